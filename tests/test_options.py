"""ctxbench.engine.options on its own: Options, each command's flags, the small validators, the
implementations a command chooses, build_spec, --resume (resolve_resume and extend_spec) and
torchrun's check_world. In-process, no worker, no model: model kinds are left out of the new runs
(--ppl-max-len 0, a decode-shaped sweep) and their plans are built by hand for a resume."""

from __future__ import annotations

import json
import random

import pytest

from ctxbench.core import kinds, registry
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.engine.options import (LENGTH_FLAGS, RUN_FLAGS, SHARED_FLAGS, Options, build_spec, check_world,
                                     choose_impls, command_flags, extend_spec, lengths_of, mask_of, parse_dtype,
                                     parse_lengths, resolve_resume)
from ctxbench.engine.plan import PlanContext, SweepSpec
from ctxbench.measurements.decode import DecodePlan
from ctxbench.measurements.kernel import KernelPlan
from ctxbench.measurements.passkey import PasskeyPlan
from ctxbench.measurements.perplexity import PerplexityPlan
from ctxbench.measurements.ruler import ContinuationPlan, RetrievalPlan
from sweep_helpers import usage_message

MODEL = {"heads": 9, "kv_heads": 3, "head_dim": 64, "dtype": "float32"}


def typed(command: str, **values) -> Options:
    """Options as the CLI makes them when `values` were typed on the command line."""
    flags = {f.name: f.flag for f in command_flags(command)}
    return Options(command, values, {name: flags[name] for name in values})


@pytest.fixture
def plain_spec(tmp_path) -> str:
    """`file.py:function` of a plain function (no declaration: default capabilities, no KV cache)."""
    path = tmp_path / "plain_attention.py"
    path.write_text("def attn(q, k, v, *, causal, window, scale=None):\n"
                    "    import torch\n"
                    "    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)\n")
    return f"{path}:attn"


# ---------------------------------------------------------------- Options

def test_options_read_values_and_defaults_and_refuse_other_commands_flags():
    o = Options("sweep", {"heads": 4, "impl_specs": ["a.py:f", "b.py:g"]}, {"heads": "--heads"})
    assert o.command == "sweep" and o.heads == 4
    assert (o.min_len, o.max_len, o.timeout, o.out, o.executor) == (1024, None, 600.0, "results", "local")
    assert o.impl_specs == ("a.py:f", "b.py:g")  # repeatable flags are tuples
    assert o.kv_heads is None and o.ppl_scheme == "truncated" and o.decode_max_len == 0
    with pytest.raises(AttributeError, match=r"`ctxbench sweep` has no option 'depths'"):
        o.depths
    assert o.get("depths") is None and o.get("depths", "0.5") == "0.5" and o.get("heads", 99) == 4
    passkey = Options("passkey")
    assert passkey.depths is None and passkey.trials == 1 and passkey.impl_specs == ()
    with pytest.raises(AttributeError):
        passkey.ppl_max_len
    with pytest.raises(TypeError, match="ppl_max_len"):
        Options("passkey", {"ppl_max_len": 0})


def test_options_replace_keeps_what_was_typed():
    o = typed("sweep", heads=4, seed=3)
    again = o.replace(heads=2, lengths="8,16")
    assert (again.heads, again.seed, again.lengths) == (2, 3, "8,16")
    assert again.given == {"heads": "--heads", "seed": "--seed"}
    assert o.heads == 4 and o.lengths is None  # the original is unchanged


# ---------------------------------------------------------------- each command's flags

def test_every_command_has_the_shared_flags_around_its_kinds_flags():
    assert set(kinds.commands()) >= {"sweep", "passkey", "ruler"}
    for name in kinds.commands():
        flags = command_flags(name)
        names = [f.name for f in flags]
        assert len(names) == len(set(names)), name
        assert len({f.flag for f in flags}) == len(flags), name
        assert names[:len(LENGTH_FLAGS)] == [f.name for f in LENGTH_FLAGS]
        assert names[-len(RUN_FLAGS):] == [f.name for f in RUN_FLAGS]
        own = {f.name for k in kinds.kinds_of(name) for f in k.flags}
        assert set(names) == own | {f.name for f in SHARED_FLAGS}


