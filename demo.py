"""The CPU demo: the whole Nested-ReFT paper in a few minutes on a 2-core machine, no GPU, no downloads.

    python demo.py                  # 6-13 minutes on 2 cores (by CPU): the table, results.json, table.md, plots
    python demo.py --quick          # same code path, fewer steps and problems (2.5-5 minutes; the CI test)
    python demo.py --out DIR        # where everything goes (default runs/demo, runs/demo_quick with --quick);
                                    # an earlier demo's run folders there are replaced (a line says so)

What it does (every stage prints its progress):
  1. task       data.synthetic_dataset: grade-school word problems with one-digit arithmetic and CoT solutions
                ending in \\boxed{}; 60 % of the SFT solutions of the two-step template box the intermediate
                result (the deliberate flaw RL has to fix); 200 held-out test problems, all correct.
  2. tokenizer  data.synthetic_tokenizer(): a byte-level BPE trained on the task with the `tokenizers` library.
  3. model      a random 12-layer Qwen2 built from configs/tiny_model.json, saved with Qwen2.save_pretrained
                and reloaded with Qwen2.from_pretrained (the HF layout real checkpoints use).
  4. SFT        nested_reft.train with configs/tiny.json and steps = 0: the warm-up checkpoint.
  5. ReFT       from that SAME checkpoint, four runs of nested_reft.train: baseline ReFT (r = 0, e = 0) and
                Nested-ReFT r = 0.15, e = 1 (k = 2 of 12 layers skipped per step) with f(rho) = Base, Practical,
                Retrace-lambda. Each run goes in chunks (train(..., stop_after=n), then resume) so that its
                checkpoint is evaluated every `eval_every` steps: held-out greedy accuracy along the run.
  6. speed      generate() tokens/s of the warm-up model against the skip ratio, beside the FLOP prediction
                (best of 3 interleaved repetitions; --quick times one, which is noisy: the table's rollout
                tok/s, from the training runs, is the steadier speed-up there).
  7. report     the paper-style table (stdout and table.md), results.json, and PNG plots when matplotlib is
                installed (pip install matplotlib).

Threads: torch uses --threads (default 1). One thread keeps the run reproducible bit for bit and is robust when
other processes share the CPU (oversubscribed OpenMP threads can be many times slower); --threads 2 is ~1.4x
faster on an idle 2-core machine but gives (slightly) different numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import data
import nested_reft
from qwen2 import Qwen2, Qwen2Config

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "tiny.json"
MODEL_CONFIG = ROOT / "configs" / "tiny_model.json"

# The four ReFT runs, all from the same warm-up checkpoint (paper §6: the baseline plus one (r, e) instance
# with each off-policy correction f).
RUNS = [
    ("baseline", "ReFT baseline", dict(skip_ratio=0.0, skip_border=0, variant="base")),
    ("nested-base", "Nested-ReFT Base", dict(skip_ratio=0.15, skip_border=1, variant="base")),
    ("nested-practical", "Nested-ReFT Practical", dict(skip_ratio=0.15, skip_border=1, variant="practical")),
    ("nested-retrace", "Nested-ReFT Retrace-λ", dict(skip_ratio=0.15, skip_border=1, variant="retrace")),
]
F_NAMES = {"base": "ρ", "practical": "1", "retrace": "λ·min(1,ρ)"}

# Full demo vs --quick (same code path). sft_epochs is in passes over the 2000 training problems.
SETTINGS = {
    "full": dict(sft_epochs=6.0, steps=90, eval_every=10, n_test=200, speed_ratios=(0.0, 0.1, 0.15, 0.25, 0.35),
                 speed_reps=3),
    "quick": dict(sft_epochs=6.0, steps=16, eval_every=8, n_test=100, speed_ratios=(0.0, 0.15), speed_reps=1,
                  reft_overrides=dict(warmup_steps=0)),
}
# Targets of issue 5 that the full run must show (reported, never enforced).
TARGET_REFT_GAIN = 10.0       # points of held-out accuracy, ReFT baseline over the SFT warm-up
TARGET_RETRACE_GAP = 3.0      # |Nested-ReFT Retrace - baseline| in points


def f_name(variant: str, skip_ratio: float) -> str:
    return "ρ (= 1 at r = 0)" if skip_ratio == 0 and variant == "base" else F_NAMES[variant]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: held-out greedy accuracy (pass@1), per template too


def evaluate_dir(model_dir: Path, tok: data.Tokenizer, test: list[data.Example], max_new_tokens: int) -> dict:
    """Greedy pass@1 of the checkpoint in model_dir on the held-out problems (eval.evaluate)."""
    from eval import evaluate
    model = Qwen2.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    acc, records = evaluate(model, tok, test, batch_size=len(test), max_new_tokens=max_new_tokens)
    per = {}
    for r in records:
        per.setdefault(data.synthetic_template(r["question"]), []).append(r["correct"])
    return {"accuracy": acc, "per_template": {t: sum(v) / len(v) for t, v in sorted(per.items())},
            "seconds": time.perf_counter() - t0, "example": records[1]["completion"]}


def fmt_templates(per: dict) -> str:
    return " ".join(f"{t} {100 * a:.0f}%" for t, a in per.items())


# ----------------------------------------------------------------------------------------------------------
# FLOP model of one rollout (generate): bench/bench_train_step.py's accounting without its ~5 * V FLOPs of
# sampling per token (0.2 % of a decoded token's FLOPs in the tiny model, 0.07 % of a rollout's).
# Per token and ACTIVE layer: 2 * (q, k, v, o, gate, up, down parameters) + 4 * c * W for attention over c keys;
# per generated token, whatever the mask: the LM head 2 * W * V. Prefill runs the Tp prompt positions (c = 1..Tp),
# decode T - 1 single positions (c = Tp + t). Skipping k layers replaces N by N - k.
# The demo passes MEAN lengths (prompt: over the task's prompts; new: real tokens per row), while generate() runs
# every row of a batch to the batch's padded prompt length and its longest completion. The prediction is a ratio,
# so this moves it little: at prompt 51 / 40 new instead of 49 / 20, 1.194x instead of 1.196x for k = 2 of 12
# (1.482x instead of 1.488x for k = 4).


def rollout_flops(cfg: Qwen2Config, active: int, prompt_len: float, new_tokens: float) -> float:
    W, I, V, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * (W * W + 2 * W * kv + W * W + 3 * W * I)                       # matmul FLOPs per token per layer
    Tp, T = prompt_len, new_tokens
    positions = Tp + T - 1
    keys = Tp * (Tp + 1) / 2 + (T - 1) * Tp + T * (T - 1) / 2                 # sum of c over those positions
    return active * (positions * layer + 4 * W * keys) + T * 2 * W * V


def predicted_speedup(cfg: Qwen2Config, k: int, prompt_len: float, new_tokens: float) -> float:
    N = cfg.num_hidden_layers
    return rollout_flops(cfg, N, prompt_len, new_tokens) / rollout_flops(cfg, N - k, prompt_len, new_tokens)


# ----------------------------------------------------------------------------------------------------------
# The stages


def build_task_and_model(out: Path, seed: int) -> tuple[data.Tokenizer, Path]:
    """Tokenizer trained on the task + a random Qwen2 from configs/tiny_model.json, saved to out/init in the
    HF layout and reloaded through Qwen2.from_pretrained (which must give back the same tensors)."""
    t0 = time.perf_counter()
    tok = data.synthetic_tokenizer()
    cfg = Qwen2Config.from_json(MODEL_CONFIG)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{MODEL_CONFIG}: vocab_size={cfg.vocab_size} is smaller than the demo tokenizer's "
                         f"{tok.vocab_size} ids; expected vocab_size >= {tok.vocab_size}")
    torch.manual_seed(seed)
    model = Qwen2(cfg)
    init = out / "init"
    model.save_pretrained(init)
    tok.save(init)
    reloaded = Qwen2.from_pretrained(init)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    if not same:
        raise RuntimeError(f"{init}: the reloaded checkpoint differs from the saved model")
    say(f"tokenizer: byte-level BPE trained on the task, {tok.vocab_size} ids (saved to {init}/tokenizer.json)")
    say(f"model: Qwen2 from {MODEL_CONFIG.relative_to(ROOT)}: {cfg.num_hidden_layers} layers, width "
        f"{cfg.hidden_size}, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), "
        f"{reloaded.num_parameters():,} parameters; random weights saved + reloaded in the HF layout "
        f"({init}), identical ({time.perf_counter() - t0:.1f}s)")
    return tok, init


def run_config(out_dir: Path, init: Path, **overrides) -> nested_reft.Config:
    """configs/tiny.json with the demo's paths and the given overrides (type-checked by load_config)."""
    base = {"model_config": str(MODEL_CONFIG), "tokenizer": str(init), "out_dir": str(out_dir)}
    return nested_reft.load_config(str(CONFIG), {**base, **overrides})


