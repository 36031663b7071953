"""`ctxbench compare BASELINE CURRENT`: what changed between two sweeps, and is it a regression.
`ctxbench compare RUN`: the same within one A/B run, X@<commit> (the baseline) against X.

Each side is a results.csv, a run folder, or a folder of run folders (benchmarks/gpu_check.sh's
OUTDIR). Rows are joined on their configuration, by value (0, 0.0 and "0" are one cell; a blank
equals NaN); for each pair the latency, TFLOP/s, peak memory, error, perplexity and status are
compared and a markdown table is printed. With one RUN, the rows of each X@<commit> are the
baseline and those of X the current side (ctxbench.core.revisions; their timed calls were
interleaved, ctxbench.engine.interleave). A regression is any of:

* latency: slower by more than --max-slowdown, beyond the run-to-run spread: a one-sided
  Mann-Whitney U test that the current repeats are larger than the baseline's repeats scaled by
  (1 + max slowdown), or p20/p80 separation for rows without samples;
* peak memory grown by more than --max-memory-growth (and by at least --min-memory-growth bytes:
  a CPU reading has page-sized noise that is a large fraction of a small cell);
* perplexity up by more than --max-ppl-increase;
* a retrieval score (passkey's `correct`, ctxbench ruler's `score`, 0..1) down by more than
  --max-score-drop (points: 0.1 is ten points of percent; by default any drop);
* a status that was ok and is anything else;
* an error that went over its tolerance;
* a gated value (latency, peak memory, perplexity, a score) the baseline has and an ok current
  row lacks;
* a cell of the baseline missing from the current run (unless --allow-missing).

And the comparison fails as bad input (exit 2) when fewer cells are in common than --min-common
(a count, or a percentage of the baseline's cells): a gate never passes because it compared nothing.

With --normalize-by IMPL every latency (and every repeat) is divided by IMPL's latency in the
same cell of the same run first, which cancels the speed of the machine each run had. The latency
is the median of the repeats, or with --statistic min their minimum (on a shared CPU interference
only adds time, so the minimum moves least between unchanged runs).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from ctxbench.core import kinds
from ctxbench.core.cell import key_columns as config_columns
from ctxbench.core.formatting import human_bytes, human_ms, number
from ctxbench.engine.results import CorruptResults, read_results
from ctxbench.reports.markdown import markdown_table

# Environment columns worth a note when they differ: they explain a change without being one.
ENV_NOTE_COLUMNS = ("device_name", "torch_version", "torch_threads", "cpu_count", "git_commit")
# Significance level of the slowdown test.
ALPHA = 0.05
# The latency statistic a slowdown is measured on: the median is the CSV's `latency_ms`; the
# minimum suits a shared CPU, where interference only ever adds time to a call.
LATENCY_COLUMNS = {"median": "latency_ms", "min": "latency_min_ms"}

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Input compare cannot use (missing, not a ctxbench CSV, nothing in common): one line, exit 2."""


@dataclass(frozen=True)
class Thresholds:
    """What counts as a regression. Fractions, not percent: 0.10 is 10%."""

    max_slowdown: float = 0.10
    max_memory_growth: float = 0.05
    max_ppl_increase: float = 0.005
    max_score_drop: float = 0.0  # absolute, on scores in [0, 1]
    min_memory_growth_bytes: int = 2**20
    alpha: float = ALPHA
    statistic: str = "median"  # the latency the slowdown threshold applies to: a key of LATENCY_COLUMNS
    allow_missing: bool = False  # a baseline cell absent from the current run is not a regression
    min_common: float = 0.5  # fewest cells in common: a count (>= 1) or a fraction of the baseline's (< 1)


@dataclass
class Table:
    """One side of the comparison: where it came from and its rows (CSV strings)."""

    label: str  # BASELINE or CURRENT
    path: str
    header: list[str]
    rows: list[dict[str, str]]


# ---------------------------------------------------------------- loading

