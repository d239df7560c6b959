"""GRPO with off-policy (nested) rollouts: group advantages, per-token log-probs, importance ratios, the three
off-policy weights of Nested-ReFT, the policy loss and its diagnostics. Pure functions on tensors.
Spec: ../shared/paper/NESTED_REFT.md, §3 (Algorithm 1) and §4 (the mitigations f).

Shapes and names used throughout:
    B completions (prompts x G), T completion positions, V vocabulary
    logp     [B, T]  log pi_theta(y_t | s_t), full model, with gradient
    logp_mu  [B, T]  log mu(y_t | s_t), behaviour = nested model (layers skipped), no gradient
    mask     [B, T]  True on completion tokens (EOS included), False on padding
    adv      [B]     one advantage A per completion, shared by its tokens (or [B, T] per token)
Per-token loss l_t = -f(rho_t) * A (+ beta * KL_t), aggregated over the masked tokens (spec §3.8).
"""
from __future__ import annotations

import math
import numbers

import torch

from qwen2 import check_logit_args, logprobs_from_logits, process_logits

VARIANTS = ("base", "practical", "retrace")
GRADS = ("detached", "surrogate")
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")
MAX_LOG_RATIO = 20.0  # overflow guard of importance_ratio: rho <= e^20 ~ 4.9e8 (fp32 exp overflows at ~88.7)


# ------------------------------------------------------------------------------------------------------
# Advantages and log-probs (Algorithm 1, steps 5-6)

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps)  (std unbiased, as TRL);  scale=False: A_i = R_i - mean_g R (Dr. GRPO).

    rewards [B*G] float, groups are consecutive: rows g*G .. g*G+G-1 are the G completions of prompt g.
    A group whose rewards are all equal gets A = 0. Returns [B*G] float32.
    """
    _check_rewards(rewards, group_size)
    if scale and group_size < 2:
        raise ValueError("group_size=1 with scale=True: the unbiased group std needs at least 2 completions")
    R = rewards.float().view(-1, group_size)                 # [B, G]
    A = R - R.mean(dim=1, keepdim=True)                      # R - mean_g R
    if scale:
        A = A / (R.std(dim=1, keepdim=True) + eps)           # / (std_g R + 1e-4), unbiased std
    # equal rewards -> A = 0 exactly (the float32 mean of G copies of 0.1 is not 0.1: |A| ~ 1e-4 otherwise);
    # "equal" as reward_stats' zero_std_frac counts it, on the rewards as given
    same = rewards.view(-1, group_size)
    A = A.masked_fill(same.amax(dim=1, keepdim=True) == same.amin(dim=1, keepdim=True), 0.0)
    return A.view(-1)                                        # [B*G]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   valid_vocab_size: int | None = None, eos_token_ids=(), min_new_tokens: int = 0) -> torch.Tensor:
    """log pi(y_t | s_t) = log softmax(z_t / tau)[y_t] in fp32 (spec §3.6: logits divided by the sampling temperature).

    logits [B, T, V] (any float dtype), tokens [B, T] long -> [B, T] float32. Delegates to
    qwen2.logprobs_from_logits, the single place of logit processing (vocab masking ids >= valid_vocab_size,
    / temperature, top-p; temperature 0 = the temperature-1 distribution), so that at r = 0 pi_theta and the
    sampler's recorded log mu agree exactly. One row at a time, so the fp32 temporaries are [T, V], not [B, T, V].
    eos_token_ids / min_new_tokens: the sampler's EOS ban before min_new_tokens (fixed-length rollouts ban EOS
    everywhere); pass the same values to score pi_theta on the distribution the rollouts were drawn from.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
                         f"expected [B, T, V] and [B, T]")
    check_logit_args(logits.shape[-1], temperature, top_p, valid_vocab_size, eos_token_ids, min_new_tokens)
    rows = [logprobs_from_logits(logits[i:i + 1], tokens[i:i + 1], temperature=temperature, top_p=top_p,
                                 valid_vocab_size=valid_vocab_size, eos_token_ids=eos_token_ids,
                                 min_new_tokens=min_new_tokens) for i in range(logits.shape[0])]   # [1, T] each
    return torch.cat(rows) if rows else logits.new_zeros(tokens.shape, dtype=torch.float32)        # [B, T]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  valid_vocab_size: int | None = None, eos_token_ids=(), min_new_tokens: int = 0) -> torch.Tensor:
    """H(pi(. | s_t)) = -sum_v p_v log p_v, p = the distribution token_logprobs scores (same arguments: vocab masking,
    EOS ban before min_new_tokens, / temperature, top-p; ids with p_v = 0 add 0). [B, T, V] -> [B, T] fp32, no grad."""
    check_logit_args(logits.shape[-1], temperature, top_p, valid_vocab_size, eos_token_ids, min_new_tokens)
    with torch.no_grad():
        rows = []
        for z in logits:                                     # [T, V]
            m = min(min_new_tokens, z.shape[0]) if len(eos_token_ids) else 0   # positions t < m: EOS banned
            banned = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=z.device) if m else None
            logp = torch.cat([process_logits(z[:m], temperature, top_p, valid_vocab_size, banned),
                              process_logits(z[m:], temperature, top_p, valid_vocab_size)])       # [T, V] fp32
            plogp = torch.where(logp > -math.inf, logp.exp() * logp, 0.0)                        # p log p, 0 log 0 = 0
            rows.append(-plogp.sum(-1))                      # [T]
        return torch.stack(rows)                             # [B, T]


