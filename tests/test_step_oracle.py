"""Independent end-to-end oracle for whole ReFT steps: `nested_reft.train` (rollout -> reft_step -> optimizer_step)
against transformers' Qwen2ForCausalLM and a loss, a gradient clip and an AdamW written out here from the spec
(shared/paper/NESTED_REFT.md, Alg. 1 and §4) and the README ("Configuration reference", "Where this implementation
chooses").

What comes from the project: the checkpoint it saved (HF layout), the tokenizer, and what the run sampled -- each
step's skip mask, prompts, completion tokens, masks, rewards and recorded behaviour log-probs (captured by wrapping
`nested_reft.rollout`), its gradients and weights after each step (captured by wrapping `nested_reft.optimizer_step`),
its logged loss / grad_norm / lr and its final checkpoint.
What is independent of the project: everything the oracle computes from those.
  - model: transformers' Qwen2ForCausalLM in float64, eager attention, loaded from the project's checkpoint;
  - left padding and positions: the oracle runs every sequence alone, unpadded (prompt + completion up to its EOS);
  - the nested model mu_t: the skipped decoder layers get a forward hook that returns the layer's input (identity on
    the residual stream, spec §2) -- a different route from the project's skip loop and KV cache;
  - logit processing: ids >= the tokenizer's size and (fixed length) EOS set to -inf by hand, then transformers'
    TemperatureLogitsWarper and TopPLogitsWarper;
  - advantages, rho, f(rho), the aggregation over the whole batch, the gradient clip, AdamW and the lr schedule:
    a few lines each below, from the spec / README formulas, over all rows at once (no micro-batches).
Checked per step: the skip mask's size and border, the rows (G consecutive rows per prompt, each reward that of its
own text), the completion layout (EOS ends a completion and is kept, padding after it; fixed length: no EOS), the
recorded log mu against the nested model's log-probs, the loss, the gradient of every parameter (by name, a tied one
once), the pre-clip norm, the lr, and every parameter after the step (and the saved checkpoint after the last one).
The update is the oracle's clip + AdamW applied to the project's gradient, once that gradient has matched the
oracle's: Adam divides by sqrt(v) + 1e-8, so where a gradient entry is ~1e-7 (the fp32 round-off of its tensor) two
correct implementations move that weight by different fractions of lr.
Reached (fp32 project vs this float64 oracle): log mu ~1e-6, loss ~5e-6, gradients ~3e-6, weights ~1e-7 relative.

Documented choices the oracle follows (README): a step that skips no layer is on-policy (log mu = sg[log pi], rho = 1
exactly); a token outside pi_theta's top-p nucleus (log pi = -inf) has rho = 0 and adds nothing, but counts in the
normaliser; dr_grpo divides by B * max_new_tokens; a group of equal rewards has A = 0.
"""
import contextlib
import json
import math
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper  # noqa: E402

import nested_reft as nr  # noqa: E402
from data import Tokenizer, chat_prompt, train_tokenizer  # noqa: E402
from qwen2 import Qwen2, Qwen2Config  # noqa: E402

# prompts of different lengths (left padding differs between rows and between generate() calls)
QUESTIONS = ["What is 2 plus 3?", "Add 2 and 9.", "What is 4 plus 1?", "6 + 1?",
             "Tom has 3 apples and buys 4 more apples at the market. How many apples does Tom have now?",
             "A train travels 5 miles, then 7 miles more, then stops. How far did it go in total?"]
EXTRA_VOCAB = 5          # the model's vocabulary is larger than the tokenizer's: those ids are never sampled
EOS_LOGIT = 6.0          # EOS made likely enough that variable-length completions end early


