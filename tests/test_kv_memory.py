"""`ctxbench kv`: KV-cache bytes of whole models, checked against numbers worked out by hand.

Pure arithmetic on configs: no torch, no GPU; the whole file runs in well under a second.
"""

from __future__ import annotations

import json

import pytest

from ctxbench.reports import kv_memory as kv
from sweep_helpers import run_cli, usage_error

KIB, MIB, GIB = 2**10, 2**20, 2**30
BF16 = 2


def shape(name: str) -> kv.ModelShape:
    preset, config = kv.load_config(name)
    return kv.shape_of(config, preset)


# ---------------------------------------------------------------- per-token bytes of the presets

@pytest.mark.parametrize("name, per_token", [
    # 32 layers * 2 (K, V) * 8 KV heads * 128 head_dim * 2 B = 131072 B = 128 KiB
    ("llama-3.1-8b", 128 * KIB),
    # 80 layers * 2 * 8 * 128 * 2 B = 327680 B = 320 KiB
    ("Llama-3.1-70B", 320 * KIB),
    # 28 layers * 2 * 4 * 128 * 2 B = 57344 B = 56 KiB (its sliding_window is unused)
    ("qwen2.5-7b", 56 * KIB),
    # 30 layers * 2 * 3 * 64 * 2 B = 23040 B = 22.5 KiB
    ("SMOLLM2-135M", 23040),
    # 61 MLA layers * (512 kv_lora_rank + 64 qk_rope_head_dim) * 2 B = 70272 B
    ("deepseek-v3", 61 * (512 + 64) * 2),
])
def test_bytes_per_token(name, per_token):
    assert kv.bytes_per_token(shape(name), BF16) == per_token


def test_llama_8b_at_128k_tokens_is_16_gib():
    # 131072 B/token * 131072 tokens = 2**17 * 2**17 = 2**34 B = 16 GiB
    assert kv.kv_bytes(shape("llama-3.1-8b"), 131072, BF16) == 16 * GIB


def test_mistral_caps_at_its_window():
    s = shape("mistral-7b")
    assert s.kinds == (kv.SLIDING,) * 32 and s.window == 4096
    # 131072 B/token * 4096 tokens = 512 MiB, and no more past the window
    assert kv.kv_bytes(s, 4096, BF16) == 512 * MIB
    assert kv.kv_bytes(s, 8192, BF16) == kv.kv_bytes(s, 4096, BF16)
    assert kv.kv_bytes(s, 2048, BF16) == 256 * MIB


def test_gemma_3_27b_interleaves_5_local_1_global():
    s = shape("gemma-3-27b")
    # sliding_window_pattern 6: layer i (from 0) is global when (i + 1) % 6 == 0 -> 5, 11, ..., 59
    assert [i for i, k in enumerate(s.kinds) if k == kv.FULL] == list(range(5, 62, 6))
    assert (s.count(kv.FULL), s.count(kv.SLIDING)) == (10, 52)
    # one layer, one token: 2 * 16 KV heads * 128 * 2 B = 8192 B
    # 512 tokens (inside the window): 62 layers * 8192 * 512 = 260046848 B
    assert kv.kv_bytes(s, 512, BF16) == 260_046_848
    # 32768 tokens: 10 global * 8192 * 32768 + 52 sliding * 8192 * 1024 = 2684354560 + 436207616
    assert kv.kv_bytes(s, 32768, BF16) == 3_120_562_176


def test_gemma_3_4b_interleaves_too():
    s = shape("gemma-3-4b")
    assert (s.count(kv.FULL), s.count(kv.SLIDING), s.window) == (5, 29, 1024)
    # one layer, one token: 2 * 4 KV heads * 256 * 2 B = 4096 B
    # 8192 tokens: 5 * 4096 * 8192 + 29 * 4096 * 1024 = 167772160 + 121634816
    assert kv.kv_bytes(s, 8192, BF16) == 289_406_976


def test_deepseek_v3_mla_at_1k():
    # 70272 B/token * 1024 tokens; MLA caches no per-head K/V, so num_key_value_heads 128 is unused
    assert kv.kv_bytes(shape("deepseek-v3"), 1024, BF16) == 70272 * 1024