# ------------------------------------------------------------------------------------------------------
# Importance ratio and the off-policy weights f (Algorithm 1, step 7; spec §4)

def importance_ratio(logp: torch.Tensor, logp_mu: torch.Tensor) -> torch.Tensor:
    """rho_t = pi_theta(y_t|s_t) / mu(y_t|s_t) = exp(min(log pi_theta - log mu, MAX_LOG_RATIO)), in log space.

    Overflow guard: the log-ratio is capped at MAX_LOG_RATIO (20: rho <= 4.9e8) so rho, rho^2 and 0 * rho stay
    finite in fp32 (an inf would turn masked or zero-advantage tokens into NaN). A ratio that large already makes
    the estimate meaningless; below the cap nothing changes. Above it the gradient through rho is zero (clamp),
    which only matters for grad="surrogate".
    """
    _check_same_shape(logp=logp, logp_mu=logp_mu)
    return torch.exp(torch.clamp(logp - logp_mu, max=MAX_LOG_RATIO))   # rho = exp(log pi - log mu)


def offpolicy_weight(rho: torch.Tensor, variant: str, lam: float = 1.0) -> torch.Tensor:
    """f(rho) of spec §4:  base: rho  |  practical: 1  |  retrace: lam * min(1, rho).  lam is used by retrace only."""
    _check_variant(variant, lam)
    if variant == "base":
        return rho                                           # f = rho (plain importance sampling)
    if variant == "practical":
        return torch.ones_like(rho)                          # f = 1 (ignore the off-policyness)
    return lam * torch.clamp(rho, max=1.0)                   # f = lam * min(1, rho) (Retrace, Munos et al. 2016)