def fresh(run_dir: Path) -> Path:
    """An empty run folder: a re-run of the demo replaces the earlier one (train() never reuses a run folder)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_dir


def run_sft(out: Path, init: Path, s: dict, tok, test, cfg_kw: dict) -> tuple[Path, dict]:
    cfg = run_config(fresh(out / "sft"), init, model=str(init), sft_epochs=s["sft_epochs"], steps=0, **cfg_kw)
    n_steps = nested_reft.sft_steps(2000, cfg.sft_epochs, cfg.sft_batch_size)
    say(f"SFT warm-up: {cfg.sft_epochs:g} epochs of the 2000 training problems = {n_steps} steps of "
        f"{cfg.sft_batch_size}, lr {cfg.sft_lr:g}")
    t0 = time.perf_counter()
    nested_reft.train(cfg)
    runtime = time.perf_counter() - t0
    sft_dir = out / "sft" / "sft"                       # model + tokenizer (eval.py --model works on it)
    ev = evaluate_dir(sft_dir, tok, test, cfg.max_new_tokens)
    say(f"SFT done in {runtime:.0f}s: held-out greedy accuracy {100 * ev['accuracy']:.1f}% "
        f"({fmt_templates(ev['per_template'])})")
    say(f"  e.g. {ev['example']!r}")
    return sft_dir, {"accuracy": ev["accuracy"], "per_template": ev["per_template"], "runtime": runtime}


class ReftRun:
    """One ReFT run from the warm-up checkpoint, trained in chunks: advance(n) runs nested_reft.train up to
    step n (stop_after, then resume from the run's checkpoint: the same steps as one uninterrupted call) and
    evaluates the checkpoint on the held-out problems."""

    def __init__(self, name: str, label: str, kw: dict, out: Path, init: Path, sft_dir: Path, steps: int,
                 sft_acc: float, cfg_kw: dict):
        self.name, self.label, self.dir = name, label, fresh(out / name)
        self.cfg = run_config(self.dir, init, model=str(sft_dir), sft_epochs=0.0, steps=steps, **{**cfg_kw, **kw})
        self.k = nested_reft.num_skipped(self.cfg.skip_ratio, Qwen2Config.from_json(MODEL_CONFIG).num_hidden_layers)
        self.step, self.curve, self.summary, self.last_eval = 0, [{"step": 0, "accuracy": sft_acc}], {}, {}

    def describe(self) -> str:
        c = self.cfg
        return (f"{self.label}: r = {c.skip_ratio:g}, e = {c.skip_border} (k = {self.k} layers skipped per step), "
                f"f(ρ) = {f_name(c.variant, c.skip_ratio)}")

    def advance(self, stop: int, tok, test) -> None:
        last = stop >= self.cfg.steps
        say(f"{self.label}: steps {self.step + 1}-{stop} of {self.cfg.steps}")
        result = nested_reft.train(self.cfg, resume=str(self.dir) if self.step else "",
                                   stop_after=None if last else stop)
        if last:
            self.summary = result                        # totals of the whole run (restored across resumes)
        self.step = stop
        ev = evaluate_dir(self.dir / "checkpoint", tok, test, self.cfg.max_new_tokens)
        self.curve.append({"step": stop, "accuracy": ev["accuracy"]})
        self.last_eval = ev
        say(f"{self.label}: step {stop}: held-out greedy accuracy {100 * ev['accuracy']:.1f}% "
            f"({fmt_templates(ev['per_template'])})")

    def result(self) -> dict:
        rows = [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["stage"] == "reft"]
        s, c = self.summary, self.cfg
        return {"name": self.name, "label": self.label, "skip_ratio": c.skip_ratio, "skip_border": c.skip_border,
                "k": self.k, "variant": c.variant, "accuracy": self.curve[-1]["accuracy"],
                "per_template": self.last_eval["per_template"], "accuracy_curve": self.curve,
                "reward": [r["reward_mean"] for r in rows], "skips": [r["skip"] for r in rows],
                "rollout_tok_s": s["rollout_tok_s"], "tok_s": s["tok_s"], "runtime": s["runtime"],
                "rollout_s": s["rollout_s"], "completion_len": sum(r["completion_len"] for r in rows) / len(rows)}


def run_all_reft(out: Path, init: Path, sft_dir: Path, s: dict, tok, test, sft_acc: float, cfg_kw: dict) -> list[dict]:
    """The four runs, interleaved chunk by chunk (eval_every steps each) so that a burst of load from other
    processes on the machine slows all of them alike instead of biasing one run's tokens/s."""
    cfg_kw = {**cfg_kw, **s.get("reft_overrides", {})}
    runs = [ReftRun(name, label, kw, out, init, sft_dir, s["steps"], sft_acc, cfg_kw) for name, label, kw in RUNS]
    c = runs[0].cfg
    say(f"{len(runs)} runs of {c.steps} steps ({c.prompts_per_step} prompts x G = {c.group_size} rollouts, "
        f"lr {c.lr:g}), interleaved every {s['eval_every']} steps:")
    for r in runs:
        say("  " + r.describe())
    for stop in range(s["eval_every"], c.steps + s["eval_every"], s["eval_every"]):
        for r in runs:
            r.advance(min(stop, c.steps), tok, test)
    return [r.result() for r in runs]


def reps_label(reps: int) -> str:
    """How the sweep's tokens/s were measured (the plot legend; printed with them, plus a warning for 1 rep)."""
    return "best of 1 rep" if reps == 1 else f"best of {reps} interleaved reps"


def reps_note(reps: int) -> str:
    return reps_label(reps) + (": noisy, see the table's rollout tok/s" if reps == 1 else "")


def earlier_demo(out: Path) -> list[str]:
    """The run folders of an earlier demo in `out` (the ones this run replaces), in RUNS order."""
    return [n for n in ("init", "sft", *(name for name, _, _ in RUNS)) if (out / n).is_dir()]


def speed_sweep(sft_dir: Path, tok, test, ratios, reps: int, cfg: nested_reft.Config) -> list[dict]:
    """generate() tokens/s of the warm-up model at each skip ratio (e = 1), rollout-shaped batches (64 rows,
    temperature 1); ratios interleaved `reps` times, the best time of each kept (least disturbed by other load)."""
    model = Qwen2.from_pretrained(sft_dir).eval()
    N = model.config.num_hidden_layers
    prompts = [tok.encode(data.chat_prompt(ex.question)) for ex in test[:cfg.rollout_batch]]
    best, lengths = {r: 0.0 for r in ratios}, []
    for rep in range(reps):
        for r in ratios:
            g = torch.Generator().manual_seed(rep)
            mask = nested_reft.draw_skip_mask(N, r, 1 if r > 0 else 0, g)
            t0 = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 skip_mask=mask, eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id,
                                 generator=g, valid_vocab_size=tok.vocab_size)
            best[r] = max(best[r], int(out.mask.sum()) / (time.perf_counter() - t0))
            lengths.append(float(out.mask.sum(1).float().mean()))
    prompt_len, new_tokens = sum(map(len, prompts)) / len(prompts), sum(lengths) / len(lengths)
    return [{"skip_ratio": r, "k": nested_reft.num_skipped(r, N), "tok_s": best[r],
             "predicted_speedup": predicted_speedup(model.config, nested_reft.num_skipped(r, N), prompt_len,
                                                    new_tokens)}
            for r in ratios]