def test_fp8_halves_bf16():
    assert kv.bytes_per_token(shape("llama-3.1-8b"), kv.DTYPE_BYTES["fp8"]) == 64 * KIB


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name, exact", [
    # 2 * 128256 * 4096 (embeddings, lm_head) + 32 * (41943040 attention + 176160768 MLP + 8192 norms) + 4096
    ("llama-3.1-8b", 8_030_261_248),
    # 49152 * 576 (tied) + 30 * (884736 + 2654208 + 1152) + 576
    ("smollm2-135m", 134_515_008),
    # 2 * 152064 * 3584 + 28 * (29364736 attention with q/k/v biases + 203685888 + 7168) + 3584
    # = the 15,231,233,024 bytes of its bf16 safetensors / 2
    ("qwen2.5-7b", 7_615_616_512),
])
def test_param_count_exact(name, exact):
    assert shape(name).params == exact


@pytest.mark.parametrize("name", list(kv.PRESETS))
def test_param_count_is_within_1_percent_of_the_published(name):
    published = kv.PRESETS[name]["published_params"]
    assert abs(shape(name).params / published - 1) < 0.01, (name, shape(name).params, published)


# ---------------------------------------------------------------- the fit

def toy(kinds: tuple[str, ...], window: int | None = None, params: int = 100) -> kv.ModelShape:
    # 1 KV head * head_dim 4: 2 * 1 * 4 = 8 values, 16 B per token per layer in bf16
    return kv.ModelShape(name="toy", kinds=kinds, kv_heads=1, head_dim=4, window=window, mla_width=0, params=params)


def test_fit_by_hand():
    s = toy((kv.FULL, kv.FULL))
    # usable 10000 * 0.5 = 5000 B; weights 100 params * 2 B = 200 B; budget 4800 B
    # 32 B per token: longest 4800 // 32 = 150 tokens; 100 tokens = 3200 B -> 1; 10 tokens = 320 B -> 15
    result = kv.fit(s, 10_000, BF16, [10, 100, 200], utilization=0.5)
    assert (result.weight_bytes, result.budget, result.longest) == (200, 4800, 150)
    assert [(r.tokens, r.kv_bytes, r.max_batch) for r in result.rows] == [(10, 320, 15), (100, 3200, 1),
                                                                          (200, 6400, 0)]


def test_fit_with_a_window_by_hand():
    s = toy((kv.FULL, kv.SLIDING), window=10)
    # bytes(L) = 16 L + 16 min(L, 10); budget 4800 >= bytes(10) = 320, so past the window:
    # 16 L + 160 <= 4800 -> L = 290
    assert kv.fit(s, 10_000, BF16, [1024], utilization=0.5).longest == 290
    # a budget below the window: every layer grows, 32 B per token -> 100 // 32 = 3
    assert kv.max_tokens(s, 100, BF16) == 3


def test_every_layer_sliding_has_no_kv_limit():
    assert kv.max_tokens(shape("mistral-7b"), 40 * GIB, BF16) is None
    assert kv.max_tokens(shape("mistral-7b"), 100 * MIB, BF16) == 100 * MIB // (128 * KIB)


def test_llama_8b_on_80_gib():
    # usable int(0.9 * 80 GiB) = 77309411328 B; weights 8030261248 * 2 = 16060522496 B
    # budget 61248888832 B; // 131072 B/token = 467291 tokens; at 131072 tokens (16 GiB each): 3
    result = kv.fit(shape("llama-3.1-8b"), 80 * GIB, BF16, [131072])
    assert result.budget == 61_248_888_832
    assert result.longest == 467_291
    assert result.rows[0].max_batch == 3


def test_weights_that_do_not_fit_are_reported(capsys):
    code, out, err = run_cli(["kv", "deepseek-v3", "--gpu-memory", "80GiB"], capsys)
    assert code == 0, err
    assert "the weights alone do not fit" in out
    assert "61 MLA" in out
    # 671026419200 parameters * 2 B > 72 GiB usable: no batch at any length, shown as "-"
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 11 and all(r[-1] == "-" for r in rows)


# ---------------------------------------------------------------- reading configs

def write(folder, config: dict) -> str:
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


QWEN_LIKE = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "sliding_window": 32,
             "use_sliding_window": False, "max_window_layers": 2}


def test_config_file_and_folder_are_read(tmp_path):
    path = write(tmp_path, QWEN_LIKE)
    for source in (path, str(tmp_path)):
        _, config = kv.load_config(source)
        s = kv.shape_of(config, "x")
        # head_dim 64 / 4 = 16; 4 layers * 2 * 2 KV heads * 16 * 2 B = 512 B per token; no layer slides
        assert s.kinds == (kv.FULL,) * 4
        assert kv.bytes_per_token(s, BF16) == 512


def test_qwen2_max_window_layers(tmp_path):
    # use_sliding_window true: layers from max_window_layers (2) on slide
    config = dict(QWEN_LIKE, use_sliding_window=True)
    assert kv.layer_kinds(config) == [kv.FULL, kv.FULL, kv.SLIDING, kv.SLIDING]