def ppo_clipped(rho: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Where PPO's eps-clip is active: (A > 0 and rho > 1 + eps) or (A < 0 and rho < 1 - eps).   [B, T] bool

    These are exactly the tokens where -min(rho*A, clip(rho, 1-eps, 1+eps)*A) takes the clipped, constant branch.
    rho [B, T] with adv [B] (one advantage per sequence), [B, 1] or [B, T]; or any shape with adv of the same.
    """
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, numbers.Real) or not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps={clip_eps!r}: expected a number in (0, 1)")
    if adv.shape != rho.shape:
        if rho.dim() == 2 and adv.shape == rho.shape[:1]:
            adv = adv.unsqueeze(1)                   # [B] -> [B, 1]; it broadcast along T (B == T) or failed
        elif not (rho.dim() == 2 and adv.shape == (rho.shape[0], 1)):
            raise ValueError(f"rho {tuple(rho.shape)} and adv {tuple(adv.shape)}: expected adv [B], [B, 1] or "
                             f"rho's shape")
    return ((adv > 0) & (rho > 1 + clip_eps)) | ((adv < 0) & (rho < 1 - clip_eps))


# ------------------------------------------------------------------------------------------------------
# The loss (Algorithm 1, step 8)

def policy_loss(logp: torch.Tensor, logp_mu: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                variant: str, lam: float = 1.0, grad: str = "detached", clip_eps: float | None = None,
                aggregation: str = "token_mean", max_len: int | None = None, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, token_normaliser: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L = -(1/Z) sum_{b,t} m_bt f(rho_bt) A_b  (+ beta * KL),  Z set by `aggregation`. Returns (loss, stats).

    grad="detached" (default): l_t = -sg[f(rho_t)] * exp(logp_t - sg[logp_t]) * A
        (value -f A, gradient -f A grad log pi).
        For Base this equals the gradient of rho * A. Retrace and Practical keep their weight at any rho.
    grad="surrogate": l_t = -f(rho_t) * A with the gradient through rho (d rho = rho * d log pi), so min(1, rho) has
        zero gradient where rho > 1. Practical's f = 1 has no rho to differentiate; it is written as the on-policy
        surrogate pi/sg[pi] (value 1), so Practical gives A * grad log pi in both modes.
    clip_eps=eps (PPO eps-clip, TRL form, on rho = pi_theta / mu): where the clip is active (see ppo_clipped) the token
        takes the constant value -f(clip(rho, 1-eps, 1+eps)) * A and contributes no gradient; elsewhere it is unchanged.
        For Base this is exactly TRL's -min(rho A, clip(rho, 1-eps, 1+eps) A) in value and gradient; for Retrace and
        Practical it is the same trust-region mask applied to their weight.
    ref_logp, beta: + beta * KL_t with the k3 estimator KL_t = exp(ref - logp) - (ref - logp) - 1 (gradient through
        logp; ref - logp bounded by +-MAX_LOG_RATIO: kl_k3). With beta = 0 a given ref_logp only feeds
        stats["kl_ref"].
    top_p < 1: a token with logp = -inf (sampled from mu's nucleus, outside pi_theta's) has rho = 0: its term is 0,
        with no gradient, in every variant; it still counts in the normaliser.
    aggregation (of l over the masked tokens; padded tokens never count):
        "token_mean"  sum_{b,t} m l / sum_{b,t} m                (TRL "bnpo", default)
        "seq_mean"    (1/B) sum_b (sum_t m l / sum_t m)          (TRL "grpo")
        "dr_grpo"     sum_{b,t} m l / (B * max_len)              (Dr. GRPO; max_len = the completion-length budget)
    token_normaliser: the denominator of the FULL batch when this call sees only part of it (a micro-batch of a
        gradient-accumulation step, or one rank's share): #tokens (token_mean), #sequences (seq_mean) or
        #sequences * max_len (dr_grpo) -- `loss_normaliser` computes it, and it is additive, so pass the sum over all
        micro-batches and ranks. Then the micro-batch losses (and gradients) sum to exactly the full-batch loss.
        Micro-batches must split the batch along B (whole sequences). None: this call is the whole batch.
    stats: dict of floats for this call (see offpolicy_stats) plus "loss" and, with ref_logp, "kl_ref".
    """
    _check_variant(variant, lam)
    if grad not in GRADS:
        raise ValueError(f"grad={grad!r}: expected one of {GRADS}")
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps={clip_eps!r}: expected None (no clipping) or a number in (0, 1)")
    if not beta >= 0 or (beta > 0 and ref_logp is None):                  # NaN fails: it dropped the KL term
        raise ValueError(f"beta={beta!r}: expected beta >= 0, and a ref_logp tensor when beta > 0")
    mask = _check_shapes(logp, logp_mu, mask, advantages, ref_logp)
    adv = _per_token(advantages).to(logp.dtype).detach()                  # [B, 1] or [B, T]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)                                  # padding: whatever it held -> 0, so
    logp_mu = torch.where(mask, logp_mu.detach().to(logp.dtype), zero)    # no inf/NaN can leak into values or grads
    # top_p < 1: a token sampled from mu's nucleus can lie outside pi_theta's (log pi = -inf). There pi_theta is
    # locally constant 0, so rho = 0 and the token's term is 0 with no gradient, in every variant (Practical's
    # A * grad log pi does not exist there); it still counts in the normaliser. Placeholder 0 until zeroed below.
    outside = mask & (logp == float("-inf"))
    logp_stats = logp.detach()
    logp = torch.where(outside, zero, logp)

    rho_sg = importance_ratio(logp.detach(), logp_mu)                     # sg[rho]  [B, T]
    pi_over_sg_pi = torch.exp(logp - logp.detach())                       # pi / sg[pi]: value 1, grad = grad log pi
    if grad == "detached" or variant == "practical":
        w = offpolicy_weight(rho_sg, variant, lam) * pi_over_sg_pi        # sg[f(rho)] * pi / sg[pi]
    else:
        w = offpolicy_weight(importance_ratio(logp, logp_mu), variant, lam)   # f(rho), gradient through rho
    per_token = -w * adv                                                  # l_t = -f(rho_t) A
    if clip_eps is not None:
        clipped = ppo_clipped(rho_sg, adv, clip_eps)                      # clip active: constant, no gradient
        w_clip = offpolicy_weight(rho_sg.clamp(1 - clip_eps, 1 + clip_eps), variant, lam)
        per_token = torch.where(clipped, -w_clip * adv, per_token)        # l_t = -f(clip(rho)) A
    if ref_logp is not None:
        ref_logp = torch.where(mask, ref_logp.detach().to(logp.dtype), zero)
        if beta > 0:
            per_token = per_token + beta * kl_k3(logp, ref_logp)          # l_t += beta * KL_t
    per_token = torch.where(outside, zero, per_token)                    # rho = 0 outside pi_theta's nucleus
    loss = aggregate(per_token, mask, aggregation, max_len=max_len, token_normaliser=token_normaliser)

    stats = offpolicy_stats(logp_stats, logp_mu, mask, advantages, variant=variant, lam=lam, clip_eps=clip_eps,
                            ref_logp=ref_logp)
    stats["loss"] = loss.item()
    return loss, stats


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL_t(pi_theta || pi_ref) by the k3 estimator on tokens sampled from pi: exp(d) - d - 1 >= 0, d = log pi_ref -
    log pi_theta, capped at +MAX_LOG_RATIO like the ratio: above the cap the value is constant (gradient 0). Below,
    log pi_ref is raised to log pi_theta - MAX_LOG_RATIO (a ref log-prob of -inf under top_p < 1, or a huge gap): the
    value stays finite and the gradient keeps pulling pi_theta back, d KL / d log pi_theta = 1 - exp(d)."""
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    ref_logp = torch.maximum(ref_logp, logp.detach() - MAX_LOG_RATIO)
    d = torch.clamp(ref_logp - logp, max=MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def loss_normaliser(mask: torch.Tensor, aggregation: str, max_len: int | None = None) -> int:
    """Denominator of the full-batch loss: #tokens (token_mean), #sequences (seq_mean), #sequences * max_len (dr_grpo).

    Additive over micro-batches and ranks: the full batch's value is the sum of its parts' values.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    if mask.dim() != 2:
        raise ValueError(f"mask {tuple(mask.shape)}: expected [B, T]")
    if aggregation == "token_mean":
        return int(mask.bool().sum().item())                              # sum_{b,t} m (nonzero = token, as aggregate)
    if aggregation == "seq_mean":
        return mask.shape[0]                                              # B
    _check_max_len(max_len, mask.shape[1])
    return mask.shape[0] * max_len                                        # B * max_len


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean", *,
              max_len: int | None = None, token_normaliser: float | torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss from per-token losses [B, T] over the masked tokens (formulas in policy_loss's docstring)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    if per_token.dim() != 2 or mask.shape != per_token.shape:             # [B, 1] / [T] masks broadcast silently
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)}: "
                         f"expected two [B, T] tensors of the same shape")
    if token_normaliser is not None and not isinstance(token_normaliser, torch.Tensor) and (
            isinstance(token_normaliser, bool) or not isinstance(token_normaliser, numbers.Real)
            or not 0 <= token_normaliser < math.inf):     # a negative one became 1, NaN a NaN loss
        raise ValueError(f"token_normaliser={token_normaliser!r}: expected None or a finite number >= 0 "
                         f"(loss_normaliser's value summed over the micro-batches and ranks)")
    mask = mask.bool()
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))     # padding -> 0 (no NaN from 0 * inf)
    if aggregation == "seq_mean":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1)                # sum_t m l / sum_t m     [B]
        numer = per_seq.sum()                                             # sum_b
    else:
        numer = masked.sum()                                              # sum_{b,t} m l
    # Z: the full batch's (token_normaliser), else this call's own
    denom = token_normaliser if token_normaliser is not None else loss_normaliser(mask, aggregation, max_len)
    denom = torch.as_tensor(denom, dtype=per_token.dtype, device=per_token.device)
    return numer / denom.clamp(min=1)                                     # Z >= 1: an empty batch gives loss 0