# ----------------------------------------------------------------------------------------------------------
# Report


def make_table(res: dict) -> str:
    """The paper-style table (Markdown): accuracy, deltas vs the baseline, tokens/s, runtime."""
    runs, sft = res["runs"], res["sft"]
    base = runs[0]
    lines = ["| run | r | e | f(ρ) | held-out acc. | Δ vs baseline | δ vs baseline | rollout tok/s | "
             "rollout speed-up (FLOP pred.) | total tok/s | runtime (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| SFT warm-up | – | – | – | {100 * sft['accuracy']:.1f}% | {100 * (sft['accuracy'] - base['accuracy']):+.1f} "
             f"| {_rel(sft['accuracy'], base['accuracy'])} | – | – | – | {sft['runtime']:.0f} |"]
    for r in runs:
        lines.append(
            f"| {r['label']} | {r['skip_ratio']:g} | {r['skip_border']} | {f_name(r['variant'], r['skip_ratio'])} | "
            f"{100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - base['accuracy']):+.1f} | "
            f"{_rel(r['accuracy'], base['accuracy'])} | {r['rollout_tok_s']:.0f} | "
            f"{r['rollout_tok_s'] / base['rollout_tok_s']:.2f}x ({r['predicted_speedup']:.2f}x) | "
            f"{r['tok_s']:.0f} | {r['runtime']:.1f} |")
    return "\n".join(lines)


