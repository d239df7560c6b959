"""Tokens/s of one full Nested-ReFT training step: baseline (r = 0) vs nested rollouts (r = 0.05 / 0.10 / 0.15).

A step is exactly what nested_reft.train() runs per step (spec §3, Algorithm 1):
    nested_reft.rollout   G fixed-length completions per prompt from the model with k = round(r*N) layers
                          skipped, decoded and scored by eval.reward (real graders, synthetic arithmetic set)
    nested_reft.reft_step advantages, full-model log-probs with gradient, f(rho)-weighted loss, backward,
                          grad clipping and one AdamW step
Every variant shares one random 28-layer Qwen2, one optimizer and the same prompts; the variants run
interleaved (a rotated order every repetition: ABCD, BCDA, ...) so that machine noise hits them alike, and each
speedup is the median over repetitions of the per-repetition ratio baseline time / variant time.

What is compared with what (spec §5):
  rollout speedup   measured: time in model.generate (the sampling the skip mask shrinks);
                    predicted: FLOPs of the rollout at N active layers / at N - k (rollout_flops below).
  step speedup      measured: whole step (rollout + scoring + reft_step);
                    predicted (Amdahl): 1 / ((1 - s) + s / rollout_speedup_predicted), s = share of the
                    baseline step spent in model.generate (scoring, log-probs, backward and AdamW don't shrink).
  gain ratio        (measured step speedup - 1) / (predicted - 1): the share of the predicted gain obtained.
                    Target (issue 4): >= 90 %, and the gain grows linearly with r. Also pooled over all r
                    (least squares of measured on predicted gains), and from the fastest rep instead of medians.
Every time is taken on two clocks: wall (what tokens/s means) and process CPU time (does not run while other
processes hold the cores: on a shared machine it separates the work from the scheduling, if torch uses 1 thread).
The predicted step gains are a few percent (k = 1/3/4 of 28 layers, times the rollout share), so the per-rep
spread printed beside them says whether this machine can resolve them at all.

    python bench/bench_train_step.py                         # CPU default, <= ~3.5 min on 2 cores
    python bench/bench_train_step.py --threads 1             # a 2-core machine shared with other busy processes
    python bench/bench_train_step.py --reps 10 --new-tokens 64
    python bench/bench_train_step.py --preset qwen1p5b-shape # GPU: Qwen2.5-Math-1.5B shape, bf16, 8 prompts x G=8,
                                                             # 256 fixed new tokens (random weights, ~24 GB)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nested_reft as nr  # noqa: E402
from data import Example, chat_prompt, train_tokenizer, write_text_atomic  # noqa: E402
from qwen2 import Qwen2Config  # noqa: E402

# --preset values: the Qwen2.5-Math-1.5B(-Instruct) shape (config.json of the HF release) and a GPU-sized step.
PRESETS = {
    "qwen1p5b-shape": dict(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                           tie=True, prompts=8, group=8, new_tokens=256, micro_batch=16, device="cuda",
                           dtype="bfloat16", reps=6, max_minutes=8.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="set the size flags below at once (qwen1p5b-shape: for a GPU, not for the 2-core CPU)")
    p.add_argument("--ratios", default="0.05,0.10,0.15", help="skip ratios r compared with the baseline r = 0")
    p.add_argument("--border", type=int, default=1, help="e: border layers never skipped (paper: 1)")
    p.add_argument("--layers", type=int, default=28, help="N (Qwen2.5-Math 1.5B / 7B: 28)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096, help="model vocab (the BPE tokenizer uses at most this)")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=48, help="fixed completion length (EOS suppressed)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward in reft_step")
    p.add_argument("--reps", type=int, default=8, help="timed repetitions of each variant (after 1 warm-up)")
    p.add_argument("--max-minutes", type=float, default=3.0,
                   help="stop starting new repetitions once the timed part has run this long (0 = no limit)")
    p.add_argument("--variant", default="retrace", help="off-policy weight f(rho): base, practical, retrace")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads(N) before measuring; 0 leaves torch's default. On a machine shared "
                        "with other busy processes, 1 avoids OpenMP threads waiting for a descheduled sibling at "
                        "every small decode op (seen: 20x slower decode with 2 threads at load 6 on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.preset:                       # the preset wins over defaults, explicit flags win over the preset
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in PRESETS[args.preset].items():
            if k not in given:
                setattr(args, k, v)
    try:
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: expected a comma list of numbers, e.g. 0.05,0.10,0.15")
    for name, low in (("reps", 1), ("threads", 0), ("max_minutes", 0)):
        if not getattr(args, name) >= low:                              # NaN fails too
            what = f"an integer >= {low}" if name != "max_minutes" else ">= 0 (0 = no limit)"
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected {what}")
    if not 0 <= args.seed < 2**62:                                      # the run config's range (nested_reft)
        p.error(f"--seed {args.seed}: expected an integer in [0, 2^62)")
    if args.json:                                   # checked now, not once the minutes of measuring are over
        parent = Path(os.path.abspath(args.json)).parent
        while not parent.exists():
            parent = parent.parent
        if os.path.isdir(args.json):
            p.error(f"--json {args.json}: is a directory, expected a file path")
        if not parent.is_dir():
            p.error(f"--json {args.json}: {parent} is a file, expected a directory")
    try:
        model_config(args)
    except ValueError as e:
        p.error(str(e))
    for r in ratios:
        try:
            nr.SkipSampler(args.layers, r, args.border, 0)            # r in [0, 1), k <= N - 2e, e >= 0
        except ValueError as e:
            p.error(f"--ratios: {e}")
    if not any(nr.num_skipped(r, args.layers) for r in ratios):     # the gain ratios divide by the predicted gains
        p.error(f"--ratios {args.ratios!r}: no ratio skips a layer (k = round(r * {args.layers}) = 0 for all), "
                f"nothing to compare")
    args.ratios = ratios
    return args


def model_config(args) -> Qwen2Config:
    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, tie_word_embeddings=args.tie)


# ----------------------------------------------------------------------------------------------------------
# FLOP model of the rollout (multiply-add = 2 FLOPs). Per token, per ACTIVE layer (W = hidden, I = intermediate,
# H heads, Hkv kv-heads, hd = W / H, c = number of key columns the token attends over):
#     projections  2 * (W*H*hd + 2*W*Hkv*hd + H*hd*W)        q, k, v, o
#     MLP          2 * 3*W*I                                 gate, up, down
#     attention    2*c*H*hd (Q K^T) + 2*c*H*hd (P V) = 4*c*W
# Per token, independent of the active layers:
#     embedding    a row gather: 0 FLOPs
#     LM head      2*W*V                                     only at positions whose logits are taken
#     sampling     ~5*V                                      vocab mask, /T, log-softmax, exp, multinomial
# Norms, RoPE, SiLU and residual adds are O(W + I) per layer-token (< 1 % here) and left out.
# generate() on B rows, prompt length Tp (left-padded, computed in full), T new tokens:
#     prefill:  Tp positions, c = i + 1 (causal), logits at the last position only (logits_from = Tp - 1)
#     decode:   T - 1 single-token steps, c = Tp + t for t = 1..T-1, logits at each
#     sampling: T positions
# F(L) = B * [ L * (Tp + T - 1) * P_layer + L * 4W * (sum of c) + T * (2WV + 5V) ]
# Skipping k layers replaces L = N by N - k; the speedup predicted for the rollout is F(N) / F(N - k).
# ----------------------------------------------------------------------------------------------------------


def layer_matmul_flops(cfg: Qwen2Config) -> int:
    """2 * (parameters of the matrices of one decoder layer): FLOPs per token per layer, context excluded."""
    W, I, H, Hkv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim)
    return 2 * (W * H * hd + 2 * W * Hkv * hd + H * hd * W + 3 * W * I)


def rollout_flops(cfg: Qwen2Config, active_layers: int, rows: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of generate() with `active_layers` of the N layers running (formula in the comment above)."""
    W, V, Tp, T = cfg.hidden_size, cfg.vocab_size, prompt_len, new_tokens
    positions = Tp + T - 1                                          # prefill + decode forwards, per row
    ctx = Tp * (Tp + 1) // 2 + sum(Tp + t for t in range(1, T))     # sum of c over those positions
    per_row = (active_layers * (positions * layer_matmul_flops(cfg) + 4 * W * ctx)   # the layers
               + T * (2 * W * V + 5 * V))                           # LM head + sampling (embedding: 0)
    return float(rows * per_row)


