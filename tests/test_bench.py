"""The predictions printed beside the measured figures: bench/bench_sampler.py (weight bytes per decode step, the
bandwidth limit, decode FLOPs and the nested decode speed-up, KV-cache bytes), bench/bench_train_step.py (rollout
FLOPs, Amdahl step speed-up) and demo.py (rollout FLOPs, the table's Δ / δ, the speed sweep's predictions).
Each is pinned against numbers derived by hand in the comments, for the Qwen2.5-0.5B shape and the benches' own
shapes, so that a wrong count (k/v with H heads instead of Hkv, the embedding counted as read, a skipped layer
counted, attention without its context) fails. No timing, no generate(): models are built on the meta device."""
import json
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import demo
import nested_reft
from bench import bench_sampler as bs
from bench import bench_train_step as bts
from qwen2 import KVCache, Qwen2, Qwen2Config

# Qwen2.5-0.5B (config.json of the HF release): D = 896, I = 4864, 24 layers, H = 14 heads of hd = 64,
# Hkv = 2 kv heads (k, v are 2 * 64 = 128 wide), V = 151936, tied LM head.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)

# Parameters by hand, 0.5B shape:
#   q_proj 896*896 + 896 (bias) = 803712;  k_proj, v_proj 2 * (896*128 + 128) = 229632;  o_proj 896*896 = 802816
#   gate, up, down 3 * 896*4864 = 13074432;  2 RMSNorms 2 * 896 = 1792
#   -> one layer 803712 + 229632 + 802816 + 13074432 + 1792 = 14912384
#   LM head (= embedding, tied) 151936*896 = 136134656;  final norm 896
#   24 layers + final norm + head: 357897216 + 896 + 136134656 = 494032768 (Qwen2.5-0.5B's "494M": the tied
#   matrix once; the embedding is not read by a decode step beyond B gathered rows)
LAYER_PARAMS, HEAD_PARAMS, NORM = 14912384, 136134656, 896


def meta_model(shape: dict, dtype=torch.float32) -> Qwen2:
    """A Qwen2 of this shape without storage (sizes only). normal_ is skipped: on the meta device it goes through
    torch._refs, whose first call imports torch._dynamo (~1.5 s); the values are never read."""
    with torch.device("meta"), mock.patch.object(torch.nn.init, "normal_", lambda t, *a, **k: t):
        return Qwen2(Qwen2Config(**shape)).to(dtype)


def test_bench_shapes_are_qwen25_05b():
    assert bs.SHAPES["0.5b"] == QWEN25_05B
    assert bs.SHAPES["0.5b-28"] == {**QWEN25_05B, "num_hidden_layers": 28}
    assert sum(p.numel() for p in meta_model(QWEN25_05B).parameters()) == 24 * LAYER_PARAMS + NORM + HEAD_PARAMS


# ----------------------------------------------------------------------------------------------------------
# bench_sampler: weight bytes per decode step and the bandwidth limit


def test_weight_bytes_per_step_05b():
    # fp32: 4 * 494032768 = 1976131072 B (the README's "1976 MB"); bf16: 2 * 494032768 = 988065536 B
    assert bs.weight_bytes_per_step(meta_model(QWEN25_05B)) == 1976131072
    assert bs.weight_bytes_per_step(meta_model(QWEN25_05B, torch.bfloat16)) == 988065536
    # untied: the head is its own matrix, the embedding (a gather of B rows) still not counted -> the same bytes
    # (counting the embedding would add 4 * 136134656 = 544538624 B)
    untied = meta_model({**QWEN25_05B, "tie_word_embeddings": False})
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert bs.weight_bytes_per_step(untied) == 1976131072


def test_weight_bytes_per_step_counts_only_active_layers():
    # 0.5b-28 in bf16 with layer 13 skipped (27 active): 2 * (27 * 14912384 + 896 + 136134656)
    #   = 2 * (402634368 + 136135552) = 1077539840 B;  all 28: 2 * (417546752 + 136135552) = 1107364608 B
    m = meta_model(bs.SHAPES["0.5b-28"], torch.bfloat16)
    assert bs.weight_bytes_per_step(m) == 1107364608
    assert bs.weight_bytes_per_step(m, [i for i in range(28) if i != 13]) == 1077539840


def test_weight_bytes_per_step_in_the_dtype_the_decode_step_reads():
    # A bf16 model on a CPU without bf16 matmul hardware decodes from fp32 copies of its matrices and biases
    # (pack_for_decode -> qwen2.DecodeLinear, compute = fp32): 4 B per matrix/bias weight, 2 B per norm weight.
    # 0.5B: matrices + biases 14912384 - 1792 = 14910592 per layer, head 136134656:
    #   4 * (24 * 14910592 + 136134656) = 4 * 493988864 = 1975955456;  norms 2 * (24 * 1792 + 896) = 87808
    #   -> 1976043264 B, twice the 988065536 B of the bf16 parameters (less the norms)
    m = meta_model(QWEN25_05B, torch.bfloat16)
    assert bs.weight_bytes_per_step(m, matmul_dtype=torch.float32) == 1976043264
    assert bs.weight_bytes_per_step(m, matmul_dtype=torch.bfloat16) == bs.weight_bytes_per_step(m) == 988065536


@pytest.mark.parametrize("native", [True, False])
def test_decode_matmul_dtype_follows_the_packing(monkeypatch, native):
    # tiny shape in bf16: per layer matrices + biases 16512 + 2 * 8256 + 16384 + 3 * 65536 = 246016, norms 256;
    # head 1024 * 128 = 131072, final norm 128. Unpacked, or packed on bf16 hardware: bf16 throughout,
    # 2 * (8 * 246272 + 128 + 131072) = 4202752 B. Packed without bf16 hardware: fp32 matrices,
    # 4 * (8 * 246016 + 131072) + 2 * (8 * 256 + 128) = 8396800 + 4352 = 8401152 B.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: pack_for_decode packs nothing")
    import qwen2
    monkeypatch.setattr(qwen2, "native_bf16_matmul", lambda: native)
    torch.manual_seed(0)
    m = Qwen2(Qwen2Config(**bs.SHAPES["tiny"])).to(torch.bfloat16).eval()
    assert bs.decode_matmul_dtype(m) == torch.bfloat16                      # not packed: the parameters
    assert bs.weight_bytes_per_step(m, matmul_dtype=bs.decode_matmul_dtype(m)) == 4202752
    assert m.pack_for_decode(m.new_cache(4, 8))
    want = torch.bfloat16 if native else torch.float32
    assert bs.decode_matmul_dtype(m) == want
    assert bs.weight_bytes_per_step(m, matmul_dtype=want) == (4202752 if native else 8401152)