def _rel(m: float, m_base: float) -> str:
    return f"{100 * (m - m_base) / m_base:+.1f}%" if m_base else "–"


def _points(acc: float, acc_base: float) -> float:
    """acc - acc_base in points of accuracy. Accuracies are counts over the test problems: the float noise is
    rounded off, so that a figure printed as +10.0 meets a >= 10 target (100 * (0.95 - 0.85) is 9.999999999999998)."""
    return round(100 * (acc - acc_base), 9)


def findings(res: dict) -> list[str]:
    """What the run shows, against issue 5's targets (reported, not enforced)."""
    runs = {r["name"]: r for r in res["runs"]}
    base, sft = runs["baseline"], res["sft"]
    gain = _points(base["accuracy"], sft["accuracy"])
    out = [f"ReFT over the SFT warm-up: {gain:+.1f} points of held-out accuracy "
           f"({'meets' if gain >= TARGET_REFT_GAIN else 'MISSES'} the >= {TARGET_REFT_GAIN:g} target)"]
    for name in ("nested-base", "nested-practical", "nested-retrace"):
        if name not in runs:
            continue
        r = runs[name]
        speed, gap = r["rollout_tok_s"] / base["rollout_tok_s"], _points(r["accuracy"], base["accuracy"])
        line = (f"{r['label']}: rollouts {speed:.2f}x the baseline's tok/s (FLOP prediction "
                f"{r['predicted_speedup']:.2f}x), accuracy {gap:+.1f} points vs the baseline")
        if name == "nested-retrace":
            line += f" ({'within' if abs(gap) <= TARGET_RETRACE_GAP else 'NOT within'} {TARGET_RETRACE_GAP:g})"
        out.append(line)
    return out