def _read_csv(path: str, label: str) -> tuple[list[str], list[dict[str, str]]]:
    try:
        return read_results(path)
    except CorruptResults as exc:
        raise BadInput(f"{label} {path} is not a ctxbench results CSV ({exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"{label} {path} is not a ctxbench results CSV ({type(exc).__name__})") from None
    except OSError as exc:
        raise BadInput(f"{label} {path} cannot be read ({exc.strerror or exc})") from None


def load_table(path: str, label: str) -> Table:
    """A results.csv, a run folder (its results.csv) or a folder of run folders (every */results.csv)."""
    if not os.path.exists(path):
        raise BadInput(f"{label} {path}: no such file or folder; give a results.csv or a run folder")
    if os.path.isdir(path):
        own = os.path.join(path, "results.csv")
        paths = [own] if os.path.exists(own) else sorted(glob.glob(os.path.join(path, "*", "results.csv")))
        if not paths:
            raise BadInput(f"{label} {path} is a folder without results.csv (nor run folders holding one), "
                           "so not a ctxbench run folder")
    else:
        paths = [path]
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for p in paths:
        h, r = _read_csv(p, label)
        # Columns read_results filled in for an older CSV count as present.
        header += [c for c in list(h) + list(r[0] if r else []) if c not in header]
        rows += r
    if not rows:
        raise BadInput(f"{label} {path} has a header but no rows")
    return Table(label=label, path=path, header=header, rows=rows)


def key_columns(base: Table, cur: Table) -> list[str]:
    """The configuration columns rows are joined on (ctxbench.core.cell.key_columns: the kind, the shared
    configuration and every kind's fields) that both tables have.

    A column only one side has (a baseline from before it existed) cannot be joined on; read_results
    fills the ones it knows a default for, so those are on both sides.
    """
    return [c for c in config_columns() if c in base.header and c in cur.header]


def key_value(text: str | None) -> str:
    """A configuration value as compared: numbers by value ("0", "0.0" and "0e0" are "0"), a blank
    and NaN alike (""), anything else as written. A CSV saved again by pandas still joins."""
    text = (text or "").strip()
    try:
        value = float(text)
    except ValueError:
        return text
    if value != value:  # NaN
        return ""
    return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)


def _index(table: Table, keys: list[str]) -> tuple[dict[tuple, dict[str, str]], int]:
    """Rows by key (a later row for the same configuration wins, as in a resumed run) and the duplicates."""
    out: dict[tuple, dict[str, str]] = {}
    dups = 0
    for r in table.rows:
        k = tuple(key_value(r.get(c)) for c in keys)
        dups += k in out
        out[k] = r
    return out, dups


def _why_disjoint(base: Table, cur: Table, keys: list[str]) -> str:
    parts = []
    for c in keys:
        a = sorted({r.get(c, "") for r in base.rows})
        b = sorted({r.get(c, "") for r in cur.rows})
        if not set(a) & set(b):
            parts.append(f"{c} {_few(a)} vs {_few(b)}")
    if not parts:  # every column shares a value, but no combination matches
        parts = [f"{c} {_few(sorted({r.get(c, '') for r in base.rows}))} vs "
                 f"{_few(sorted({r.get(c, '') for r in cur.rows}))}" for c in keys
                 if {r.get(c, "") for r in base.rows} != {r.get(c, "") for r in cur.rows}]
    return "; ".join(parts) or "every configuration column has the same values, yet no combination matches"


def _few(values: list[str]) -> str:
    shown = ",".join(v or "''" for v in values[:4])
    return shown + (f",... ({len(values)} values)" if len(values) > 4 else "")


# ---------------------------------------------------------------- numbers

def _num(row: dict[str, str] | None, col: str) -> float | None:
    return None if row is None else number(row.get(col))


def _series(row: dict[str, str], column: str) -> list[float]:
    """A ';'-separated column of numbers; [] where it is blank, absent or not numbers."""
    text = row.get(column, "") or ""
    try:
        return [float(x) for x in text.split(";") if x]
    except ValueError:
        return []


