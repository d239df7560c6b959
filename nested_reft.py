"""Nested-ReFT (arXiv 2508.10123): GRPO fine-tuning whose rollouts come from the model with k of its N layers
skipped, corrected by importance sampling. Spec: ../shared/paper/NESTED_REFT.md.

This file is the entry point (config, Algorithm 1, training loop, checkpoint/resume). Importing it has no side
effects.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

try:
    import fcntl                                  # POSIX file locks (lock_run_dir); absent on Windows
except ImportError:
    fcntl = None
import torch
import torch.nn.functional as F

import distributed
from eval import check_benchmarks, check_tokenizer_fits, evaluate, reward, run_benchmarks
from data import (TRAIN_SETS, Example, Tokenizer, chat_prompt, collate_sft, load_dataset, sft_example,
                  synthetic_tokenizer, write_text_atomic)
from grpo import (AGGREGATIONS, GRADS, VARIANTS, group_advantages, loss_normaliser, offpolicy_stats, policy_loss,
                  reward_stats, token_entropy, token_logprobs)
from qwen2 import Qwen2, Qwen2Config, drop_decode_packing, parse_device

# ======================================================================================================
# Layer skipping (Definitions 1–3, spec §2)
#
# The paper indexes layers 1..N; we use the 0-based indices of `model.layers.{i}` (paper layer l = index + 1).
#   border e:     paper layers 1..e and N-e+1..N are never skipped
#   valid set V:  paper {e+1, ..., N-e}  ==  0-based {e, ..., N-e-1},   |V| = N - 2e
#   k:            k = round(r * N)        (from N, not |V|: Table 1, N = 28: r = 5/10/15 % -> k = 1/3/4)
#   skip set:     a uniform random k-subset of V, drawn without replacement, redrawn every training step
# A mask is a list of N host-side bools, True = layer skipped (identity on the residual stream).
# ======================================================================================================


def num_skipped(ratio: float, n_layers: int) -> int:
    """k = round(r * N), exact for the decimal the user wrote.

    r * N is evaluated in decimal arithmetic on the shortest repr of r, so float noise cannot move the result
    (0.1 * 28 is 2.8, not 2.8000000000000003; 0.58 * 25 is 14.5, not 14.499999999999998). Exact halves round
    UP (0.125 * 20 = 2.5 -> 3), i.e. floor(r * N + 1/2), unlike Python's round() which rounds halves to even.
    """
    _check_ratio(ratio)
    _check_n_layers(n_layers)
    x = Decimal(repr(float(ratio))) * n_layers                      # r * N, exact in decimal
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))      # round half up


def valid_layers(n_layers: int, border: int) -> list[int]:
    """V = 0-based indices at least `border` away from either end: [e, N - e). Empty when 2e >= N."""
    _check_n_layers(n_layers)
    if isinstance(border, bool) or not isinstance(border, int) or border < 0:
        raise ValueError(f"skip border e={border!r}: expected an integer >= 0 (layers kept at each end)")
    return list(range(border, n_layers - border))


def draw_skip_mask(n_layers: int, ratio: float, border: int, generator: torch.Generator) -> list[bool]:
    """One skip mask: a uniform k-subset of V without replacement (torch.randperm on the given CPU generator).

    r = 0 (k = 0) returns all False and draws nothing from the generator.
    """
    k, valid = _k_and_valid(n_layers, ratio, border)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator={generator!r}: expected a CPU torch.Generator")
    mask = [False] * n_layers
    if k == 0:
        return mask
    perm = torch.randperm(len(valid), generator=generator)         # uniform permutation of V
    for j in perm[:k].tolist():                                     # its first k = uniform k-subset
        mask[valid[j]] = True
    return mask


def skipped_layers(mask: list[bool]) -> list[int]:
    """The skip set of a mask as sorted 0-based layer indices (for logging)."""
    return [i for i, s in enumerate(mask) if s]


class SkipSampler:
    """Draws one skip mask per training step from its own seeded generator (the global RNG is untouched).

    state_dict() / load_state_dict() capture the generator state, so a resumed run draws the same masks as an
    uninterrupted one.
    """

    def __init__(self, n_layers: int, ratio: float, border: int, seed: int):
        self.k, self.valid = _k_and_valid(n_layers, ratio, border)  # validates everything up front
        if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):   # int(1.7) would seed 1, silently
            raise TypeError(f"seed={seed!r}: expected an int")
        self.n_layers, self.ratio, self.border, self.seed = n_layers, ratio, border, int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.draws = 0                                              # masks drawn so far

    def next(self) -> list[bool]:
        self.draws += 1
        return draw_skip_mask(self.n_layers, self.ratio, self.border, self.generator)

    def state_dict(self) -> dict:
        return {"n_layers": self.n_layers, "ratio": self.ratio, "border": self.border, "seed": self.seed,
                "draws": self.draws, "generator": self.generator.get_state().clone()}   # uint8 tensor

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_layers", "ratio", "border"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"skip sampler state has {key}={state.get(key)!r} but this run has "
                                 f"{key}={getattr(self, key)!r}: resume with the same skip settings")
        g = state["generator"]
        self.generator.set_state(torch.as_tensor(g, dtype=torch.uint8).clone())
        self.seed, self.draws = int(state["seed"]), int(state["draws"])

    def __repr__(self) -> str:
        return (f"SkipSampler(N={self.n_layers}, r={self.ratio}, e={self.border}, k={self.k}, "
                f"|V|={len(self.valid)}, seed={self.seed})")


def _check_ratio(ratio) -> None:
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and math.isfinite(ratio)
    if not ok or not 0 <= ratio < 1:
        raise ValueError(f"skip ratio r={ratio!r}: expected a number in [0, 1)")


def _check_n_layers(n_layers) -> None:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"number of layers N={n_layers!r}: expected an integer >= 1")


def _k_and_valid(n_layers: int, ratio: float, border: int) -> tuple[int, list[int]]:
    k, valid = num_skipped(ratio, n_layers), valid_layers(n_layers, border)
    if k > len(valid):
        raise ValueError(f"skip ratio r={ratio} gives k=round(r*N)={k} skipped layers but N={n_layers} with "
                         f"border e={border} leaves only |V|=N-2e={len(valid)} valid layers: "
                         f"expected k <= |V| (lower r or e)")
    return k, valid



# ----------------------------------------------------------------------------------------------------------
# Configuration. Every field: its meaning and where its default comes from ("paper: ...", "TRL: ..." = a default
# of the paper's era, "ours" where the paper is silent, or the spec's source such as Liu et al.).
# configs/NAME.json overrides the defaults; --key=value overrides the file.

def _f(default, help, src):
    return field(default=default, metadata={"help": help, "src": src})


@dataclass
class Config:
    # --- model and data
    model: str = _f("", "HF-layout checkpoint dir (config.json + *.safetensors); empty: build `model_config` "
                    "with random weights (CPU demo)", "paper: Qwen2.5-Math-{1.5B,7B}-Instruct")
    model_config: str = _f("", "JSON file with a Qwen2 config.json, used when `model` is empty (a relative path: "
                               "from the working directory, else from the project folder)", "ours")
    tokenizer: str = _f("", "tokenizer dir (tokenizer.json or vocab.json+merges.txt); empty: same as `model`",
                        "ours")
    dataset: str = _f("gsm8k", "fine-tuning set: gsm8k, svamp, math12k (or synthetic for the demo)",
                      "paper: SVAMP, GSM8K, Math12k")
    data_dir: str = _f("", "folder with the datasets (layout of README 'Data'); empty: $NESTED_REFT_DATA",
                       "ours")
    out_dir: str = _f("runs/default", "run folder: metrics.jsonl, checkpoints, eval results", "ours")
    seed: int = _f(0, "seed of data order, skip masks and sampling", "ours")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N", "ours")
    dtype: str = _f("auto", "compute dtype: auto (bfloat16 on a bf16 GPU, else float32), float32, bfloat16; "
                    "parameters and optimizer state stay float32", "ours")
    parallel: str = _f("ddp", "under torchrun (one process per GPU): ddp (whole model on every GPU; 1.5B) or fsdp "
                       "(FSDP2: weights, grads and AdamW state sharded, compute dtype all-gather, fp32 "
                       "reduce-scatter; 7B); prompts_per_step and sft_batch_size are split over the processes; "
                       "unused in a single process", "ours")
    # --- SFT warm-up (ReFT stage 1)
    sft_epochs: float = _f(2.0, "E_sft: epochs of supervised fine-tuning on (prompt, CoT); 0 skips it",
                           "[U] ReFT: 2")
    sft_lr: float = _f(1e-5, "SFT learning rate (AdamW, linear decay)", "[U] ours")
    sft_batch_size: int = _f(64, "SFT sequences per optimizer step", "[U] ours")
    sft_micro_batch: int = _f(8, "SFT sequences per forward/backward (gradient accumulation)", "ours")
    grad_checkpointing: bool = _f(False, "recompute each layer in the backward instead of keeping its activations "
                                  "(loss and SFT passes): far less memory, ~1/3 more compute", "ours (TRL: off)")
    sft_skip_prob: float = _f(0.0, "probability that an SFT step trains the nested model (a skip mask drawn as in "
                              "ReFT from skip_ratio / skip_border) instead of the full one, as LayerDrop: makes a "
                              "model trained from scratch robust to layer skipping (CPU demo); 0 = the paper",
                              "ours (demo only)")
    max_seq_len: int = _f(1024, "SFT: truncate prompt + CoT to this many tokens (the examples cut are counted)", "ours")
    # --- ReFT (GRPO) stage
    steps: int = _f(500, "T: number of ReFT optimizer steps", "[U] one fixed number for all datasets")
    prompts_per_step: int = _f(64, "prompts per step (each with `group_size` rollouts)", "[U] ours: 64")
    group_size: int = _f(8, "G: rollouts per prompt", "paper / TRL: 8")
    micro_batch: int = _f(16, "sequences per forward/backward in the loss pass (gradient accumulation)",
                          "ours")
    rollout_batch: int = _f(128, "sequences per generate() call", "ours")
    lr: float = _f(1e-6, "ReFT learning rate (AdamW)", "TRL: 1e-6")
    lr_schedule: str = _f("linear", "linear (decay to 0) or constant; SFT and ReFT", "TRL: linear")
    warmup_steps: int = _f(0, "linear warm-up steps, of SFT and of ReFT", "TRL: 0")
    weight_decay: float = _f(0.0, "AdamW weight decay (SFT and ReFT)", "TRL: 0.0")
    adam_betas: str = _f("0.9,0.999", "AdamW betas (SFT and ReFT)", "TRL: 0.9,0.999")
    grad_clip: float = _f(1.0, "max global gradient norm, SFT and ReFT (0 = off)", "TRL: 1.0")
    temperature: float = _f(0.9, "rollout sampling temperature; the full model's log-probs use the same",
                            "TRL 0.16-0.17: 0.9")
    top_p: float = _f(1.0, "rollout nucleus sampling", "TRL: 1.0")
    max_prompt_len: int = _f(512, "prompts are truncated (left) to this many tokens", "TRL: 512")
    max_new_tokens: int = _f(256, "completion length", "TRL: 256")
    fixed_length: bool = _f(True, "min_new_tokens = max_new_tokens (EOS suppressed): fixed-length rollouts",
                            "paper: min length = max length")
    # --- the nested behaviour model and the off-policy correction
    skip_ratio: float = _f(0.0, "r: k = round(r*N) layers skipped per step (0 = plain ReFT)",
                           "paper: 0.05, 0.10, 0.15")
    skip_border: int = _f(0, "e: layers within e of either end are never skipped", "paper: 1")
    variant: str = _f("retrace", "off-policy weight f(rho): base (rho), practical (1), retrace (lam*min(1,rho))",
                      "paper: all three")
    lam: float = _f(1.0, "lambda of Retrace", "[M] 1.0")
    weight_grad: str = _f("detached", "detached: grad = -sg[f]*A*grad log pi; surrogate: grad through f(rho)",
                          "[M] detached")
    clip_eps: float = _f(0.0, "PPO epsilon-clip of the ratio (0 = off)", "[M] off (TRL: 0.2)")
    aggregation: str = _f("token_mean", "loss normaliser: token_mean (TRL bnpo), seq_mean (grpo), dr_grpo",
                          "TRL: bnpo")
    scale_rewards: bool = _f(True, "divide advantages by the group std (+1e-4); False = Dr. GRPO", "TRL: True")
    beta: float = _f(0.0, "weight of the k3 KL to a frozen reference model (0 = no reference loaded)",
                     "paper: 0")
    # --- bookkeeping
    log_every: int = _f(1, "print a progress line every N steps (metrics.jsonl gets every step)", "ours")
    save_every: int = _f(0, "checkpoint every N ReFT steps (0 = only at the end; --resume restarts from the last "
                            "one, or from sft/ before the first)", "ours")
    eval_benchmarks: str = _f("", "comma list of test sets evaluated at the end (aime, amc, math500, minerva, "
                                  "olympiad, gsm8k, svamp); empty = none", "ours")
    eval_every: int = _f(0, "also evaluate eval_benchmarks every N ReFT steps, a metrics.jsonl row of stage 'eval' "
                               "each (0 = only at the end)", "ours")
    eval_max_new_tokens: int = _f(3000, "evaluation: max new tokens (greedy)", "Liu et al.: 3000")
    eval_batch_size: int = _f(32, "evaluation: prompts per generate() call", "ours")
    eval_limit: int = _f(0, "evaluation: first N problems per benchmark (0 = all)", "ours")

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs"


def project_path(path: str) -> Path:
    """A file named in a config: relative to the working directory or, failing that, to this project's folder (the
    named configs name files in configs/), so that `python nested_reft.py --config tiny` runs from any folder."""
    p = Path(path)
    return ROOT / p if not p.is_absolute() and not p.exists() and (ROOT / p).exists() else p


def config_names() -> list[str]:
    """The named run configs: configs/NAME.json (configs/*_model.json are Qwen2 config.json files, not runs)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if not p.stem.endswith("_model"))


class UserError(Exception):
    """A mistake in the user's input (config, path, value): printed as one line, no traceback."""


def _coerce(name: str, value, typ, source: str):
    """Convert `value` (from JSON or the command line) to the field type, or raise a one-line UserError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ in (int, float) and not isinstance(value, bool):
        numeric = (int,) if typ is int else (int, float)                # an int field refuses 2.5
        if isinstance(value, numeric):
            return typ(value)
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{source}: key '{name}' expects {typ.__name__}, got {value!r}")


def _field_types() -> dict:
    """Config field name -> its type (int, float, str or bool; annotations are strings under `from __future__`)."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: types.get(f.type, f.type) if isinstance(f.type, str) else f.type for f in fields(Config)}


def load_config(name: str = "", overrides: dict | None = None) -> Config:
    """Config from configs/NAME.json (or a path to a .json) with `overrides` applied; every key type-checked."""
    values, known = {}, _field_types()
    if name:
        path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
        if path.is_dir():
            raise UserError(f"config '{name}': {path} is a folder, expected a JSON config file")
        if not path.is_file():
            avail = ", ".join(config_names())
            raise UserError(f"config '{name}': {path} not found (available: {avail})")
        def once(pairs):                          # json.loads keeps the last of a repeated key, silently
            keys = [k for k, _ in pairs if not k.startswith("_")]
            for k in keys:
                if keys.count(k) > 1:
                    raise UserError(f"{path}: key '{k}' is given {keys.count(k)} times, expected once")
            return dict(pairs)

        try:
            raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=once)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), expected a JSON config") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object of config keys")
        for k, v in raw.items():
            if k.startswith("_"):
                continue  # "_comment" keys
            if k not in known:
                raise UserError(f"{path}: unknown key '{k}' (see python nested_reft.py --help)")
            values[k] = _coerce(k, v, known[k], str(path))
    for k, v in (overrides or {}).items():
        if k not in known:
            raise UserError(f"command line: unknown key '--{k}' (see python nested_reft.py --help)")
        values[k] = _coerce(k, v, known[k], "command line")
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and cross-field checks that a type check cannot do: every bad value fails here, before the SFT warm-up
    (k = round(r*N) against the model's layers is checked by train() once the model config is read)."""
    choices = {"variant": VARIANTS, "weight_grad": GRADS, "aggregation": AGGREGATIONS,
               "lr_schedule": ("linear", "constant"), "dtype": ("auto", "float32", "bfloat16"),
               "parallel": ("ddp", "fsdp"), "dataset": (*TRAIN_SETS, "synthetic")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: expected one of {', '.join(ok)}")
    ranges = {  # key: (test, what is expected); written so that NaN fails every test
        **{k: (lambda v: v >= 1, "a positive integer") for k in (
            "prompts_per_step", "group_size", "micro_batch", "rollout_batch", "max_new_tokens", "max_prompt_len",
            "sft_batch_size", "sft_micro_batch", "max_seq_len", "log_every", "eval_max_new_tokens",
            "eval_batch_size")},
        **{k: (lambda v: v >= 0, "an integer >= 0") for k in (
            "steps", "warmup_steps", "save_every", "skip_border", "eval_limit", "eval_every")},
        **{k: (lambda v: v > 0 and math.isfinite(v), "a number > 0") for k in ("lr", "sft_lr", "temperature")},
        **{k: (lambda v: v >= 0 and math.isfinite(v), "a number >= 0") for k in (
            "sft_epochs", "weight_decay", "grad_clip", "beta")},
        "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "seed": (lambda v: 0 <= v < 2**62, "an integer in [0, 2^62)"),   # seed + epoch / + rank: a torch seed
        "sft_skip_prob": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        "skip_ratio": (lambda v: 0 <= v < 1, "0 <= r < 1"),
        "clip_eps": (lambda v: v == 0 or 0 < v < 1, "0 (off) or a number in (0, 1)"),
        "lam": (lambda v: cfg.variant != "retrace" or 0 < v <= 1, "Retrace's lambda in (0, 1]"),
    }
    for key, (ok, expected) in ranges.items():
        if not ok(getattr(cfg, key)):
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: expected {expected}")
    if cfg.group_size < 2:
        raise UserError(f"config key 'group_size' = {cfg.group_size}: GRPO needs at least 2 rollouts per prompt")
    betas = cfg.adam_betas.split(",")
    try:
        ok = len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"config key 'adam_betas' = {cfg.adam_betas!r}: expected two numbers in [0, 1), e.g. 0.9,0.999")
    if not cfg.out_dir:                             # not the working directory by accident
        raise UserError("config key 'out_dir' = '': expected a run folder")
    if not cfg.model and not cfg.model_config:
        raise UserError("config: set 'model' (a checkpoint dir) or 'model_config' (a config.json to build)")
    if cfg.eval_every and not cfg.eval_benchmarks:
        raise UserError(f"config key 'eval_every' = {cfg.eval_every}: expected eval_benchmarks too (what to evaluate)")
    if cfg.eval_benchmarks:
        try:
            check_benchmarks(cfg.eval_benchmarks)
        except ValueError as e:
            raise UserError(f"config key 'eval_benchmarks' = {cfg.eval_benchmarks!r}: {e}") from None


def help_text() -> str:
    lines = ["usage: python nested_reft.py [--config NAME] [--resume RUN_DIR] [--key=value ...]", "",
             "Nested-ReFT (Algorithm 1): SFT warm-up, then GRPO on rollouts of the nested model.", "",
             f"configs ({CONFIG_DIR}): " + ", ".join(config_names()), "",
             "keys (default) -- meaning [source]:"]
    for f in fields(Config):
        lines.append(f"  --{f.name}={f.default!r}")
        lines.append(f"      {f.metadata['help']} [{f.metadata['src']}]")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[Config, str]:
    """Command line -> (config, resume dir). Accepts --key=value and --key value."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    name, resume, overrides, i = "", "", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"command line: unexpected argument {arg!r} (expected --key=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"command line: --{key} needs a value")
            value, i = argv[i + 1], i + 1
        key = key.replace("-", "_")
        if key in ("config", "resume") and not value:
            raise UserError(f"command line: --{key} needs a value")
        if key == "config":
            name = value
        elif key == "resume":
            resume = value
        else:
            overrides[key] = value
        i += 1
    if resume:  # the run's own saved config, then the command line on top
        saved = Path(resume) / "run_config.json"
        if not saved.is_file():
            raise UserError(f"--resume {resume}: {saved} not found (expected a run folder written by nested_reft.py)")
        if "out_dir" in overrides or name:
            raise UserError("--resume RUN_DIR continues that run in its own folder with its own config: drop "
                            "--out_dir / --config (other --key=value overrides apply on top of the saved config)")
        name = str(saved)
        cfg = load_config(name, overrides)
        return replace(cfg, out_dir=str(Path(resume))), resume
    return load_config(name, overrides), resume


# ----------------------------------------------------------------------------------------------------------
# Setup: device, model, data order, optimizer


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype). Parameters and AdamW state stay float32; bfloat16 only through autocast."""
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = parse_device(cfg.device, "config key 'device'")
        except ValueError as e:
            raise UserError(str(e)) from None
    if cfg.dtype == "auto":
        # bf16 in hardware (Ampere on): a pre-Ampere GPU's emulated bf16 is slower than fp32 (and its test
        # allocates a tensor on cuda:0, a context there for every torchrun rank)
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, getattr(torch, cfg.dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for the matmuls (RMSNorm and the log-softmax stay fp32), nothing for fp32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def resolve_data_dir(cfg: Config) -> Path:
    d = cfg.data_dir or os.environ.get("NESTED_REFT_DATA", "")
    if not d and cfg.dataset != "synthetic":
        raise UserError("no data folder: set --data_dir=DIR or $NESTED_REFT_DATA (see README 'Data')")
    return Path(d)


def check_context(cfg: Config, context: int) -> None:
    """Training sequences must fit the model's context (max_position_embeddings: 4096 for Qwen2.5-Math):
    positions beyond it were never trained. Evaluation cuts its completions there instead (eval.evaluate)."""
    for what, n in (("max_prompt_len + max_new_tokens", cfg.max_prompt_len + cfg.max_new_tokens),
                    ("max_seq_len", cfg.max_seq_len if cfg.sft_epochs > 0 else 0)):
        if n > context:
            raise UserError(f"config: {what} = {n} exceeds the model's max_position_embeddings = {context}")


def load_model(cfg: Config, device: torch.device, model_dir: str = "") -> tuple[Qwen2, Tokenizer]:
    """The checkpoint `model_dir or cfg.model` (float32 master weights), or a random model from `model_config`."""
    path = model_dir or cfg.model
    if path and not model_dir and not Path(path).is_dir():
        raise UserError(f"config key 'model' = {path!r}: checkpoint folder not found (download it first: "
                        f"README 'Running the paper's configurations')")
    if path:
        model = Qwen2.from_pretrained(path, dtype=torch.float32, device=device)
    else:
        torch.manual_seed(cfg.seed)
        model = Qwen2(Qwen2Config.from_json(project_path(cfg.model_config))).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    tok_dir = cfg.tokenizer or cfg.model
    if not tok_dir and cfg.dataset == "synthetic":      # the demo task: its own BPE, trained deterministically
        return model, synthetic_tokenizer()
    if not tok_dir:
        raise UserError("config: set 'tokenizer' (a dir with tokenizer.json) when 'model' is empty (the demo's own "
                        "tokenizer comes only with dataset 'synthetic'; for another dataset save it once: python -c "
                        "\"import data; data.synthetic_tokenizer().save('DIR')\", then --tokenizer=DIR)")
    tok = Tokenizer.load(tok_dir)
    check_tokenizer_fits(tok.vocab_size, model.config.vocab_size, f"tokenizer {tok_dir}", "the model")
    return model, tok


class DataOrder:
    """Shuffled passes over n items: pass e is randperm(n) seeded with seed + e. Its state is (epoch, pos)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            n = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos:self.pos + n]
            self.pos += n
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._make_perm()


def make_optimizer(model: torch.nn.Module, cfg: Config, lr: float, total_steps: int):
    """AdamW with linear warm-up and then linear decay to 0 over total_steps (or a constant rate). Step s (from 0)
    runs at lr * factor(s): (s + 1) / (w + 1) for s < w = warmup_steps, so the first step already learns
    (Hugging Face's s / w spends it at lr 0); then (T - s) / (T - w), as Hugging Face's linear decay."""
    betas = tuple(float(b) for b in cfg.adam_betas.split(","))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))


def lr_factor(cfg: Config, total_steps: int):
    """The schedule of make_optimizer: step s (from 0) -> the factor of the base learning rate."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))
    return factor


def resume_optimizer(model, opt, state: dict, cfg: Config, lr: float, total_steps: int, step: int):
    """Load a checkpoint's AdamW state into `opt` and return the scheduler that goes on from `step` -> sched.
    The saved param groups hold the lr, betas and weight decay of the config the run was saved with: they are set
    from `cfg` (the run's config with the --resume overrides), and the schedule is `cfg`'s over `total_steps`, so
    that a new --steps decays over the new total from the first resumed step on. Same config: the same rates."""
    distributed.load_optimizer_state_dict(model, opt, state)
    betas = tuple(float(b) for b in cfg.adam_betas.split(","))
    for g in opt.param_groups:
        g.update(initial_lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps), last_epoch=step - 1)


def optimizer_step(model, opt, sched, grad_clip: float, stage: str = "") -> float:
    """Clip the global gradient norm (0 = no clipping), step, zero the gradients. Returns the pre-clip norm.
    A NaN / inf norm (a NaN or inf loss or gradient: the run diverged) stops the run before the update: the weights,
    the optimizer state and the last checkpoint stay as they were. The norm is global, so every rank stops."""
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
    if not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise UserError(f"{stage} step {sched.last_epoch + 1}: the gradient norm is {norm} (a NaN or inf loss or "
                        f"gradient: the run diverged); no update was made. Lower the learning rate, or look at the "
                        f"step's data")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------------------
# Stage 1 -- SFT warm-up:  L_sft = -(1 / #completion tokens) * sum_t log pi(y_t | x, y_<t)  (prompt masked)


def sft_steps(n: int, epochs: float, batch_size: int) -> int:
    """The SFT warm-up's optimizer steps: ceil(n * E_sft / batch), on the decimal written for E_sft (exact, as k)."""
    return math.ceil(Fraction(repr(float(epochs))) * n / batch_size)


def sft(model: Qwen2, tok: Tokenizer, examples: list[Example], cfg: Config, device, dtype, log) -> None:
    pairs = [sft_example(tok, ex, max_len=cfg.max_seq_len) for ex in examples]
    cut = sum(ids[-1] != tok.im_end_id for ids, _ in pairs)       # cut short: the end (answer, <|im_end|>) is lost
    if cut and log.enabled and not log.quiet:
        print(f"note: {cut} of {len(pairs)} SFT examples are longer than max_seq_len={cfg.max_seq_len} tokens and "
              f"are cut short (their answer and <|im_end|> are not learned): raise max_seq_len to keep them whole")
    steps = sft_steps(len(pairs), cfg.sft_epochs, cfg.sft_batch_size)
    opt, sched = make_optimizer(model, cfg, cfg.sft_lr, steps)
    order, t0 = DataOrder(len(pairs), cfg.seed), time.perf_counter()
    # LayerDrop (sft_skip_prob > 0): with that probability a step trains the nested model of a fresh skip mask;
    # own generators, so the data order, the ReFT masks and the sampling streams are unchanged.
    skipper = SkipSampler(distributed.unwrap(model).config.num_hidden_layers, cfg.skip_ratio, cfg.skip_border,
                          cfg.seed + 7919)
    coin = torch.Generator().manual_seed(cfg.seed + 7920)
    model.train()
    for step in range(1, steps + 1):
        skip = None
        if cfg.sft_skip_prob > 0 and torch.rand((), generator=coin).item() < cfg.sft_skip_prob:
            skip = skipper.next()
        idx = order.take(cfg.sft_batch_size)
        n_tok = sum(sum(pairs[i][1][1:]) for i in idx)      # normaliser: predicted completion tokens, whole batch
        idx = distributed.shard(idx)                        # torchrun: this rank's share of the batch
        loss_sum = 0.0
        for j in range(0, len(idx), cfg.sft_micro_batch):
            b = collate_sft([pairs[i] for i in idx[j:j + cfg.sft_micro_batch]], tok.pad_token_id)
            ids, attn, lmask = b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"].to(device)
            # targets before the micro-batch's first completion token have no loss: no logits for them (LM head)
            L = int(b["loss_mask"].argmax(1).min().clamp(min=1)) - 1                  # first target - 1
            with distributed.grad_sync(model, last=j + cfg.sft_micro_batch >= len(idx)):
                with autocast(device, dtype):
                    logits = model(ids[:, :-1], attention_mask=attn[:, :-1], skip_mask=skip,
                                   logits_from=L)                                      # [b, T-1-L, V]
                logp = token_logprobs(logits, ids[:, 1 + L:])                         # [b, T-1-L]
                del logits                         # freed before the backward, which needs log pi only
                loss = -(logp * lmask[:, 1 + L:]).sum() / max(n_tok, 1)
                distributed.backward(loss)
            loss_sum += loss.item()
        lr = sched.get_last_lr()[0]
        grad_norm = optimizer_step(model, opt, sched, cfg.grad_clip, "SFT")
        loss_sum = distributed.all_reduce_sum(loss_sum)      # the whole batch's loss (all ranks)
        log({"stage": "sft", "step": step, "steps": steps, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
             "skip": skipped_layers(skip) if skip else [], "runtime": time.perf_counter() - t0,
             **({"examples": len(pairs), "cut": cut} if step == 1 else {})})


# ----------------------------------------------------------------------------------------------------------
# Stage 2 -- ReFT. One step of Algorithm 1: skip mask s_t -> G rollouts per prompt from the nested model
# mu_t -> 0/1 rewards -> group advantages -> full-model log-probs -> f(rho)-weighted loss -> one AdamW step.


@dataclass
class Rollouts:
    prompt_tokens: torch.Tensor  # [S, Tp] left-padded; S = prompts * G, the G rows of a prompt consecutive
    prompt_mask: torch.Tensor    # [S, Tp] bool
    tokens: torch.Tensor         # [S, Tn] sampled completion tokens
    mask: torch.Tensor           # [S, Tn] bool: completion tokens (EOS kept, after it False)
    logp_mu: torch.Tensor        # [S, Tn] log mu_t(y_t | s_t), recorded at sampling time
    rewards: torch.Tensor        # [S] 0/1
    texts: list[str]
    skip: list[bool] | None = None   # the step's skip mask; all False: mu_t = pi_theta (on-policy, rho = 1 exactly);
    # None (not recorded: Rollouts built by hand): rho = pi_theta / the recorded logp_mu, as for a nested mu_t


def sampling_kwargs(cfg: Config, tok: Tokenizer) -> dict:
    """The behaviour distribution's logit processing; pi_theta is scored with exactly the same (so rho = 1 at
    r = 0): vocab masked to the tokenizer, EOS banned before min_new_tokens, / temperature, top-p."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "valid_vocab_size": tok.vocab_size,
            "eos_token_ids": tok.eos_token_ids, "min_new_tokens": cfg.max_new_tokens if cfg.fixed_length else 0}


def rollout(model: Qwen2, tok: Tokenizer, batch: list[Example], skip_mask: list[bool], cfg: Config,
            gen: torch.Generator, device, dtype) -> Rollouts:
    """Steps 3-5 up to the rewards: G completions per prompt from the nested model (no gradient), their log mu
    (recorded by generate) and 0/1 rewards R; reft_step turns R into advantages. skip_mask: N bools (a list, a
    tensor), or None = no layer skipped, as in generate()."""
    G = cfg.group_size
    prompts = [tok.encode(chat_prompt(ex.question))[-cfg.max_prompt_len:] for ex in batch for _ in range(G)]
    golds = [ex.answer for ex in batch for _ in range(G)]
    kw = sampling_kwargs(cfg, tok)
    model.eval()
    parts = []
    for i in range(0, len(prompts), cfg.rollout_batch):
        with torch.no_grad(), autocast(device, dtype):
            parts.append(model.generate(prompts[i:i + cfg.rollout_batch], max_new_tokens=cfg.max_new_tokens,
                                        skip_mask=skip_mask, pad_token_id=tok.pad_token_id, generator=gen, **kw))
    # CPU: generate()'s decode packing (a copy of the weights: 1.8 GiB for the 0.5B shape in fp32) cannot serve
    # again, this step's update changes the weights; freed now, not kept through the loss pass to the optimizer step
    drop_decode_packing(model)
    cat = lambda name, pad, left: _cat_padded([getattr(p, name).cpu() for p in parts], pad, left)
    tokens, mask = cat("tokens", tok.pad_token_id, False), cat("mask", False, False)
    texts = [tok.decode(t[m].tolist()) for t, m in zip(tokens, mask)]
    rewards = torch.tensor([reward(t, g) for t, g in zip(texts, golds)], dtype=torch.float32)   # step 5: R
    skip = [False] * model.config.num_hidden_layers if skip_mask is None else [bool(s) for s in skip_mask]
    return Rollouts(cat("prompt_tokens", tok.pad_token_id, True), cat("prompt_mask", False, True), tokens, mask,
                    cat("logprobs", 0.0, False), rewards, texts, skip)


def _cat_padded(ts: list[torch.Tensor], pad, left: bool) -> torch.Tensor:
    """Concatenate [b_i, T_i] tensors along the batch, padding T to the longest (left or right)."""
    T = max(t.shape[1] for t in ts)
    return torch.cat([F.pad(t, (T - t.shape[1], 0) if left else (0, T - t.shape[1]), value=pad) for t in ts])


def policy_logits(model: Qwen2, r: Rollouts, rows: slice, device, dtype) -> torch.Tensor:
    """Logits of the FULL model (no skipping) at the completion positions: [b, Tn, V], with gradient."""
    pt, pm, ct = r.prompt_tokens[rows].to(device), r.prompt_mask[rows].to(device), r.tokens[rows].to(device)
    ids = torch.cat([pt, ct], 1)                                              # [b, Tp + Tn]
    attn = torch.cat([pm, torch.ones_like(ct, dtype=torch.bool)], 1)
    with autocast(device, dtype):
        return model(ids[:, :-1], attention_mask=attn[:, :-1], logits_from=pt.shape[1] - 1)   # [b, Tn, V]


def reft_step(model: Qwen2, opt, sched, r: Rollouts, cfg: Config, tok: Tokenizer, device, dtype,
              ref_model: Qwen2 | None = None) -> dict:
    """Steps 5-9 on one rollout batch, in micro-batches whose losses sum to the full-batch loss.
    ref_model (only when beta > 0): the frozen initial model of the k3 KL penalty beta * KL(pi_theta || pi_ref).
    A step that skips no layer (r.skip all False: k = 0, the baseline) is on-policy, mu_t = pi_theta_old = pi_theta
    (one gradient step per rollout batch): the loss takes log mu = sg[log pi_theta], so rho = 1 exactly and every
    variant is plain GRPO (spec §2, §3), as TRL's num_iterations = 1. The recorded log mu, equal up to the
    sampler's round-off, still feeds the logged ratio statistics."""
    adv = group_advantages(r.rewards, cfg.group_size, scale=cfg.scale_rewards)          # [S] step 5
    on_policy = r.skip is not None and not any(r.skip)                                  # k = 0: mu_t = pi_theta
    kw = sampling_kwargs(cfg, tok)
    Z = loss_normaliser(r.mask, cfg.aggregation, cfg.max_new_tokens)                    # whole-batch denominator
    Z = distributed.all_reduce_sum(Z)                                                   # (torchrun: all ranks)
    S = r.tokens.shape[0]
    logp_all, entropy = torch.zeros(r.tokens.shape), torch.zeros(r.tokens.shape)
    ref_all = torch.zeros(r.tokens.shape) if ref_model is not None else None
    model.train()
    loss_sum = 0.0
    for i in range(0, S, cfg.micro_batch):
        rows = slice(i, i + cfg.micro_batch)
        with distributed.grad_sync(model, last=i + cfg.micro_batch >= S):             # DDP: 1 all-reduce/step
            logits = policy_logits(model, r, rows, device, dtype)                       # [b, Tn, V]
            logp = token_logprobs(logits, r.tokens[rows].to(device), **kw)              # step 6: log pi_theta
            entropy[rows] = token_entropy(logits, **kw).cpu()                          # H of pi_theta as scored
            ref_logp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(policy_logits(ref_model, r, rows, device, dtype),
                                              r.tokens[rows].to(device), **kw)
            logp_mu = logp.detach() if on_policy else r.logp_mu[rows].to(device)      # rho = 1 exactly at k = 0
            loss, _ = policy_loss(logp, logp_mu, adv[rows].to(device), r.mask[rows].to(device),
                                  variant=cfg.variant, lam=cfg.lam, grad=cfg.weight_grad,
                                  clip_eps=cfg.clip_eps or None, aggregation=cfg.aggregation,
                                  max_len=cfg.max_new_tokens, token_normaliser=Z, ref_logp=ref_logp,
                                  beta=cfg.beta)                                        # steps 7-8
            del logits                         # the backward needs log pi, not the [b, Tn, V] logits: freed first
            distributed.backward(loss)
        loss_sum += loss.item()
        logp_all[rows] = logp.detach().cpu()
        if ref_all is not None:
            ref_all[rows] = ref_logp.cpu()
        del logp, loss
    lr = sched.get_last_lr()[0]
    grad_norm = optimizer_step(model, opt, sched, cfg.grad_clip, "ReFT")                 # step 9
    # statistics of the whole batch (torchrun: every rank's rows, gathered)
    logp_all, logp_mu, mask, adv, entropy = map(distributed.gather_rows, (logp_all, r.logp_mu, r.mask, adv, entropy))
    ref_all = None if ref_all is None else distributed.gather_rows(ref_all)
    stats = offpolicy_stats(logp_all, logp_mu, mask, adv, variant=cfg.variant, lam=cfg.lam,
                            clip_eps=cfg.clip_eps or None, ref_logp=ref_all)            # + kl_ref when beta > 0
    stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
    return {"loss": distributed.all_reduce_sum(loss_sum), "grad_norm": grad_norm, "lr": lr, **stats}


# ----------------------------------------------------------------------------------------------------------
# Metrics, checkpoints, the training run


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class MetricsLog:
    """metrics.jsonl (one JSON object per step, both stages) plus a progress line on the terminal."""

    def __init__(self, path: Path, log_every: int = 1, quiet: bool = False, enabled: bool = True):
        self.path, self.log_every, self.quiet, self.enabled = path, log_every, quiet, enabled   # off: rank > 0

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.quiet and (row["step"] % self.log_every == 0 or row["step"] == row["steps"]
                               or row["stage"] == "eval"):             # an evaluation (eval_every) always shows
            print(progress_line(row), flush=True)

    def rows(self) -> list[dict]:
        """Every row logged so far (none when the file does not exist)."""
        if not self.path.exists():
            return []
        rows = []
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start}), "
                            f"expected JSON lines") from None
        lines = text.splitlines()
        if lines and not text.endswith("\n"):      # an append cut short (a kill, a full disk): its row never was
            try:                                    # logged, and its step comes after the last checkpoint's
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{self.path}: line {n}: bad JSON ({e.msg}), expected one JSON object a line") from None
            if not isinstance(row, dict) or type(row.get("step")) is not int:       # a list, a hand-edited row
                raise UserError(f"{self.path}: line {n}: expected a JSON object with an integer 'step', "
                                f"got {line.strip()[:60]}")
            rows.append(row)
        return rows

    def truncate(self, stages: tuple[str, ...], step: int) -> None:
        """Drop rows of `stages` after `step` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.rows() if not (r.get("stage") in stages and r["step"] > step)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def sft_summary(log: MetricsLog) -> dict | None:
    """The SFT warm-up as metrics.jsonl logged it (kept across resumes): its steps, runtime, first / last batch
    loss and how many of its examples max_seq_len cut short; None when the run had no warm-up (sft_epochs = 0)."""
    rows = [r for r in log.rows() if r.get("stage") == "sft"]
    if not rows:
        return None
    return {"steps": rows[-1]["step"], "runtime": rows[-1]["runtime"], "loss_first": rows[0]["loss"],
            "loss_last": rows[-1]["loss"], "examples": rows[0].get("examples"), "cut": rows[0].get("cut")}


def progress_line(row: dict) -> str:
    if row["stage"] == "eval":
        accs = "  ".join(f"{k[4:]} {100 * v:.1f}%" for k, v in row.items() if k.startswith("acc_"))
        return f"[eval] step {row['step']}/{row['steps']}  pass@1 macro {100 * row['macro']:.1f}%  ({accs})"
    runtime, step, steps = row["runtime"], row["step"], row["steps"]
    eta = runtime / step * (steps - step)
    line = f"[{row['stage']}] step {step}/{steps}  loss {row['loss']:+.4f}"
    if row["stage"] == "reft":
        line += (f"  reward {row['reward_mean']:.3f}  skip {row['skip']}  rollout {row['rollout_tok_s']:.0f} tok/s"
                 f"  total {row['tok_s']:.0f} tok/s")
    return line + f"  {runtime:.0f}s  ETA {eta:.0f}s"


def checkpoint_paths(run_dir: Path) -> tuple[Path, Path, Path]:
    """<run>/checkpoint, and the two names save_checkpoint moves it through: checkpoint.tmp (the new one, written
    whole before any rename) and checkpoint.old (the previous one, deleted after the swap)."""
    return run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"


def recover_checkpoint(run_dir: Path) -> None:
    """A save_checkpoint killed between its two renames leaves checkpoint.old and the complete checkpoint.tmp but
    no checkpoint/: put the newer one in place (rank 0, before anything reads checkpoint/). Then delete the copies a
    killed save leaves behind: checkpoint.old beside checkpoint/ (the previous checkpoint, weights and AdamW state:
    the next save deletes it, but none comes when the run has no step left), the temp folder of a
    Qwen2.save_pretrained killed mid-write (.checkpoint.tmp.tmp-*, .sft.tmp-*: weights, no save ever deletes them)
    and the temp files of killed atomic writes (.NAME.*.tmp) in the run folder, checkpoint/ and sft/."""
    final, tmp, old = checkpoint_paths(run_dir)
    if not final.exists() and old.exists():
        (tmp if tmp.is_dir() else old).rename(final)
    for stale in (old, *run_dir.glob(f".{tmp.name}.tmp-*"), *run_dir.glob(".sft.tmp-*")):  # old: beside checkpoint/
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (f for d in (run_dir, final, run_dir / "sft") for f in d.glob(".*.tmp") if f.is_file()):
        stale.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, model: Qwen2, tok: Tokenizer, opt, sched, state: dict) -> None:
    """<run>/checkpoint = the model in the HF layout + tokenizer.json + trainer_state.pt (a self-contained folder
    for eval.py, transformers, vLLM), written beside and renamed into place.
    torchrun: every rank calls it (FSDP gathers the full weights and AdamW state to rank 0); rank 0 writes."""
    optim, full = distributed.optimizer_state_dict(model, opt), distributed.full_model(model)
    if distributed.is_main():
        final, tmp, old = checkpoint_paths(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        full.save_pretrained(tmp)
        tok.save(tmp)
        torch.save({"optimizer": optim, "scheduler": sched.state_dict(), **state}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)      # a save killed while deleting it: a stale, partial copy
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load_reference(cfg: Config, run_dir: Path, device) -> Qwen2:
    """On resume, the KL reference is the model ReFT started from: the run's sft/ checkpoint, else `model`."""
    ref_dir = run_dir / "sft" if (run_dir / "sft").is_dir() else cfg.model
    if not ref_dir:
        raise UserError(f"--resume {run_dir}: beta > 0 needs the reference model, but the run has no sft/ and "
                        "no 'model' checkpoint (it started from random weights)")
    return Qwen2.from_pretrained(ref_dir, device=device)


TRAINER_STATE_KEYS = frozenset({"optimizer", "scheduler", "step", "totals", "data_order", "skip_sampler", "sample_rng"})


def open_run_dir(run_dir: Path, resume: str, world: int, main_rank: bool) -> tuple[dict | None, str]:
    """Check the run folder and read what a resume continues from -> (trainer state or None, model dir to load).

    A new run needs a folder that holds no run (train creates it once every check has passed); it starts from the
    config's model (""). --resume continues from checkpoint/ (its trainer_state.pt, written by the same number of
    processes) or, killed before the first checkpoint, runs ReFT again from the finished sft/ (state None)."""
    ckpt, sft_dir = run_dir / "checkpoint", run_dir / "sft"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out_dir {run_dir}: is a file, expected a run folder")
    if resume and main_rank:
        recover_checkpoint(run_dir)
    distributed.barrier()
    has_state = (ckpt / "trainer_state.pt").is_file()
    resumable = has_state or (sft_dir / "config.json").is_file()
    if resume and not resumable:
        raise UserError(f"--resume {resume}: no checkpoint/trainer_state.pt and no finished sft/ in it: nothing to "
                        f"continue (start again in another --out_dir, or delete it)")
    if not resume and ((run_dir / "metrics.jsonl").exists() or ckpt.exists()):
        how = f"continue it with --resume {run_dir}, or start" if resumable else "nothing to resume in it: start"
        raise UserError(f"out_dir {run_dir} already holds a run: {how} a new one in another --out_dir (or delete it)")
    if not resume:
        return None, ""
    if not has_state:
        return None, str(sft_dir)
    try:      # weights_only: tensors, numbers, strings and containers only; a pickled object (code) is refused.
        # map_location cpu: a GPU run's AdamW moments were saved as on cuda:0; without it every torchrun rank put
        # its copy on cuda:0 (and kept it there all run), and a CPU machine could not read them at all.
        # load_state_dict moves each to its parameter's device.
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True, mmap=world > 1, map_location="cpu")
    except Exception as e:    # damaged bytes raise what they lead the unpickler to: RuntimeError, EOFError,
        # UnpicklingError, UnicodeDecodeError, KeyError ("hello world"), IndexError ("abc"), struct.error ("r"), ...
        raise UserError(f"{ckpt / 'trainer_state.pt'}: not a readable trainer state ({e})") from None
    missing = TRAINER_STATE_KEYS - state.keys() if isinstance(state, dict) else TRAINER_STATE_KEYS
    if missing:
        raise UserError(f"{ckpt / 'trainer_state.pt'}: not a trainer state of this project (no {sorted(missing)[0]!r}; "
                        f"expected the keys {', '.join(sorted(TRAINER_STATE_KEYS))})")
    if state.get("world_size", 1) != world:
        raise UserError(f"--resume {resume}: the checkpoint was written by {state.get('world_size', 1)} "
                        f"process(es) but this run has {world}: resume with the same number")
    return state, str(ckpt)


def lock_run_dir(run_dir: Path, hold: contextlib.ExitStack) -> None:
    """Hold <run>/.lock (an exclusive flock, with this pid in it) until `hold` closes, i.e. until train returns: a
    second process on the same run folder (a --resume of a run still running, a duplicate launch) stops with one
    line instead of interleaving its writes with the first's, and a resume never deletes the temp files of a save
    in progress. The OS drops the lock when the process dies, however it dies. No lock where the OS or the file
    system has none (no fcntl, some network file systems)."""
    if fcntl is None:
        return
    f = hold.enter_context(open(run_dir / ".lock", "a+", encoding="utf-8"))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"out_dir {run_dir}: in use by another process (pid {f.read().strip() or '?'}): wait for "
                        f"it to end, or stop it") from None
    except OSError:                                  # locks not supported here
        return
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()


def train(cfg: Config, resume: str = "", quiet: bool = False, stop_after: int | None = None) -> dict:
    """Algorithm 1 end to end: SFT warm-up (sft_epochs), `steps` ReFT steps, optional evaluation.

    Writes <out_dir>/run_config.json, metrics.jsonl, sft/ (the warm-up model), checkpoint/ (model + trainer
    state, every save_every steps and at the end) and eval.jsonl. resume=RUN_DIR continues from its checkpoint
    with the same skip masks, rollouts and losses as an uninterrupted run. stop_after=N checkpoints and returns
    after ReFT step N, as an interrupted run would (for time-limited jobs and the resume test).
    Returns the summary dict.
    """
    with contextlib.ExitStack() as hold:            # the run folder's lock (lock_run_dir), released on return
        return _train(cfg, resume, quiet, stop_after, hold)


def _train(cfg: Config, resume: str, quiet: bool, stop_after: int | None, hold: contextlib.ExitStack) -> dict:
    run_dir = Path(resume or cfg.out_dir)
    device, dtype = resolve_device(cfg)
    device = distributed.init(device)            # torchrun: this rank's GPU (nccl) or the CPU (gloo); else as is
    world, main_rank = distributed.world_size(), distributed.is_main()        # 1, True without torchrun
    for key in ("prompts_per_step", "sft_batch_size"):
        if getattr(cfg, key) % world:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)}: expected a multiple of the number of "
                            f"processes ({world}), each takes an equal share")
    if resume and main_rank and run_dir.is_dir():
        lock_run_dir(run_dir, hold)                          # before open_run_dir deletes what a kill left
    state, start_dir = open_run_dir(run_dir, resume, world, main_rank)
    from_sft = bool(resume) and state is None             # interrupted before the first checkpoint: ReFT from sft/
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.log_every, quiet, enabled=main_rank)
    model, tok = load_model(cfg, device, start_dir)
    k, _ = _k_and_valid(model.config.num_hidden_layers, cfg.skip_ratio, cfg.skip_border)   # k <= |V|, before SFT
    if k == 0 and cfg.skip_ratio > 0 and main_rank and not quiet:
        print(f"note: skip_ratio={cfg.skip_ratio} on N={model.config.num_hidden_layers} layers gives k = round(r*N) "
              f"= 0: no layer is ever skipped, this run is plain ReFT")
    check_context(cfg, model.config.max_position_embeddings)
    run_sft = not resume and cfg.sft_epochs > 0
    model = distributed.wrap(model, cfg.parallel, device, dtype,               # torchrun: DDP or FSDP2
                             skips_layers=run_sft and cfg.sft_skip_prob > 0)
    data_dir = resolve_data_dir(cfg)
    train_set = load_dataset(cfg.dataset, data_dir, "train")
    for name in check_benchmarks(cfg.eval_benchmarks) if cfg.eval_benchmarks else []:
        load_dataset(name, data_dir, "test")                # a missing benchmark file fails now, not after training
    if main_rank and not resume:                            # a resume records its config once its state loaded
        try:                                                # the folder only now: a failed check leaves nothing
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:                        # a file where a parent folder should be, no permission, ...
            raise UserError(f"out_dir {run_dir}: cannot create the run folder ({e.strerror}: {e.filename})") from None
        lock_run_dir(run_dir, hold)
        write_json_atomic(run_dir / "run_config.json", asdict(cfg))

    if run_sft:
        sft(model, tok, train_set, cfg, device, dtype, log)
        # self-contained (eval.py --model <run>/sft): weights and tokenizer appear together, in one rename
        distributed.save_pretrained(model, run_dir / "sft", also_write=tok.save)

    ref_model = None
    if cfg.beta > 0:  # frozen reference = the model ReFT starts from: a copy now, or sft/ (else `model`) on resume
        ref_model = (distributed.frozen_copy(model, device, dtype) if state is None else
                     distributed.shard_like(model, load_reference(cfg, run_dir, device), device, dtype))
        ref_model.requires_grad_(False).eval()
    opt, sched = make_optimizer(model, cfg, cfg.lr, cfg.steps)
    order = DataOrder(len(train_set), cfg.seed)
    skipper = SkipSampler(distributed.unwrap(model).config.num_hidden_layers, cfg.skip_ratio, cfg.skip_border,
                          cfg.seed)                                             # same masks on every rank
    rank = distributed.rank()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank)       # rollout sampling (own per rank)
    step, totals = 0, {"tokens": 0, "rollout_tokens": 0, "runtime": 0.0, "rollout_s": 0.0}
    if state is not None:
        rng = state["sample_rng_ranks"][rank] if world > 1 else state["sample_rng"]
        if rng.numel() != gen.get_state().numel():   # a CUDA generator's state is 16 bytes, a CPU one's 5056
            raise UserError(f"--resume {run_dir}: its sampling state is not one of a {device.type} generator (the "
                            f"run was saved on another device type): resume it on the device type it ran on")
        # popped: the host copy of the AdamW state is freed once loaded onto the parameters' device
        sched = resume_optimizer(model, opt, state.pop("optimizer"), cfg, cfg.lr, cfg.steps, state["step"])
        order.load_state_dict(state["data_order"])
        skipper.load_state_dict(state["skip_sampler"])
        gen.set_state(rng)
        step, totals = state["step"], state["totals"]
        log.truncate(("reft", "eval"), step)
    elif from_sft:
        if main_rank and not quiet:
            print(f"{run_dir}: no ReFT checkpoint yet: ReFT starts again from sft/ (its logged ReFT steps are dropped)")
        log.truncate(("reft", "eval"), 0)                    # the rows of the interrupted ReFT steps
    if resume and main_rank:                                 # everything loaded: record the config it goes on with
        write_json_atomic(run_dir / "run_config.json", asdict(cfg))
    if resume and step >= cfg.steps and (run_dir / "summary.json").is_file():
        if main_rank and not quiet:
            print(f"{run_dir}: already at step {step} of steps={cfg.steps}; its summary.json stands (raise --steps "
                  f"to go on)")
        try:
            return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else f"not UTF-8: {e.reason} at byte {e.start}"
            raise UserError(f"{run_dir / 'summary.json'}: bad JSON ({why}): delete it and --resume again to "
                            f"write it anew") from None

    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = [train_set[i] for i in order.take(cfg.prompts_per_step)]
        batch = distributed.shard(batch)                                        # torchrun: this rank's prompts
        skip = skipper.next()                                                   # step 2: s_t
        with distributed.gathered(model):                                       # FSDP: all-gather once
            r = rollout(distributed.unwrap(model), tok, batch, skip, cfg, gen, device, dtype)   # steps 3-5
        t_roll = max(distributed.all_gather(time.perf_counter() - t0))          # torchrun: until the slowest rank
        out = reft_step(model, opt, sched, r, cfg, tok, device, dtype, ref_model)  # steps 5-9
        dt, step = time.perf_counter() - t0, step + 1
        n_gen, n_prompt = int(r.mask.sum()), int(r.prompt_mask.sum())
        n_gen, n_prompt = distributed.all_reduce_sum(n_gen), distributed.all_reduce_sum(n_prompt)   # all ranks
        rewards = distributed.gather_rows(r.rewards)                            # [prompts_per_step * G]
        totals = {"tokens": totals["tokens"] + n_gen + n_prompt, "rollout_tokens": totals["rollout_tokens"] + n_gen,
                  "runtime": totals["runtime"] + dt, "rollout_s": totals["rollout_s"] + t_roll}
        log({"stage": "reft", "step": step, "steps": cfg.steps, **out, **reward_stats(rewards, cfg.group_size),
             "skip": skipped_layers(skip), "completion_len": n_gen / len(rewards), "step_s": dt, "rollout_s": t_roll,
             "rollout_tok_s": n_gen / t_roll, "tok_s": totals["tokens"] / totals["runtime"],
             "runtime": totals["runtime"]})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:   # the last step's: below
            log(eval_row(run_eval(model, tok, data_dir, cfg, device, dtype, None, print_fn=lambda *a: None),
                         step, cfg.steps))
        if (cfg.save_every and step % cfg.save_every == 0) or step in (cfg.steps, stop_after):
            rng = {"sample_rng": gen.get_state()}
            if world > 1:  # every rank's sampling stream (resume needs the same world size)
                rng.update(world_size=world, sample_rng_ranks=distributed.all_gather(gen.get_state()))
            save_checkpoint(run_dir, model, tok, opt, sched, {
                "step": step, "totals": totals, "data_order": order.state_dict(),
                "skip_sampler": skipper.state_dict(), **rng})
        if step == stop_after:
            return {"steps": step, "interrupted": True}

    del opt, sched, ref_model      # in the last checkpoint: freed for the final evaluation (AdamW: 2x the fp32 weights)
    summary = {"steps": step, "runtime": totals["runtime"], "tok_s": totals["tokens"] / max(totals["runtime"], 1e-9),
               "rollout_tok_s": totals["rollout_tokens"] / max(totals["rollout_s"], 1e-9), **totals}
    if main_rank:
        summary["sft"] = sft_summary(log)
    if cfg.eval_benchmarks:
        summary["eval"] = run_eval(model, tok, data_dir, cfg, device, dtype, run_dir / "eval.jsonl" if main_rank
                                   else None, print_fn=(lambda *a: None) if quiet or not main_rank else print)
        log.truncate(("eval",), step - 1)                    # a resume that evaluates again: one row per step
        log(eval_row(summary["eval"], step, cfg.steps))
    if main_rank:
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def run_eval(model, tok: Tokenizer, data_dir: Path, cfg: Config, device, dtype, out_path, print_fn) -> dict:
    """eval_benchmarks on the current weights: greedy, in the compute dtype (bf16 autocast on a bf16 GPU, as the
    rollouts), predictions to out_path (None: not written); torchrun: a slice per rank, FSDP: gathered once."""
    with distributed.gathered(model), autocast(device, dtype):
        return run_benchmarks(distributed.unwrap(model), tok, data_dir, cfg.eval_benchmarks, out_path,
                              limit=cfg.eval_limit or None, print_fn=print_fn,
                              evaluate_fn=evaluate_sharded if distributed.world_size() > 1 else evaluate,
                              batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens)


def eval_row(result: dict, step: int, steps: int) -> dict:
    """The metrics.jsonl row of one evaluation: pass@1 macro mean, acc_<benchmark> each, eval_s."""
    bench = result["benchmarks"]
    return {"stage": "eval", "step": step, "steps": steps, "macro": result["macro"],
            **{f"acc_{name}": b["accuracy"] for name, b in bench.items()},
            "eval_s": sum(b["seconds"] for b in bench.values())}


def evaluate_sharded(model: Qwen2, tok: Tokenizer, examples: list[Example], **gen_kwargs) -> tuple[float, list]:
    """eval.evaluate over the torchrun ranks: rank r grades problems r, r + W, r + 2W, ...; the records are
    gathered back into order, so every rank returns what one process would (accuracy, records)."""
    world = distributed.world_size()
    _, mine = evaluate(model, tok, examples[distributed.rank()::world], **gen_kwargs)
    records = [None] * len(examples)
    for r, part in enumerate(distributed.all_gather(mine)):
        records[r::world] = part
    return (sum(rec["correct"] for rec in records) / len(records) if records else 0.0), records


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
        train(cfg, resume)
    except (UserError, ValueError, OSError) as e:    # OSError: a missing file, no permission, a full disk, ...
        if os.environ.get("NESTED_REFT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()                        # torchrun: leave the process group
    return 0


if __name__ == "__main__":
    sys.exit(main())
