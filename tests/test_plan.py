"""ctxbench.engine.plan on its own: the run order of a SweepSpec's cells, its meta.json round trip
(also from a meta.json the ctxbench before kinds wrote), all_impls and powers_of_two. No torch,
no registry: plans are built by hand, and the expected cells are written out here."""

from __future__ import annotations

import json
import random

import pytest

from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.engine.plan import SweepSpec, powers_of_two
from ctxbench.measurements.decode import DecodePlan
from ctxbench.measurements.kernel import KernelPlan
from ctxbench.measurements.passkey import PasskeyPlan
from ctxbench.measurements.perplexity import PerplexityPlan
from ctxbench.measurements.ruler import ContinuationPlan, RetrievalPlan

# The default model's attention shape (as a perplexity plan records it): 9 query heads, 3 KV heads, 64 dims.
MODEL = {"heads": 9, "kv_heads": 3, "head_dim": 64, "dtype": "float32"}


def via_json(data: dict) -> dict:
    """What meta.json gives back: JSON text (tuples become lists, keys stay in order)."""
    return json.loads(json.dumps(data))


def sweep_spec(lengths=(32, 64, 128), config: Config | None = None, **settings) -> SweepSpec:
    config = config or Config(batch=2, heads=4, kv_heads=2, head_dim=16, mask="window", window=24, sinks=2,
                              mode="fwd+bwd")
    return SweepSpec(
        command="sweep", config=config, lengths=list(lengths), timeout_s=75.0, memory_limit_bytes=3 * 2**30,
        settings=Settings(seed=11, rep_ms=40.0, ppl_tokens=300, **settings), reuse_workers=False,
        memory_limit_auto=True,
        plans={"kernel": KernelPlan(impls=["sdpa", "naive"], query_len=8, page_size=16),
               "perplexity": PerplexityPlan(impls=["naive"], **MODEL, max_len=64, ropes=["default", "yarn:2"],
                                            scheme="strided"),
               "decode": DecodePlan(impls=["chunked"], **MODEL, max_len=32)})


# ---------------------------------------------------------------- powers_of_two

@pytest.mark.parametrize("lo, hi, want", [
    (1024, 16384, [1024, 2048, 4096, 8192, 16384]),
    (1000, 4096, [1000, 1024, 2048, 4096]),   # a min_len off the powers stays first
    (1024, 1024, [1024]),
    (1024, 2047, [1024]),                      # max_len off the powers: the last power below it
    (1, 8, [1, 2, 4, 8]),
    (3, 3, [3]),
])
def test_powers_of_two_known_cases(lo, hi, want):
    assert powers_of_two(lo, hi) == want


def test_powers_of_two_against_its_definition():
    rng = random.Random(20240611)
    for _ in range(200):
        lo = rng.randrange(1, 5000)
        hi = lo + rng.randrange(0, 70000)
        want = [lo] + [2 ** e for e in range(40) if lo < 2 ** e <= hi]
        assert powers_of_two(lo, hi) == want, (lo, hi)


# ---------------------------------------------------------------- cells

def test_cells_are_length_major_with_kinds_in_the_commands_order():
    assert [k.name for k in kinds.kinds_of("sweep")] == ["kernel", "perplexity", "decode"]
    spec = sweep_spec()
    want = []
    for n in (32, 64, 128):
        want += [("kernel", impl, n, None) for impl in ("sdpa", "naive")]
        if n <= 64:  # perplexity's max_len
            want += [("perplexity", "naive", n, rope) for rope in ("default", "yarn:2")]
        if n <= 32:  # decode's max_len
            want += [("decode", "chunked", n, None)]
    got = [(c.kind, c.impl, c.n, c.get("rope")) for c in spec.cells()]
    assert got == want