# ------------------------------------------------------------------------------------------------------
# Diagnostics (logged every step)

def offpolicy_stats(logp: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor,
                    advantages: torch.Tensor | None = None, *, variant: str = "base", lam: float = 1.0,
                    clip_eps: float | None = None, logits: torch.Tensor | None = None, temperature: float = 1.0,
                    ref_logp: torch.Tensor | None = None) -> dict[str, float]:
    """Floats describing how off-policy the batch is, all over the masked (completion) tokens:

    ratio_min / ratio_mean / ratio_max   rho = pi_theta / mu (after the overflow guard)
    trunc_frac     fraction of tokens whose weight was truncated: Retrace rho > 1, or the eps-clip active
    clip_frac      fraction where the eps-clip is active (0 without clip_eps; needs advantages)
    ess_ratio      effective sample size of the weights rho, normalised: (sum w)^2 / (n sum w^2), in (0, 1]
    ess_weight     the same for the variant's weights f(rho)
    kl_mu_pi       KL(mu || pi_theta) ~ mean(log mu - log pi_theta) on tokens sampled from mu (k1, unbiased, can be < 0)
    kl_mu_pi_k3    the same with k3: mean(rho - 1 - log rho) >= 0 (lower variance)
    entropy        mean entropy of pi_theta(. | s_t), exact -- only when logits [B, T, V] are given
    kl_ref         mean k3 KL(pi_theta || pi_ref) (kl_k3) -- only when ref_logp is given
    neg_logp       mean -log pi_theta(y_t) -- always; an entropy PROXY (a cross-entropy, since y_t ~ mu)
    outside_frac   fraction of tokens outside pi_theta's top-p nucleus (log pi_theta = -inf, rho = 0; 0 when top_p = 1);
                   the KL and neg_logp statistics leave them out (they would be infinite)
    completion_len mean #tokens per completion;  n_tokens, n_seqs
    """
    _check_variant(variant, lam)
    m = _check_shapes(logp, logp_mu, mask, advantages, ref_logp)         # a [B, 1] ref_logp broadcast silently
    if logits is not None and (logits.dim() != 3 or logits.shape[:2] != logp.shape):
        raise ValueError(f"logits {tuple(logits.shape)}: expected [B, T, V] with [B, T] = {tuple(logp.shape)}")
    with torch.no_grad():
        n = m.sum()
        logp, logp_mu = logp.detach().double(), logp_mu.detach().double()   # float64: sums of rho^2 stay finite
        log_ratio = torch.clamp(logp - logp_mu, max=MAX_LOG_RATIO)
        rho = torch.exp(log_ratio)                                        # [B, T]; 0 outside pi's nucleus
        live = m & (logp > -math.inf)                                     # log pi finite (always when top_p = 1)
        log_ratio, logp = torch.where(live, log_ratio, 0.0), torch.where(live, logp, 0.0)
        w = offpolicy_weight(rho, variant, lam)
        trunc = (rho > 1) if variant == "retrace" else torch.zeros_like(m)
        clipped = torch.zeros_like(m)
        if clip_eps is not None and advantages is not None:
            clipped = ppo_clipped(rho, _per_token(advantages).to(rho), clip_eps)
        inf = torch.tensor(math.inf, dtype=rho.dtype, device=rho.device)
        values = {
            "ratio_min": torch.where(m, rho, inf).min(),
            "ratio_mean": _masked_mean(rho, m),
            "ratio_max": torch.where(m, rho, -inf).max(),
            "trunc_frac": _masked_mean((trunc | clipped).double(), m),
            "clip_frac": _masked_mean(clipped.double(), m),
            "ess_ratio": _ess(rho, m),
            "ess_weight": _ess(w, m),
            "kl_mu_pi": _masked_mean(logp_mu - logp, live),               # E_mu[log mu - log pi]
            "kl_mu_pi_k3": _masked_mean(rho - 1 - log_ratio, live),       # E_mu[rho - 1 - log rho]
            "neg_logp": _masked_mean(-logp, live),
            "outside_frac": _masked_mean((m & ~live).double(), m),
            "completion_len": m.sum(1).double().mean(),
            "n_tokens": n.double(),
            "n_seqs": torch.tensor(float(m.shape[0]), device=rho.device),
        }
        if logits is not None:
            values["entropy"] = _masked_mean(token_entropy(logits, temperature).double(), m)
        if ref_logp is not None:
            values["kl_ref"] = _masked_mean(kl_k3(logp, ref_logp.detach().double()), live)
        out = dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist()))  # one host sync
        if out["n_tokens"] == 0:
            out["ratio_min"] = out["ratio_max"] = math.nan
        return out