def make_checkpoint(path: Path, tok, tie: bool) -> None:
    """A random 6-layer Qwen2 (GQA, q/k/v biases), weights larger than the default init so that pi_theta is peaked
    and skipping layers changes it; EOS rows of the head point along the mean final hidden state."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.vocab_size + EXTRA_VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    m = Qwen2(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name or "lm_head" in name else 0.15)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.8, 1.2)                                   # RMSNorm weights
        hidden = []
        hook = m.model.norm.register_forward_hook(lambda mod, a, out: hidden.append(out[0]))
        for q in QUESTIONS:
            m(torch.tensor([tok.encode(chat_prompt(q))]))
        hook.remove()
        u = torch.cat(hidden).mean(0)
        for e in tok.eos_token_ids:
            m.lm_head.weight[e] = EOS_LOGIT * u / u.norm() ** 2
    m.save_pretrained(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small run ~5x faster on one thread (no OpenMP hand-offs), the more so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle_ws")
    (root / "data" / "gsm8k").mkdir(parents=True)
    lines = [json.dumps({"question": q, "answer": "It is 5.\n#### 5"}) for q in QUESTIONS]
    (root / "data" / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([chat_prompt(q) for q in QUESTIONS] * 3 + ["The answer is \\boxed{12}."], 400)
    tok.save(root / "tok")
    for tie in (True, False):
        make_checkpoint(root / f"model_tied{int(tie)}", tok, tie)
    return root


# ------------------------------------------------------------------------------------------------ the project's run

def run_project(ws: Path, out: Path, monkeypatch, tied: bool, **kw):
    """Two ReFT steps of nested_reft.train (no SFT), recording what each step sampled, its gradients and weights."""
    base = dict(model=ws / f"model_tied{int(tied)}", tokenizer=ws / "tok", dataset="gsm8k", data_dir=ws / "data",
                out_dir=out, sft_epochs=0, steps=3, prompts_per_step=3, group_size=4, micro_batch=5,
                rollout_batch=5, max_new_tokens=8, lr=1e-3, weight_decay=0.1, adam_betas="0.9,0.95", grad_clip=1.0,
                device="cpu", dtype="float32", seed=1)
    cfg = nr.load_config("", {k: str(v) for k, v in {**base, **kw}.items()})
    monkeypatch.setattr(nr, "reward", lambda text, gold: float(zlib.crc32(text.encode()) % 2))
    steps = []
    rollout, optimizer_step = nr.rollout, nr.optimizer_step

    def record_rollout(*a, **k):
        r = rollout(*a, **k)
        steps.append({"rollouts": r})
        return r

    def record_step(model, *a, **k):
        steps[-1]["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm = optimizer_step(model, *a, **k)
        steps[-1]["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return norm

    monkeypatch.setattr(nr, "rollout", record_rollout)
    monkeypatch.setattr(nr, "optimizer_step", record_step)
    nr.train(cfg, quiet=True, stop_after=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for s, row in zip(steps, [r for r in rows if r["stage"] == "reft"]):
        s["logged"] = row
    return cfg, Tokenizer.load(ws / "tok"), steps


# ------------------------------------------------------------------------------------------------ the oracle

def load_hf(path: Path):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                         attn_implementation="eager").eval()


@contextlib.contextmanager
def nested(hf, skip):
    """mu_t: every skipped decoder layer returns its input hidden states unchanged."""
    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x
    hooks = [hf.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i, s in enumerate(skip) if s]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def sequences(r):
    """Per row: (prompt ids, completion ids up to and including EOS), padding removed."""
    return [(r.prompt_tokens[b][r.prompt_mask[b]], r.tokens[b][r.mask[b]]) for b in range(r.tokens.shape[0])]


def score(hf, r, cfg, tok):
    """log p(y_t | s_t) of every completion token, one unpadded sequence at a time -> list of [L_b] float64.
    The distribution is the sampler's (README): ids >= the tokenizer's size never, EOS never before
    min_new_tokens (= max_new_tokens with fixed_length), logits / temperature, then top-p."""
    eos = list(tok.eos_token_ids)
    min_new = cfg.max_new_tokens if cfg.fixed_length else 0
    top_p = TopPLogitsWarper(cfg.top_p) if cfg.top_p < 1 else None
    out = []
    for prompt, comp in sequences(r):
        ids = torch.cat([prompt, comp])[None]
        z = hf(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(comp)]    # predicts comp[t]
        z = z.masked_fill(torch.arange(z.shape[-1]) >= tok.vocab_size, -math.inf)
        ban = torch.zeros_like(z, dtype=torch.bool)
        ban[:min_new, eos] = True
        z = TemperatureLogitsWarper(cfg.temperature)(ids, z.masked_fill(ban, -math.inf))
        if top_p is not None:
            z = top_p(ids, z)
        out.append(torch.log_softmax(z, -1).gather(1, comp[:, None])[:, 0])
    return out


def advantages(rewards, G: int, scale: bool):
    R = rewards.double().view(-1, G)
    A = R - R.mean(1, keepdim=True)
    if scale:
        A = A / (R.std(1, keepdim=True) + 1e-4)                        # unbiased std
    return A.masked_fill((R == R[:, :1]).all(1, keepdim=True), 0.0).view(-1)


def loss_terms(logp, logmu, A, cfg):
    """Per row: (value terms, gradient terms) of -f(rho) A per token; summing them and dividing by the aggregation's
    normaliser gives the loss value and a function whose gradient is the loss's. Tokens outside pi's nucleus
    (log pi = -inf): 0 in both."""
    val, grad = [], []
    for lp, lm, a in zip(logp, logmu, A):
        live = torch.isfinite(lp)
        lp, lm = lp[live], lm[live]
        rho = torch.exp(lp - lm)                                       # with gradient
        assert (lp - lm).max() < 20                                    # the overflow cap never binds here
        f = {"base": rho, "practical": torch.exp(lp - lp.detach()),    # practical: value 1, gradient of log pi
             "retrace": cfg.lam * torch.clamp(rho, max=1.0)}[cfg.variant]
        if cfg.clip_eps:                                               # TRL: -min(rho A, clip(rho) A), Base only
            assert cfg.variant == "base"
            term = -torch.minimum(rho * a, torch.clamp(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
        else:
            term = -f * a
        if cfg.weight_grad == "detached" and not cfg.clip_eps:       # gradient -sg[f] A grad log pi
            g = -f.detach() * a * lp
        else:
            g = term
        val.append(term.detach().sum())
        grad.append(g.sum())
    return val, grad


def aggregate(per_row, lengths, cfg):
    if cfg.aggregation == "token_mean":
        return sum(per_row) / sum(lengths)
    if cfg.aggregation == "seq_mean":
        return sum(x / n for x, n in zip(per_row, lengths)) / len(lengths)
    return sum(per_row) / (len(lengths) * cfg.max_new_tokens)        # dr_grpo


def lr_factor(cfg, s: int) -> float:
    """README: step s (from 0) runs at lr * (s + 1) / (w + 1) while s < w, then (T - s) / (T - w) (linear)."""
    if s < cfg.warmup_steps:
        return (s + 1) / (cfg.warmup_steps + 1)
    return 1.0 if cfg.lr_schedule == "constant" else (cfg.steps - s) / (cfg.steps - cfg.warmup_steps)


def adamw(params, grads, state, lr, cfg, eps=1e-8):
    b1, b2 = (float(x) for x in cfg.adam_betas.split(","))
    state["t"] = t = state.get("t", 0) + 1
    with torch.no_grad():
        for n, p in params.items():
            m, v = state.get(("m", n), torch.zeros_like(p)), state.get(("v", n), torch.zeros_like(p))
            m, v = b1 * m + (1 - b1) * grads[n], b2 * v + (1 - b2) * grads[n] ** 2
            state["m", n], state["v", n] = m, v
            p.mul_(1 - lr * cfg.weight_decay)                          # decoupled weight decay
            p.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """|actual - expected| <= rtol |expected| + atol, norms over the whole tensor (fp32 round-off is spread over it;
    an entry near 0 has no meaningful relative error of its own)."""
    d, n = (actual.double() - expected).norm().item(), expected.norm().item()
    assert d <= rtol * n + atol, f"|difference| {d:.3g}, |expected| {n:.3g}"


# ------------------------------------------------------------------------------------------------ the tests

CASES = {   # each: 12 rows (3 prompts x G = 4) in micro-batches of 5, 5, 2 and generate() calls of 5, 5, 2; 2 steps
    "base-k2-variable-length": dict(tied=True, variant="base", skip_ratio=0.34, skip_border=1,
                                    fixed_length=False, temperature=0.7),
    "base-clip-k1-fixed-length-top_p": dict(tied=False, variant="base", clip_eps=0.2, skip_ratio=0.17, skip_border=1,
                                            fixed_length=True, temperature=1.2, top_p=0.95, aggregation="seq_mean",
                                            grad_clip=0.5, warmup_steps=1),
    "practical-k2-top_p-checkpointing": dict(tied=False, variant="practical", skip_ratio=0.34, skip_border=1,
                                             fixed_length=False, temperature=0.8, top_p=0.9,
                                             grad_checkpointing=True, lr_schedule="constant"),
    "retrace-surrogate-k2-dr_grpo": dict(tied=True, variant="retrace", lam=0.8, weight_grad="surrogate",
                                         skip_ratio=0.34, skip_border=1, fixed_length=False, temperature=1.3,
                                         aggregation="dr_grpo", scale_rewards=False),
    "retrace-k3-fixed-length": dict(tied=True, variant="retrace", skip_ratio=0.5, skip_border=1, fixed_length=True,
                                    temperature=0.9, top_p=0.97),
    "retrace-k0-on-policy": dict(tied=False, variant="retrace", skip_ratio=0.0, skip_border=0, fixed_length=False,
                                 temperature=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reft_steps_match_the_oracle(workspace, tmp_path, monkeypatch, case):
    kw = CASES[case]
    cfg, tok, steps = run_project(workspace, tmp_path / "run", monkeypatch, **kw)
    assert len(steps) == 2
    hf = load_hf(workspace / f"model_tied{int(kw['tied'])}")
    params = dict(hf.named_parameters())
    assert set(params) == set(steps[0]["grads"])                       # every parameter, each tied one once
    eos, adam = set(tok.eos_token_ids), {}
    N = hf.config.num_hidden_layers
    k = nr.num_skipped(cfg.skip_ratio, N)                              # k = round(r N)
    lengths_seen, outside = set(), 0
    for s, step in enumerate(steps):
        r = step["rollouts"]
        assert len(r.skip) == N and sum(r.skip) == k                   # the step's mask: k layers, none at the border
        assert not any(r.skip[:cfg.skip_border]) and not any(r.skip[N - cfg.skip_border:])
        # completions: EOS ends one (kept, masked in), padding after it; fixed length: no EOS, all max_new_tokens
        for prompt, comp in sequences(r):
            assert len(comp) >= 1 and not (set(comp[:-1].tolist()) & eos) and int(comp.max()) < tok.vocab_size
            if cfg.fixed_length:
                assert len(comp) == cfg.max_new_tokens and not (set(comp.tolist()) & eos)
            else:
                assert len(comp) == cfg.max_new_tokens or int(comp[-1]) in eos
            lengths_seen.add(len(comp))
        assert len({len(p) for p, _ in sequences(r)}) > 1              # unequal prompt lengths
        G = cfg.group_size                                             # a group = G consecutive rows of one prompt
        groups = [[tuple(p.tolist()) for p, _ in sequences(r)[g * G:(g + 1) * G]] for g in range(len(r.rewards) // G)]
        assert all(len(set(grp)) == 1 for grp in groups) and len({grp[0] for grp in groups}) == len(groups)
        assert r.rewards.tolist() == [zlib.crc32(tok.decode(c.tolist()).encode()) % 2 for _, c in sequences(r)]
        lengths = [int(n) for n in r.mask.sum(1)]

        # behaviour log-probs: what the sampler recorded = the nested model's, teacher-forced
        with torch.no_grad(), nested(hf, r.skip):
            logmu = score(hf, r, cfg, tok)
        for b, lm in enumerate(logmu):
            close(r.logp_mu[b, :lengths[b]], lm, 2e-6, 1e-6 * len(lm) ** 0.5)
        assert (r.logp_mu[~r.mask] == 0).all()

        # the loss over the whole batch, its gradient, the clip, AdamW
        logp = score(hf, r, cfg, tok)                                  # full model, with gradient
        if k == 0:                                                     # on-policy: log mu = sg[log pi], rho = 1
            logmu = [lp.detach() for lp in logp]
        else:                                                          # the skip really changed the distribution
            assert max((lp.detach() - lm)[torch.isfinite(lp)].abs().max() for lp, lm in zip(logp, logmu)) > 0.1
        A = advantages(r.rewards, cfg.group_size, cfg.scale_rewards)
        assert A.abs().max() > 0
        log_rho = torch.cat([lp.detach() - lm for lp, lm in zip(logp, logmu)])
        outside += int((log_rho == -math.inf).sum())
        if k > 0:                                                      # rho on both sides of 1
            assert (log_rho > 0.1).any() and ((log_rho < -0.1) & (log_rho > -math.inf)).any()
        if cfg.clip_eps:                                               # the PPO clip is active on some tokens
            A_tok = torch.cat([a.expand(n) for a, n in zip(A, lengths)])
            assert ((A_tok > 0) & (log_rho > math.log(1 + cfg.clip_eps))).any()
            assert ((A_tok < 0) & (log_rho < math.log(1 - cfg.clip_eps))).any()
        val, gfun = loss_terms(logp, logmu, A, cfg)
        loss, objective = aggregate(val, lengths, cfg), aggregate(gfun, lengths, cfg)
        grads = dict(zip(params, torch.autograd.grad(objective, list(params.values()))))
        assert step["logged"]["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=2e-7)
        gnorm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
        for n, g in grads.items():
            close(step["grads"][n], g, 1e-5, 1e-7 * gnorm)
        assert step["logged"]["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
        # the update: clip + AdamW + schedule on the project's gradient, just checked equal to the oracle's (docstring)
        grads = {n: g.double() for n, g in step["grads"].items()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
        if cfg.grad_clip > 0 and norm > cfg.grad_clip:
            grads = {n: g * cfg.grad_clip / norm for n, g in grads.items()}
        lr = cfg.lr * lr_factor(cfg, s)
        assert step["logged"]["lr"] == pytest.approx(lr, rel=1e-12)
        adamw(params, grads, adam, lr, cfg)
        for n, p in params.items():
            close(step["params"][n], p.detach(), 1e-7, 1e-5 * lr * p.numel() ** 0.5)
    if not cfg.fixed_length:
        assert len(lengths_seen) > 2                                   # EOS inside some completions
    assert (outside > 0) == (cfg.top_p < 1 and k > 0)                  # top-p: tokens outside pi_theta's nucleus
    saved = dict(load_hf(tmp_path / "run" / "checkpoint").named_parameters())
    for n, p in params.items():
        close(saved[n], p.detach(), 1e-7, 1e-5 * cfg.lr * p.numel() ** 0.5)