# ----------------------------------------------------------------------------------------------------------
# Setup: a tokenizer trained on a small arithmetic corpus, a random model built by nested_reft.load_model


def arithmetic_examples(n: int, seed: int) -> list[Example]:
    """Tiny synthetic Example set: 'What is a plus b?' with the gold answer (eval.reward grades against it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append(Example(f"What is {a} plus {b}?", f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                           str(a + b)))
    return out


def build(args, tmp: Path):
    """(cfg, model, tokenizer, device, dtype, examples) through the library's own config and loader."""
    examples = arithmetic_examples(256, args.seed)
    tok = train_tokenizer([chat_prompt(ex.question) + ex.solution for ex in examples], min(args.vocab, 8192))
    tok.save(tmp / "tok")
    mcfg = model_config(args)
    (tmp / "model_config.json").write_text(json.dumps(mcfg.to_dict()))
    S = args.prompts * args.group
    cfg = nr.load_config("", {
        "model_config": str(tmp / "model_config.json"), "tokenizer": str(tmp / "tok"), "device": args.device,
        "dtype": args.dtype, "seed": str(args.seed), "prompts_per_step": str(args.prompts),
        "group_size": str(args.group), "max_new_tokens": str(args.new_tokens), "fixed_length": "true",
        "rollout_batch": str(S), "micro_batch": str(args.micro_batch), "variant": args.variant,
        "skip_border": str(args.border), "lr_schedule": "constant", "sft_epochs": "0"})
    device, dtype = nr.resolve_device(cfg)
    model, tok = nr.load_model(cfg, device)
    return cfg, model, tok, device, dtype, examples


