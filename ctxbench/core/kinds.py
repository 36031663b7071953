"""The registry of measurement kinds, and of the commands that run them.

A kind is what one cell measures: one attention call (kernel), a model's perplexity, a passkey
trial, a model decoding through a KV cache, a RULER prompt under a KV-cache policy... Its value is
the CSV column `kind`. Each kind is one class, declared in its own package under
ctxbench.measurements and registered with `@register_kind`; the engine (planning, scheduling, the
worker, resume, the CSV schema, reports, compare) looks kinds up here and never branches on their
names. A kind declares:

* `command`: the command that plans it (`ctxbench sweep`, `passkey`, `ruler`, or a new one
  declared with `register_command`), and `flags`: the flags it adds to that command;
* `fields`: the configuration columns its cells add (`Field`: a CSV key column, with the value
  every other row holds), and `columns`: the measured columns its rows carry;
* `plan(context)`: its cells (a `Plan`), `plan_from_json` to rebuild the plan from meta.json
  for --resume, and `extend` for implementations a resume adds;
* `measurement`: "module:function" run in the worker, function(impl, cell, settings) -> the
  row's measured fields with status and message (or override `measure`);
* `weight` (expected seconds, for the progress bar) and `label` (the progress line);
* `report`: "module:name" of its report section (ctxbench.reports.section.Section): its part of
  the terminal summary, report.html and `ctxbench report`. Kinds may share one section.

A command is a name, the kinds that declare it, and what differs between commands (default
lengths and implementations). Three words, three meanings: a *command* is what users type, a
*kind* what one cell measures, a RULER *task* (the `ruler_task` column) one of RULER's prompt
templates.

Nothing here imports torch: `ctxbench --help` lists every command's flags from the declarations.
Built-in kinds are loaded by importing ctxbench.measurements; plugins with an entry point in the
group `ctxbench.kinds`; a kind registered elsewhere (a test, a script) is found in a worker by
importing the module or file that registered it (`origin`, `find`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from ctxbench.core.flags import Flag

if TYPE_CHECKING:
    from ctxbench.core.cell import Cell, Config, Settings

ENTRY_POINT_GROUP = "ctxbench.kinds"


@dataclass(frozen=True)
class Field:
    """A configuration column a kind adds to its cells: a key of the CSV (a finished cell is found
    by it on resume, and `ctxbench compare` joins rows on it). `absent` is the column's value in a
    row of a kind without the field, and in a results.csv written before the column existed."""

    name: str
    absent: str = ""
    numeric: bool = False  # its values are numbers (reports read them as such)


@dataclass(frozen=True)
class Command:
    """A command that runs cells (`ctxbench <name>`), planned by the kinds that name it.

    max_len: the longest length (tokens) by device when no length flag is given. default_impls:
    the implementations when none is named (None: every one in the default sweep of the device that
    supports the configuration); specs_join_defaults: whether `--impl X` alone adds X to those
    defaults (True) or replaces them (False). masks: the --mask values it takes (a command
    whose kinds have no --mask flag runs causal)."""

    name: str
    help: str
    max_len: dict[str, int]
    default_impls: tuple[str, ...] | None = None
    specs_join_defaults: bool = False
    masks: tuple[str, ...] = ("none", "causal", "window")
    run_prefix: str = ""  # what a run id made up for it starts with after the time, e.g. "passkey-"


class Plan(Protocol):
    """What a kind plans for a run: its implementations and, per length, its cells. A dataclass,
    saved in meta.json (dataclasses.asdict) and rebuilt by the kind's plan_from_json."""

    impls: list[str]

    def cells(self, config: Config, n: int) -> list[Cell]:
        """The kind's cells at context length n (tokens), in the order they run."""