def test_bandwidth_limit_reproduces_the_readme_xeon_rows():
    # fp32: 1976131072 B / 34.7e9 B/s = 56.95 ms ("57.0 ms"), / 74.8 ms per step = 0.7613 ("76 %")
    limit, share = bs.bandwidth_limit(1976131072, 34.7e9, 74.8e-3)
    assert limit == pytest.approx(0.0569490, rel=1e-5) and share == pytest.approx(0.761350, rel=1e-5)
    # bf16: 988065536 / 34.7e9 = 28.47 ms ("28.5 ms"), / 48.1 ms = 0.5920 ("59 %")
    limit, share = bs.bandwidth_limit(988065536, 34.7e9, 48.1e-3)
    assert limit == pytest.approx(0.0284745, rel=1e-5) and share == pytest.approx(0.591986, rel=1e-5)


def test_read_bandwidth_is_bytes_over_the_fastest_rep(monkeypatch):
    # a 1 MiB fp32 tensor summed twice, timed 0.5 s then 0.25 s by a fake clock: 2**20 B / 0.25 s = 4194304 B/s
    ticks = iter([0.0, 0.5, 1.0, 1.25])
    monkeypatch.setattr(bs, "clock", lambda: next(ticks))
    assert bs.read_bandwidth(mb=1, reps=2) == 4194304.0


# ----------------------------------------------------------------------------------------------------------
# bench_sampler: decode FLOPs and the nested decode speed-up (section b)

# 0.5b-28 (the bench's nested shape), per active layer and decoded token:
#   matmuls 2 * (q 896*896 + k, v 2 * 896*128 + o 896*896 + MLP 3 * 896*4864)
#         = 2 * (802816 + 229376 + 802816 + 13074432) = 2 * 14909440 = 29818880
#   attention over ctx keys: q.k^T 2 * ctx * 14 * 64 + p.v the same = 4 * ctx * 896; at the bench's default
#   ctx = prompt 32 + 32 new / 2 = 48: 172032  -> layer 29990912
#   LM head, whatever the mask: 2 * 896 * 151936 = 272269312
#   N = 28: 28 * 29990912 + 272269312 = 1112014848;  27: 1082023936;  25: 1022042112;  24: 992051200
#   speed-ups k = 1 / 3 / 4 (r = 0.05 / 0.10 / 0.15): 1.027717 / 1.088032 / 1.120925 (README: 1.028 / 1.088 / 1.121)


def test_decode_flops_05b_28():
    cfg = Qwen2Config(**bs.SHAPES["0.5b-28"])
    assert bs.decode_flops(cfg, 28, 0) == 28 * 29818880 + 272269312
    assert bs.decode_flops(cfg, 28, 48) == 1112014848
    assert bs.decode_flops(cfg, 24, 48) == 992051200
    assert bs.decode_flops(cfg, 0, 48) == 272269312                        # the LM head alone
    f0 = bs.decode_flops(cfg, 28, 48)
    pred = [f0 / bs.decode_flops(cfg, 28 - k, 48) for k in (1, 3, 4)]
    assert pred == pytest.approx([1112014848 / 1082023936, 1112014848 / 1022042112, 1112014848 / 992051200])
    assert [round(p, 3) for p in pred] == [1.028, 1.088, 1.121]
    assert [nested_reft.num_skipped(r, 28) for r in (0.05, 0.10, 0.15)] == [1, 3, 4]


def test_decode_flops_grows_with_context_and_uses_the_kv_heads():
    # 0.5B (24 layers): 2 * (matmul parameters) = 2 * 14909440 per layer = the parameter count minus biases and
    # norms: 24 * 29818880 + 272269312 = 987922432 = 2 * 494032768 - 2 * (24 * (1152 + 1792) + 896)
    cfg = Qwen2Config(**QWEN25_05B)
    assert bs.decode_flops(cfg, 24, 0) == 987922432 == 2 * 494032768 - 2 * (24 * (1152 + 1792) + 896)
    # each key column adds 4 * 896 FLOPs per layer: 24 * 3584 = 86016 per column
    assert bs.decode_flops(cfg, 24, 1000) - bs.decode_flops(cfg, 24, 0) == 1000 * 86016
    # k/v are Hkv * hd = 128 wide: with Hkv = 14 (no GQA) the k, v matmuls grow by 2 * 2 * 896 * (896 - 128)
    mha = Qwen2Config(**{**QWEN25_05B, "num_key_value_heads": 14})
    assert bs.decode_flops(mha, 1, 0) - bs.decode_flops(cfg, 1, 0) == 4 * 896 * 768


def test_flop_prediction_equals_the_weight_byte_prediction():
    # The nested decode step at B = 4 is memory-bound, yet the FLOP ratio is the right predictor here: both the
    # layers and the head do 2 FLOPs per weight, so FLOPs ~ bf16 bytes (2 B per weight). bf16 bytes with n active
    # layers: n * 29824768 + 272271104; k = 4: 1107364608 / 988065536 = 1.120739 vs FLOPs 1.120925 (0.02 %).
    m = meta_model(bs.SHAPES["0.5b-28"], torch.bfloat16)
    cfg = m.config
    for k in (1, 3, 4):
        by_bytes = bs.weight_bytes_per_step(m) / bs.weight_bytes_per_step(m, range(28 - k))
        by_flops = bs.decode_flops(cfg, 28, 48) / bs.decode_flops(cfg, 28 - k, 48)
        assert by_flops == pytest.approx(by_bytes, rel=3e-4)
    assert bs.weight_bytes_per_step(m) / bs.weight_bytes_per_step(m, range(24)) == pytest.approx(
        1107364608 / 988065536)


# ----------------------------------------------------------------------------------------------------------
# KV-cache bytes (section c; README memory paragraph)