def reward_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """reward_mean (= accuracy for 0/1 rewards), reward_std, zero_std_frac = fraction of groups whose G rewards are
    all equal (zero variance: A = 0, no learning signal from that prompt)."""
    _check_rewards(rewards, group_size)
    R = rewards.detach().double().view(-1, group_size)                   # [B, G]
    flat = R.view(-1)
    return {"reward_mean": flat.mean().item(),
            "reward_std": flat.std().item() if flat.numel() > 1 else 0.0,
            "zero_std_frac": (R.max(1).values == R.min(1).values).double().mean().item()}


# ------------------------------------------------------------------------------------------------------
# helpers

def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


def _ess(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n sum w^2) over the masked entries: 1 when all weights are equal, 1/n when one dominates."""
    w = torch.where(m, w, torch.zeros_like(w))
    denom = m.sum() * (w * w).sum()
    return torch.where(denom > 0, w.sum() ** 2 / denom.clamp(min=1e-300), torch.zeros_like(denom, dtype=w.dtype))


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages   # [B] -> [B, 1]


def _check_variant(variant: str, lam: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    if variant == "retrace" and not 0 < lam <= 1:
        raise ValueError(f"lam={lam!r}: expected Retrace's lambda in (0, 1]")


def _check_rewards(rewards, group_size) -> None:
    """group_advantages' and reward_stats' arguments (rewards are few and on the CPU in reft_step: the finiteness
    check costs nothing there)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: expected an integer >= 1")
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a 1-D tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected a 1-D tensor whose length is a "
                         f"multiple of group_size={group_size}")
    if rewards.is_floating_point() and not bool(torch.isfinite(rewards).all()):   # NaN: A and the loss NaN
        raise ValueError(f"rewards: expected finite numbers, got {rewards[~torch.isfinite(rewards)][:3].tolist()} "
                         f"among them (a reward function returned NaN or inf)")