def test_each_command_takes_its_kinds_flags_and_no_others():
    names = {c: {f.name for f in command_flags(c)} for c in ("sweep", "passkey", "ruler")}
    assert {"depths", "trials", "rope", "mask", "window", "sinks"} <= names["passkey"]
    assert not {"ppl_max_len", "decode_max_len", "query_len", "heads", "policies"} & names["passkey"]
    assert {"query_len", "kv_lens", "heads", "mask", "ppl_max_len", "ppl_scheme", "decode_max_len",
            "text_path"} <= names["sweep"]
    assert not {"depths", "trials", "policies", "ruler_tasks"} & names["sweep"]
    assert {"ruler_tasks", "policies", "kv_budget", "depths", "trials", "continuation_tokens"} <= names["ruler"]
    assert not {"mask", "window", "ppl_max_len", "query_len"} & names["ruler"]


@pytest.mark.parametrize("command, longest, impls", [
    ("sweep", "(default: 16384)", "(default: all that support the configuration)"),
    ("passkey", "(default: 4096 cpu, 32768 cuda)", "(default: sdpa, plus any --impl)"),
    ("ruler", "(default: 4096 cpu, 32768 cuda)", "(default: sdpa, plus any --impl)"),
])
def test_max_len_and_impls_help_name_the_commands_defaults(command, longest, impls):
    by_name = {f.name: f for f in command_flags(command)}
    assert by_name["max_len"].help.endswith(longest)
    assert by_name["impl_names"].help.endswith(impls)
    assert by_name["max_len"].flag == "--max-len" and by_name["max_len"].default is None


# ---------------------------------------------------------------- lengths, dtype, mask

def test_parse_lengths_reads_increasing_positive_lengths():
    assert parse_lengths("1024, 2048,4096") == [1024, 2048, 4096]
    assert parse_lengths("8,16,") == [8, 16]
    rng = random.Random(7)
    lengths = sorted(rng.sample(range(1, 100000), 12))
    assert parse_lengths(",".join(map(str, lengths))) == lengths


@pytest.mark.parametrize("text, fragment", [
    ("", "--lengths is empty"),
    (",", "--lengths is empty"),
    ("12x", "not a comma-separated list of integers"),
    ("1.5,3", "not a comma-separated list of integers"),
    ("0,128", "must be positive"),
    ("-8,16", "must be positive"),
    ("128,64", "strictly increasing"),
    ("64,64", "strictly increasing"),
])
def test_parse_lengths_errors_are_one_line(text, fragment):
    assert fragment in usage_message(parse_lengths, text)


def test_lengths_of_explicit_lengths_powers_of_two_and_the_commands_default():
    assert lengths_of(Options("sweep", {"lengths": "10,20"}), 16384) == [10, 20]
    assert lengths_of(Options("sweep", {"min_len": 1000, "max_len": 4096}), 16384) == [1000, 1024, 2048, 4096]
    assert lengths_of(Options("sweep", {"min_len": 256}), 2048) == [256, 512, 1024, 2048]  # default max
    assert lengths_of(Options("sweep"), 1024) == [1024]
    assert "below --min-len 512" in usage_message(lengths_of, Options("sweep", {"min_len": 512, "max_len": 256}), 1)
    assert "must be positive (got 0 and 64)" in usage_message(lengths_of, Options("sweep", {"min_len": 0}), 64)
    assert "must be positive" in usage_message(lengths_of, Options("sweep", {"max_len": -1}), 64)


def test_parse_dtype_aliases():
    for text, want in (("fp32", "float32"), ("BF16", "bfloat16"), ("torch.float16", "float16"), ("half", "float16"),
                       (" f32 ", "float32")):
        assert parse_dtype(text) == want
    assert "unsupported --dtype 'float64'" in usage_message(parse_dtype, "float64")


