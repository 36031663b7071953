"""results.csv: the long-format table, one row per cell, appended as each cell finishes.

Column groups, in order: identity and configuration (ctxbench.core.cell.key_columns: the
implementation, the length, the kind, the shared configuration, every kind's fields), outcome,
every kind's measured columns (ctxbench.core.kinds: Kind.columns, in the kinds' order),
bookkeeping, environment (ctxbench.core.env). The schema is the registered kinds': a kind adds
its columns by declaring them.

Older files stay readable: a configuration column a file lacks reads as its value for rows
without it (Field.absent), the kind's field values of another kind read as absent too (a
kernel row of an old strided run said ppl_scheme=strided), and the column `task` of files
written before kinds had that name is read as `kind` (and written back under its own name when
such a run resumes).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterable

from ctxbench.core import kinds
from ctxbench.core.cell import CONFIG_FIELDS, key_columns, key_text
from ctxbench.core.env import ENV_FIELDS

STATUSES = ("ok", "oom", "error", "timeout", "unsupported", "wrong", "skipped")
BOOKKEEPING = ("impl_exact", "rep_ms", "seed", "wall_s", "log", "finished_at")
# Columns renamed since the first release: old name -> name.
RENAMED = {"task": "kind"}


def columns() -> tuple[str, ...]:
    """Every column of results.csv, in order."""
    return ("run_id", *key_columns(), "status", "message", *kinds.measured_columns(), *BOOKKEEPING, *ENV_FIELDS)


def absent_values() -> dict[str, str]:
    """The value of each configuration column in a row (or a file) that lacks it."""
    # sinks came after the first release; rows from before kinds are of the oldest kind
    return {"kind": kinds.oldest(), "sinks": "0", **{f.name: f.absent for f in kinds.fields()}}


class UnknownColumns(ValueError):
    """A row carries a key the CSV schema does not have (a measurement bug)."""


class CorruptResults(ValueError):
    """results.csv can't be read as a ctxbench table; the message names the line."""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if value == value else ""  # NaN -> empty
    return str(value)


class ResultsWriter:
    """Appends rows to results.csv, writing the header when the file is new.

    Each row is written with one write() and flushed and fsynced, so a killed sweep leaves
    at most the row in flight unwritten. An existing file keeps its own header (a run from
    an older ctxbench resumes with its columns; new columns are left out of it, renamed ones
    keep their old name).
    """

    def __init__(self, path: str, header: Iterable[str] | None = None) -> None:
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.header = list(header) if header is not None else list(columns())
        self.schema = frozenset(columns())
        if new:
            self._write_line(self.header)

    def _write_line(self, values: list[str]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict[str, Any]) -> None:
        """Append one row; missing columns are left empty.

        A key that is not a column of the schema (columns()) is a bug in whatever measured the
        row, and raises UnknownColumns instead of vanishing. Columns of the schema that an
        older run's header lacks are left out of that run's file (it resumes with its columns).
        """
        unknown = [k for k in row if k not in self.schema]
        if unknown:
            raise UnknownColumns(f"row has keys that are not results.csv columns: {', '.join(unknown)}; a kind "
                                 "declares its measured columns in Kind.columns")
        self._write_line([_fmt(row.get(RENAMED.get(c, c))) for c in self.header])


def normalize(row: dict[str, str]) -> dict[str, str]:
    """A row as this ctxbench reads it: renamed columns under their names, configuration columns
    missing or empty at their absent value, and the fields of kinds other than the row's at theirs."""
    for old, name in RENAMED.items():
        if old in row and name not in row:
            row[name] = row.pop(old)
    absent = absent_values()
    for column, value in absent.items():
        if not row.get(column):  # missing, or left empty: no kind writes "" where its absent value is another
            row[column] = value
    own = {f.name for f in _kind_fields(row["kind"])}
    for f in kinds.fields():
        if f.name not in own:
            row[f.name] = f.absent
    return row


def _kind_fields(name: str) -> tuple[kinds.Field, ...]:
    try:
        return kinds.get(name).fields
    except KeyError:  # a kind this process doesn't know: keep what the row says
        return tuple(kinds.fields())


def read_results(path: str, *, repair_tail: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a results.csv; CorruptResults naming the line if it isn't one. The header
    is the file's own; the rows are normalized (normalize).

    A last line without its newline is a row that was being written when the sweep died:
    with repair_tail it is cut off the file (that cell runs again), else it is an error.
    """
    with open(path, newline="") as f:
        text = f.read()
    if not text.strip():
        raise CorruptResults(f"{path} is empty")
    if not text.endswith("\n"):
        if not repair_tail:
            raise CorruptResults(f"{path}: the last line is incomplete")
        cut = text.rfind("\n") + 1
        with open(path, "r+", newline="") as f:
            f.truncate(len(text[:cut].encode()))
        text = text[:cut]
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise CorruptResults(f"{path} line 1: not a ctxbench header ({exc})") from None
    present = {RENAMED.get(c, c) for c in header}
    required = ("impl", "n", "status", *CONFIG_FIELDS)
    missing = [c for c in required if c not in present and c not in absent_values()]
    if missing:
        raise CorruptResults(f"{path} line 1: not a ctxbench results header (missing columns: "
                             f"{', '.join(dict.fromkeys(missing))})")
    rows = []
    try:
        for values in reader:
            line = reader.line_num
            if len(values) != len(header):
                raise CorruptResults(f"{path} line {line}: {len(values)} fields where the header has {len(header)}")
            row = normalize(dict(zip(header, values)))
            if row["status"] not in STATUSES:
                raise CorruptResults(f"{path} line {line}: unknown status {row['status']!r}")
            if row["n"].endswith(".0") and row["n"][:-2].isdigit():
                row["n"] = row["n"][:-2]  # saved again by pandas (a float column): the same length
            if not row["n"].isdigit():
                raise CorruptResults(f"{path} line {line}: length {row['n']!r} is not a number")
            rows.append(row)
    except csv.Error as exc:
        raise CorruptResults(f"{path} line {reader.line_num}: {exc}") from None
    return header, rows


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    """The key of a (normalized) CSV row, comparable with Cell.key."""
    return tuple(key_text(row.get(c, "")) for c in key_columns())