def save_png(fig, path: Path) -> None:
    """fig as a PNG at path, atomically (data.write_bytes_atomic): an interrupted demo never leaves a truncated
    plot in place of the earlier one."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    data.write_bytes_atomic(path, buf.getvalue())


def plot(res: dict, out: Path) -> list[str]:
    """reward_accuracy.png (per step, per run) and speed_vs_skip.png; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in res["runs"]:
        rew = r["reward"]
        w = 5                                                    # moving average over 5 steps
        smooth = [sum(rew[max(0, i - w + 1):i + 1]) / len(rew[max(0, i - w + 1):i + 1]) for i in range(len(rew))]
        line, = ax1.plot(range(1, len(rew) + 1), smooth, label=r["label"])
        ax1.plot(range(1, len(rew) + 1), rew, color=line.get_color(), alpha=0.2, linewidth=0.8)
        ax2.plot([c["step"] for c in r["accuracy_curve"]], [100 * c["accuracy"] for c in r["accuracy_curve"]],
                 marker="o", label=r["label"], color=line.get_color())
    ax1.set(xlabel="ReFT step", ylabel="mean rollout reward", title="Training reward (5-step average; raw faint)")
    ax2.axhline(100 * res["sft"]["accuracy"], color="gray", linestyle=":", label="SFT warm-up")
    ax2.set(xlabel="ReFT step", ylabel="held-out greedy accuracy (%)", title="Held-out accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "reward_accuracy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sweep = res["speed_sweep"]
    r0 = sweep[0]["tok_s"]
    ax.plot([p["skip_ratio"] for p in sweep], [p["tok_s"] for p in sweep], marker="o",
            label=f"generate(), warm-up model ({reps_label(res['settings']['speed_reps'])})")
    ax.plot([p["skip_ratio"] for p in sweep], [r0 * p["predicted_speedup"] for p in sweep], linestyle="--",
            label="FLOP prediction (scaled to r = 0)")
    for r in res["runs"]:
        ax.scatter([r["skip_ratio"]], [r["rollout_tok_s"]], marker="x", s=60, label=f"{r['label']} (training rollouts)")
    ax.set(xlabel="skip ratio r (k = round(12 r) layers skipped, e = 1)", ylabel="rollout tokens/s",
           title="Rollout speed against the skip ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "speed_vs_skip.png")
    plt.close(fig)
    return [str(out / "reward_accuracy.png"), str(out / "speed_vs_skip.png")]


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The CPU demo of Nested-ReFT (see the module docstring).")
    ap.add_argument("--quick", action="store_true", help="fewer steps and problems, same code path (CI)")
    ap.add_argument("--out", default="", help="output folder (default runs/demo, or runs/demo_quick with --quick); "
                    "an earlier demo's run folders there are replaced")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init, data order, masks, sampling")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: expected an integer >= 1")
    if not 0 <= args.seed < 2**62:                  # the run configs' range (nested_reft.validate), checked here
        ap.error(f"--seed {args.seed}: expected an integer in [0, 2^62)")   # before the model init and out/ exist
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    out = Path(args.out or ("runs/demo_quick" if args.quick else "runs/demo"))
    if out.is_file():
        ap.error(f"--out {out}: is a file, expected an output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:                            # a file where a parent folder should be, no permission, ...
        ap.error(f"--out {out}: cannot create the output folder ({e.strerror}: {e.filename})")
    torch.set_num_threads(args.threads)
    cfg_kw = {"seed": args.seed}
    t_start = time.perf_counter()
    say(f"Nested-ReFT CPU demo ({mode}), torch {torch.__version__}, {args.threads} thread(s), output in {out}/")
    earlier = earlier_demo(out)
    if earlier:
        say(f"{out}/ holds an earlier demo: this run replaces its run folders ({', '.join(earlier)})")

    say("1/6 task: synthetic grade-school word problems (data.synthetic_dataset)")
    train_set = data.synthetic_dataset("train")
    test = data.synthetic_dataset("test")[:s["n_test"]]
    two = [ex for ex in train_set if data.synthetic_template(ex.question) == "two"]
    flawed = sum(not ex.solution.endswith(f"{{{ex.answer}}}.") for ex in two)
    say(f"  {len(train_set)} training problems ({len(two)} two-step, {flawed} of them with the deliberately "
        f"flawed solution), {len(test)} held-out test problems")
    say(f"  e.g. {train_set[1].question!r} -> {train_set[1].solution!r} (gold {train_set[1].answer})")

    try:
        say("2/6 tokenizer and 3/6 model")
        tok, init = build_task_and_model(out, args.seed)
        say("4/6 SFT warm-up")
        sft_dir, sft = run_sft(out, init, s, tok, test, cfg_kw)
        say("5/6 ReFT runs from the same warm-up checkpoint")
        model_cfg = Qwen2Config.from_json(MODEL_CONFIG)
        prompt_len = sum(len(tok.encode(data.chat_prompt(ex.question))) for ex in train_set) / len(train_set)
        runs = run_all_reft(out, init, sft_dir, s, tok, test, sft["accuracy"], cfg_kw)
        for r in runs:
            r["predicted_speedup"] = predicted_speedup(model_cfg, r["k"], prompt_len, r["completion_len"])
            r["prompt_len"] = prompt_len
        say("6/6 rollout speed against the skip ratio")
        sweep = speed_sweep(sft_dir, tok, test, s["speed_ratios"], s["speed_reps"],
                            run_config(out / "sft", init, **cfg_kw))
        say(f"  generate() tok/s of the warm-up model ({reps_note(s['speed_reps'])})")
        for p in sweep:
            say(f"  r = {p['skip_ratio']:g} (k = {p['k']}): {p['tok_s']:.0f} tok/s, "
                f"{p['tok_s'] / sweep[0]['tok_s']:.2f}x measured, {p['predicted_speedup']:.2f}x FLOP-predicted")
    except nested_reft.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    res = {"mode": mode, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
           "config": str(CONFIG.relative_to(ROOT)), "model_config": str(MODEL_CONFIG.relative_to(ROOT)),
           "settings": s,
           "n_train": len(train_set), "n_test": len(test), "sft": sft, "runs": runs, "speed_sweep": sweep,
           "wall_s": time.perf_counter() - t_start}
    res["findings"] = findings(res)
    table = make_table(res)
    data.write_text_atomic(out / "results.json", json.dumps(res, indent=2) + "\n")
    data.write_text_atomic(out / "table.md", table + "\n\n" + "\n".join(f"- {f}" for f in res["findings"]) + "\n")
    print()
    print(table)
    print()
    for f in res["findings"]:
        say(f)
    pngs = plot(res, out)
    if pngs:
        say("plots: " + ", ".join(pngs))
    else:
        say("plots skipped: matplotlib is not installed (pip install matplotlib, then run the demo again)")
    say(f"results: {out / 'results.json'}, {out / 'table.md'}; total {res['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