def test_kernel_cells_carry_the_configuration_and_model_cells_the_models_shape():
    spec = sweep_spec()
    cells = spec.cells()
    kernel = [c for c in cells if c.kind == "kernel"]
    for c in kernel:
        assert (c.batch, c.heads, c.kv_heads, c.head_dim, c.mask, c.window, c.sinks, c.mode) == \
               (2, 4, 2, 16, "window", 24, 2, "fwd+bwd")
        assert dict(c.params) == {"query_len": 8, "ragged": False, "kv_lens": None, "page_size": 16}
        assert c.allow_interpreter is False
        assert c.q_len == 8
    for c in (c for c in cells if c.kind in ("perplexity", "decode")):
        # one sequence of the model's shape, forward only; mask and device stay the run's
        assert (c.batch, c.heads, c.kv_heads, c.head_dim, c.dtype, c.mode) == (1, 9, 3, 64, "float32", "fwd")
        assert (c.mask, c.window, c.sinks, c.device) == ("window", 24, 2, "cpu")
        assert c.q_len == c.n and c.get("query_len") is None
    assert {c.get("ppl_scheme") for c in cells if c.kind == "perplexity"} == {"strided"}
    # every cell of the run is a different CSV row
    assert len({c.key for c in cells}) == len(cells) == 2 * 3 + 2 * 2 + 1


def test_no_plans_no_cells_and_an_empty_kinds_plan_adds_none():
    spec = sweep_spec()
    spec.plans = {}
    assert spec.cells() == [] and spec.all_impls() == []
    spec.plans = {"kernel": KernelPlan(impls=[]), "decode": DecodePlan(impls=["sdpa"], **MODEL, max_len=16)}
    assert spec.cells() == []  # decode's max_len is below every length


def test_all_impls_is_each_implementation_once_in_plan_order():
    spec = sweep_spec()
    spec.plans["perplexity"] = PerplexityPlan(impls=["naive", "chunked", "sdpa"], **MODEL, max_len=64,
                                              ropes=["default"])
    assert spec.all_impls() == ["sdpa", "naive", "chunked"]
    # all_impls names every implementation with cells, and nothing else
    assert set(spec.all_impls()) == {c.impl for c in spec.cells()}


# ---------------------------------------------------------------- meta.json

def test_to_json_is_plain_json_with_every_plan_by_kind():
    spec = sweep_spec()
    data = spec.to_json()
    assert via_json(data) == data
    assert data["command"] == "sweep" and list(data["plans"]) == ["kernel", "perplexity", "decode"]
    assert data["plans"]["kernel"] == {"impls": ["sdpa", "naive"], "query_len": 8, "ragged": False, "kv_lens": None,
                                       "page_size": 16}
    assert data["plans"]["decode"] == {"impls": ["chunked"], **MODEL, "max_len": 32}
    assert data["config"]["window"] == 24 and data["settings"]["seed"] == 11
    assert (data["timeout_s"], data["memory_limit_bytes"], data["reuse_workers"], data["memory_limit_auto"]) == \
           (75.0, 3 * 2**30, False, True)


@pytest.mark.parametrize("which", ["sweep", "passkey", "ruler"])
def test_json_round_trip_gives_the_same_spec_and_cells(which):
    if which == "sweep":
        spec = sweep_spec(bandwidth_gbps=12.5, bandwidth_source="probe")
    elif which == "passkey":
        spec = SweepSpec(command="passkey", config=Config(mask="window", window=40, sinks=1), lengths=[256, 512],
                         timeout_s=600.0, memory_limit_bytes=None,
                         plans={"passkey": PasskeyPlan(impls=["sdpa", "chunked"], **MODEL, ropes=["default", "yarn:4"],
                                                       depths=[0.0, 0.5, 1.0], trials=2)})
    else:
        shared = dict(impls=["sdpa"], **MODEL, policies=["full", "snapkv"], budgets=["0.25", "100"])
        spec = SweepSpec(command="ruler", config=Config(), lengths=[256, 512], timeout_s=600.0,
                         memory_limit_bytes=None, settings=Settings(haystack="filler", continuation_tokens=64),
                         plans={"retrieval": RetrievalPlan(**shared, tasks=["niah_single", "vt"], depths=[0.5],
                                                           trials=2),
                                "continuation": ContinuationPlan(**shared)})
    again = SweepSpec.from_json(via_json(spec.to_json()))
    assert again == spec
    assert [c.key for c in again.cells()] == [c.key for c in spec.cells()]
    assert again.cells() == spec.cells()