ALL_MASKS = ("none", "causal", "window")


@pytest.mark.parametrize("values, want", [
    ({}, ("causal", None, 0)),
    ({"window": 8}, ("window", 8, 0)),          # --window alone means --mask window
    ({"window": 8, "sinks": 2}, ("window", 8, 2)),
    ({"mask": "none"}, ("none", None, 0)),
    ({"mask": "window", "window": 1}, ("window", 1, 0)),
])
def test_mask_of(values, want):
    assert mask_of(Options("sweep", values), ALL_MASKS) == want


@pytest.mark.parametrize("values, fragments", [
    ({"mask": "window"}, ["--mask window:", "needs a window"]),
    ({"mask": "causal", "window": 8}, ["--mask causal --window 8:"]),
    ({"window": 0}, ["--mask window --window 0:"]),
    ({"sinks": 2}, ["--mask causal --sinks 2:", "--sinks S needs one"]),
    ({"window": 8, "sinks": -1}, ["--sinks -1"]),
])
def test_mask_of_errors_name_the_flags(values, fragments):
    message = usage_message(mask_of, Options("sweep", values), ALL_MASKS)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_mask_of_keeps_to_the_commands_masks():
    passkey_masks = kinds.command("passkey").masks
    assert passkey_masks == ("causal", "window")
    message = usage_message(mask_of, Options("passkey", {"mask": "none"}), passkey_masks)
    assert message == "--mask none is not available here; choose causal, window"
    # a command without --mask runs causal
    assert "mask" not in Options("ruler").values
    assert mask_of(Options("ruler"), kinds.command("ruler").masks) == ("causal", None, 0)


# ---------------------------------------------------------------- implementations

def chosen(o: Options, config: Config | None = None, world: int = 1) -> list[str]:
    from ctxbench.engine.options import impl_names

    context = PlanContext(options=o, config=config or Config(), lengths=[1024], impls=[],
                          named=bool(impl_names(o) or o.impl_specs), world=world)
    return choose_impls(o, context)


def test_sweep_runs_the_named_implementations_and_impl_alone_replaces_the_defaults(plain_spec):
    assert chosen(Options("sweep", {"impl_names": "naive, sdpa"})) == ["naive", "sdpa"]
    assert chosen(Options("sweep", {"impl_names": "sdpa,naive,sdpa"})) == ["sdpa", "naive"]
    assert chosen(Options("sweep", {"impl_specs": (plain_spec,)})) == [plain_spec]
    assert chosen(Options("sweep", {"impl_names": "naive", "impl_specs": (plain_spec,)})) == ["naive", plain_spec]
    message = usage_message(chosen, Options("sweep", {"impl_names": "sdpa,nosuch"}))
    assert "unknown implementation 'nosuch'" in message and "known:" in message


def test_sweep_defaults_are_what_supports_the_configuration_on_the_device():
    cpu = chosen(Options("sweep"))
    assert {"sdpa", "naive", "chunked"} <= set(cpu)
    everything = registry.all_impls()
    for name in cpu:
        impl = everything[name]
        assert "cpu" in impl.devices and not impl.distributed and impl.in_default_sweep("cpu"), name
    assert not {"ring", "sdpa_flash", "flash_attn", "flex"} & set(cpu)  # distributed, cuda-only, cuda-default
    # a window sweep leaves out what declares no window; sliding_window declares only the window
    assert "sliding_window" not in cpu
    assert "sliding_window" in chosen(Options("sweep", {"window": 8}), Config(mask="window", window=8))
    # under torchrun only the distributed ones
    assert chosen(Options("sweep"), world=2) == ["ring"]


def test_a_decode_sweeps_defaults_take_decode_kernels():
    decode = Cell.of(Config(), "", 2, "kernel", query_len=1)
    decode_only = [n for n, i in registry.all_impls().items()
                   if i.max_query_len is not None and i.declared_reason(decode) is None and i.in_default_sweep("cpu")]
    if not decode_only:
        pytest.skip("no decode-only kernel is registered")
    o = Options("sweep", {"query_len": 1})
    assert set(decode_only) <= set(chosen(o))
    assert not set(decode_only) & set(chosen(Options("sweep")))  # a prefill's square is over their limit


