"""The documentation is tested: every `ctxbench ...` command shown in a fenced block of README.md
and docs/*.md runs, at small sizes, and exits with the status the documentation shows; every
flag of an options table is one the CLI lists in `ctxbench <cmd> --help`.

Design:

* `doc_commands()` reads each fenced block: in ```bash (or sh, shell, console) blocks every line
  is a command; in ```text blocks the lines after a `$ ` prompt are, and the output printed
  below one says its exit status (`ctxbench: error:` 2, `**REGRESSION**` 1, else 0). A line
  continued with `\\` is joined; it is split on `&&`, `||`, `;` and `|`, and each part that runs
  `ctxbench` (behind `VAR=value` assignments or `time`, as `python -m ctxbench`, or as
  `torchrun ... -m ctxbench`) is one command. A ```python block whose first line is
  `# name.py` is written to that file in the working folder (docs/implementations.md's
  `mykernels.py`, which a documented command loads).
* `rewrite()` is one table of size changes applied to every command alike: values shrink,
  documented flags stay. Lengths become 1024 and 2048 (above the Triton interpreter's 512, so
  triton is the documented `not run` line rather than minutes of interpretation); an `--impls`
  list runs its first implementation (each is a worker process to start;
  `test_documented_implementations_exist` checks every name) and a command that names none
  runs sdpa; `--rep-ms` is 5, `--out` a fresh temporary folder, a window at most 256 keys, and
  a sweep that gives no shape gets 2 heads of dimension 16. Workers run one thread
  (OMP_NUM_THREADS=1) unless the line sets it. Perplexity is left out (`--ppl-max-len 0`)
  unless the command is about quality (passkey, a perplexity or RoPE flag, `--model`,
  `--text`, `--sinks`, or shown in docs/quality.md); such a command runs a tiny random model
  (tests/lm_helpers.py) with `--model` and a few hundred tokens. A `--resume` command gets
  nothing added (a resumed run refuses new configuration); its length flags extend the run it
  resumes. Lines that differ only in what the rewrite replaces run once.
* Placeholders are runs made first: `results/<run-id>` a small sweep, `$GATE_DIR/gate-1` a copy
  of the committed CPU gate baseline (so the documented gate comparison is exact: 0),
  `planted-baseline/` that copy with chunked's N=1024 latencies planted 40% lower (1),
  `$GATE_DIR/ab-1` and `results/<ab-run-id>` an A/B run: that copy with each row repeated as
  X@0123456789ab (exact: 0).
  Committed runs (`results/...`) are read from a copy, so nothing under the checkout is written.
* SKIPS: a few commands can't run here, each with the reason.

Commands run in this process (`ctxbench.cli.main`), with the documented environment variables
set and the working folder a temporary one; only torchrun lines start processes of their own.
A failing command shows the command as run and its output. The plots and report.html at the end
of a sweep are switched off (a report failure never changes a sweep's exit status, and
`ctxbench report`, run here too, draws them): that is most of what each sweep would cost.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

# Lengths every sweep and passkey command runs at (tokens).
LENGTHS = "1024,2048"
MAX_LEN, MIN_LEN = "2048", "1024"
# ctxbench ruler commands run the tiny model (tests/lm_helpers.py) at a length that holds every
# task's prompt in its tokens
RULER_LENGTHS = "480"
# The run `results/<run-id>` stands for: one implementation at 1024 tokens, so a documented
# `--resume` that adds lengths (to 2048) or implementations extends it.
RUN_FIXTURE = ["sweep", "--impls", "sdpa", "--lengths", "1024", "--heads", "2", "--head-dim", "16", "--rep-ms", "5",
               "--ppl-max-len", "0"]
# Flags that make a sweep about quality: it then runs the tiny model instead of no perplexity.
QUALITY_FLAGS = {"--ppl-tokens", "--ppl-scheme", "--ppl-stride", "--rope", "--model", "--text", "--sinks",
                 "--decode-max-len"}
QUALITY_PAGE = "docs/quality.md"


@dataclass(frozen=True)
class DocCommand:
    where: str                        # "docs/quality.md:141": file and line of the command
    text: str                         # the command as documented (one line, continuations joined)
    argv: tuple[str, ...]             # what follows `ctxbench`
    env: tuple[tuple[str, str], ...]  # VAR=value in front of it
    launcher: tuple[str, ...] = ()    # ("torchrun", "--nproc-per-node", "2") for a torchrun line
    expect: int = 0                   # the exit status the documentation shows
    output: tuple[str, ...] = ()      # what the documentation shows it printing (```text blocks)

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv else ""

    @property
    def id(self) -> str:
        return f"{self.where}-{self.command or 'help'}"


# ---------------------------------------------------------------- reading the documentation

def fenced_blocks(path: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(language, [(line number, line)]) of every fenced code block of a markdown file."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    lang, body = None, []
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
            if fence and lang is None:
                lang, body = fence.group(2).lower(), []
            elif fence and lang is not None:
                blocks.append((lang, body))
                lang = None
            elif lang is not None:
                body.append((number, line))
    return blocks


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines with their `\\` continuations joined, each with the number of its first line."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
        else:
            out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def _expected_status(output: list[str]) -> int:
    text = "\n".join(output)
    if "ctxbench: error:" in text:
        return 2
    if "**REGRESSION**" in text:
        return 1
    return 0


def _ctxbench_parts(line: str) -> list[tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]]:
    """(env, launcher, argv) of every part of a shell line that runs ctxbench."""
    tokens = shlex.split(line, comments=True)
    parts, current = [], []
    for tok in tokens + ["&&"]:
        if tok in ("&&", "||", ";", "|"):
            if current:
                parts.append(current)
            current = []
        else:
            current.append(tok)
    found = []
    for part in parts:
        env = []
        while part and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", part[0]):
            name, _, value = part.pop(0).partition("=")
            env.append((name, value))
        if part and part[0] == "time":
            part = part[1:]
        if not part:
            continue
        if part[0] == "ctxbench":
            found.append((tuple(env), (), tuple(part[1:])))
        elif part[0] in ("python", "python3") and part[1:3] == ["-m", "ctxbench"]:
            found.append((tuple(env), (), tuple(part[3:])))
        elif part[0] == "torchrun" and "ctxbench" in part:
            i = part.index("ctxbench")
            if part[i - 1] == "-m":
                found.append((tuple(env), tuple(part[:i - 1]), tuple(part[i + 1:])))
    return found


def doc_commands() -> list[DocCommand]:
    """Every documented ctxbench command, in order of appearance."""
    commands = []
    for path in DOC_FILES:
        for lang, lines in fenced_blocks(path):
            if lang in SHELL_LANGS:
                shown = [(n, line[2:] if line.startswith("$ ") else line, []) for n, line in _joined(lines)]
            elif lang in ("text", "", "console"):
                shown = []
                for n, line in _joined(lines):
                    if line.startswith("$ "):
                        shown.append((n, line[2:], []))
                    elif shown:
                        shown[-1][2].append(line)
            else:
                continue
            for n, line, output in shown:
                for env, launcher, argv in _ctxbench_parts(line):
                    commands.append(DocCommand(where=f"{path}:{n}", text=" ".join(line.split()), argv=argv,
                                               env=env, launcher=launcher, expect=_expected_status(output),
                                               output=tuple(output)))
    return commands


def doc_files() -> dict[str, str]:
    """The files the documentation's Python blocks define: `# name.py` first line -> contents."""
    files = {}
    for path in DOC_FILES:
        for lang, lines in fenced_blocks(path):
            if lang == "python" and lines:
                first = re.match(r"^#\s*([\w./-]+\.py)\s*$", lines[0][1])
                if first:
                    files[first.group(1)] = "\n".join(line for _, line in lines) + "\n"
    return files