def test_kv_cache_bytes():
    cfg = Qwen2Config(**bs.SHAPES["0.5b-28"])
    # k and v, [layers, B, Hkv, S, hd]: 2 * 28 * 4 * 2 * 64 * 64 * 2 B (bf16) = 3670016 B = 3.5 MiB (B = 4,
    # S = 32 + 32); the nested cache holds the active layers only: 24 of 28 -> 3145728 B = 0.857 of full
    full = KVCache(cfg, tuple(range(28)), 4, 64, torch.bfloat16, "meta", (None, None))
    nested = KVCache(cfg, tuple(range(24)), 4, 64, torch.bfloat16, "meta", (None, None))
    assert full.nbytes == 3670016 and nested.nbytes == 3145728
    assert [round(n / 28, 3) for n in (27, 25, 24)] == [0.964, 0.893, 0.857]           # the README's column
    # Qwen2.5-7B (28 layers, 28 heads of 128, Hkv = 4): 2 * 28 * 4 * 128 * 2 B = 57344 B per token in bf16
    # (README: "a bf16 KV cache of ≈ 57 KB/token")
    q7b = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4)
    assert KVCache(q7b, tuple(range(28)), 1, 1, torch.bfloat16, "meta", (None, None)).nbytes == 57344


def test_new_cache_allocates_only_the_active_layers():
    # tiny shape (8 layers, Hkv = 2, hd = 128 / 4 = 32), fp32, B = 2, S = 10, layers 2 and 5 skipped:
    # 2 * 6 * 2 * 2 * 10 * 32 * 4 B = 61440 B, against 2 * 8 * ... = 81920 B for the full model (= 6 / 8)
    torch.manual_seed(0)
    m = Qwen2(Qwen2Config(**bs.SHAPES["tiny"]))
    skip = [i in (2, 5) for i in range(8)]
    assert m.new_cache(2, 10).nbytes == 81920
    c = m.new_cache(2, 10, skip)
    assert c.active == (0, 1, 3, 4, 6, 7) and c.nbytes == 61440


def test_section_b_with_a_ratio_that_skips_no_layer(capsys):
    # --nested-shape tiny (8 layers) with the default ratios: k = round(0.05 * 8) = 0, a speed-up of 1 against a
    # predicted 1 (no realised-gain share: it divided by zero); r = 0.15 skips k = 1
    args = SimpleNamespace(nested_shape="tiny", nested_dtype="float32", big_batch=1, prompt_len=4, new_tokens=2,
                           ratios=[0.05, 0.15])
    bs.section_bc(args)
    out = capsys.readouterr().out
    assert "r=0.05 k=0:" in out and "r=0.15 k=1:" in out and out.count("realised gain") == 1


# ----------------------------------------------------------------------------------------------------------
# bench_train_step: rollout FLOPs and the Amdahl step prediction

# The bench's default model: W = 256, H = 4 (hd 64), Hkv = 2 (k, v 128 wide), I = 704, V = 4096, N = 28.
#   per layer and token: 2 * (256*256 + 2 * 256*128 + 256*256 + 3 * 256*704) = 2 * 737280 = 1474560
# README run: 1 prompt x G = 4 rows, Tp = 37 (the padded prompt), T = 128 fixed new tokens:
#   positions Tp + T - 1 = 164;  keys: prefill 37*38/2 = 703, decode sum_{t=1..127} (37 + t) = 4699 + 8128
#   = 12827 -> 13530;  per row and layer: 164 * 1474560 + 4 * 256 * 13530 = 241827840 + 13854720 = 255682560
#   per row, any mask: T * (LM head 2 * 256 * 4096 + sampling 5 * 4096) = 128 * 2117632 = 271056896
#   F(L) = 4 * (L * 255682560 + 271056896): F(28) = 4 * 7430168576;  F(27) = 4 * 7174486016;
#   F(25) = 4 * 6663120896;  F(24) = 4 * 6407438336
#   speed-ups 1.035638 / 1.115119 / 1.159613 (README: 1.036 / 1.115 / 1.160)
TRAIN_CFG = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=28,
                 num_attention_heads=4, num_key_value_heads=2)


def test_train_step_rollout_flops():
    cfg = Qwen2Config(**TRAIN_CFG)
    assert bts.layer_matmul_flops(cfg) == 1474560
    assert bts.rollout_flops(cfg, 28, 4, 37, 128) == 4 * 7430168576
    assert bts.rollout_flops(cfg, 24, 4, 37, 128) == 4 * 6407438336
    pred = [bts.rollout_flops(cfg, 28, 4, 37, 128) / bts.rollout_flops(cfg, 28 - k, 4, 37, 128) for k in (1, 3, 4)]
    assert [round(p, 3) for p in pred] == [1.036, 1.115, 1.160]
    # the same accounting as demo.rollout_flops plus the 5 * V FLOPs of sampling per generated token
    assert bts.rollout_flops(cfg, 28, 1, 37, 128) == demo.rollout_flops(cfg, 28, 37, 128) + 128 * 5 * 4096


def test_train_step_amdahl_prediction():
    # summarise() on made-up timings: the baseline spends s = 1.0 of its 2.0 s step in generate (s = 0.5), so the
    # predicted step speed-up of k = 3 is 1 / ((1 - s) + s / 1.115119) = 1 / (0.5 + 0.448383) = 1.054426; the
    # rollout prediction is the FLOP ratio above (Tp = 37, Tn = 128, 4 rows). README's s = 0.54 rows:
    # 1 / (0.46 + 0.54 / 1.115119) = 1.059 as printed.
    cfg = Qwen2Config(**TRAIN_CFG)
    base = {"r": 0.0, "k": 0, "tokens": [660] * 3, "reward": [0.0] * 3, "Tp": 37, "Tn": 128,
            "t": {"cpu": {"step": [2.0] * 3, "rollout": [1.0] * 3, "generate": [1.0] * 3}}}
    nested = {"r": 0.1, "k": 3, "tokens": [660] * 3, "reward": [0.0] * 3,
              "t": {"cpu": {"step": [1.9, 1.9, 1.9], "rollout": [0.9] * 3, "generate": [0.9] * 3}}}
    out = bts.summarise(SimpleNamespace(prompts=1, group=4), cfg, [base, nested], "cpu")
    row = out["rows"][1]
    assert out["share_generate"] == 0.5
    assert row["rollout_speedup_pred"] == pytest.approx(4 * 7430168576 / (4 * 6663120896))
    assert row["step_speedup_pred"] == pytest.approx(1 / (0.5 + 0.5 * 6663120896 / 7430168576))
    assert row["step_speedup_pred"] == pytest.approx(1.054426, abs=1e-6)
    assert row["step_speedup"] == pytest.approx(2.0 / 1.9)
    assert row["gain_ratio"] == pytest.approx((2.0 / 1.9 - 1) / (row["step_speedup_pred"] - 1))
    assert round(1 / (0.46 + 0.54 / row["rollout_speedup_pred"]), 3) == 1.059