class Kind:
    """A measurement kind (see the module docstring); subclass, set the attributes, register."""

    name: str = ""
    command: str = "sweep"
    flags: tuple[Flag, ...] = ()
    fields: tuple[Field, ...] = ()
    columns: tuple[str, ...] = ()
    # Those of its columns that hold text, even where it looks like a number (a key "00042").
    text_columns: tuple[str, ...] = ()
    # Measured columns in [0, 1] where a drop is a regression (ctxbench compare: --max-score-drop).
    score_columns: tuple[str, ...] = ()
    # Whether a cell runs a whole language model rather than one attention call: its cells get a
    # worker apart from the kernel cells' (ctxbench.engine.executor.WorkerPool).
    runs_a_model: bool = False
    # Whether its implementations must take fewer queries than keys (a KV cache, kv_cache=True).
    needs_kv_cache: bool = False
    # Whether its rows divide by the device's memory bandwidth: the run then probes it once
    # (ctxbench.engine.bandwidth) before its first cell.
    uses_bandwidth: bool = False
    # Whether rows of a results.csv written before it had a kind (or task) column are of this kind.
    oldest: bool = False
    # Rough seconds to start a worker and import what a cell needs, for weight (ETAs only).
    worker_start_s: float = 2.0
    # "module:function" timing a cell again in a worker that measured it with
    # Settings.keep_for_more: function(impl, cell, settings) -> the latency columns of one round.
    # A kind with one has a cell of X measured beside X@REV in interleaved rounds
    # (ctxbench.engine.interleave), joined by merge_rounds.
    measurement_more: str = ""
    # "module:function" the worker calls: function(impl, cell, settings) -> dict (see measure).
    measurement: str = ""
    # "module:name" of its report section (ctxbench.reports.section); "" for none.
    report: str = ""
    # Where it was registered (set by register_kind): a module name, and its file.
    module: str = ""
    source: str = ""

    def plan(self, context: Any) -> Plan | None:
        """Its cells for a new run (ctxbench.engine.plan.PlanContext: options, configuration,
        lengths, implementations); None when it has none. UsageError (one line) for bad input."""
        return None

    def plan_from_json(self, data: dict[str, Any]) -> Plan:
        """Its plan from meta.json (what dataclasses.asdict made of it)."""
        raise NotImplementedError(f"kind {self.name!r} does not say how to read its plan from meta.json")

    def plan_from_legacy(self, spec: dict[str, Any]) -> Plan | None:
        """Its plan from the meta.json of a run made before kinds existed (its spec's ppl, passkey,
        decode or ruler entry, and the configuration), so such a run resumes; None when it had none."""
        return None

    def extend(self, plan: Plan, names: list[str], added: list[str]) -> Plan:
        """The plan of a resumed run whose implementations are now `names` (`added` are new);
        UsageError when one can't run this kind."""
        return plan

    def lengths(self, options: Any) -> list[int] | None:
        """The run's lengths (tokens) when this kind's flags fix them (else None)."""
        return None

    def validate(self, options: Any) -> None:
        """Check this kind's flags (UsageError, one line); called for new and resumed runs."""

    def settings(self, options: Any, device: str) -> dict[str, Any]:
        """Values of ctxbench.core.cell.Settings that this kind's flags set."""
        return {}

    def default_impls(self, context: Any) -> list[str]:
        """The implementations of a command whose default is "every one that supports the
        configuration" (Command.default_impls None): asked of the command's first kind."""
        raise NotImplementedError(f"kind {self.name!r} can't choose implementations")

    def describe(self, plan: Plan | None, spec: Any) -> list[str]:
        """The lines printed when a run starts, saying what this kind measures."""
        return []

    def weight(self, cell: Cell, settings: Settings) -> float:
        """Expected seconds of one cell, for the progress bar's ETA (only their ratios matter)."""
        return 1.0

    def label(self, cell: Cell) -> str:
        """The cell as the progress bar and the worker's log name it."""
        return f"{self.name} {cell.impl} N={cell.n}"

    def measure(self, impl: Any, cell: Cell, settings: Settings) -> dict[str, Any]:
        """Measure one cell in the worker: the measured columns with `status` and `message`."""
        module, _, function = self.measurement.partition(":")
        return getattr(importlib.import_module(module), function)(impl, cell, settings)

    @property
    def interleaves(self) -> bool:
        """Whether an A/B pair's cells of this kind are timed in interleaved rounds."""
        return bool(self.measurement_more)

    def measure_more(self, impl: Any, cell: Cell, settings: Settings) -> dict[str, Any]:
        """One more round of timed calls of the cell this worker measured last (measurement_more)."""
        module, _, function = self.measurement_more.partition(":")
        return getattr(importlib.import_module(module), function)(impl, cell, settings)

    def merge_rounds(self, cell: Cell, rows: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
        """One row from the rows of a cell measured in several rounds (each with the share of the
        timing budget ctxbench.engine.interleave gave it); only asked of a kind that interleaves."""
        raise NotImplementedError(f"kind {self.name!r} does not merge rounds")

    def section(self) -> Any:
        """Its report section, or None."""
        if not self.report:
            return None
        module, _, name = self.report.partition(":")
        return getattr(importlib.import_module(module), name)


_KINDS: dict[str, Kind] = {}
_COMMANDS: dict[str, Command] = {}
_LOADED = False


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Class decorator: register one instance of a Kind subclass under its `name`."""
    kind = cls()
    if not kind.name:
        raise ValueError(f"{cls.__name__} has no name")
    kind.module = cls.__module__
    kind.source = inspect.getsourcefile(cls) or ""
    _KINDS[kind.name] = kind
    return cls


def register_command(command: Command) -> Command:
    """Declare a command that runs cells; its kinds name it in Kind.command."""
    _COMMANDS[command.name] = command
    return command


def unregister(name: str) -> None:
    """Forget the kind `name` (and the command it declared, when no other kind plans it): for a
    kind registered for a while, e.g. by a test."""
    kind = _KINDS.pop(name, None)
    if kind is not None and not any(k.command == kind.command for k in _KINDS.values()):
        _COMMANDS.pop(kind.command, None)


def load() -> None:
    """Register the built-in kinds (ctxbench.measurements) and installed plugins, once."""
    global _LOADED
    if _LOADED:
        return
    importlib.import_module("ctxbench.measurements")
    _LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the tool down
            print(f"ctxbench: kind plugin {ep.name} failed to load ({type(exc).__name__}: {exc})", file=sys.stderr)


def all_kinds() -> dict[str, Kind]:
    """Every registered kind by name, in registration order."""
    load()
    return dict(_KINDS)


def get(name: str) -> Kind:
    """The kind registered as `name` (KeyError naming the known ones if none)."""
    load()
    if name not in _KINDS:
        raise KeyError(f"unknown kind {name!r}; known: {', '.join(_KINDS)}")
    return _KINDS[name]


def origin(name: str) -> dict[str, str]:
    """Where kind `name` was registered (module name and file), for a process that must find it."""
    kind = get(name)
    return {"module": kind.module, "source": kind.source}


def find(name: str, where: dict[str, str] | None = None) -> Kind:
    """get(name), after importing the module that registered it (or else its file, `where` as
    origin() gave it in the process that planned the cell) if this process has not."""
    load()
    if name not in _KINDS and where:
        if where.get("module") not in ("", "__main__"):  # a script's __main__ is this process's own
            try:
                importlib.import_module(where["module"])
            except ImportError:
                pass
        if name not in _KINDS and where.get("source"):
            _import_file(where["source"])
    return get(name)


def _import_file(path: str) -> None:
    module_name = "ctxbench_kind_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


def commands() -> dict[str, Command]:
    """Every command that runs cells, by name."""
    load()
    return dict(_COMMANDS)


def command(name: str) -> Command:
    return commands()[name]


def kinds_of(command_name: str) -> list[Kind]:
    """The kinds a command plans, in registration order (the order of their cells at each length)."""
    return [k for k in all_kinds().values() if k.command == command_name]


def fields() -> list[Field]:
    """Every kind's fields, each once (the first declaration of a name wins), in registration order."""
    seen: dict[str, Field] = {}
    for kind in all_kinds().values():
        for f in kind.fields:
            seen.setdefault(f.name, f)
    return list(seen.values())


def measured_columns() -> list[str]:
    """Every kind's measured columns, each once, in registration order."""
    return list(dict.fromkeys(c for kind in all_kinds().values() for c in kind.columns))


def oldest() -> str:
    """The kind of the rows of a results.csv written before it had a kind column (Kind.oldest)."""
    return next((k.name for k in all_kinds().values() if k.oldest), "")


def numeric_columns() -> list[str]:
    """Every kind's numeric fields and measured columns (those not declared text), each once."""
    found = [f.name for f in fields() if f.numeric]
    found += [c for kind in all_kinds().values() for c in kind.columns if c not in kind.text_columns]
    return list(dict.fromkeys(found))


def score_columns() -> list[str]:
    """Every kind's score columns (0..1, a drop is a regression), each once."""
    return list(dict.fromkeys(c for kind in all_kinds().values() for c in kind.score_columns))


def sections(kind_names: list[str]) -> list[tuple[Any, list[str]]]:
    """The report sections of the kinds named, in registration order, each once with the kinds it
    covers (kinds may share one)."""
    found: list[tuple[Any, list[str]]] = []
    for kind in all_kinds().values():
        if kind.name not in kind_names:
            continue
        section = kind.section()
        if section is None:
            continue
        for existing, covered in found:
            if existing is section:
                covered.append(kind.name)
                break
        else:
            found.append((section, [kind.name]))
    return found