CLOCKS = ("wall", "cpu")


def now() -> dict:
    """Both clocks: wall time (what tokens/s means) and this process's CPU time (all its threads). The CPU
    clock does not advance while other processes hold the cores, so on a shared machine it isolates the work
    the step does from the scheduling noise; with torch threads > 1 it also counts OpenMP spin-waits."""
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def since(t0: dict) -> dict:
    t1 = now()
    return {c: t1[c] - t0[c] for c in CLOCKS}


class GenerateTimer:
    """Wraps model.generate (an instance attribute) to add up the time spent sampling, on both clocks."""

    def __init__(self, model, sync):
        self.fn, self.sync, self.seconds = model.generate, sync, dict.fromkeys(CLOCKS, 0.0)
        model.generate = self

    def __call__(self, *a, **kw):
        self.sync()
        t0 = now()
        out = self.fn(*a, **kw)
        self.sync()
        for c, dt in since(t0).items():
            self.seconds[c] += dt
        return out


# ----------------------------------------------------------------------------------------------------------
# The measurement


def run(args) -> dict:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as d:
        cfg, model, tok, device, dtype, examples = build(args, Path(d))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    N = model.config.num_hidden_layers
    opt, sched = nr.make_optimizer(model, cfg, cfg.lr, 10 ** 6)
    timer = GenerateTimer(model, sync)
    variants = [{"r": r, "k": nr.num_skipped(r, N),
                 "skipper": nr.SkipSampler(N, r, cfg.skip_border, args.seed + 17),
                 "gen": torch.Generator(device=device).manual_seed(args.seed + 1 + i),
                 "t": {c: {"step": [], "rollout": [], "generate": []} for c in CLOCKS},
                 "tokens": [], "reward": []}
                for i, r in enumerate([0.0] + args.ratios)]
    order = nr.DataOrder(len(examples), args.seed)

    def one_step(v: dict, batch: list[Example], record: bool) -> None:
        skip = v["skipper"].next()                                                 # s_t, drawn every step
        sync()
        timer.seconds = dict.fromkeys(CLOCKS, 0.0)
        t0 = now()
        ro = nr.rollout(model, tok, batch, skip, cfg, v["gen"], device, dtype)      # sample + decode + reward
        sync()
        t_roll = since(t0)
        nr.reft_step(model, opt, sched, ro, cfg, tok, device, dtype)               # log-probs, backward, AdamW
        sync()
        t_step = since(t0)
        if record:
            for c in CLOCKS:
                v["t"][c]["step"].append(t_step[c])
                v["t"][c]["rollout"].append(t_roll[c])
                v["t"][c]["generate"].append(timer.seconds[c])
            v["tokens"].append(int(ro.mask.sum()) + int(ro.prompt_mask.sum()))     # as train(): gen + prompt
            v["reward"].append(float(ro.rewards.mean()))
        v["Tp"], v["Tn"] = ro.prompt_tokens.shape[1], ro.tokens.shape[1]

    take = lambda: [examples[i] for i in order.take(args.prompts)]     # the same prompts for every variant
    batch = take()
    for v in variants:                                                  # warm-up, untimed
        one_step(v, batch, record=False)
    t_start, reps = time.perf_counter(), 0
    gc.disable()                                                        # no collector pauses inside a timed step
    for rep in range(args.reps):                                        # ABCD, BCDA, CDAB, ... (rotated)
        batch = take()
        for j in range(len(variants)):
            one_step(variants[(rep + j) % len(variants)], batch, record=True)
            gc.collect()
        reps += 1
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes and reps < args.reps:
            print(f"(time budget --max-minutes={args.max_minutes} reached: {reps} of {args.reps} reps done)")
            break
    gc.enable()
    timed_s = time.perf_counter() - t_start
    return {"timed_s": timed_s, "reps": reps, "Tp": variants[0]["Tp"], "Tn": variants[0]["Tn"],
            **{c: summarise(args, model.config, variants, c) for c in CLOCKS}}