def test_ruler_cells_plan_each_kept_token_count_once():
    plan = ContinuationPlan(impls=["sdpa"], **MODEL, policies=["full", "streaming"], budgets=["0.25", "16"])
    at = {n: [(c.get("policy"), c.get("kv_budget")) for c in plan.cells(Config(), n)] for n in (17, 64, 128)}
    # n=64: 0.25 keeps 16 tokens, as "16" does: once; n=128: 32 and 16 tokens; n=17: 16 = n - 1 is the full cache
    assert at[64] == [("full", None), ("streaming", "0.25")]
    assert at[128] == [("full", None), ("streaming", "0.25"), ("streaming", "16")]
    assert at[17] == [("full", None), ("streaming", "0.25")]  # round(0.25 * 17) = 4 tokens


# ---------------------------------------------------------------- meta.json of the ctxbench before kinds
# Written as SweepSpec.to_json wrote them at ea26b0e (`git show ea26b0e:ctxbench/plan.py`): the kernel
# implementations as "impls", one entry per model plan ("ppl", "passkey", "decode", "ruler"), and the
# kernel and perplexity fields (ppl_scheme, query_len, ragged, kv_lens, page_size) inside "config"
# beside allow_interpreter (which stays there). No "command" and no "plans".

OLD_SETTINGS = {"warmup_ms": 100.0, "rep_ms": 40.0, "min_repeats": 3, "max_repeats": 100, "check_rows": 256,
                "seed": 11, "model": "", "text": "", "ppl_tokens": 300, "ppl_stride": 64, "decode_tokens": 16,
                "haystack": "corpus", "continuation_tokens": 256, "bandwidth_gbps": 12.5,
                "bandwidth_probe_gbps": 11.0, "bandwidth_source": "probe", "cuda_graph": True}


def old_config(**changes) -> dict:
    config = {"batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "float32", "mask": "causal",
              "window": None, "mode": "fwd", "device": "cpu", "allow_interpreter": False, "sinks": 0,
              "ppl_scheme": "truncated", "query_len": None, "ragged": False, "kv_lens": None, "page_size": None}
    config.update(changes)
    return config


def old_spec(config: dict, impls: list[str], **entries) -> dict:
    spec = {"config": config, "impls": impls, "lengths": [32, 64, 128], "timeout_s": 75.0,
            "memory_limit_bytes": 3 * 2**30, "settings": OLD_SETTINGS, "reuse_workers": False, "ppl": None,
            "memory_limit_auto": True, "passkey": None, "decode": None, "ruler": None}
    spec.update(entries)
    return via_json(spec)


NEW_CONFIG = Config(batch=2, heads=4, kv_heads=2, head_dim=16, allow_interpreter=True)


def test_an_old_sweep_meta_json_gives_the_cells_of_the_same_new_spec():
    old = old_spec(old_config(query_len=8, page_size=16, allow_interpreter=True, ppl_scheme="strided"),
                   ["sdpa", "naive"],
                   ppl={"max_len": 64, "impls": ["naive"], "ropes": ["default", "yarn:2"], **MODEL},
                   decode={"max_len": 32, "impls": ["chunked"], **MODEL})
    spec = SweepSpec.from_json(old)
    new = SweepSpec(command="sweep", config=NEW_CONFIG, lengths=[32, 64, 128], timeout_s=75.0,
                    memory_limit_bytes=3 * 2**30, settings=Settings(**OLD_SETTINGS), reuse_workers=False,
                    memory_limit_auto=True,
                    plans={"kernel": KernelPlan(impls=["sdpa", "naive"], query_len=8, page_size=16),
                           "perplexity": PerplexityPlan(impls=["naive"], **MODEL, max_len=64,
                                                        ropes=["default", "yarn:2"], scheme="strided"),
                           "decode": DecodePlan(impls=["chunked"], **MODEL, max_len=32)})
    assert spec == new
    assert spec.cells() == new.cells()
    # the kernel fields the old configuration held are the kernel cells' fields now, and only theirs
    by_kind = {}
    for c in spec.cells():
        by_kind.setdefault(c.kind, []).append(c)
    assert {(c.get("query_len"), c.get("page_size")) for c in by_kind["kernel"]} == {(8, 16)}
    assert all(c.allow_interpreter for c in spec.cells())  # the run's configuration, every kind's
    assert {c.row()["ppl_scheme"] for c in by_kind["kernel"]} == {"truncated"}
    assert {c.row()["ppl_scheme"] for c in by_kind["perplexity"]} == {"strided"}
    assert [(c.impl, c.n) for c in by_kind["decode"]] == [("chunked", 32)]
    # and it saves as a new meta.json
    assert SweepSpec.from_json(via_json(spec.to_json())) == new