# ---------------------------------------------------------------- what cannot run here

def _flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def skip_reason(cmd: DocCommand) -> str | None:
    if "--executor" in cmd.argv and _flag(cmd.argv, "--executor") == "ray" and "--address" in cmd.argv:
        return ("needs a running Ray cluster at the documented address; tests/test_ray_executor.py runs the Ray "
                "executor on a local one")
    if cmd.launcher:
        nodes = _flag(cmd.launcher, "--nnodes") or "1"
        ranks = _flag(cmd.launcher, "--nproc-per-node") or "1"
        if nodes != "1":
            return f"torchrun across {nodes} nodes"
        if not ranks.isdigit() or int(ranks) > 2:
            return f"torchrun with {ranks} ranks per node (the 2-rank line of docs/scaling-out.md runs, marked slow)"
    if _flag(cmd.argv, "--device") == "cuda" and not _cuda():
        return "CUDA only, and torch sees no CUDA device here"
    return None


# ---------------------------------------------------------------- the rewrite table

@dataclass
class Workspace:
    """Where the commands run: a temporary folder with a copy of results/, the documented Python
    files, and the runs the placeholders stand for (made on first use)."""

    root: str
    made: dict[str, str]
    counter: int = 0

    def fresh(self, name: str) -> str:
        self.counter += 1
        return os.path.join(self.root, "out", f"{self.counter:02d}-{name}")