def paired(base: list[float], var: list[float]) -> list[float]:
    """Per-repetition speedups base[i] / var[i] (neighbours in time, so slow drifts cancel)."""
    return [b / v for b, v in zip(base, var)]


def fit_line(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x -> (slope b, intercept a, R^2)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sum((xi - mx) ** 2 for xi in x)
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return b, a, (1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def summarise(args, mcfg: Qwen2Config, variants: list[dict], clock: str) -> dict:
    """Speedups of every variant vs the baseline (variants[0]) on one clock."""
    N, rows = mcfg.num_hidden_layers, args.prompts * args.group
    bt = variants[0]["t"][clock]
    s = statistics.median(g / t for g, t in zip(bt["generate"], bt["step"]))     # rollout share of the step
    s_roll = statistics.median(r / t for r, t in zip(bt["rollout"], bt["step"]))
    f_full = rollout_flops(mcfg, N, rows, variants[0]["Tp"], variants[0]["Tn"])
    out = {"share_generate": s, "share_rollout": s_roll, "rows": []}
    for v in variants:
        vt = v["t"][clock]
        step = statistics.median(vt["step"])
        roll_pred = f_full / rollout_flops(mcfg, N - v["k"], rows, variants[0]["Tp"], variants[0]["Tn"])
        step_pred = 1.0 / ((1.0 - s) + s / roll_pred)                               # Amdahl
        roll_meas = statistics.median(paired(bt["generate"], vt["generate"]))
        per_rep = paired(bt["step"], vt["step"])
        step_meas = statistics.median(per_rep)
        nested = v["k"] > 0
        out["rows"].append({
            "r": v["r"], "k": v["k"], "tokens": statistics.median(v["tokens"]), "step_s": step,
            "tok_s": statistics.median(v["tokens"]) / step, "generate_s": statistics.median(vt["generate"]),
            "share_generate": statistics.median(g / t for g, t in zip(vt["generate"], vt["step"])),
            "rollout_speedup": roll_meas, "rollout_speedup_pred": roll_pred,
            "rollout_gain_ratio": (roll_meas - 1) / (roll_pred - 1) if nested else None,
            "step_speedup": step_meas, "step_speedup_pred": step_pred, "speedup_ratio": step_meas / step_pred,
            "gain_ratio": (step_meas - 1) / (step_pred - 1) if nested else None,
            "step_gain_min_max": [min(per_rep) - 1, max(per_rep) - 1],
            # the same from the fastest rep of each (interference from other processes only ever slows a step)
            "rollout_speedup_min": min(bt["generate"]) / min(vt["generate"]),
            "step_speedup_min": min(bt["step"]) / min(vt["step"]),
            "reward_mean": statistics.fmean(v["reward"]), "times": vt})
    # pooled gain ratio: least squares (through 0) of the measured step gains on the predicted ones, all r at once,
    #   eta = sum_r g_r p_r / sum_r p_r^2 ; per repetition (its own paired gains) and from the medians
    nested = [(v, row) for v, row in zip(variants, out["rows"]) if v["k"] > 0]
    pp = sum((row["step_speedup_pred"] - 1) ** 2 for _, row in nested)
    for suffix in ("", "_min"):
        out["pooled_gain_ratio" + suffix] = sum((row["step_speedup" + suffix] - 1) * (row["step_speedup_pred"] - 1)
                                                for _, row in nested) / pp
    # its 95 % confidence interval: bootstrap over repetitions (a rep = one rotated round of all variants, so the
    # same rep indices are drawn for every variant and the pairing is kept), the medians recomputed each time
    reps, rng, boot = len(bt["step"]), random.Random(0), []
    for _ in range(2000):
        idx = [rng.randrange(reps) for _ in range(reps)]
        boot.append(sum((statistics.median(bt["step"][i] / v["t"][clock]["step"][i] for i in idx) - 1)
                        * (row["step_speedup_pred"] - 1) for v, row in nested) / pp)
    boot.sort()
    out["pooled_gain_ratio_ci95"] = [boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]]
    out["pooled_gain_ratio_per_rep"] = [
        sum((bt["step"][i] / v["t"][clock]["step"][i] - 1) * (row["step_speedup_pred"] - 1) for v, row in nested) / pp
        for i in range(len(bt["step"]))]
    rs = [row["r"] for row in out["rows"]]
    for name, key in (("fit_step_measured", "step_speedup"), ("fit_step_predicted", "step_speedup_pred"),
                      ("fit_rollout_measured", "rollout_speedup")):
        out[name] = fit_line(rs, [row[key] - 1 for row in out["rows"]])
    return out


def report_clock(res: dict, clock: str) -> None:
    rows, base = res["rows"], res["rows"][0]
    print(f"--- {clock} clock ---  baseline step {base['step_s']:.3f} s, rollout share s = "
          f"{res['share_generate']:.3f} (model.generate; whole nr.rollout() incl. decode + eval.reward: "
          f"{res['share_rollout']:.3f})")
    hdr = (f"{'r':>5} {'k':>2} {'step s':>7} {'tok/s':>7} {'gen s':>6} {'gen%':>5} | "
           f"{'roll x':>6} {'pred':>6} {'gain%':>6} | {'step x':>6} {'Amdahl':>6} {'x/pred':>6} {'gain%':>6} |"
           f" {'rep gains min..max':>18}")
    print(hdr)
    print("-" * len(hdr))
    pct = lambda x: f"{100 * x:6.1f}" if x is not None else f"{'-':>6}"
    for row in rows:
        lo, hi = row["step_gain_min_max"]
        spread = f"{100 * lo:+6.1f}..{100 * hi:+6.1f} %" if row["k"] else "-"
        print(f"{row['r']:5.2f} {row['k']:2d} {row['step_s']:7.3f} {row['tok_s']:7.1f} {row['generate_s']:6.3f} "
              f"{100 * row['share_generate']:5.1f} | {row['rollout_speedup']:6.3f} {row['rollout_speedup_pred']:6.3f} "
              f"{pct(row['rollout_gain_ratio'])} | {row['step_speedup']:6.3f} {row['step_speedup_pred']:6.3f} "
              f"{pct(row['speedup_ratio'])} {pct(row['gain_ratio'])} | {spread:>18}")
    for name, key in (("step gain, measured   ", "fit_step_measured"), ("step gain, predicted  ", "fit_step_predicted"),
                      ("rollout gain, measured", "fit_rollout_measured")):
        b, a, r2 = res[key]
        print(f"  least squares over r = 0 + {len(rows) - 1} ratios, {name}: gain = {a:+.4f} + {b:.4f} * r, "
              f"R^2 = {r2:.3f}")
    nested = [row for row in rows if row["k"] > 0]
    per_r = ", ".join(f"r={row['r']:.2f}: {100 * row['gain_ratio']:.0f}%" for row in nested)
    eta, per_rep = res["pooled_gain_ratio"], sorted(res["pooled_gain_ratio_per_rep"])
    q1, q3 = (statistics.quantiles(per_rep, n=4)[::2] if len(per_rep) > 1 else (per_rep[0], per_rep[0]))
    print(f"  gain ratio per r: {per_r}")
    mins = ", ".join(f"r={row['r']:.2f}: roll x {row['rollout_speedup_min']:.3f}, step x {row['step_speedup_min']:.3f} "
                     f"= {100 * (row['step_speedup_min'] - 1) / (row['step_speedup_pred'] - 1):.0f}%" for row in nested)
    print(f"  from the fastest rep of each variant instead of medians: {mins}; "
          f"pooled {100 * res['pooled_gain_ratio_min']:.0f}%")
    print(f"  pooled gain ratio (LSQ of measured on predicted step gains, all r): {100 * eta:.0f}%; "
          f"per rep: quartiles {100 * q1:.0f}..{100 * q3:.0f}%, "
          f"min..max {100 * per_rep[0]:.0f}..{100 * per_rep[-1]:.0f}%")
    lo, hi = res["pooled_gain_ratio_ci95"]
    print(f"  pooled gain ratio, 95 % bootstrap interval over reps: {100 * lo:.0f}..{100 * hi:.0f}%")
    if len(per_rep) < 3:
        verdict = f"INCONCLUSIVE (only {len(per_rep)} rep(s); need >= 3 for a median against noise)"
    elif lo < 0.9 <= hi:
        verdict = (f"INCONCLUSIVE (90 % lies inside the 95 % interval {100 * lo:.0f}..{100 * hi:.0f}%: noise > the "
                   f"effect; more reps / a quieter machine)")
    else:
        verdict = "MET" if lo >= 0.9 else "NOT MET"
    print(f"  target (pooled gain ratio >= 90 %): {verdict}")


def load_warning() -> str:
    """A warning line when torch runs several threads on a machine whose load exceeds its cores."""
    load, cores, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load > cores - 0.5:
        return (f"WARNING: load average {load:.1f} on {cores} cores with {threads} torch threads: OpenMP threads "
                f"wait for descheduled siblings at every small op, so decode slows down erratically (seen 5-20x) "
                f"and the timings mostly measure the scheduler; rerun with --threads 1")
    return ""


def report(args, out: dict) -> None:
    base = out["wall"]["rows"][0]
    print(f"tokens per step {base['tokens']:.0f} = {args.prompts} prompts x G={args.group} x ({out['Tn']} fixed new "
          f"+ prompt; padded prompt length {out['Tp']}); {out['reps']} interleaved reps per variant after 1 warm-up; "
          f"timed part {out['timed_s']:.0f} s")
    print("roll x: median over reps of the paired speedup of model.generate vs r=0;  pred: FLOP ratio F(N)/F(N-k)")
    print("step x: the same for the whole step;  Amdahl: 1/((1-s) + s/pred);  x/pred: step x / Amdahl;")
    print("gain%: (measured - 1) / (predicted - 1), target >= 90 %;  rep gains: min..max of the per-rep step gains")
    for clock in CLOCKS:
        if clock == "cpu" and args.device != "cpu":
            continue
        print()
        report_clock(out[clock], clock)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join(["python", *(sys.argv if argv is None else ["bench/bench_train_step.py", *argv])]))
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, device {args.device}, "
          f"dtype {args.dtype}")
    print(f"model: random Qwen2, N={args.layers} W={args.hidden} heads={args.heads}/{args.kv_heads} "
          f"I={args.intermediate} V={args.vocab} tie={args.tie}; e={args.border}, variant={args.variant}")
    if load_warning():
        print(load_warning())
    try:
        out = run(args)
    except nr.UserError as e:                    # a value nested_reft.load_config rejects (--variant, --dtype, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args, out)
    if load_warning():
        print("\n" + load_warning() + " (at the end of the run)")
    if args.json:
        write_text_atomic(args.json, json.dumps({"args": vars(args), **out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
