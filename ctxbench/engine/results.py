"""results.csv: the long-format table, one row per cell, appended as each cell finishes.

Column groups, in order: identity (run, implementation, length), configuration, outcome,
measurements (see ctxbench.measurements.kernel.measure), bookkeeping, environment (see ctxbench.core.env).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterable

from ctxbench.core.env import ENV_FIELDS
from ctxbench.engine.plan import KEY_FIELDS

STATUSES = ("ok", "oom", "error", "timeout", "unsupported", "wrong", "skipped")

CONFIG_COLUMNS = ("impl", "n", "query_len", "task", "rope", "batch", "heads", "kv_heads", "head_dim", "dtype",
                  "mask", "window", "sinks", "mode", "device", "allow_interpreter", "ppl_scheme",
                  "ragged", "kv_lens", "page_size",  # the KV layout (ctxbench.core.kv_layout)
                  "depth", "trial",  # passkey and retrieval cells: the key's depth (fraction of the haystack) and trial
                  "ruler_task", "policy", "kv_budget")  # ruler cells: RULER task, KV-cache policy, budget as given
# Key columns added after the first release, with the value every row of an older run has.
KEY_DEFAULTS = {"task": "kernel", "rope": "default", "sinks": "0", "ppl_scheme": "truncated", "depth": "",
                "trial": "", "query_len": "", "ragged": "False", "kv_lens": "", "page_size": "",
                "ruler_task": "", "policy": "", "kv_budget": ""}
MEASURE_COLUMNS = (
    "latency_ms", "latency_p20_ms", "latency_p80_ms", "latency_min_ms", "repeats",  # ms; timed calls
    "latency_samples_ms",                              # every timed call, ms, ';'-separated (ctxbench compare)
    "timing_method",                                   # perf_counter, cuda_events or cuda_graph (replays)
    "setup_ms", "setup_mem_bytes",                     # the setup step, once per cell: ms; bytes it keeps
    "first_call_ms",                                   # ms; compilation and autotuning happen in it
    "flops", "tflops", "peak_fraction",                # FLOPs of one call; TFLOP/s at the median
    # forward cells: the minimum traffic of one call (bytes: Q, the K and V some query sees, O),
    # GB/s at the median and its fraction of the device bandwidth; that bandwidth (GB/s), what
    # the run's probe measured (GB/s) and where the bandwidth comes from (ctxbench.engine.bandwidth)
    "bytes_moved", "gbps", "bw_fraction", "device_bw_gbps", "device_bw_probe_gbps", "device_bw_source",
    "kv_lens_used",                                    # ragged or paged cells: KV tokens per sequence
    "peak_mem_bytes", "mem_method",                    # bytes above the inputs; how it was read
    "err_rel_l2", "err_max_abs", "err_rows", "err_tolerance", "grad_err_rel_l2",
    "impl_info",                                       # JSON the implementation reports (config chosen, ...)
    # perplexity cells (task=perplexity, ctxbench.measurements.perplexity.measure): perplexity and bits per byte over
    # the scored tokens, how many tokens and bytes were scored, in how many windows, the scored
    # tail per window (strided), mean NLL (nats) per position bin (JSON), the model, the corpus
    # hash, and tokens through the model per second of forward passes
    "ppl", "bits_per_byte", "ppl_tokens", "ppl_bytes", "ppl_windows", "ppl_stride", "loss_curve",
    "model", "corpus_sha256", "tokens_per_s",
    # passkey cells (task=passkey, ctxbench.measurements.passkey.measure; `model` as above): the 5-digit key hidden in
    # the prompt, the teacher-forced argmax text at the answer positions (greedy decoding's output
    # up to its first wrong token), 1 when greedy decoding retrieves the key exactly else 0, and
    # the prompt's length in tokens (prompt and answer: N)
    "key", "predicted", "correct", "n_tokens",
    # decode cells (task=decode, ctxbench.measurements.decode.measure; `model`, `predicted` (the greedy text),
    # `n_tokens` (the prompt) and `tokens_per_s` as above): prefill ms, median ms per generated
    # token, bytes of the KV cache held, tokens generated, leading tokens equal to transformers'
    # sdpa attention's
    "prefill_ms", "ms_per_token", "kv_cache_bytes", "decode_tokens", "tokens_match",
    # ruler cells (tasks retrieval and continuation, ctxbench.measurements.ruler.compression; prefill_ms,
    # ms_per_token, kv_cache_bytes (the compressed cache), predicted, n_tokens, model and
    # ppl/ppl_tokens (continuation) as above): the answers expected (';'-separated), RULER's
    # recall of them in the greedy text (0..1), ms of the policy's own scoring and selection
    # (inside prefill_ms), and the cached tokens per layer and head the policy kept
    "expected", "score", "selection_ms", "kv_kept",
    # distributed implementations (ctxbench.measurements.kernel.sharded): ranks, each rank's peak memory (JSON
    # list, bytes; peak_mem_bytes is the largest), and the share of a call's time spent waiting
    # for communication (mean over ranks and timed calls)
    "world_size", "peak_mem_rank_bytes", "comm_fraction",
)
COLUMNS: tuple[str, ...] = (
    ("run_id",) + CONFIG_COLUMNS + ("status", "message") + MEASURE_COLUMNS
    + ("impl_exact", "rep_ms", "seed", "wall_s", "log", "finished_at") + ENV_FIELDS
)
assert set(KEY_FIELDS) <= set(COLUMNS), "every Cell field must be a CSV column"


_SCHEMA = frozenset(COLUMNS)


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
    an older ctxbench resumes with its columns; new columns are left out of it).
    """

    def __init__(self, path: str, header: Iterable[str] | None = None) -> None:
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.header = list(header) if header is not None else list(COLUMNS)
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

        A key that is not a column of the schema (COLUMNS) is a bug in whatever measured the
        row, and raises UnknownColumns instead of vanishing. Columns of the schema that an
        older run's header lacks are left out of that run's file (it resumes with its columns).
        """
        unknown = [k for k in row if k not in _SCHEMA]
        if unknown:
            raise UnknownColumns(f"row has keys that are not results.csv columns: {', '.join(unknown)}; "
                                 "add them to ctxbench.engine.results.COLUMNS")
        self._write_line([_fmt(row.get(c)) for c in self.header])


def read_results(path: str, *, repair_tail: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a results.csv; CorruptResults naming the line if it isn't one.

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
    missing = [c for c in ("impl", "n", "status") + KEY_FIELDS if c not in header and c not in KEY_DEFAULTS]
    if missing:
        raise CorruptResults(f"{path} line 1: not a ctxbench results header (missing columns: "
                             f"{', '.join(dict.fromkeys(missing))})")
    absent = {c: v for c, v in KEY_DEFAULTS.items() if c not in header}  # a run from an older ctxbench
    rows = []
    try:
        for values in reader:
            line = reader.line_num
            if len(values) != len(header):
                raise CorruptResults(f"{path} line {line}: {len(values)} fields where the header has {len(header)}")
            row = dict(zip(header, values))
            row.update(absent)
            if row["status"] not in STATUSES:
                raise CorruptResults(f"{path} line {line}: unknown status {row['status']!r}")
            if not row["n"].isdigit():
                raise CorruptResults(f"{path} line {line}: length {row['n']!r} is not a number")
            rows.append(row)
    except csv.Error as exc:
        raise CorruptResults(f"{path} line {reader.line_num}: {exc}") from None
    return header, rows


def row_key(row: dict[str, str]) -> tuple:
    """The key of a CSV row, comparable with Cell.key."""
    return tuple(row.get(f, "") for f in KEY_FIELDS)