def test_layer_types_win(tmp_path):
    config = dict(QWEN_LIKE, layer_types=["sliding_attention", "full_attention"] * 2)
    assert kv.layer_kinds(config) == [kv.SLIDING, kv.FULL] * 2


def test_multimodal_text_config_is_read(tmp_path):
    nested = {"model_type": "gemma3", "text_config": dict(kv.PRESETS["gemma-3-4b"], model_type="gemma3_text"),
              "vision_config": {"hidden_size": 1152}}
    _, config = kv.load_config(write(tmp_path, nested))
    assert kv.shape_of(config, "x").count(kv.FULL) == 5


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GIB), ("141GB", 141 * 10**9), ("24 GiB", 24 * GIB),
                                            ("512MiB", 512 * MIB), ("1.5GB", 1_500_000_000)])
def test_parse_bytes(text, expected):
    assert kv.parse_bytes(text) == expected


# ---------------------------------------------------------------- the command

def test_command_prints_a_row_per_length(capsys):
    code, out, err = run_cli(["kv", "llama-3.1-8b", "--gpu-memory", "80GiB", "--lengths", "1024,131072"], capsys)
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert rows == [["1024", "128", "MiB", "456"], ["131072", "16", "GiB", "3"]]
    assert "131072 B (128 KiB)" in out and "467291 tokens" in out and "32 global" in out


def test_command_default_lengths_go_to_1m(capsys):
    code, out, _ = run_cli(["kv", "gemma-3-27b"], capsys)
    assert code == 0
    assert "1048576" in out and "10 global" in out and "52 sliding" in out


@pytest.mark.parametrize("args, fragments", [
    (["kv", "no-such-model"], ["no preset or file named 'no-such-model'", "Llama-3.1-8B", "DeepSeek-V3"]),
    (["kv", "llama-3.1-8b", "--gpu-memory", "lots"], ["--gpu-memory", "80GiB"]),
    (["kv", "llama-3.1-8b", "--gpu-memory", "0GiB"], ["--gpu-memory", "positive"]),
    (["kv", "llama-3.1-8b", "--dtype", "int4"], ["unsupported --dtype 'int4'", "fp8"]),
    (["kv", "llama-3.1-8b", "--utilization", "1.5"], ["--utilization"]),
    (["kv", "llama-3.1-8b", "--lengths", "8,4"], ["strictly increasing"]),
    (["kv", "llama-3.1-8b", "--params", "many"], ["--params"]),
])
def test_bad_input_is_one_line_and_exit_2(args, fragments, capsys):
    usage_error(args, capsys, *fragments, quiet=True)


def test_bad_configs_are_one_line_and_exit_2(tmp_path, capsys):
    usage_error(["kv", str(tmp_path)], capsys, "has no config.json", quiet=True)
    (tmp_path / "config.json").write_text("{not json")
    usage_error(["kv", str(tmp_path)], capsys, "not valid JSON", quiet=True)
    write(tmp_path, {"hidden_size": 64})
    usage_error(["kv", str(tmp_path / "config.json")], capsys, "no num_hidden_layers", quiet=True)
    write(tmp_path, dict(QWEN_LIKE, layer_types=["linear_attention"] * 4))
    usage_error(["kv", str(tmp_path)], capsys, "linear_attention", quiet=True)
    unreadable = tmp_path / "sub"
    unreadable.mkdir()
    (unreadable / "config.json").mkdir()  # a folder where the file should be
    usage_error(["kv", str(unreadable)], capsys, "cannot read", quiet=True)


def test_qwen2_without_use_sliding_window_does_not_slide():
    # transformers' Qwen2Config defaults use_sliding_window to false; Mistral has no such field
    config = {k: v for k, v in QWEN_LIKE.items() if k != "use_sliding_window"}
    assert kv.layer_kinds(config) == [kv.FULL] * 4
    assert kv.layer_kinds(dict(config, model_type="mistral")) == [kv.SLIDING] * 4


def test_params_override_a_config_without_vocab(tmp_path, capsys):
    config = {k: v for k, v in QWEN_LIKE.items() if k != "vocab_size"}
    write(tmp_path, config)
    usage_error(["kv", str(tmp_path)], capsys, "no vocab_size", "--params", quiet=True)
    code, out, err = run_cli(["kv", str(tmp_path), "--params", "1000", "--lengths", "1024"], capsys)
    assert code == 0, err
    # 1000 parameters x 2 B
    assert "1,000 parameters x 2 B = 1.95 KiB" in out