def samples(row: dict[str, str]) -> list[float]:
    """Per-repeat latencies (ms) of a row; [] for a CSV written before they were recorded."""
    return _series(row, "latency_samples_ms")


def _ref_latencies(table: Table, keys: list[str], impl: str, column: str) -> dict[tuple, float]:
    """impl's latency (ms, `column`) in every cell of the table, by the key without the impl."""
    i = keys.index("impl")
    out = {}
    for r in table.rows:
        lat = _num(r, column)
        if r.get("impl") == impl and r.get("status") == "ok" and lat and lat > 0:
            k = tuple(key_value(r.get(c)) for c in keys)
            out[k[:i] + k[i + 1:]] = lat
    return out


@dataclass
class Latency:
    """A latency comparison of one cell: the ratio of latencies and the spread test."""

    ratio: float | None                # current / baseline latency (normalized when asked)
    raw_ratio: float | None            # current / baseline latency, as measured
    p_value: float | None = None       # of the test, None when it had no samples
    significant: bool | None = None    # the change exceeds the run-to-run spread
    test: str = ""
    note: str = ""


def slowdown_test(base: list[float], cur: list[float], alpha: float, margin: float = 0.0) -> tuple[float, bool]:
    """One-sided Mann-Whitney U: p-value that `cur` is not larger than `base` scaled by
    (1 + margin), and p <= alpha. With margin the allowed slowdown (0.05: 5%), a significant
    result says "slower by more than the margin", not merely "slower".

    Ranks only, so one descheduled repeat (a 10x outlier on a shared machine) counts as one
    repeat. Exact distribution for small samples without ties (scipy's method='auto').
    """
    from scipy.stats import mannwhitneyu

    p = float(mannwhitneyu(cur, [x * (1 + margin) for x in base], alternative="greater").pvalue)
    # 3 repeats against 3 can reach p = 1/20 = alpha exactly; allow for its rounding.
    return p, p <= alpha * (1 + 1e-9)


def paired_test(ratios: list[float], alpha: float, margin: float = 0.0) -> tuple[float, bool]:
    """One-sided Wilcoxon signed-rank test on per-round ratios (current / baseline, each pair of
    adjacent interleaved rounds of an A/B run): p-value that the ratios are not above 1 + margin,
    and p <= alpha. Pairing cancels what the machine did during both rounds of a pair."""
    from scipy.stats import wilcoxon

    shifted = [math.log(r) - math.log1p(margin) for r in ratios]
    if not any(shifted):
        return 1.0, False
    p = float(wilcoxon(shifted, alternative="greater").pvalue)
    return p, p <= alpha * (1 + 1e-9)


def round_latencies(row: dict[str, str]) -> list[float]:
    """Per-round medians (ms) of a row measured in interleaved rounds; [] for any other row."""
    return _series(row, "round_latency_ms")


# Fewest interleaved rounds for the paired test (with fewer its p-value cannot reach 0.05 reliably).
MIN_PAIRED_ROUNDS = 6

TEST_NAMES = {
    "paired": "one-sided Wilcoxon signed-rank of the per-round ratios (adjacent interleaved rounds, current / "
              "baseline) against 1 + the threshold",
    "mwu": "one-sided Mann-Whitney U of the current repeats against the baseline's scaled by (1 + the threshold)",
    "p20p80": "p20/p80 separation (current p20 above baseline p80 scaled by (1 + the threshold))",
    "none": "none (no spread recorded; threshold only)",
}