def test_passkey_impl_joins_sdpa(plain_spec):
    assert kinds.command("passkey").specs_join_defaults
    assert chosen(Options("passkey")) == ["sdpa"]
    assert chosen(Options("passkey", {"impl_specs": (plain_spec,)})) == ["sdpa", plain_spec]
    assert chosen(Options("passkey", {"impl_names": "chunked", "impl_specs": (plain_spec,)})) == \
           ["chunked", plain_spec]


# ---------------------------------------------------------------- build_spec

KERNEL_ONLY = {"device": "cpu", "ppl_max_len": 0, "impl_names": "sdpa"}


def test_build_spec_of_a_kernel_sweep():
    o = typed("sweep", **KERNEL_ONLY, lengths="16,32", heads=6, kv_heads=2, head_dim=8, dtype="bf16", seed=5,
              rep_ms=12.0, memory_limit=1.5, fresh_worker=True, window=4, sinks=1, timeout=30.0)
    spec = build_spec(o)
    assert spec.command == "sweep" and spec.lengths == [16, 32] and list(spec.plans) == ["kernel"]
    assert spec.config == Config(batch=1, heads=6, kv_heads=2, head_dim=8, dtype="bfloat16", mask="window",
                                 window=4, sinks=1, mode="fwd", device="cpu")
    assert spec.plans["kernel"] == KernelPlan(impls=["sdpa"])
    assert (spec.settings.seed, spec.settings.rep_ms, spec.settings.warmup_ms) == (5, 12.0, 100.0)
    assert (spec.timeout_s, spec.memory_limit_bytes, spec.memory_limit_auto, spec.reuse_workers) == \
           (30.0, int(1.5 * 2**30), False, False)
    auto = build_spec(typed("sweep", **KERNEL_ONLY, lengths="16"))
    assert auto.memory_limit_auto and auto.memory_limit_bytes > 0
    assert auto.config.kv_heads == auto.config.heads == 8 and auto.config.dtype == "float32"
    assert auto.settings.rep_ms == 1000.0  # the cpu default


def test_build_spec_kv_lens_fix_the_length():
    o = typed("sweep", **KERNEL_ONLY, batch=2, kv_lens="100,300")
    spec = build_spec(o)
    assert spec.lengths == [300] and spec.plans["kernel"].kv_lens == "100,300"
    padded = build_spec(typed("sweep", **KERNEL_ONLY, batch=2, kv_lens="100, 300", max_len=512))
    assert padded.lengths == [512] and padded.plans["kernel"].kv_lens == "100,300"
    cell = padded.cells()[0]
    assert (cell.n, cell.get("kv_lens"), cell.is_ragged) == (512, "100,300", True)
    for extra, fragment in (({"lengths": "64"}, "--kv-lens fixes the KV lengths"),
                            ({"min_len": 64}, "--kv-lens fixes the KV lengths"),
                            ({"max_len": 200}, "300 is above --max-len 200"),
                            ({"batch": 3}, "gives 2 lengths for --batch 3"),
                            ({"ragged": True}, "give one of them")):
        o = typed("sweep", **{**KERNEL_ONLY, "batch": 2, "kv_lens": "100,300", **extra})
        assert fragment in usage_message(build_spec, o)


def test_build_spec_refuses_a_query_len_above_the_shortest_length():
    message = usage_message(build_spec, typed("sweep", **KERNEL_ONLY, lengths="16,32", query_len=20))
    assert message.startswith("--query-len 20 is above the KV length 16")
    spec = build_spec(typed("sweep", device="cpu", impl_names="sdpa", lengths="16,32", query_len=16))
    # a decode-shaped sweep plans no perplexity unless --ppl-max-len asks for it
    assert list(spec.plans) == ["kernel"] and spec.plans["kernel"].query_len == 16
    assert [(c.n, c.q_len) for c in spec.cells()] == [(16, 16), (32, 16)]


