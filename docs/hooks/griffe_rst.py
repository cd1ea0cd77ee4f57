"""A griffe extension for the API reference (mkdocs.yml): frog's docstrings are Google style with a
few reStructuredText habits, which Markdown would print as they are. Before griffe parses a
docstring this turns

- the roles :func:`x`, :meth:`x`, :class:`x`, :mod:`x`, ... into code spans `x` (`~a.b` -> `b`);
- a literal block, "Example::" or "... text. ::" followed by an indented block, into "Example:" and
  a fenced Python block;
- a `*` that opens a shape, as in (k, *shape), into `\\*`, so that Markdown does not start emphasis.

The docstrings in src/ stay as they are; only their rendering changes.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):`~?([^`]+)`")
STAR = re.compile(r"(?<=[\s(,\[])\*(?=[\w(])")


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    whole = match.group(0)
    return f"`{target.rsplit('.', 1)[-1] if ':`~' in whole else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_end = j
        while block_end < len(lines) and (not lines[block_end].strip() or _indent(lines[block_end]) > base):
            block_end += 1
        block = lines[j:block_end]
        while block and not block[-1].strip():
            block.pop()
        if not block:  # no literal block after all
            out.append(line)
            i += 1
            continue
        head = line.rstrip()
        head = head[:-3].rstrip() if head.endswith(" ::") else head[:-1]
        if head.strip():
            out += [head, ""]
        cut = min(_indent(b) for b in block if b.strip())
        pad = " " * base
        out += [pad + "```python", *[pad + b[cut:] if b.strip() else "" for b in block], pad + "```"]
        if block_end < len(lines):
            out.append("")
        i = block_end
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """The docstring `text` with its reStructuredText habits turned into Markdown."""
    parts = re.split(r"(``[^`]*``|`[^`]*`)", ROLE.sub(_role, _literal_blocks(text)))
    return "".join(part if part.startswith("`") else STAR.sub(r"\\*", part) for part in parts)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