def compare_latency(b: dict[str, str], c: dict[str, str], b_ref: float | None, c_ref: float | None,
                    normalize_by: str | None, alpha: float, column: str = "latency_ms",
                    margin: float = 0.0, one_run: bool = False) -> Latency:
    """Latency change of one cell (`column`, ms), normalized by the reference implementation's when
    asked; significant when slower by more than `margin` (a fraction) beyond the spread. one_run:
    both rows come from one A/B run, whose paired rounds are then tested (paired_test)."""
    bl, cl = _num(b, column), _num(c, column)
    if not bl or not cl or b.get("status") not in ("ok", "wrong") or c.get("status") not in ("ok", "wrong"):
        return Latency(None, None)
    raw = cl / bl
    if normalize_by is None:
        bs = cs = 1.0
    elif b_ref is None or c_ref is None:
        return Latency(None, raw, note=f"no ok {normalize_by} row in this cell of the "
                                       f"{'baseline' if b_ref is None else 'current run'} to normalize by")
    else:
        bs, cs = b_ref, c_ref
    ratio = (cl / cs) / (bl / bs)
    b_rounds, c_rounds = round_latencies(b), round_latencies(c)
    # paired only when the two rows' rounds really ran side by side: the same A/B pair of one run
    # (ctxbench.engine.interleave's ab_pair), never two runs or a side re-measured on resume
    same_pair = one_run and bool(b.get("ab_pair")) and b.get("ab_pair") == c.get("ab_pair")
    if normalize_by is None and same_pair and len(b_rounds) == len(c_rounds) >= MIN_PAIRED_ROUNDS \
            and min(b_rounds + c_rounds) > 0:
        # one A/B run (ctxbench.engine.interleave): round i of each side ran next to the other's
        ratios = sorted(cr / br for br, cr in zip(b_rounds, c_rounds))
        p, sig = paired_test(ratios, alpha, margin)
        return Latency(statistics.median(ratios), raw, p, sig, "paired")
    b_samples, c_samples = samples(b), samples(c)
    if len(b_samples) >= 2 and len(c_samples) >= 2:
        p, sig = slowdown_test([x / bs for x in b_samples], [x / cs for x in c_samples], alpha, margin)
        return Latency(ratio, raw, p, sig, "mwu")
    b80, c20 = _num(b, "latency_p80_ms"), _num(c, "latency_p20_ms")
    if b80 is not None and c20 is not None:
        return Latency(ratio, raw, None, c20 / cs > (1 + margin) * b80 / bs, "p20p80")
    return Latency(ratio, raw, None, True, "none")


@dataclass
class Change:
    """The comparison of one joined cell."""

    key: dict[str, str]
    base: dict[str, str]
    cur: dict[str, str]
    latency: Latency
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _rel(b: float | None, c: float | None) -> float | None:
    return (c / b - 1) if b and c is not None and b > 0 else None


def judge(change: Change, t: Thresholds) -> None:
    """Fill change.regressions (what fails the gate) and change.notes (what does not)."""
    b, c, lat = change.base, change.cur, change.latency
    bs, cs = b.get("status", ""), c.get("status", "")
    if bs == "ok" and cs != "ok":
        change.regressions.append(f"status ok -> {cs}")
    berr, btol, cerr, ctol = _num(b, "err_rel_l2"), _num(b, "err_tolerance"), _num(c, "err_rel_l2"), _num(c, "err_tolerance")
    if cerr is not None and ctol is not None and cerr > ctol and not (berr is not None and btol is not None and berr > btol):
        change.regressions.append(f"error {cerr:.1e} over tolerance {ctol:.0e}")
    if lat.ratio is not None and lat.ratio - 1 > t.max_slowdown:
        what = f"slower {100 * (lat.ratio - 1):+.1f}%"
        if lat.significant:
            change.regressions.append(what + (f" (p={lat.p_value:.2g})" if lat.p_value is not None else ""))
        else:
            change.notes.append(what + " but within the run-to-run spread"
                                + (f" (p={lat.p_value:.2g})" if lat.p_value is not None else ""))
    if lat.note:
        change.notes.append(lat.note)
    bm, cm = _num(b, "peak_mem_bytes"), _num(c, "peak_mem_bytes")
    growth = _rel(bm, cm)
    if growth is not None and growth > t.max_memory_growth:
        assert bm is not None and cm is not None
        what = f"memory {100 * growth:+.1f}% ({human_bytes(cm - bm)})"
        if cm - bm >= t.min_memory_growth_bytes:
            change.regressions.append(what)
        else:
            change.notes.append(what + f", under the {human_bytes(t.min_memory_growth_bytes)} floor")
    ppl = _rel(_num(b, "ppl"), _num(c, "ppl"))
    if ppl is not None and ppl > t.max_ppl_increase:
        change.regressions.append(f"perplexity {100 * ppl:+.2f}%")
    for col in kinds.score_columns():  # each kind names its scores in [0, 1] (Kind.score_columns)
        bq, cq = _num(b, col), _num(c, col)
        if bq is not None and cq is not None and bq - cq > t.max_score_drop + 1e-12:
            change.regressions.append(f"{col} {100 * bq:.0f}% -> {100 * cq:.0f}%")
    if cs == "ok":  # an ok row that lost a gated number would otherwise pass every check above
        for col in (LATENCY_COLUMNS[t.statistic], "peak_mem_bytes", "ppl", *kinds.score_columns()):
            if _num(b, col) is not None and _num(c, col) is None:
                change.regressions.append(f"{col} missing (baseline {b.get(col)})")