# ----------------------------------------------------------------------------------------------------------
# demo.py: rollout FLOPs, the speed sweep's predictions, the table's Δ and δ

# configs/tiny_model.json: W = 64, I = 128, V = 448, 12 layers, 4 heads (hd 16), 2 kv heads (k, v 32 wide).
#   per layer and token: 2 * (64*64 + 2 * 64*32 + 64*64 + 3 * 64*128) = 73728;  attention 4 * 64 = 256 per key
#   LM head per generated token: 2 * 64 * 448 = 57344


def test_demo_rollout_flops_with_decode_steps():
    cfg = Qwen2Config.from_json(demo.MODEL_CONFIG)
    # Tp = 3, T = 3: positions 3 (prefill, c = 1, 2, 3) + 2 (decode, c = 4, 5) = 5, keys 15;
    # per layer 5 * 73728 + 256 * 15 = 372480;  LM head on 3 tokens 3 * 57344 = 172032
    assert demo.rollout_flops(cfg, 12, 3, 3) == 12 * 372480 + 172032
    assert demo.rollout_flops(cfg, 0, 3, 3) == 172032


def test_demo_predictions_match_the_readme():
    # The speed sweep's k = round(12 r): r = 0.10 / 0.15 / 0.25 / 0.35 -> 1 / 2 / 3 / 4.
    # At the demo's lengths (mean chat prompt 49 tokens under the demo tokenizer, ~20 new tokens):
    #   positions 49 + 20 - 1 = 68;  keys 49*50/2 + 19*49 + 20*19/2 = 1225 + 931 + 190 = 2346
    #   per layer 68 * 73728 + 256 * 2346 = 5013504 + 600576 = 5614080;  LM head 20 * 57344 = 1146880
    #   F(L) = L * 5614080 + 1146880: F(12) = 68515840, F(11) = 62901760, F(10) = 57287680, F(9) = 51673600,
    #   F(8) = 46059520 -> 1.0893 / 1.1960 / 1.3259 / 1.4876 (README: 1.09 / 1.20 / 1.33 / 1.49)
    cfg = Qwen2Config.from_json(demo.MODEL_CONFIG)
    ks = [nested_reft.num_skipped(r, 12) for r in demo.SETTINGS["full"]["speed_ratios"]]
    assert ks == [0, 1, 2, 3, 4]
    assert demo.rollout_flops(cfg, 12, 49, 20) == 68515840
    pred = [demo.predicted_speedup(cfg, k, 49, 20) for k in ks]
    assert pred == pytest.approx([1.0, 68515840 / 62901760, 68515840 / 57287680, 68515840 / 51673600,
                                  68515840 / 46059520])
    assert [f"{p:.2f}" for p in pred] == ["1.00", "1.09", "1.20", "1.33", "1.49"]


def test_demo_table_delta_columns_reproduce_the_readme():
    # Δ = M - M_base in points, δ = (M - M_base) / M_base (spec §6). README, EPYC AVX2 table:
    #   SFT 84.5 % vs baseline 99.5 %: Δ = -15.0, δ = -15.0 / 99.5 = -15.08 % -> "-15.1%"
    #   Base 100.0 %: +0.5, +0.5 / 99.5 = +0.50 %;  Practical 99.0 %: -0.5, -0.50 %
    #   rollout speed-ups 2336 / 1966 = 1.188, 2364 / 1966 = 1.202, 2311 / 1966 = 1.175
    def run(label, r, e, variant, acc, roll, pred, tok, rt):
        return {"label": label, "skip_ratio": r, "skip_border": e, "variant": variant, "accuracy": acc,
                "rollout_tok_s": roll, "predicted_speedup": pred, "tok_s": tok, "runtime": rt}
    res = {"sft": {"accuracy": 0.845, "runtime": 192.0}, "runs": [
        run("ReFT baseline", 0.0, 0, "base", 0.995, 1966, 1.0, 2887, 138.8),
        run("Nested-ReFT Base", 0.15, 1, "base", 1.0, 2336, 1.196, 3120, 128.4),
        run("Nested-ReFT Practical", 0.15, 1, "practical", 0.99, 2364, 1.196, 3187, 125.7),
        run("Nested-ReFT Retrace-λ", 0.15, 1, "retrace", 0.995, 2311, 1.196, 3131, 128.0)]}
    assert demo.make_table(res).splitlines()[2:] == [
        "| SFT warm-up | – | – | – | 84.5% | -15.0 | -15.1% | – | – | – | 192 |",
        "| ReFT baseline | 0 | 0 | ρ (= 1 at r = 0) | 99.5% | +0.0 | +0.0% | 1966 | 1.00x (1.00x) | 2887 | 138.8 |",
        "| Nested-ReFT Base | 0.15 | 1 | ρ | 100.0% | +0.5 | +0.5% | 2336 | 1.19x (1.20x) | 3120 | 128.4 |",
        "| Nested-ReFT Practical | 0.15 | 1 | 1 | 99.0% | -0.5 | -0.5% | 2364 | 1.20x (1.20x) | 3187 | 125.7 |",
        "| Nested-ReFT Retrace-λ | 0.15 | 1 | λ·min(1,ρ) | 99.5% | +0.0 | +0.0% | 2311 | 1.18x (1.20x) | 3131 | 128.0 |"]
    assert demo._rel(0.845, 0.995) == "-15.1%" and demo._rel(0.5, 0.0) == "–"
    # δ is relative to the baseline, not to the other model: 60 % vs 50 % is +20.0 %, not +16.7 %
    assert demo._rel(0.6, 0.5) == "+20.0%"


# ----------------------------------------------------------------------------------------------------------
# the command lines: a bad value is a one-line usage error before any measuring (was: a traceback, a silent
# no-op or a wrong run after minutes of setup)


