"""The API reference (docs/api.md) documents every public name under its public path."""

import re
from pathlib import Path

import frog

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_reference_lists_every_public_name():
    documented = re.findall(r"^::: frog\.(\w+)$", API.read_text(), flags=re.MULTILINE)
    assert sorted(documented) == sorted(frog.__all__)