@dataclass
class Comparison:
    """Everything `ctxbench compare` found; `markdown()` is what it prints."""

    base: Table
    cur: Table
    keys: list[str]
    changes: list[Change]
    thresholds: Thresholds
    normalize_by: str | None
    only_base: int = 0
    only_cur: int = 0
    notes: list[str] = field(default_factory=list)
    # The baseline's cells the current run lacks (their keys), a regression unless allowed.
    missing: list[dict[str, str]] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [ch for ch in self.changes if ch.regressions]

    @property
    def missing_fails(self) -> bool:
        return bool(self.missing) and not self.thresholds.allow_missing

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.regressions or self.missing_fails else EXIT_OK

    def tests_used(self) -> list[str]:
        return sorted({ch.latency.test for ch in self.changes if ch.latency.test})

    def worst(self) -> dict[str, tuple[float, Change] | None]:
        """The largest latency ratio, memory growth and perplexity rise over all cells (for choosing thresholds)."""
        def top(values: list[tuple[float, Change]]) -> tuple[float, Change] | None:
            return max(values, key=lambda v: v[0]) if values else None

        lat = [(ch.latency.ratio - 1, ch) for ch in self.changes if ch.latency.ratio is not None]
        mem = [(g, ch) for ch in self.changes
               if (g := _rel(_num(ch.base, "peak_mem_bytes"), _num(ch.cur, "peak_mem_bytes"))) is not None]
        ppl = [(g, ch) for ch in self.changes if (g := _rel(_num(ch.base, "ppl"), _num(ch.cur, "ppl"))) is not None]
        return {"latency": top(lat), "memory": top(mem), "ppl": top(ppl)}

    def markdown(self) -> str:
        return render_markdown(self)