def test_an_old_kernel_only_meta_json_is_a_sweep_of_kernel_cells():
    spec = SweepSpec.from_json(old_spec(old_config(mask="window", window=24, sinks=2), ["sdpa"]))
    assert spec.command == "sweep" and list(spec.plans) == ["kernel"]
    assert spec.plans["kernel"] == KernelPlan(impls=["sdpa"])
    assert spec.config == Config(batch=2, heads=4, kv_heads=2, head_dim=16, mask="window", window=24, sinks=2)
    assert [(c.impl, c.n, c.kind) for c in spec.cells()] == [("sdpa", n, "kernel") for n in (32, 64, 128)]


def test_an_old_passkey_meta_json_is_a_passkey_run():
    passkey = {"impls": ["sdpa", "chunked"], "ropes": ["default"], "depths": [0.0, 1.0], "trials": 2, **MODEL}
    spec = SweepSpec.from_json(old_spec(old_config(), [], passkey=passkey))
    assert spec.command == "passkey" and list(spec.plans) == ["passkey"]
    want = [(impl, n, "default", d, t) for n in (32, 64, 128) for impl in ("sdpa", "chunked") for d in (0.0, 1.0)
            for t in (0, 1)]
    assert [(c.impl, c.n, c.get("rope"), c.get("depth"), c.get("trial")) for c in spec.cells()] == want
    assert spec.all_impls() == ["sdpa", "chunked"]


@pytest.mark.parametrize("continuation", [256, 0])
def test_an_old_ruler_meta_json_is_split_into_retrieval_and_continuation(continuation):
    ruler = {"impls": ["sdpa"], "tasks": ["niah_single"], "policies": ["full", "streaming"], "budgets": ["0.25"],
             "depths": [0.5], "trials": 1, "continuation": continuation, **MODEL}
    spec = SweepSpec.from_json(old_spec(old_config(), [], ruler=ruler))
    assert spec.command == "ruler"
    assert list(spec.plans) == (["retrieval", "continuation"] if continuation else ["retrieval"])
    # the old plan's cells at each length, per implementation: each task's prompts, then the continuation
    want = []
    for n in (32, 64, 128):
        pairs = [("full", None), ("streaming", "0.25")]
        want += [("retrieval", n, "niah_single", policy, budget) for policy, budget in pairs]
        if continuation:
            want += [("continuation", n, None, policy, budget) for policy, budget in pairs]
    got = [(c.kind, c.n, c.get("ruler_task"), c.get("policy"), c.get("kv_budget")) for c in spec.cells()]
    assert got == want


def test_an_old_meta_json_with_two_ruler_impls_has_the_same_cells_in_another_order():
    """Before kinds, an implementation's retrieval and continuation cells alternated per
    implementation; now each kind's cells come together at each length. Resume finds cells by
    key, so the set is what must match."""
    ruler = {"impls": ["sdpa", "chunked"], "tasks": ["vt"], "policies": ["full"], "budgets": ["0.5"],
             "depths": [0.25], "trials": 1, "continuation": 64, **MODEL}
    spec = SweepSpec.from_json(old_spec(old_config(), [], ruler=ruler))
    old_order = [(kind, impl, n) for n in (32, 64, 128) for impl in ("sdpa", "chunked")
                 for kind in ("retrieval", "continuation")]
    got = [(c.kind, c.impl, c.n) for c in spec.cells()]
    assert sorted(got) == sorted(old_order) and len(set(got)) == len(got)
    assert got[:4] == [("retrieval", "sdpa", 32), ("retrieval", "chunked", 32), ("continuation", "sdpa", 32),
                       ("continuation", "chunked", 32)]


def test_cell_json_round_trip():
    for cell in sweep_spec().cells():
        assert Cell.from_json(via_json(cell.to_json())) == cell