def _set(argv: list[str], name: str, value: str, add: bool = True) -> None:
    if name in argv:
        argv[argv.index(name) + 1] = value
    elif add:
        argv += [name, value]


def is_quality(cmd: DocCommand) -> bool:
    argv = cmd.argv
    if cmd.command in ("passkey", "ruler"):
        return True
    if cmd.command != "sweep" or "--resume" in argv:
        return False
    ppl = _flag(argv, "--ppl-max-len")
    if ppl is not None:
        return ppl != "0"
    return bool(QUALITY_FLAGS & set(argv)) or cmd.where.startswith(QUALITY_PAGE + ":")


def rewrite(cmd: DocCommand, ws: Workspace) -> tuple[list[str], dict[str, str]]:
    """(argv, environment variables) of the command as it runs here."""
    # one thread per worker unless documented otherwise: on a loaded machine a 2-thread op waits
    # for its descheduled partner (docs/reports.md, the CI gate), which only costs time here
    env = {"OMP_NUM_THREADS": "1", **dict(cmd.env)}
    env["GATE_DIR"] = ws.made.get("gate_dir", "")
    env_vars = dict(os.environ, **env)
    argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env_vars.get(m.group(1), m.group(0)), a) for a in cmd.argv]
    placeholders = {"results/<run-id>": ws.made.get("run", ""), "planted-baseline/": ws.made.get("planted", ""),
                    "results/<ab-run-id>": ws.made.get("ab", "")}
    argv = [placeholders.get(a, a) for a in argv]
    if cmd.command == "ruler" and "--resume" not in argv:
        return rewrite_ruler(argv, ws), env
    if cmd.command not in ("sweep", "passkey"):
        return argv, env
    if "--resume" in argv:  # extend the resumed run; add nothing it would refuse
        for name, value in (("--lengths", LENGTHS), ("--max-len", MAX_LEN), ("--min-len", MIN_LEN)):
            _set(argv, name, value, add=False)
        return argv, env
    lengths_given = {"--lengths", "--max-len", "--min-len"} & set(argv)
    _set(argv, "--lengths", LENGTHS, add=False)
    _set(argv, "--max-len", MAX_LEN, add=not lengths_given)
    _set(argv, "--min-len", MIN_LEN, add=False)
    if "--window" in argv:
        _set(argv, "--window", str(min(int(_flag(tuple(argv), "--window") or 256), 256)))
    if "--kv-lens" in argv:  # the KV lengths fit the rewritten --max-len
        _set(argv, "--kv-lens", ",".join(str(min(int(x), int(MAX_LEN))) for x in _flag(tuple(argv), "--kv-lens").split(",")))
    if "--decode-max-len" in argv:
        _set(argv, "--decode-max-len", MIN_LEN)
        _set(argv, "--decode-tokens", "3")
    _set(argv, "--out", ws.fresh(cmd.command))
    if "--impls" in argv:  # a worker per implementation is most of a small sweep's time
        _set(argv, "--impls", _flag(tuple(argv), "--impls").split(",")[0])
    elif "--impl" not in argv:
        argv += ["--impls", "sdpa"]
    if cmd.command == "sweep":
        _set(argv, "--rep-ms", "5")
        if not {"--heads", "--kv-heads", "--head-dim"} & set(argv):
            argv += ["--heads", "2", "--head-dim", "16"]
    if is_quality(cmd):
        _set(argv, "--model", ws.made["model"])
        if "--text" in argv:
            _set(argv, "--text", ws.made["text"])
        if cmd.command == "sweep":
            if "--ppl-max-len" in argv:
                _set(argv, "--ppl-max-len", MAX_LEN)
            _set(argv, "--ppl-tokens", "256")
            _set(argv, "--ppl-stride", "64", add=False)
    elif cmd.command == "sweep":
        _set(argv, "--ppl-max-len", "0")
    return argv, env