def compare_tables(base: Table, cur: Table, thresholds: Thresholds = Thresholds(),
                   normalize_by: str | None = None, one_run: bool = False) -> Comparison:
    """Join base and cur on their configuration and judge every cell both have. one_run: the two
    sides of one A/B run (split_revisions), whose interleaved rounds pair."""
    keys = key_columns(base, cur)
    bi, bdup = _index(base, keys)
    ci, cdup = _index(cur, keys)
    common = [k for k in bi if k in ci]
    if not common:
        raise BadInput(f"no rows in common between BASELINE {base.path} and CURRENT {cur.path}; "
                       f"configurations differ: {_why_disjoint(base, cur, keys)}")
    needed = (thresholds.min_common if thresholds.min_common >= 1
              else max(1, math.ceil(thresholds.min_common * len(bi) - 1e-9)))
    if len(common) < needed:
        raise BadInput(f"only {len(common)} of the baseline's {len(bi)} cells are in the current run (at least "
                       f"{needed:g} needed, --min-common); configurations differ: {_why_disjoint(base, cur, keys)}")
    column = LATENCY_COLUMNS[thresholds.statistic]
    b_ref = c_ref = {}
    if normalize_by is not None:
        b_ref, c_ref = (_ref_latencies(base, keys, normalize_by, column),
                        _ref_latencies(cur, keys, normalize_by, column))
        for table, ref in ((base, b_ref), (cur, c_ref)):
            if not ref:
                raise BadInput(f"--normalize-by {normalize_by}: {table.label} {table.path} has no ok row of {normalize_by}; "
                               f"normalize by an implementation both runs measured")
    i = keys.index("impl")
    changes = []
    for k in common:
        cell = k[:i] + k[i + 1:]
        lat = compare_latency(bi[k], ci[k], b_ref.get(cell), c_ref.get(cell), normalize_by, thresholds.alpha,
                              column, thresholds.max_slowdown, one_run)
        ch = Change(key=dict(zip(keys, k)), base=bi[k], cur=ci[k], latency=lat)
        judge(ch, thresholds)
        changes.append(ch)
    comp = Comparison(base=base, cur=cur, keys=keys, changes=changes, thresholds=thresholds,
                      normalize_by=normalize_by, only_base=len(bi) - len(common), only_cur=len(ci) - len(common),
                      missing=[dict(zip(keys, k)) for k in bi if k not in ci])
    for table, n in ((base, bdup), (cur, cdup)):
        if n:
            comp.notes.append(f"{table.label} {table.path} has {n} rows repeating a configuration; "
                              "the last of each is used")
    one_sided = [c for c in config_columns() if (c in base.header) != (c in cur.header)]
    if one_sided:
        comp.notes.append(f"not joined on {', '.join(one_sided)} (present in only one of the files)")
    for col in ENV_NOTE_COLUMNS:
        a = sorted({r.get(col, "") for r in base.rows} - {""})
        b = sorted({r.get(col, "") for r in cur.rows} - {""})
        if a and b and a != b:
            comp.notes.append(f"{col} differs: {_few(a)} (baseline) vs {_few(b)} (current)")
    return comp


# ---------------------------------------------------------------- output

def _pct(ratio: float | None) -> str:
    return "" if ratio is None else f"{100 * (ratio - 1):+.1f}%"


def _pair(b: float | None, c: float | None, fmt: Any) -> str:
    return f"{fmt(b) if b is not None else '-'} → {fmt(c) if c is not None else '-'}"


def cell_name(ch: Change, shown_keys: list[str]) -> str:
    """A changed cell as "impl N=n", plus the key columns that tell it apart from the others
    (a ruler cell's task, policy and budget)."""
    extra = [f"{k}={ch.key[k]}" for k in shown_keys if k not in ("impl", "n") and ch.key[k] not in ("", None)]
    return " ".join([f"{ch.key['impl']} N={ch.key['n']}", *extra])


