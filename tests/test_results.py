"""results.csv's schema: a row key the schema lacks fails loudly instead of vanishing."""

from __future__ import annotations

import random

import pytest

from ctxbench.engine.results import ResultsWriter, UnknownColumns, columns, read_results


def test_unknown_key_raises_and_writes_nothing(tmp_path):
    path = str(tmp_path / "results.csv")
    writer = ResultsWriter(path)
    with pytest.raises(UnknownColumns, match="latency_typo"):
        writer.append({"impl": "sdpa", "n": 64, "status": "ok", "latency_typo": 1.0})
    header, rows = read_results(path)
    assert header == list(columns()) and rows == []


def test_known_keys_round_trip(tmp_path):
    rng = random.Random(0)
    path = str(tmp_path / "results.csv")
    writer = ResultsWriter(path)
    value = rng.uniform(0.1, 100.0)
    writer.append({"impl": "sdpa", "n": 64, "status": "ok", "latency_ms": value})
    _, rows = read_results(path)
    assert float(rows[0]["latency_ms"]) == value


def test_older_header_keeps_its_columns(tmp_path):
    """A run written by an older ctxbench resumes with its own header: schema columns it lacks
    are left out of that file, and that is not an error."""
    path = str(tmp_path / "results.csv")
    old_header = [c for c in columns() if c not in ("loss_curve", "world_size")]
    writer = ResultsWriter(path, old_header)
    writer.append({"impl": "sdpa", "n": 64, "status": "ok", "world_size": 2})
    header, rows = read_results(path)
    assert header == old_header and "world_size" not in rows[0]