def rewrite_ruler(argv: list[str], ws: Workspace) -> list[str]:
    """A `ctxbench ruler` command at the tiny model's size: every task's prompt fits RULER_LENGTHS,
    a 16-token continuation, the first implementation, the first depth, one trial; tasks,
    policies and budgets as documented (two of each when none are)."""
    for flag in ("--max-len", "--min-len"):
        if flag in argv:
            del argv[argv.index(flag):argv.index(flag) + 2]
    _set(argv, "--lengths", RULER_LENGTHS)
    _set(argv, "--continuation-tokens", "16")
    # a command that names no tasks or policies runs two of each (a cell per task x policy x budget)
    _set(argv, "--tasks", "niah_single,vt", add="--tasks" not in argv)
    _set(argv, "--policies", "full,snapkv", add="--policies" not in argv)
    _set(argv, "--model", ws.made["model"])
    if "--text" in argv:
        _set(argv, "--text", ws.made["text"])
    _set(argv, "--out", ws.fresh("ruler"))
    for flag in ("--impls", "--depths"):
        if flag in argv:
            _set(argv, flag, _flag(tuple(argv), flag).split(",")[0])
    if "--trials" in argv:
        _set(argv, "--trials", "1")
    return argv


# ---------------------------------------------------------------- the placeholders' runs