def render_markdown(comp: Comparison) -> str:
    """The table of changes and the verdict, as GitHub markdown."""
    t = comp.thresholds
    shown_keys = ["impl", "n"] + [k for k in comp.keys if k not in ("impl", "n")
                                  and len({ch.key[k] for ch in comp.changes}) > 1]
    has_ppl = any(_num(ch.base, "ppl") is not None or _num(ch.cur, "ppl") is not None for ch in comp.changes)
    header = [("N" if k == "n" else k) for k in shown_keys] + [f"latency ({t.statistic})", "Δ latency"]
    paired = not comp.normalize_by and "paired" in comp.tests_used()
    if comp.normalize_by:
        header.append(f"Δ vs {comp.normalize_by}")
    elif paired:
        header.append("Δ per round")  # the median of the per-round ratios, which is judged
    header += ["p", "TFLOP/s", "peak memory", "Δ memory", "error"] + (["ppl", "Δ ppl"] if has_ppl else [])
    header += ["status", "verdict"]
    body = []
    for ch in comp.changes:
        b, c, lat = ch.base, ch.cur, ch.latency
        row = [ch.key[k] for k in shown_keys]
        column = LATENCY_COLUMNS[t.statistic]
        row += [_pair(_num(b, column), _num(c, column), human_ms), _pct(lat.raw_ratio)]
        if comp.normalize_by or paired:
            row.append(_pct(lat.ratio) if comp.normalize_by or lat.test == "paired" else "")
        row.append(f"{lat.p_value:.2g}" if lat.p_value is not None else "")
        row += [_pair(_num(b, "tflops"), _num(c, "tflops"), lambda x: f"{x:.3g}"),
                _pair(_num(b, "peak_mem_bytes"), _num(c, "peak_mem_bytes"), human_bytes),
                _pct(1 + g) if (g := _rel(_num(b, "peak_mem_bytes"), _num(c, "peak_mem_bytes"))) is not None else "",
                _pair(_num(b, "err_rel_l2"), _num(c, "err_rel_l2"), lambda x: f"{x:.1e}")]
        if has_ppl:
            g = _rel(_num(b, "ppl"), _num(c, "ppl"))
            row += [_pair(_num(b, "ppl"), _num(c, "ppl"), lambda x: f"{x:.4g}"), _pct(1 + g) if g is not None else ""]
        bs, cs = b.get("status", ""), c.get("status", "")
        row.append(bs if bs == cs else f"{bs} → {cs}")
        verdict = ("**REGRESSION**: " + "; ".join(ch.regressions)) if ch.regressions else "ok"
        if ch.notes:
            verdict += " (" + "; ".join(ch.notes) + ")"
        row.append(verdict)
        body.append(row)
    tests = "; ".join(TEST_NAMES[x] for x in comp.tests_used()) or "none (no latency compared)"
    lines = [
        "## ctxbench compare",
        "",
        f"* baseline: {_describe(comp.base)}",
        f"* current: {_describe(comp.cur)}",
        f"* joined on: {', '.join(comp.keys)}; {len(comp.changes)} cells in common"
        + (f", {comp.only_base} only in the baseline" if comp.only_base else "")
        + (f", {comp.only_cur} only in the current run" if comp.only_cur else ""),
        f"* latency ({t.statistic} of the repeats): "
        + (f"each divided by {comp.normalize_by}'s in the same cell of the same run" if comp.normalize_by
           else "interleaved rounds: the median of the per-round ratios is judged" if paired
           else "as measured (not normalized)")
        + f"; a slowdown over {100 * t.max_slowdown:g}% is a regression when the slowdown test agrees: {tests}, "
        f"alpha {t.alpha:g}",
        f"* also a regression: peak memory over +{100 * t.max_memory_growth:g}% (and at least "
        f"{human_bytes(t.min_memory_growth_bytes)}), perplexity over +{100 * t.max_ppl_increase:g}%, "
        f"a retrieval score down by more than {100 * t.max_score_drop:g} points, "
        "a status that was ok and is not, an error that went over its tolerance, a gated number an ok row lost, "
        + ("a cell of the baseline missing" if not t.allow_missing else "(missing cells allowed)"),
    ]
    lines += [f"* note: {n}" for n in comp.notes]
    lines += ["", markdown_table(header, body, left=len(shown_keys), left_last=True), ""]
    worst = comp.worst()
    extremes = []
    for name, label in (("latency", "latency" + (" (normalized)" if comp.normalize_by else "")),
                        ("memory", "peak memory"), ("ppl", "perplexity")):
        if worst[name] is not None:
            v, ch = worst[name]
            extremes.append(f"{label} {100 * v:+.1f}% ({cell_name(ch, shown_keys)})")
    regs = comp.regressions
    if comp.missing:
        names = [f"{m['impl']} N={m['n']}" + "".join(f" {k}={m[k]}" for k in shown_keys if k not in ("impl", "n")
                                                  and m.get(k) not in ("", None)) for m in comp.missing]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        lines.append(f"**{len(names)} cell{'s' if len(names) != 1 else ''} of the baseline missing** from the current "
                     f"run{' (allowed: --allow-missing)' if not comp.missing_fails else ''}: {shown}")
        lines.append("")
    if regs:
        lines.append(f"**{len(regs)} regression{'s' if len(regs) != 1 else ''}** in {len(comp.changes)} cells: "
                     + "; ".join(f"{cell_name(ch, shown_keys)}: {', '.join(ch.regressions)}" for ch in regs))
    elif comp.missing_fails:
        lines.append(f"**No regression** in the {len(comp.changes)} cells in common, but cells are missing: failed.")
    else:
        lines.append(f"**No regression** in {len(comp.changes)} cells.")
    if extremes:
        lines.append("")
        lines.append("Largest increases: " + ", ".join(extremes) + ".")
    return "\n".join(lines) + "\n"


