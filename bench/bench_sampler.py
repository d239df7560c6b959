"""Sampler benchmark for qwen2.py (CPU). Prints ratios measured side by side in one run.

(a) new tokens/s of Qwen2.generate vs transformers' generate() on the same random weights, prompts, batch,
    length, greedy, same dtype: a tiny config and a Qwen2.5-0.5B-shaped one; decode time per step against the
    memory-bandwidth limit (weight bytes read per step / measured read bandwidth); bf16 vs fp32.
(b) decode speedup of the nested model (k = round(r * 28) layers skipped) vs the FLOP-predicted speedup.
(c) KV-cache bytes, full vs nested.
(k) (not run by default) the decode matmuls alone, tiny (16 rows) and 0.5B (4 rows) shapes: time and weight GB/s
    of F.linear, torch.mm on W^T, the oneDNN-prepacked matmul and a matrix-vector product.

    python bench/bench_sampler.py                       # all sections, modest sizes (a few minutes)
    python bench/bench_sampler.py --sections b --nested-shape 1.5b --new-tokens 32
Timings are noisy when other jobs share the CPU: every comparison is interleaved and the best of --reps is kept,
and by default the clock is this thread's CPU time (--clock cpu, needs --threads 1: all the work then runs on the
calling thread), so time spent descheduled by other jobs is not counted; --clock wall for wall-clock time.
"""
import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import collate_prompts  # noqa: E402
from qwen2 import PACK_MIN_NEW_TOKENS, Qwen2, Qwen2Config, decode_packing, drop_decode_packing, pack_rows  # noqa: E402

clock = time.thread_time          # main() sets it from --clock