def _main(argv: list[str]) -> int:
    from ctxbench.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _plant(src: str, dest: str, impl: str, n: str, factor: float) -> None:
    """A copy of run folder src with impl's latencies at n multiplied by factor."""
    shutil.copytree(src, dest)
    path = os.path.join(dest, "results.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    for r in rows:
        if r["impl"] == impl and r["n"] == n:
            for col in ("latency_ms", "latency_p20_ms", "latency_p80_ms", "latency_min_ms"):
                r[col] = f"{float(r[col]) * factor:.6g}"
            r["latency_samples_ms"] = ";".join(f"{float(x) * factor:.6g}" for x in r["latency_samples_ms"].split(";"))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def _ab_copy(src: str, dest: str) -> None:
    """A copy of run folder src whose every row is there twice: as measured, and as X@0123456789ab
    (one A/B run of two identical revisions, for `ctxbench compare RUN`)."""
    shutil.copytree(src, dest)
    path = os.path.join(dest, "results.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    with open(path, "w", newline="") as f:
        rounds = {"round_latency_ms": None, "ab_pair": None}
        for r in rows:  # 20 rounds at the row's median each: every per-round ratio is exactly 1
            r.update(round_latency_ms=";".join([r["latency_ms"]] * 20), ab_pair=f"pair{r['impl']}{r['n']}")
        w = csv.DictWriter(f, fieldnames=header + [c for c in rounds if c not in header])
        w.writeheader()
        w.writerows(rows + [dict(r, impl=r["impl"] + "@0123456789ab") for r in rows])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = str(tmp_path_factory.mktemp("docs"))
    shutil.copytree(os.path.join(ROOT, "results"), os.path.join(root, "results"))
    for name, text in doc_files().items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    return Workspace(root=root, made={})


def _prepare(cmd: DocCommand, ws: Workspace) -> None:
    """Make the runs and files this command's placeholders and rewrite need, once each."""
    text = " ".join(cmd.argv)
    if "$GATE_DIR" in text or "planted-baseline/" in text:
        if "planted" not in ws.made:
            gate_dir = ws.made.setdefault("gate_dir", os.path.join(ws.root, "gate"))
            # the committed baseline's own numbers: the documented gate comparison is exact
            shutil.copytree(os.path.join(ws.root, "results", "baselines", "cpu-gate"), os.path.join(gate_dir, "gate-1"))
            ws.made["gate_dir"] = gate_dir
            # the baseline with chunked's N=1024 latencies planted 40% lower, as documented
            _plant(os.path.join(gate_dir, "gate-1"), os.path.join(ws.root, "planted-baseline"), "chunked", "1024",
                   0.6)
            ws.made["planted"] = os.path.join(ws.root, "planted-baseline") + os.sep
    if ("$GATE_DIR" in text or "results/<ab-run-id>" in text) and "ab" not in ws.made:
        # an A/B run whose X@<commit> rows equal its X rows: the documented comparison is exact (0)
        gate_dir = ws.made.setdefault("gate_dir", os.path.join(ws.root, "gate"))
        _ab_copy(os.path.join(ws.root, "results", "baselines", "cpu-gate"), os.path.join(gate_dir, "ab-1"))
        ws.made["ab"] = os.path.join(gate_dir, "ab-1")
    if "results/<run-id>" in text and "run" not in ws.made:
        out = os.path.join(ws.root, "fixture-runs")
        code = _main([*RUN_FIXTURE, "--out", out, "--run-id", "run"])
        assert code == 0, f"the run behind results/<run-id> failed (exit {code})"
        ws.made["run"] = os.path.join(out, "run")
    if is_quality(cmd) and "model" not in ws.made:
        import lm_helpers

        ws.made["model"] = lm_helpers.checkpoint(os.path.join(ws.root, "tiny-model"))
        ws.made["text"] = os.path.join(ws.root, "corpus.txt")
        with open(ws.made["text"], "w", encoding="utf-8") as f:
            f.write(lm_helpers.corpus_text())


# ---------------------------------------------------------------- the tests

COMMANDS = doc_commands()


def _unique(commands: list[DocCommand]) -> list[DocCommand]:
    """One test per distinct command as it runs here: lines that differ only in what the rewrite
    replaces, or in where the run is written (--out, --run-id), run once."""
    symbolic = Workspace(root="WS", made={k: k for k in ("model", "text", "run", "gate_dir", "planted")})
    seen: dict[tuple, DocCommand] = {}
    for c in commands:
        argv, env = rewrite(c, symbolic)
        for flag in ("--out", "--run-id"):
            if flag in argv:
                argv[argv.index(flag) + 1] = "..."
        seen.setdefault((tuple(sorted(argv)), tuple(sorted(env.items())), c.launcher, c.expect), c)
    return list(seen.values())


def _param(cmd: DocCommand):
    if cmd.launcher:  # torchrun: processes per rank and cell
        marks = [pytest.mark.slow]
    elif is_quality(cmd):  # a model loaded per worker: 6 to 35 s each, about 200 s in all on 2 cores
        marks = [pytest.mark.slow, pytest.mark.ci]
    else:
        marks = []
    return pytest.param(cmd, id=cmd.id, marks=marks)


def test_the_documentation_shows_commands():
    """The parser finds the commands it should (a regression in it would silently test nothing)."""
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert "README.md" in where and len(COMMANDS) >= 10, COMMANDS
    first = next(c for c in COMMANDS if c.where.startswith("README.md"))
    assert first.argv == ("sweep", "--max-len", "32768"), first
    assert any(c.expect == 2 for c in COMMANDS) and any(c.expect == 1 for c in COMMANDS)
    assert any(c.launcher for c in COMMANDS) and any(dict(c.env).get("OMP_NUM_THREADS") == "1" for c in COMMANDS)


@pytest.mark.parametrize("cmd", [_param(c) for c in _unique(COMMANDS)])
def test_documented_command_runs(cmd: DocCommand, workspace: Workspace, monkeypatch, capsys):
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    _prepare(cmd, workspace)
    argv, env = rewrite(cmd, workspace)
    monkeypatch.chdir(workspace.root)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shown = " ".join(f"{k}={v}" for k, v in cmd.env) + (" " if cmd.env else "") + shlex.join(
        [*cmd.launcher, *(["-m"] if cmd.launcher else []), "ctxbench", *argv])
    if cmd.launcher:
        launcher = [shutil.which("torchrun") or sys.executable, *cmd.launcher[1:]]
        if launcher[0] == sys.executable:
            launcher[1:1] = ["-m", "torch.distributed.run"]
        proc = subprocess.run([*launcher, "-m", "ctxbench", *argv], capture_output=True, text=True, timeout=600,
                              cwd=workspace.root, env=dict(os.environ, **env))
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        import ctxbench.reports.report
        from ctxbench.core import registry

        # a documented --impl file registers its function: keep that out of the other tests
        registry.all_impls()  # the built-ins and plugins, loaded once, before the copy
        monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
        monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
        if cmd.command in ("sweep", "passkey"):
            monkeypatch.setattr(ctxbench.reports.report, "report", lambda run_dir: [os.path.join(run_dir, "report.html")])
        code = _main(argv)
        out, err = capsys.readouterr()
    assert code == cmd.expect, (
        f"{cmd.where}: `{cmd.text}`\nran as: {shown}\nexit status {code}, documented {cmd.expect}\n"
        f"--- stderr (last 3000 characters)\n{err[-3000:]}\n--- stdout (last 2000 characters)\n{out[-2000:]}")
    if cmd.expect == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("ctxbench: error:"), err
        documented = [ln for ln in cmd.output if ln.startswith("ctxbench: error:")]
        assert lines == documented, f"{cmd.where}: the documented message is not the CLI's:\n{documented}\n{lines}"
    if cmd.command == "compare":
        assert "## ctxbench compare" in out
        # the documented verdict, up to its measured numbers: "**1 regression** in 12 cells: chunked N=1024"
        for line in (ln for ln in cmd.output if ln.startswith("**") and "regression" in ln.lower()):
            verdict = ":".join(line.split(":")[:2])
            assert verdict in out, f"{cmd.where}: documented verdict {verdict!r} not in the output:\n{out[-2000:]}"


def test_documented_implementations_exist():
    """Every implementation a documented command names is registered (the rewrite runs only the
    first of each list)."""
    from ctxbench import registry

    known = registry.all_impls()
    # X@REV is X at a git revision (ctxbench.core.revisions): X must be registered
    named = {name.split("@")[0] for c in COMMANDS for name in (_flag(c.argv, "--impls") or "").split(",") if name}
    assert named and not named - set(known), f"documented but not registered: {sorted(named - set(known))}"


# ---------------------------------------------------------------- options tables vs --help

def options_tables() -> list[tuple[str, str, list[str]]]:
    """(where, command, flags) of every markdown table with an `option` column: the command is the
    one the section heading above it names in backticks (`ctxbench sweep`)."""
    found = []
    for path in DOC_FILES:
        heading = ""
        lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
        in_fence = False
        for i, line in enumerate(lines):
            if line.lstrip().startswith(("```", "~~~")):
                in_fence = not in_fence
            if in_fence:
                continue
            if line.startswith("#"):
                heading = line
            if not (line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1])):
                continue
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            columns = [j for j, c in enumerate(header) if c.lower().startswith("option")]
            if not columns:
                continue
            flags: list[str] = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
                for j in columns:
                    if j < len(cells):
                        flags += re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cells[j])
            command = re.search(r"`ctxbench (\w+)", heading)
            found.append((f"{path}:{i + 1}", command.group(1) if command else "", list(dict.fromkeys(flags))))
    return found