@pytest.mark.parametrize("values, fragment", [
    ({"heads": 6, "kv_heads": 4}, "--heads 6 is not divisible by --kv-heads 4"),
    ({"timeout": 0.0}, "--timeout must be positive"),
    ({"memory_limit": -1.0}, "--memory-limit must be positive"),
    ({"address": "127.0.0.1:1"}, "needs --executor ray"),
    ({"device": "tpu"}, "unsupported --device 'tpu'"),
    ({"ppl_max_len": -1}, "--ppl-max-len must be a positive integer"),
    ({"decode_tokens": 1}, "--decode-tokens must be at least 2"),
    ({"mode": "bwd", "ragged": True}, "measured forward only"),
])
def test_build_spec_validates_every_kinds_flags(values, fragment):
    assert fragment in usage_message(build_spec, typed("sweep", **{**KERNEL_ONLY, "lengths": "16", **values}))


# ---------------------------------------------------------------- --resume

def saved_run(tmp_path, spec: SweepSpec, name: str = "run") -> str:
    """A run folder holding spec in meta.json, as the sweep writes it."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"run_id": name, "spec": spec.to_json()}))
    return str(run_dir)


def kernel_spec(impls=("sdpa",), lengths=(32, 64)) -> SweepSpec:
    return SweepSpec(command="sweep", config=Config(heads=2, kv_heads=2, head_dim=16), lengths=list(lengths),
                     timeout_s=600.0, memory_limit_bytes=2**30, settings=Settings(seed=4, rep_ms=5.0),
                     plans={"kernel": KernelPlan(impls=list(impls))})


def test_resume_without_flags_gives_the_saved_spec(tmp_path):
    spec = kernel_spec()
    run_dir = saved_run(tmp_path, spec)
    again, where, changes = resolve_resume(typed("sweep", resume=run_dir))
    assert (again, where, changes) == (spec, run_dir, {})
    # a run id under --out finds the same folder
    again, where, _ = resolve_resume(typed("sweep", resume="run", out=str(tmp_path)))
    assert again == spec and where == run_dir


@pytest.mark.parametrize("values, fragment", [
    ({"dtype": "bf16"}, "--dtype cannot change when resuming"),
    ({"heads": 4, "mask": "none"}, "--heads, --mask cannot change when resuming"),
    ({"seed": 1}, "--seed cannot change"),
    ({"ppl_max_len": 0}, "--ppl-max-len cannot change"),
    ({"fresh_worker": True}, "--fresh-worker cannot change"),
])
def test_resume_refuses_a_configuration_flag(tmp_path, values, fragment):
    run_dir = saved_run(tmp_path, kernel_spec())
    message = usage_message(resolve_resume, typed("sweep", resume=run_dir, **values))
    assert fragment in message and "resume without" in message


def test_resume_refuses_dropping_lengths(tmp_path):
    run_dir = saved_run(tmp_path, kernel_spec(lengths=(32, 64)))
    message = usage_message(resolve_resume, typed("sweep", resume=run_dir, lengths="64,128"))
    assert "leave out 32 of the run" in message and "can only gain lengths" in message
    message = usage_message(resolve_resume, typed("sweep", resume=run_dir, min_len=64, max_len=256))
    assert "(64, 128, 256) leave out 32" in message


def test_resume_gains_lengths_implementations_and_a_timeout(tmp_path, plain_spec):
    run_dir = saved_run(tmp_path, kernel_spec(lengths=(32, 64)))
    # --max-len alone grows the run's own powers of two from its shortest length
    spec, _, changes = resolve_resume(typed("sweep", resume=run_dir, max_len=256))
    assert changes == {"lengths": [32, 64, 128, 256]} and spec.lengths == [32, 64, 128, 256]
    spec, _, changes = resolve_resume(typed("sweep", resume=run_dir, lengths="32,64,96", impl_names="sdpa,naive",
                                            impl_specs=(plain_spec,), timeout=300.0))
    assert changes == {"lengths": [32, 64, 96], "impls": ["sdpa", "naive", plain_spec], "timeout_s": 300.0}
    assert spec.plans["kernel"].impls == ["sdpa", "naive", plain_spec] and spec.timeout_s == 300.0
    assert [(c.impl, c.n) for c in spec.cells()][:3] == [("sdpa", 32), ("naive", 32), (plain_spec, 32)]
    # the same timeout, lengths and implementations as saved change nothing
    _, _, changes = resolve_resume(typed("sweep", resume=run_dir, lengths="32,64", impl_names="sdpa",
                                         timeout=600.0))
    assert changes == {}


def test_resume_refuses_leaving_out_implementations(tmp_path):
    run_dir = saved_run(tmp_path, kernel_spec(impls=("sdpa", "chunked")))
    message = usage_message(resolve_resume, typed("sweep", resume=run_dir, impl_names="naive,chunked"))
    assert "--impls leaves out sdpa of the run" in message and "give --impls sdpa,chunked,naive" in message
    assert "unknown implementation 'nosuch'" in usage_message(
        resolve_resume, typed("sweep", resume=run_dir, impl_names="sdpa,chunked,nosuch"))


# A run with an --impl spec (file.py:function): --impls names registered implementations only, so it
# can't leave the spec out (the spec stays in the run), and a refusal's hint never puts the spec there
# (following such a hint once failed with "unknown implementation").
def test_a_resumes_impls_keep_the_runs_impl_spec(tmp_path, plain_spec):
    run_dir = saved_run(tmp_path, kernel_spec(impls=("sdpa", plain_spec)))
    _, _, changes = resolve_resume(typed("sweep", resume=run_dir, impl_names="sdpa,naive"))
    assert changes == {"impls": ["sdpa", plain_spec, "naive"]}
    message = usage_message(resolve_resume, typed("sweep", resume=run_dir, impl_names="naive"))
    assert "--impls leaves out sdpa of the run" in message and plain_spec not in message
    hint = message.split("(give ", 1)[1].rsplit(")", 1)[0].split()
    assert hint == ["--impls", "sdpa,naive"]
    _, _, changes = resolve_resume(typed("sweep", resume=run_dir, impl_names=hint[1]))
    assert changes == {"impls": ["sdpa", plain_spec, "naive"]}


def test_resume_of_another_commands_run_or_of_no_run(tmp_path):
    run_dir = saved_run(tmp_path, kernel_spec())
    message = usage_message(resolve_resume, typed("passkey", resume=run_dir))
    assert message == f"{run_dir} is a `ctxbench sweep` run; continue it with ctxbench sweep --resume {run_dir}"
    assert "no such run folder" in usage_message(resolve_resume, typed("sweep", resume=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    assert "has no meta.json" in usage_message(resolve_resume, typed("sweep", resume=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text(json.dumps({"spec": {"command": "sweep"}}))
    assert "meta.json's spec can't be read (KeyError" in usage_message(resolve_resume,
                                                                       typed("sweep", resume=str(tmp_path / "bad")))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "meta.json").write_text('{"spec": {"comm')
    assert "meta.json is unreadable (JSONDecodeError" in usage_message(resolve_resume,
                                                                       typed("sweep", resume=str(tmp_path / "torn")))


# ---------------------------------------------------------------- extend_spec

def model_sweep() -> SweepSpec:
    return SweepSpec(command="sweep", config=Config(), lengths=[64], timeout_s=60.0, memory_limit_bytes=None,
                     plans={"kernel": KernelPlan(impls=["sdpa"]),
                            "perplexity": PerplexityPlan(impls=["sdpa"], **MODEL, max_len=64, ropes=["default"]),
                            "decode": DecodePlan(impls=["sdpa"], **MODEL, max_len=64)})


def test_extend_spec_adds_implementations_each_kind_can_run(plain_spec):
    spec = model_sweep()
    names = ["sdpa", "naive", "ring", plain_spec]
    extended = extend_spec(spec, {"impls": names})
    assert extended.plans["kernel"].impls == names
    # perplexity: every added one that runs in one process; decode: those that take a KV cache
    assert extended.plans["perplexity"].impls == ["sdpa", "naive", plain_spec]
    assert extended.plans["decode"].impls == ["sdpa", "naive"]
    assert extended.plans["perplexity"].max_len == 64 and extended.plans["decode"].heads == 9
    assert {(c.kind, c.impl) for c in extended.cells()} == {
        *(("kernel", n) for n in names), ("perplexity", "sdpa"), ("perplexity", "naive"),
        ("perplexity", plain_spec), ("decode", "sdpa"), ("decode", "naive")}
    assert spec.plans["kernel"].impls == ["sdpa"]  # the saved spec is not changed in place


def test_extend_spec_changes_lengths_and_timeout_only():
    spec = model_sweep()
    extended = extend_spec(spec, {"lengths": [64, 128], "timeout_s": 5.0})
    assert extended.lengths == [64, 128] and extended.timeout_s == 5.0 and extended.plans == spec.plans


def test_extend_spec_refuses_what_a_model_command_cannot_run(plain_spec):
    passkey = SweepSpec(command="passkey", config=Config(), lengths=[256], timeout_s=60.0, memory_limit_bytes=None,
                        plans={"passkey": PasskeyPlan(impls=["sdpa"], **MODEL, ropes=["default"], depths=[0.5])})
    assert extend_spec(passkey, {"impls": ["sdpa", "chunked"]}).plans["passkey"].impls == ["sdpa", "chunked"]
    assert "ring: a distributed implementation can't run passkey" in usage_message(
        extend_spec, passkey, {"impls": ["sdpa", "ring"]})
    shared = dict(impls=["sdpa"], **MODEL, policies=["full"], budgets=["0.5"])
    ruler = SweepSpec(command="ruler", config=Config(), lengths=[256], timeout_s=60.0, memory_limit_bytes=None,
                      plans={"retrieval": RetrievalPlan(**shared, tasks=["vt"], depths=[0.5]),
                             "continuation": ContinuationPlan(**shared)})
    grown = extend_spec(ruler, {"impls": ["sdpa", "naive"]})
    assert grown.plans["retrieval"].impls == grown.plans["continuation"].impls == ["sdpa", "naive"]
    assert f"{plain_spec} does not take a KV cache" in usage_message(extend_spec, ruler,
                                                                     {"impls": ["sdpa", plain_spec]})


def test_extend_spec_refuses_a_saved_implementation_that_no_longer_resolves(tmp_path):
    gone = str(tmp_path / "moved.py") + ":attn"
    spec = kernel_spec(impls=("sdpa", gone))
    assert f"--impl {gone!r}: no file" in usage_message(extend_spec, spec, {})
    assert "unknown implementation 'retired'" in usage_message(extend_spec, kernel_spec(impls=("retired",)), {})


# ---------------------------------------------------------------- torchrun

def test_check_world_runs_only_distributed_kernels():
    check_world(kernel_spec(impls=("ring",)), 2)
    message = usage_message(check_world, kernel_spec(impls=("ring", "sdpa")), 2)
    assert message.startswith("under torchrun (WORLD_SIZE=2) only distributed implementations run")
    assert "sdpa would run once per rank: run it without torchrun" in message
    assert "sdpa, naive would run once per rank: run them without torchrun" in usage_message(
        check_world, kernel_spec(impls=("sdpa", "ring", "naive")), 4)
    spec = model_sweep()
    spec.plans = {"kernel": KernelPlan(impls=["ring"]), "perplexity": spec.plans["perplexity"]}
    assert "ctxbench sweep would run once per rank" in usage_message(check_world, spec, 2)
    spec.plans["perplexity"] = PerplexityPlan(impls=[], **MODEL, max_len=64, ropes=["default"])
    check_world(spec, 2)  # a model plan with no implementation runs nothing