def _check_max_len(max_len, T: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len={max_len!r}: aggregation 'dr_grpo' needs the completion-length budget (an int >= 1)")
    if T > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the completions ({T} positions): expected max_len >= T")


def _check_same_shape(**tensors) -> None:
    (a, x), (b, y) = tensors.items()
    if x.shape != y.shape:                           # [B, T] against [B] or [B, 1] broadcast silently
        raise ValueError(f"{a} {tuple(x.shape)} and {b} {tuple(y.shape)}: expected the same shape")


def _check_shapes(logp, logp_mu, mask, advantages, ref_logp) -> torch.Tensor:
    if logp.dim() != 2 or logp_mu.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_mu {tuple(logp_mu.shape)}, mask {tuple(mask.shape)}: "
                         f"expected three [B, T] tensors of the same shape")
    if advantages is not None and advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)}: expected [B] = {tuple(logp.shape[:1])} or [B, T]")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp {tuple(ref_logp.shape)}: expected the shape of logp {tuple(logp.shape)}")
    if not logp.is_floating_point():                 # an integer logp truncated logp_mu and the advantages to it
        raise TypeError(f"logp of dtype {logp.dtype}: expected floating-point log-probs")
    named = {"logp": logp, "logp_mu": logp_mu, "mask": mask, "advantages": advantages, "ref_logp": ref_logp}
    devices = {k: t.device for k, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {', '.join(f'{k} on {d}' for k, d in devices.items())}; "
                         f"expected all on logp's device")
    return mask.bool()
