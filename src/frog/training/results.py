"""Result files written as results come: CSV rows appended and flushed one at a time."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]  # a CSV row: written from any values (:func:`text`), read back as strings


def prepare_out_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable; ValueError that names it otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".frog-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {out}: {error.strerror or error}") from None
    return out


class CsvLog:
    """Append-only CSV with a fixed header; rows already in the file are kept (a rerun resumes).

    A file whose header is the start of ``columns`` (written before columns were added) gets the
    new columns, filled in its old rows from ``defaults`` (what the older frog did), else empty.

    ``done(key_columns)`` lists the key tuples already written, so a caller can skip them.
    """

    def __init__(self, path: str | Path, columns: Sequence[str], defaults: dict[str, object] | None = None) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.rows: list[Row] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            header, self.rows = read_csv(self.path)
            if header != self.columns and self.columns[: len(header)] == header:  # written by an older frog
                filled = {c: text((defaults or {}).get(c)) for c in self.columns[len(header):]}
                self.rows = [{**filled, **row} for row in self.rows]
                write_csv(self.path, self.columns, self.rows)
                header = self.columns
            if header != self.columns:
                raise ValueError(
                    f"{self.path} has columns {header}, expected {self.columns}; "
                    "use another output folder or delete the file"
                )
        else:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def done(self, key_columns: Iterable[str]) -> set[tuple[str, ...]]:
        """Key tuples (as strings) of the rows already written."""
        keys = list(key_columns)
        return {tuple(row[c] for c in keys) for row in self.rows}

    def append(self, row: Row) -> None:
        """Write one row at once (missing columns stay empty)."""
        written = {c: text(row.get(c, "")) for c in self.columns}
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([written[c] for c in self.columns])
        self.rows.append(written)


def read_csv(path: str | Path) -> tuple[list[str], list[Row]]:
    """Header and rows (dicts of strings) of a CSV file."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Row]) -> Path:
    """Write a whole (derived) table at once, replacing the file."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([text(row.get(c, "")) for c in columns])
    return Path(path)


def text(value: object) -> str:
    """How a value is written to CSV: true/false, repr for floats, empty for None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)