def _describe(table: Table) -> str:
    runs = sorted({r.get("run_id", "") for r in table.rows} - {""})
    first = table.rows[0]
    return (f"{table.path} ({len(table.rows)} rows; run {_few(runs)}; "
            f"{first.get('device_name', '?')}; commit {first.get('git_commit', '') or '?'})")


def split_revisions(table: Table) -> tuple[Table, Table]:
    """(baseline, current) of one A/B run: the rows of each X@<commit> (as X) and those of X, for
    every X the run measured at both; BadInput when it measured none."""
    from ctxbench.core import revisions

    impls = list(dict.fromkeys(r.get("impl", "") for r in table.rows))  # in the order the run measured them
    paired = {}
    for name in impls:
        base, rev = revisions.split(name)
        if rev is not None and base in impls:
            paired.setdefault(base, name)  # the first revision of X, as the sweep interleaved it
    if not paired:
        raise BadInput(f"RUN {table.path} holds no implementation at a revision beside itself (X and X@REV); "
                       "give BASELINE and CURRENT, or sweep with --impls X,X@REV")
    base_rows = [dict(r, impl=revisions.split(r["impl"])[0]) for r in table.rows if r.get("impl") in paired.values()]
    cur_rows = [r for r in table.rows if r.get("impl") in paired]
    label = ", ".join(paired.values())
    return (Table("BASELINE", f"{table.path} [{label}]", table.header, base_rows),
            Table("CURRENT", f"{table.path} [{', '.join(paired)}]", table.header, cur_rows))


def unmeasured_baseline(base: Table, cur: Table) -> str:
    """The first cells (as "impl N=n: status (message)") where an A/B run's baseline side did not
    measure (error, unsupported, timeout...) but the current side did; "" when there is none. Such a
    cell compares no latency, and a gate made only of them would pass having compared nothing."""
    keys = key_columns(base, cur)
    ci, _ = _index(cur, keys)
    found = []
    for k, r in _index(base, keys)[0].items():
        c = ci.get(k)
        if c is not None and c.get("status") in ("ok", "wrong") and r.get("status") not in ("ok", "wrong"):
            found.append(f"{r.get('impl')} N={r.get('n')}: {r.get('status')} ({(r.get('message') or '')[:120]})")
    return "; ".join(found[:3]) + (f"; ... ({len(found)} cells)" if len(found) > 3 else "")


def compare_paths(baseline: str, current: str | None = None, thresholds: Thresholds = Thresholds(),
                  normalize_by: str | None = None) -> Comparison:
    """Load both sides (BadInput when one is unusable) and compare them; with current None,
    `baseline` is one A/B run whose X@<commit> rows are compared with its X rows."""
    if current is None:
        base, cur = split_revisions(load_table(baseline, "RUN"))
        unmeasured = unmeasured_baseline(base, cur)
        if unmeasured:
            raise BadInput(f"the revision could not be measured where the current code was, so nothing was compared "
                           f"there: {unmeasured}")
        return compare_tables(base, cur, thresholds, normalize_by, one_run=True)
    return compare_tables(load_table(baseline, "BASELINE"), load_table(current, "CURRENT"), thresholds, normalize_by)