SHAPES = {   # width, intermediate, layers, heads, kv heads, vocab, tied
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "0.5b-28": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=28, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def best_of(fns: dict, reps: int) -> dict:
    """Run each fn once as warm-up, then `reps` interleaved rounds; return the best wall time of each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = clock()
            f()
            times[k].append(clock() - t)
    return {k: min(v) for k, v in times.items()}


def cpu_description() -> str:
    """The CPU the figures belong to: model name, torch's vector ISA, and the bf16 matrix units (AMX, AVX512-BF16)
    without which bf16 matmuls are emulated and slower than fp32."""
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    def has(probe):                                 # private torch probes: "?" where this torch lacks them
        f = getattr(torch.cpu, probe, None)
        return "?" if f is None else "yes" if f() else "no"
    return (f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores; torch ISA "
            f"{torch.backends.cpu.get_cpu_capability()}, AMX {has('_is_amx_tile_supported')}, "
            f"AVX512-BF16 {has('_is_avx512_bf16_supported')}")


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a plain reduction over a tensor much larger than the caches."""
    a = torch.ones(mb * 2**20 // 4)
    a.sum()
    t = min(_timed(lambda: a.sum()) for _ in range(reps))
    return a.nbytes / t


def _timed(f):
    t = clock()
    f()
    return clock() - t


def weight_bytes_per_step(m: Qwen2, active=None, matmul_dtype=None) -> int:
    """Bytes of weights read for one decode step: decoder layers (active ones: q/k/v/o with the q/k/v biases,
    gate/up/down, both norms), final norm, LM head. Not the embedding: a decode step gathers B of its rows; a tied
    LM head is the embedding matrix and is counted once, as the head. matmul_dtype: the dtype the step reads the
    matrices and their biases in (decode_matmul_dtype); None = the parameters' dtype. The norms are read as
    parameters."""
    def nbytes(p, matrix: bool) -> int:
        return p.numel() * (matmul_dtype if matrix and matmul_dtype is not None else p.dtype).itemsize
    layers = range(m.config.num_hidden_layers) if active is None else active
    b = sum(nbytes(p, isinstance(mod, torch.nn.Linear))
            for i in layers for mod in m.model.layers[i].modules() for p in mod.parameters(recurse=False))
    return b + m.model.norm.weight.nbytes + nbytes(m.lm_head.weight, True)


def decode_matmul_dtype(m: Qwen2) -> torch.dtype:
    """The dtype the decode step reads its matrices in: that of the model's decode packing where generate() made
    one (pack_for_decode, from PACK_MIN_NEW_TOKENS new tokens on): fp32 copies for a bf16 model on a CPU without
    bf16 matmul hardware (qwen2.DecodeLinear), twice the parameters' bytes; else the parameters' dtype."""
    packed = decode_packing(m)
    if packed is not None and packed["lm_head"].dtype == m.dtype:
        return packed["lm_head"].compute
    return m.dtype


def bandwidth_limit(weight_bytes: int, bandwidth: float, step_s: float) -> tuple[float, float]:
    """(limit, share): the time a decode step needs to read its weights once at the measured read bandwidth
    (weight_bytes / bandwidth, in s), and that limit as a share of the measured step time (1 = at the limit).
    Left out: the KV-cache reads (0.5B shape, B=4, ~40 cached columns: 0.2 % of the weight bytes) and the
    activations and logits (a few MB, which stay in the CPU caches)."""
    limit = weight_bytes / bandwidth
    return limit, limit / step_s


def decode_flops(cfg: Qwen2Config, n_active: int, ctx: float) -> float:
    """FLOPs to decode one token at context length ctx: 2 * (matmul params) per layer + attention
    (q.k and p.v: 4 * ctx * H * hd) per active layer, plus the LM head 2 * D * V. ctx = key columns attended
    (padding columns included: the step computes them). Left out: the embedding (a gather), biases, norms, RoPE,
    SiLU, softmax, residual adds and sampling (O(D + I + V) per token, < 0.5 % for the 0.5B shape)."""
    D, I, H, Hkv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim)
    layer = 2 * (D * H * hd + 2 * D * Hkv * hd + H * hd * D + 3 * D * I) + 4 * ctx * H * hd
    return n_active * layer + 2 * D * cfg.vocab_size


def random_prompts(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [max(1, length - 3 * (i % 3)) for i in range(batch)]        # unequal: exercises left padding
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def make_pair(shape: dict, seed=0):
    """A transformers Qwen2ForCausalLM with random weights and our Qwen2 sharing the same tensors."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, attn_implementation="sdpa")).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        ours = Qwen2(Qwen2Config(**shape))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours.eval()


def hf_generate(hf, out, new):
    with torch.no_grad():
        return hf.generate(out.prompt_tokens, attention_mask=out.prompt_mask.long(), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)[:, out.prompt_tokens.shape[1]:]


def bf16_logit_errors(hf, ours, out) -> tuple[float, float]:
    """Max |logit - fp32 transformers logit| over the real tokens of prompt + greedy completion `out`, for our bf16
    model and for transformers in bf16: how far each bf16 model is from the fp32 one."""
    seq, am = torch.cat([out.prompt_tokens, out.tokens], 1), torch.cat([out.prompt_mask, out.mask], 1)
    with torch.no_grad():
        ours_bf16 = ours(seq, None, am).float()[am]
        hf_bf16 = hf(seq, attention_mask=am.long()).logits.float()[am]
        hf_fp32 = hf.float()(seq, attention_mask=am.long()).logits[am]
    hf.to(torch.bfloat16)
    return (ours_bf16 - hf_fp32).abs().max().item(), (hf_bf16 - hf_fp32).abs().max().item()


def decode_steps(m: Qwen2, prompts, new: int) -> tuple[float, float]:
    """(median time of one decode step, time of pack_for_decode) as generate(prompts, new) runs them: prefill,
    prepack the decode weights (CPU, from PACK_MIN_NEW_TOKENS on), then new - 1 one-token steps (forward +
    log-softmax + argmax)."""
    ids, am = collate_prompts(prompts, 0)
    B, T = ids.shape
    times, pack = [], 0.0
    with torch.no_grad():
        cache = m.new_cache(B, T + new - 1)
        if new >= PACK_MIN_NEW_TOKENS:
            drop_decode_packing(m)                         # time a real packing, not the reuse of the last one
            t0 = clock()
            m.pack_for_decode(cache)
            pack = clock() - t0
        tok = m(ids, None, am, logits_from=T - 1, cache=cache)[:, -1].argmax(-1)
        for _ in range(new - 1):
            t0 = clock()
            tok = m(tok[:, None], cache=cache)[:, -1].float().log_softmax(-1).argmax(-1)
            times.append(clock() - t0)
    return statistics.median(times), pack


def section_a(args, bw):
    print("\n(a) Qwen2.generate vs transformers generate(), greedy, CPU, new tokens/s (best of reps)")
    for name, batch, new in (("tiny", args.tiny_batch, args.tiny_new), ("0.5b", args.big_batch, args.big_new)):
        if name not in args.shapes.split(","):
            continue
        hf, ours = make_pair(SHAPES[name])
        prompts = random_prompts(batch, args.prompt_len, ours.config.vocab_size)
        res = {}
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and name == "tiny" and not args.tiny_bf16:
                continue
            hf.to(dtype), ours.to(dtype)
            ref = ours.generate(prompts, max_new_tokens=new, temperature=0)
            gen = {"ours": lambda: ours.generate(prompts, max_new_tokens=new, temperature=0),
                   "hf": lambda: hf_generate(hf, ref, new)}
            reps = args.tiny_reps if name == "tiny" else args.reps
            t = best_of(gen, reps)
            same = (hf_generate(hf, ref, new) == ref.tokens).float().mean().item()
            runs = [decode_steps(ours, prompts, new) for _ in range(reps)]
            step, pack = min(r[0] for r in runs), min(r[1] for r in runs)
            read_as = decode_matmul_dtype(ours)                  # fp32 copies of a bf16 model without bf16 hardware
            wbytes = weight_bytes_per_step(ours, matmul_dtype=read_as)
            limit, share = bandwidth_limit(wbytes, bw, step)
            res[dtype] = t["ours"]
            d = str(dtype).removeprefix("torch.")
            target = "2x" if name == "tiny" else "1x"
            cold = t["ours"] + (pack if new >= PACK_MIN_NEW_TOKENS else 0.0)
            print(f"  {name:5s} {d:8s} B={batch} Tp<={args.prompt_len} new={new}:  ours {batch * new / t['ours']:8.1f} tok/s"
                  f"  transformers {batch * new / t['hf']:8.1f} tok/s  ratio {t['hf'] / t['ours']:.2f}x (target >= {target})"
                  f"  (same greedy tokens {same:.0%})")
            print(f"        ratio {t['hf'] / cold:.2f}x counting a fresh packing of the decode weights in every call "
                  f"(the first generate() after a weight update; later calls reuse the packing)")
            packing = f"{pack * 1e3:.0f} ms per call" if new >= PACK_MIN_NEW_TOKENS else "off (new too small)"
            print(f"        decode {step * 1e3:.1f} ms/step (packing the decode weights: {packing});"
                  f" weights {wbytes / 1e6:.0f} MB"
                  + (f" (matrices read as {str(read_as).removeprefix('torch.')} copies)" if read_as != dtype else "") +
                  f" / {bw / 1e9:.1f} GB/s = {limit * 1e3:.1f} ms  -> {share:.0%} of the bandwidth limit (target >= 60%)")
            if dtype == torch.bfloat16:
                a, b = bf16_logit_errors(hf, ours, ref)
                print(f"        teacher-forced logits vs transformers in fp32, max |diff|: ours bf16 {a:.4f}, transformers "
                      f"bf16 {b:.4f} (greedy tokens differ where bf16 rounding flips a near-tie)")
        if torch.bfloat16 in res:
            print(f"  {name:5s} bf16 gain over fp32 (ours, end to end): {res[torch.float32] / res[torch.bfloat16]:.2f}x")
        del hf, ours


def section_k(args, bw):
    """The decode step's matmuls alone, with the batch's few rows: which kernel of this torch build is fastest, and
    can any read a 0.5B-shaped weight at the memory bandwidth? Timed: F.linear on the [out, in] weight (MKL /
    oneDNN), torch.mm on the transposed [in, out] copy (DecodeLinear's choice below PACK_MIN_BYTES), the
    oneDNN-prepacked matmul (DecodeLinear's choice from PACK_MIN_BYTES on) and one matrix-vector product (a single
    row: the bandwidth a gemv reaches)."""
    print(f"\n(k) decode matmuls alone, fp32: us per call (weight GB/s); read bandwidth {bw / 1e9:.1f} GB/s")
    for shape, B in (("tiny", args.tiny_batch), ("0.5b", args.big_batch)):
        cfg = Qwen2Config(**SHAPES[shape])
        D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        print(f"  {shape} shape, {B} rows:")
        for name, n_out, n_in in (("q|k|v", qkv, D), ("o_proj", D, D), ("gate|up", 2 * I, D), ("down", D, I),
                                  ("lm_head", V, D)):
            w, x = torch.randn(n_out, n_in), torch.randn(B, n_in)
            wt, packed = w.t().contiguous(), torch.ops.mkldnn._reorder_linear_weight(w, pack_rows(B))
            t = best_of({"F.linear": lambda: F.linear(x, w), "mm W^T": lambda: torch.mm(x, wt),
                         "prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                         "one row (mv)": lambda: torch.mv(w, x[0])}, args.reps)
            print(f"    {name:8s} [{n_out} x {n_in}] " + "  ".join(
                f"{k} {v * 1e6:7.1f} ({w.nbytes / v / 1e9:4.1f})" for k, v in t.items()))


def section_bc(args):
    shape = SHAPES[args.nested_shape]
    cfg = Qwen2Config(**shape)
    N = cfg.num_hidden_layers
    print(f"\n(b) nested decode speedup, {args.nested_shape} shape ({N} layers, width {cfg.hidden_size}), "
          f"{args.nested_dtype}, B={args.big_batch}, new={args.new_tokens}; e=1, skipped layers from the middle")
    torch.manual_seed(0)
    with torch.device("meta"):
        m = Qwen2(cfg)
    m.to_empty(device="cpu").to(getattr(torch, args.nested_dtype))
    m.apply(m._init_weights)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m.eval()
    prompts = random_prompts(args.big_batch, args.prompt_len, cfg.vocab_size)
    masks = {0.0: None}
    for r in args.ratios:
        k = round(r * N + 1e-9)                                         # k = round(r N): 1, 3, 4 for N = 28
        skip = set(range(1, N - 1)[(N - 2 - k) // 2:][:k])               # valid set {1..N-2} (0-based), e = 1
        masks[r] = [i in skip for i in range(N)]
    # decode steps of all the models are interleaved one step at a time, so that a burst of load from other
    # jobs hits all of them alike; speedup = median over steps of t_full / t_nested (the real sampler loop).
    B, T = args.big_batch, args.prompt_len
    ids, am = collate_prompts(prompts, 0)
    caches, toks = {}, {}
    times = {r: [] for r in masks}
    with torch.no_grad():
        for r, mask in masks.items():
            caches[r] = m.new_cache(B, T + args.new_tokens + 1, mask)
            if args.new_tokens >= PACK_MIN_NEW_TOKENS:
                m.pack_for_decode(caches[r])                            # as generate() does (CPU)
            toks[r] = m(ids, mask, am, logits_from=T - 1, cache=caches[r])[:, -1].argmax(-1)
        for _ in range(args.new_tokens):
            for r, mask in masks.items():
                t0 = clock()
                toks[r] = m(toks[r][:, None], mask, cache=caches[r])[:, -1].float().log_softmax(-1).argmax(-1)
                times[r].append(clock() - t0)
    step = {r: statistics.median(v[1:]) for r, v in times.items()}
    ratio = {r: statistics.median(a / b for a, b in zip(times[0.0][1:], v[1:])) for r, v in times.items()}
    ctx = args.prompt_len + args.new_tokens / 2
    f0 = decode_flops(cfg, N, ctx)
    for r, mask in masks.items():
        k = sum(mask) if mask else 0
        pred = f0 / decode_flops(cfg, N - k, ctx)
        meas = ratio[r]
        extra = "" if k == 0 else (f"  measured/predicted {meas / pred:.3f}; realised gain "
                                   f"{(meas - 1) / (pred - 1):.0%} of predicted (target >= 95%)")
        print(f"  r={r:.2f} k={k}: decode {step[r] * 1e3:7.1f} ms/step  speedup {meas:.3f}x"
              f"  FLOP-predicted {pred:.3f}x{extra}")

    print(f"\n(c) KV-cache bytes (B={args.big_batch}, S={args.prompt_len + args.new_tokens}, {args.nested_dtype})")
    S = args.prompt_len + args.new_tokens
    full = m.new_cache(args.big_batch, S).nbytes
    for r, mask in masks.items():
        c = m.new_cache(args.big_batch, S, mask)
        n_act = len(c.active)
        print(f"  r={r:.2f}: {c.nbytes / 2**20:8.2f} MiB  = {c.nbytes / full:.3f} of full"
              f"  (active layers {n_act}/{N} = {n_act / N:.3f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a,b", help="comma list of a, b (b includes c), k (matmul kernels alone)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the 2 cores are shared)")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="cpu: this thread's CPU time (default; needs --threads 1), wall: wall-clock time")
    p.add_argument("--shapes", default="tiny,0.5b", help="section a: comma list of tiny, 0.5b")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny-reps", type=int, default=15, help="reps of the tiny shape (a call takes < 1 s)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tiny-batch", type=int, default=16)
    p.add_argument("--tiny-new", type=int, default=64)
    p.add_argument("--tiny-bf16", action="store_true", help="also time the tiny shape in bf16")
    p.add_argument("--big-batch", type=int, default=4)
    p.add_argument("--big-new", type=int, default=16)
    p.add_argument("--nested-shape", default="0.5b-28", choices=sorted(SHAPES))
    p.add_argument("--nested-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per row for section b")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.10, 0.15])
    args = p.parse_args()
    if not args.sections or not set(args.sections.split(",")) <= {"a", "b", "c", "k"}:
        p.error(f"--sections {args.sections!r}: expected a comma list of a, b, c, k (e.g. a,b)")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (a thread's CPU time does not count the other threads)")
    if min(args.tiny_new, args.big_new) < 2:
        p.error("--tiny-new and --big-new must be >= 2")
    for name in ("reps", "tiny_reps", "prompt_len", "tiny_batch", "big_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.new_tokens < 2:                          # section b times the decode steps after the first
        p.error(f"--new-tokens {args.new_tokens}: expected an integer >= 2")
    if not args.shapes or not set(args.shapes.split(",")) <= {"tiny", "0.5b"}:
        p.error(f"--shapes {args.shapes!r}: expected a comma list of tiny, 0.5b")
    N = SHAPES[args.nested_shape]["num_hidden_layers"]
    for r in args.ratios:                            # section b skips k of the N - 2 layers 1..N-2 (e = 1)
        if not (0 <= r < 1 and round(r * N + 1e-9) <= N - 2):
            p.error(f"--ratios {r:g}: expected 0 <= r < 1 with k = round(r * {N}) <= {N - 2} (the {N - 2} "
                    f"layers between the borders of the {args.nested_shape} shape)")
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"CPU: {cpu_description()}")
    bw = read_bandwidth()
    print(f"read bandwidth (sum over a 512 MiB fp32 tensor): {bw / 1e9:.1f} GB/s")
    secs = args.sections.split(",")
    if "a" in secs:
        section_a(args, bw)
    if "k" in secs:
        section_k(args, bw)
    if "b" in secs or "c" in secs:
        section_bc(args)


if __name__ == "__main__":
    main()
