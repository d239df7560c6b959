"""The predictions printed beside the measured figures: bench/bench_sampler.py (weight bytes per decode step, the
bandwidth limit, decode FLOPs and the nested decode speed-up, KV-cache bytes), bench/bench_train_step.py (rollout
FLOPs, Amdahl step speed-up) and demo.py (rollout FLOPs, the table's Δ / δ, the speed sweep's predictions).
Each is pinned against numbers derived by hand in the comments, for the Qwen2.5-0.5B shape and the benches' own
shapes, so that a wrong count (k/v with H heads instead of Hkv, the embedding counted as read, a skipped layer
counted, attention without its context) fails. No timing, no generate(): models are built on the meta device."""
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