def _help(command: str, capsys) -> str:
    code = _main([command, "--help"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_every_flag_of_an_options_table_is_in_the_commands_help(capsys):
    tables = options_tables()
    assert len(tables) >= 3, tables
    missing = []
    helps: dict[str, str] = {}
    for where, command, flags in tables:
        assert command, f"{where}: the heading above an options table must name its command, e.g. `ctxbench sweep`"
        if command not in helps:
            helps[command] = _help(command, capsys)
        listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps[command]))
        missing += [f"{where}: ctxbench {command} {flag}" for flag in flags if flag not in listed]
    assert not missing, "documented flags that --help does not list:\n" + "\n".join(missing)


def test_inline_commands_use_flags_the_cli_has(capsys):
    """`ctxbench <cmd> --flag` written inline in the prose (outside fenced blocks) names flags
    that command has."""
    helps: dict[str, str] = {}
    missing = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, path), encoding="utf-8").read(), flags=re.S)
        for span in re.findall(r"`([^`]+)`", text):
            m = re.search(r"(?:^|\s)ctxbench (sweep|passkey|report|compare|list)\b(.*)", " ".join(span.split()))
            if not m:
                continue
            command = m.group(1)
            if command not in helps:
                helps[command] = _help(command, capsys)
            listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps[command]))
            missing += [f"{path}: `{span}`: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2))
                        if flag not in listed]
    assert not missing, "inline commands with flags their command lacks:\n" + "\n".join(missing)