@pytest.mark.parametrize("argv, words", [
    (["--reps", "0"], "--reps 0: expected an integer >= 1"),
    (["--tiny-reps", "0"], "--tiny-reps 0: expected an integer >= 1"),
    (["--prompt-len", "0"], "--prompt-len 0: expected an integer >= 1"),
    (["--big-batch", "0"], "--big-batch 0: expected an integer >= 1"),
    (["--tiny-batch", "-2"], "--tiny-batch -2: expected an integer >= 1"),
    (["--threads", "0", "--clock", "wall"], "--threads 0: expected an integer >= 1"),
    (["--new-tokens", "1"], "--new-tokens 1: expected an integer >= 2"),
    (["--shapes", "1.5b"], "--shapes '1.5b': expected a comma list of tiny, 0.5b"),
    # r < 0 skipped 2 of the tiny shape's 8 layers; k = round(0.95 * 8) = 8 > the 6 layers 1..6 skipped only 6
    (["--nested-shape", "tiny", "--ratios", "0.1", "-0.1"], "--ratios -0.1: expected 0 <= r < 1"),
    (["--nested-shape", "tiny", "--ratios", "0.95"], "--ratios 0.95: expected 0 <= r < 1 with k = round(r * 8) <= 6"),
])
def test_sampler_bad_option_values_are_usage_errors(monkeypatch, capsys, argv, words):
    def measured(*a, **k):
        raise AssertionError("bench_sampler.main went past its argument checks")
    monkeypatch.setattr(sys, "argv", ["bench/bench_sampler.py", *argv])
    monkeypatch.setattr(bs, "read_bandwidth", measured)
    monkeypatch.setattr(bs, "clock", bs.clock)                  # main sets the module's clock: restored after
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(SystemExit) as e:
        bs.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {words}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, words", [
    (["--reps", "0"], "--reps 0: expected an integer >= 1"),
    (["--threads", "-1"], "--threads -1: expected an integer >= 0"),
    (["--max-minutes", "-1"], "--max-minutes -1.0: expected >= 0"),
    (["--max-minutes", "nan"], "--max-minutes nan: expected >= 0"),            # was: no time limit at all
    (["--seed", str(10**23)], f"--seed {10**23}: expected an integer in [0, 2^62)"),   # was a torch overflow
    (["--json", "/"], "--json /: is a directory, expected a file path"),   # was an error after the measurements
    (["--json", __file__ + "/out.json"], f"--json {__file__}/out.json: {__file__} is a file, expected a directory"),
    (["--ratios", "0.1,x"], "--ratios '0.1,x': expected a comma list of numbers"),
    (["--ratios", ""], "--ratios '': no ratio skips a layer (k = round(r * 28) = 0 for all), nothing to compare"),
    (["--ratios", "0"], "--ratios '0': no ratio skips a layer"),
    (["--ratios", "0.1,1.5"], "--ratios: skip ratio r=1.5: expected a number in [0, 1)"),
    (["--layers", "4", "--ratios", "0.9"], "--ratios: skip ratio r=0.9 gives k=round(r*N)=4 skipped layers but N=4"),
    (["--hidden", "30", "--heads", "2"], "Qwen2Config: head_dim=15 must be even for RoPE"),
])
def test_train_step_bad_option_values_are_usage_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        bts.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {words}" in err and "Traceback" not in err, err