def test_rewrite_keeps_documented_flags(tmp_path):
    """The rewrite changes values, never drops a documented flag, and shrinks every sweep."""
    ws = Workspace(root=str(tmp_path), made={"model": "/tiny", "text": "/corpus.txt", "run": "/run",
                                             "gate_dir": "/gate", "planted": "/planted/"})
    for cmd in COMMANDS:
        if cmd.command not in ("sweep", "passkey"):
            continue
        argv, _ = rewrite(cmd, ws)
        documented = [a for a in cmd.argv if a.startswith("--")]
        assert [a for a in argv if a in documented] == documented, (cmd.text, argv)
        if "--resume" not in argv:
            assert _flag(tuple(argv), "--lengths") == LENGTHS or _flag(tuple(argv), "--max-len") == MAX_LEN, argv
            assert _flag(tuple(argv), "--out", ).startswith(str(tmp_path)), argv
            assert (_flag(tuple(argv), "--model") == "/tiny") == is_quality(cmd), argv


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_resolve():
    """Every relative link of README.md and docs/ names a file that exists, and an anchor that one
    of its headings has."""
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, path), encoding="utf-8").read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), file)) if file else os.path.join(ROOT, path)
            if not os.path.exists(dest):
                broken.append(f"{path}: {target} (no such file)")
            elif anchor:
                with open(dest, encoding="utf-8") as f:
                    body = re.sub(r"```.*?```", "", f.read(), flags=re.S)
                slugs = {_slug(line) for line in body.splitlines() if line.startswith("#")}
                if anchor not in slugs:
                    broken.append(f"{path}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)