def test_train_step_bad_config_value_is_a_one_line_error(capsys):
    # values the library's config checks (nested_reft.load_config): its UserError becomes "error: ...", exit 2
    assert bts.main(["--variant", "nope", "--layers", "4", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                     "--intermediate", "32", "--vocab", "512"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: config key 'variant' = 'nope': expected one of base, practical, retrace", err


# ----------------------------------------------------------------------------------------------------------
# what the benches print beside their predictions (each check below was added because a hand-made mutant of the
# bench passed every test before it)


def test_section_b_prints_the_speedup_prediction_and_kv_bytes_by_hand(monkeypatch, capsys):
    """tiny shape (N = 8, D 128, I 512, H 4 of 32, Hkv 2, V 1024), prompt 4, 40 new tokens: the mean context
    ctx = 4 + 40 / 2 = 24 key columns.
      layer 2 * (128*128 + 2 * 128*64 + 128*128 + 3 * 128*512) + 4 * 24 * 128 = 491520 + 12288 = 503808
      head 2 * 128 * 1024 = 262144;  F(8) = 4292608, F(7) = 3788800, F(6) = 3284992
    r = 0.0625: k = 1 (0.5 rounds up, not to even), 1.132973;  r = 0.2: k = round(1.6) = 2, 1.306733 (at the
    prompt's 4 columns alone it would be 1.306218).
    A fake clock times each decode step 12 ms (r = 0), 12.5 ms (r = 0.0625), 10 ms (r = 0.2): speed-ups 0.960
    and 1.200 (first step left out); 0.96 / 1.132973 = 0.847 of the prediction, a realised gain -0.04 / 0.132973 =
    -30 %; 1.2 / 1.306733 = 0.918, 0.2 / 0.306733 = 65 %. KV cache, fp32, B = 1, S = 44: 2 * 8 * 2 * 44 * 32 * 4 B
    = 180224 B (0.17 MiB); 7 of 8 layers: 157696 B (0.15 MiB, 0.875), 6 of 8: 135168 B (0.13 MiB, 0.750)."""
    dur = {0: 0.012, 1: 0.0125, 2: 0.010}
    state = {"t": 0.0, "n": 0}

    def clock():                                        # called twice per timed step, the variants in turn
        if state["n"] % 2:                              # (the first step, 100 ms for all, is not counted)
            state["t"] += dur[(state["n"] // 2) % 3] if state["n"] > 6 else 0.1
        state["n"] += 1
        return state["t"]
    monkeypatch.setattr(bs, "clock", clock)
    args = SimpleNamespace(nested_shape="tiny", nested_dtype="float32", big_batch=1, prompt_len=4, new_tokens=40,
                           ratios=[0.0625, 0.2])
    bs.section_bc(args)
    out = capsys.readouterr().out
    assert "  r=0.00 k=0: decode    12.0 ms/step  speedup 1.000x  FLOP-predicted 1.000x\n" in out
    assert ("  r=0.06 k=1: decode    12.5 ms/step  speedup 0.960x  FLOP-predicted 1.133x  measured/predicted 0.847; "
            "realised gain -30% of predicted (target >= 95%)\n") in out
    assert ("  r=0.20 k=2: decode    10.0 ms/step  speedup 1.200x  FLOP-predicted 1.307x  measured/predicted 0.918; "
            "realised gain 65% of predicted (target >= 95%)\n") in out
    assert "  r=0.00:     0.17 MiB  = 1.000 of full  (active layers 8/8 = 1.000)" in out
    assert "  r=0.06:     0.15 MiB  = 0.875 of full  (active layers 7/8 = 0.875)" in out
    assert "  r=0.20:     0.13 MiB  = 0.750 of full  (active layers 6/8 = 0.750)" in out


def test_best_of_keeps_the_fastest_interleaved_rep_after_a_warm_up(monkeypatch):
    calls, ticks = [], iter([0.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 7.0])
    monkeypatch.setattr(bs, "clock", lambda: next(ticks))
    t = bs.best_of({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b", "a", "b", "a", "b"]                        # warm-up, then a b a b
    assert t == {"a": 1.0, "b": 1.0}                                      # a: 3, 1;  b: 1, 2


@pytest.mark.parametrize("argv, words", [
    (["--threads", "2"], "--clock cpu needs --threads 1"),
    (["--sections", "a,x"], "--sections 'a,x': expected a comma list of a, b, c, k"),
    (["--tiny-new", "1"], "--tiny-new and --big-new must be >= 2"),
])
def test_sampler_more_bad_option_values(monkeypatch, capsys, argv, words):
    test_sampler_bad_option_values_are_usage_errors(monkeypatch, capsys, argv, words)


def test_sampler_accepts_r_0_and_the_largest_k(monkeypatch):
    """r = 0 (the baseline row) and k = N - 2 (tiny: round(0.75 * 8) = 6, layers 1..6) pass the checks."""
    class Reached(Exception):
        pass

    def measured(*a, **k):
        raise Reached
    monkeypatch.setattr(sys, "argv", ["bench/bench_sampler.py", "--nested-shape", "tiny", "--ratios", "0", "0.75"])
    monkeypatch.setattr(bs, "read_bandwidth", measured)
    monkeypatch.setattr(bs, "cpu_description", lambda: "cpu")
    monkeypatch.setattr(bs, "clock", bs.clock)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(Reached):
        bs.main()


def test_fit_line_by_hand():
    # x 0, 1, 2 and y 1, 3, 2: means 1 and 2, slope (1 + 0 + 0) / 2 = 0.5, intercept 2 - 0.5 = 1.5;
    # residuals -0.5, 1, -0.5: ss_res 1.5, ss_tot 2 -> R^2 = 0.25
    assert bts.fit_line([0, 1, 2], [1, 3, 2]) == pytest.approx((0.5, 1.5, 0.25))


def _made_up_variants():
    """3 reps of the baseline and of k = 1 and k = 3 (4 rows, Tp = 37, Tn = 128: the FLOP ratios of the README
    run, 1.035638 and 1.115119). Baseline: steps 2.0 / 2.2 / 2.0 s, generate 1.0 / 1.1 / 1.2 s (shares 0.5 / 0.5 /
    0.6: median s = 0.5), whole rollouts 1.2 / 1.3 / 1.4 s (shares 0.6 / 0.59 / 0.7: not s)."""
    def v(r, k, step, gen, tokens, **kw):
        return {"r": r, "k": k, "tokens": tokens, "reward": [0.25, 0.5, 0.75],
                "t": {"cpu": {"step": step, "rollout": [g + 0.2 for g in gen], "generate": gen}}, **kw}
    return [v(0.0, 0, [2.0, 2.2, 2.0], [1.0, 1.1, 1.2], [660, 680, 700], Tp=37, Tn=128),
            v(0.05, 1, [2.0, 2.1, 1.9], [1.0, 1.0, 1.1], [660, 680, 700]),
            v(0.1, 3, [1.9, 2.0, 1.6], [0.8, 1.0, 0.8], [640, 700, 680])]


def test_train_step_summarise_on_made_up_timings():
    """k = 3: paired step speed-ups 2.0/1.9, 2.2/2.0, 2.0/1.6 = 1.0526, 1.1, 1.25 (median 1.1, gains +5.3..+25 %);
    generate 1.25, 1.1, 1.5 (median 1.25); fastest reps 1.0 / 0.8 = 1.25 (generate) and 2.0 / 1.6 = 1.25 (step);
    Amdahl 1 / (0.5 + 0.5 / 1.115119) = 1.054426; tok/s = median tokens 680 / median step 1.9 s.
    k = 1: paired 1.0, 1.047619, 1.052632 (median 1.047619), Amdahl 1 / (0.5 + 0.5 / 1.035638) = 1.017507.
    Pooled gain ratio: sum g p / sum p^2 over the two (g = measured - 1, p = Amdahl - 1), per rep from that rep's
    paired gains."""
    cfg = Qwen2Config(**TRAIN_CFG)
    out = bts.summarise(SimpleNamespace(prompts=1, group=4), cfg, _made_up_variants(), "cpu")
    assert out["share_generate"] == 0.5 and out["share_rollout"] == pytest.approx(0.6)
    base, r1, r3 = out["rows"]
    p1, p3 = 1 / (0.5 + 0.5 * 7174486016 / 7430168576), 1 / (0.5 + 0.5 * 6663120896 / 7430168576)
    assert (p1, p3) == pytest.approx((1.017507, 1.054426), abs=1e-6)
    assert r3["step_speedup_pred"] == pytest.approx(p3) and r1["step_speedup_pred"] == pytest.approx(p1)
    assert r3["step_speedup"] == pytest.approx(1.1) and r1["step_speedup"] == pytest.approx(2.2 / 2.1)
    assert r3["speedup_ratio"] == pytest.approx(1.1 / p3)
    assert r3["step_gain_min_max"] == pytest.approx([2.0 / 1.9 - 1, 0.25])
    assert r3["rollout_speedup"] == pytest.approx(1.25)
    assert r3["rollout_gain_ratio"] == pytest.approx(0.25 / (7430168576 / 6663120896 - 1))
    assert r3["rollout_speedup_min"] == pytest.approx(1.25) and r3["step_speedup_min"] == pytest.approx(1.25)
    assert r3["tokens"] == 680 and r3["tok_s"] == pytest.approx(680 / 1.9) and r3["step_s"] == pytest.approx(1.9)
    assert base["rollout_gain_ratio"] is None and base["gain_ratio"] is None and base["step_speedup"] == 1.0
    assert r3["reward_mean"] == pytest.approx(0.5)
    pp = (p1 - 1) ** 2 + (p3 - 1) ** 2
    assert out["pooled_gain_ratio"] == pytest.approx(((2.2 / 2.1 - 1) * (p1 - 1) + 0.1 * (p3 - 1)) / pp)
    assert out["pooled_gain_ratio_min"] == pytest.approx(((2.0 / 1.9 - 1) * (p1 - 1) + 0.25 * (p3 - 1)) / pp)
    assert out["pooled_gain_ratio_per_rep"] == pytest.approx([
        (0.0 * (p1 - 1) + (2.0 / 1.9 - 1) * (p3 - 1)) / pp, ((2.2 / 2.1 - 1) * (p1 - 1) + 0.1 * (p3 - 1)) / pp,
        ((2.0 / 1.9 - 1) * (p1 - 1) + 0.25 * (p3 - 1)) / pp])
    lo, hi = out["pooled_gain_ratio_ci95"]                   # resampled reps: inside the per-rep range, not a point
    assert min(out["pooled_gain_ratio_per_rep"]) <= lo < hi <= max(out["pooled_gain_ratio_per_rep"])
    # least squares over r = 0, 0.05, 0.1 of the gains (speed-up - 1), the baseline's gain 0
    for key, col in (("fit_step_measured", "step_speedup"), ("fit_step_predicted", "step_speedup_pred"),
                     ("fit_rollout_measured", "rollout_speedup")):
        assert out[key] == pytest.approx(bts.fit_line([0.0, 0.05, 0.1], [0.0, r1[col] - 1, r3[col] - 1]))
    assert out["fit_step_predicted"][1] == pytest.approx(0.0, abs=0.01)      # gains ~ r: the line through ~0


@pytest.mark.parametrize("per_rep, ci, verdict", [
    ([0.9, 1.0], (0.95, 1.1), "INCONCLUSIVE (only 2 rep(s); need >= 3 for a median against noise)"),
    ([0.9, 1.0, 1.1], (0.95, 1.1), "MET"),
    ([0.9, 1.0, 1.1], (0.9, 1.1), "MET"),
    ([0.5, 0.6, 0.7], (0.5, 0.8), "NOT MET"),
    ([0.5, 0.6, 0.7], (0.8, 0.9), "INCONCLUSIVE (90 % lies inside the 95 % interval 80..90%"),
])
def test_train_step_report_verdict(capsys, per_rep, ci, verdict):
    out = bts.summarise(SimpleNamespace(prompts=1, group=4), Qwen2Config(**TRAIN_CFG), _made_up_variants(), "cpu")
    out["pooled_gain_ratio_per_rep"], out["pooled_gain_ratio_ci95"] = per_rep, list(ci)
    bts.report_clock(out, "cpu")
    text = capsys.readouterr().out
    assert f"  target (pooled gain ratio >= 90 %): {verdict}" in text, text
    assert "  least squares over r = 0 + 2 ratios, step gain, measured   : gain = " in text


def test_train_step_report_figures(capsys):
    """The printed row of k = 3 and the fastest-rep line: step x 1.1 / Amdahl 1.054426 = 104.3 %, gain
    0.1 / 0.054426 = 183.7 %, rep gains +5.3..+25.0 %; fastest reps 1.25 -> 0.25 / 0.054426 = 459 %."""
    out = bts.summarise(SimpleNamespace(prompts=1, group=4), Qwen2Config(**TRAIN_CFG), _made_up_variants(), "cpu")
    bts.report_clock(out, "cpu")
    text = capsys.readouterr().out
    assert (" 0.10  3   1.900   357.9  0.800  50.0 |  1.250  1.115  217.2 |  1.100  1.054  104.3  183.7 |"
            "     +5.3.. +25.0 %") in text, text
    assert "r=0.10: roll x 1.250, step x 1.250 = 459%" in text
    # the per-rep pooled ratios 88 / 192 / 444 % (the docstring of the test above): for 3 values the quartiles
    # (exclusive method) are the lowest and the highest
    assert "per rep: quartiles 88..444%, min..max 88..444%" in text
    assert "gain ratio per r: r=0.05: 272%, r=0.10: 184%" in text


@pytest.mark.parametrize("threads, load, warns", [(1, 5.0, False), (2, 1.4, False), (2, 1.6, True)])
def test_load_warning_only_with_several_threads_on_a_loaded_machine(monkeypatch, threads, load, warns):
    monkeypatch.setattr(bts.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(bts.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert bool(bts.load_warning()) is warns


def test_train_step_preset_explicit_flags_win():
    args = bts.parse_args(["--preset", "qwen1p5b-shape", "--reps", "2", "--new-tokens=64"])
    assert (args.reps, args.new_tokens) == (2, 64)
    assert (args.layers, args.hidden, args.vocab, args.device, args.dtype, args.prompts) == (
        28, 1536, 151936, "cuda", "bfloat16", 8)


def test_train_step_run_rotates_the_variants_and_counts_prompt_and_new_tokens(monkeypatch, capsys):
    """run() with the model, rollout and update faked: each rep runs every variant once in a rotated order (A B,
    then B A, ...), a step's tokens are its real new tokens plus its real prompt tokens (as train() counts them),
    and the timed part stops starting reps after --max-minutes of wall time (a fake clock: 1 s a reading)."""
    import torch as t
    args = bts.parse_args(["--layers", "4", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate",
                           "32", "--vocab", "512", "--prompts", "1", "--group", "2", "--new-tokens", "3", "--reps",
                           "40", "--ratios", "0.25", "--max-minutes", "1"])
    model = SimpleNamespace(config=bts.model_config(args), generate=lambda *a, **k: None)
    examples = bts.arithmetic_examples(8, 0)
    cfg = SimpleNamespace(lr=1e-6, skip_border=1)
    monkeypatch.setattr(bts, "build", lambda a, d: (cfg, model, None, t.device("cpu"), t.float32, examples))
    monkeypatch.setattr(bts.nr, "make_optimizer", lambda *a: (None, None))
    monkeypatch.setattr(bts.nr, "reft_step", lambda *a: None)
    order = []

    def rollout(model_, tok, batch, skip, cfg, gen, device, dtype):
        order.append(sum(skip))
        model_.generate()                                                       # the timed sampling
        return SimpleNamespace(mask=t.tensor([[1, 1, 0], [1, 1, 1]]),
                               prompt_mask=t.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), prompt_tokens=t.zeros(2, 4),
                               tokens=t.zeros(2, 3), rewards=t.tensor([0.0, 1.0]))
    monkeypatch.setattr(bts.nr, "rollout", rollout)
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 1.0
        return clock["t"]
    monkeypatch.setattr(bts, "time", SimpleNamespace(perf_counter=tick, process_time=tick))
    out = bts.run(args)
    assert 2 < out["reps"] < 40 and "time budget --max-minutes=1.0 reached" in capsys.readouterr().out
    assert order[:2] == [0, 1]                                                  # the untimed warm-up
    assert order[2:] == [0, 1, 1, 0] * (out["reps"] // 2) + [0, 1] * (out["reps"] % 2)
    assert (out["Tp"], out["Tn"]) == (4, 3)
    assert [row["tokens"] for row in out["wall"]["rows"]] == [12, 12]         # 5 new + 7 prompt tokens
    assert [row["reward_mean"] for row in out["wall"]["rows"]] == [0.5, 0.5]


def test_random_prompts_have_unequal_lengths_for_left_padding():
    # lengths length - 3 * (i % 3), at least 1: 10, 7, 4, 10, 7 and 2, 1, 1; token ids below the vocab, seeded
    p = bs.random_prompts(5, 10, 100)
    assert [len(x) for x in p] == [10, 7, 4, 10, 7] and all(0 <= t < 100 for x in p for t in x)
    assert p == bs.random_prompts(5, 10, 100) != bs.random_prompts(5, 10, 100, seed=1)
    assert [len(x) for x in bs.random_prompts(3, 2, 50)] == [2, 1, 1]


def test_train_step_json_is_written_atomically(tmp_path, monkeypatch, capsys):
    """--json: the arguments and the results, replacing an earlier file by a rename (never rewritten in place)."""
    monkeypatch.setattr(bts, "run", lambda args: {"reps": 3, "wall": {"rows": []}})
    monkeypatch.setattr(bts, "report", lambda args, out: None)
    monkeypatch.setattr(bts, "load_warning", lambda: "")
    path = tmp_path / "out.json"
    path.write_text("{}")
    earlier = path.stat().st_ino
    assert bts.main(["--json", str(path), "--layers", "4", "--ratios", "0.25"]) == 0
    got = json.loads(path.read_text())
    assert got["reps"] == 3 and got["args"]["layers"] == 4 and got["args"]["ratios"] == [0.25]
    assert path.stat().st_ino != earlier


def test_section_a_prints_ratios_of_the_times_it_measured(monkeypatch, capsys):
    """Section a's figures from its timings (faked: best_of and decode_steps) on the tiny shape, B = 2, 16 new
    tokens (generate() packs the decode weights from 16 on): fp32 ours 0.01 s, transformers 0.03 s per call ->
    2 * 16 / 0.01 = 3200.0 and 1066.7 tok/s, ratio 3.00x; with a fresh packing (4 ms) 0.03 / 0.014 = 2.14x;
    decode 2.0 ms/step against the fp32 weights 4 * 2101376 = 8405504 B / 1 GB/s = 8.4 ms (420 %). bf16: ours
    0.005 s, transformers 0.02 s -> 4.00x; bf16 over fp32 end to end 0.01 / 0.005 = 2.00x."""
    pytest.importorskip("transformers")
    times = iter([{"ours": 0.01, "hf": 0.03}, {"ours": 0.005, "hf": 0.02}])
    monkeypatch.setattr(bs, "best_of", lambda fns, reps: next(times))
    monkeypatch.setattr(bs, "decode_steps", lambda m, prompts, new: (0.002, 0.004))
    args = SimpleNamespace(shapes="tiny", tiny_batch=2, tiny_new=16, prompt_len=4, tiny_bf16=True, tiny_reps=1,
                           reps=1, big_batch=1, big_new=2)
    bs.section_a(args, 1e9)
    out = capsys.readouterr().out
    assert ("  tiny  float32  B=2 Tp<=4 new=16:  ours   3200.0 tok/s  transformers   1066.7 tok/s  ratio 3.00x "
            "(target >= 2x)") in out, out
    assert "        ratio 2.14x counting a fresh packing of the decode weights in every call" in out
    assert "        decode 2.0 ms/step (packing the decode weights: 4 ms per call); weights 8 MB" in out
    assert "weights 8 MB / 1.0 GB/s = 8.4 ms  -> 420% of the bandwidth limit (target >= 60%)" in out
    assert "ours   6400.0 tok/s  transformers   1600.0 tok/s  ratio 4.00x (target >= 2x)" in out
    assert "  tiny  bf16 gain over fp32 (ours, end to end): 2.00x" in out


def test_pooled_gain_ratio_interval_is_the_central_95_percent_of_the_bootstrap():
    """20 reps, one nested variant whose per-rep step gains are 0.00, 0.01, ..., 0.19 (median 0.095). Resampling
    the reps, the median of 20 draws falls below the j-th smallest gain with probability P(Binomial(20, (j + 1) /
    20) >= 10)-ish: its 2.5 % / 97.5 % quantiles are about the 6th / 14th smallest gains (0.05..0.14), while the
    extremes of the 2000 resamples reach out to about the 3rd / 17th (0.03 / 0.16). In gains (pooled ratio * the
    predicted gain p, one variant): the interval must be the central one."""
    n = 20
    base = {"r": 0.0, "k": 0, "tokens": [1] * n, "reward": [0.0] * n, "Tp": 37, "Tn": 128,
            "t": {"cpu": {"step": [2.0] * n, "rollout": [1.0] * n, "generate": [1.0] * n}}}
    var = {"r": 0.1, "k": 3, "tokens": [1] * n, "reward": [0.0] * n,
           "t": {"cpu": {"step": [2.0 / (1 + 0.01 * i) for i in range(n)], "rollout": [0.9] * n,
                         "generate": [0.9] * n}}}
    out = bts.summarise(SimpleNamespace(prompts=1, group=4), Qwen2Config(**TRAIN_CFG), [base, var], "cpu")
    p = out["rows"][1]["step_speedup_pred"] - 1
    assert out["pooled_gain_ratio"] * p == pytest.approx(0.095)
    lo, hi = (x * p for x in out["pooled_gain_ratio_ci95"])
    assert 0.045 <= lo <= 0.065 and 0.125 <= hi <= 0.145, (lo, hi)


def test_tokenizer_sweep_help_and_missing_data_are_usage_errors(monkeypatch, capsys):
    """bench/tokenizer_sweep.py --help prints its usage and stops (it used to run the whole ~4-minute sweep); an
    unset or wrong $NESTED_REFT_DATA is a usage error naming it (was a KeyError traceback), before any work."""
    ts = pytest.importorskip("bench.tokenizer_sweep")          # needs `regex` (a transformers dependency)
    with pytest.raises(SystemExit) as e:
        ts.main(["--help"])
    assert e.value.code == 0 and "Tokenizer parity sweep" in capsys.readouterr().out
    for env in ("", "/nonexistent/data"):
        monkeypatch.setenv("NESTED_REFT_DATA", env)
        with pytest.raises(SystemExit) as e:
            ts.main([])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: $NESTED_REFT_DATA={env!r}: expected the datasets folder" in err and "Traceback" not in err
