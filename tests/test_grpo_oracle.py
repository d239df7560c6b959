"""Independent oracle for grpo.policy_loss and grpo.group_advantages.

The reference below is float64 NumPy written from the spec (shared/paper/NESTED_REFT.md, Alg. 1 steps 5-8 and §4)
and README.md ("The paper, equation by equation"; "Where this implementation chooses"), plus the argument
meanings of policy_loss's docstring -- not from grpo.py's code. The gradient with respect to log pi_theta is
derived by hand per token (no autograd in the reference) and compared with torch.autograd through policy_loss.

Notation per token (b, t): x = log pi - log mu, rho = exp(min(x, 20)), A = A_b, m = mask, l = per-token loss,
g = d l / d log pi. The loss is sum_{b,t} c_bt l_bt with aggregation weights c (zero on padding), so
d loss / d log pi_bt = c_bt g_bt.
"""
import zlib

import numpy as np
import pytest
import torch

import grpo
from grpo import group_advantages, policy_loss

CAP = 20.0  # README "Overflow guard": log rho capped at 20 before exp


# ------------------------------------------------------------------------------------------------ reference

def ref_group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """Alg. 1 step 5: A_i = (R_i - mean_g R) / (std_g R + 1e-4), std unbiased (ddof = 1);
    scale=False (Dr. GRPO): A_i = R_i - mean_g R. A group of equal rewards gets A = 0 exactly."""
    R = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    A = R - R.mean(axis=1, keepdims=True)
    if scale:
        A = A / (R.std(axis=1, ddof=1, keepdims=True) + eps)
    A[(R == R[:, :1]).all(axis=1)] = 0.0
    return A.reshape(-1)


def ref_ratio(logp, logmu):
    """Alg. 1 step 7: rho = exp(min(log pi - log mu, 20)); log pi = -inf (outside pi's nucleus) gives rho = 0.
    d rho / d log pi = rho below the cap, 0 above it (the cap is a constant there), 0 at log pi = -inf."""
    x = logp - logmu
    rho = np.exp(np.minimum(x, CAP))
    drho = np.where(x < CAP, rho, 0.0)
    return rho, drho


def ref_f(rho, variant, lam):
    """§4: Base f = rho; Practical f = 1; Retrace-lambda f = lam * min(1, rho)."""
    if variant == "base":
        return rho
    if variant == "practical":
        return np.ones_like(rho)
    if variant == "retrace":
        return lam * np.minimum(1.0, rho)
    raise NotImplementedError(f"variant {variant!r} (grpo.VARIANTS) has no reference here: add its f to ref_f and "
                              f"its d f / d log pi to ref_df_dlogp")


def ref_df_dlogp(rho, drho, variant, lam):
    """d f(rho) / d log pi for the surrogate: Base drho; Practical 1 (written as pi / sg[pi], value 1);
    Retrace lam * drho where rho < 1 and 0 where rho > 1 (min(1, rho) is flat above 1)."""
    if variant == "base":
        return drho
    if variant == "practical":
        return np.ones_like(rho)
    if variant == "retrace":
        return np.where(rho < 1.0, lam * drho, 0.0)
    raise NotImplementedError(f"variant {variant!r} (grpo.VARIANTS) has no reference here: add it to ref_df_dlogp")


def ref_kl_k3(logp, ref_logp):
    """Optional KL (README): k3 = exp(d) - d - 1, d = log pi_ref - log pi, d bounded to [-20, 20].
    d k3 / d log pi = (exp(d) - 1) * dd/dlogp = 1 - exp(d) for d <= 20 (below -20 the ref is raised to
    sg[log pi] - 20, so the pull 1 - exp(-20) stays: kl_k3's docstring); above +20 d is capped like the ratio,
    gradient 0."""
    draw = ref_logp - logp
    d = np.clip(draw, -CAP, CAP)
    k = np.expm1(d) - d
    dk = np.where(draw <= CAP, -np.expm1(d), 0.0)
    return k, dk


def ref_token_loss(logp, logmu, adv, variant, lam, grad, clip_eps, ref_logp, beta):
    """Per-token loss l and its hand-derived gradient g = dl / dlog pi (Alg. 1 step 8, §4 gradient semantics):
      detached:  l = -sg[f] * exp(logp - sg[logp]) * A  -> value -f A, g = -f A
      surrogate: l = -f(rho) * A                       -> value -f A, g = -A df/dlogp
      PPO clip (TRL form): active where (A > 0, rho > 1 + eps) or (A < 0, rho < 1 - eps); there
                 l = -f(clip(rho, 1 - eps, 1 + eps)) A, g = 0
      + beta * k3 with g += beta * dk3/dlogp
      log pi = -inf (outside pi_theta's nucleus): l = 0, g = 0 in every variant (README)."""
    A = np.broadcast_to(np.asarray(adv, dtype=np.float64)[:, None], logp.shape)
    rho, drho = ref_ratio(logp, logmu)
    f = ref_f(rho, variant, lam)
    l = -f * A
    g = -f * A if grad == "detached" else -A * ref_df_dlogp(rho, drho, variant, lam)
    if clip_eps is not None:
        active = ((A > 0) & (rho > 1 + clip_eps)) | ((A < 0) & (rho < 1 - clip_eps))
        l = np.where(active, -ref_f(np.clip(rho, 1 - clip_eps, 1 + clip_eps), variant, lam) * A, l)
        g = np.where(active, 0.0, g)
    if ref_logp is not None and beta:
        k, dk = ref_kl_k3(logp, ref_logp)
        l = l + beta * k
        g = g + beta * dk
    outside = np.isneginf(logp)
    return np.where(outside, 0.0, l), np.where(outside, 0.0, g)


def ref_weights(mask, aggregation, max_len=None):
    """Aggregation weights c_bt (loss = sum c l):
      token_mean: c = m / sum_{b,t} m;  seq_mean: c = m / (B * sum_t m_b) (an empty row counts in B, adds 0);
      dr_grpo:    c = m / (B * max_len)."""
    m = mask.astype(np.float64)
    B = m.shape[0]
    if aggregation == "token_mean":
        return m / m.sum()
    if aggregation == "seq_mean":
        n = m.sum(axis=1, keepdims=True)
        return np.divide(m, B * n, out=np.zeros_like(m), where=n > 0)
    if aggregation == "dr_grpo":
        return m / (B * max_len)
    raise NotImplementedError(f"aggregation {aggregation!r} (grpo.AGGREGATIONS) has no reference here: add it to "
                              f"ref_weights")


def ref_policy_loss(logp, logmu, adv, mask, **kw):
    """Loss value and d loss / d log pi [B, T]; padded positions never enter (their inputs may be garbage)."""
    aggregation, max_len = kw.pop("aggregation"), kw.pop("max_len")
    on = mask.astype(bool)
    ref_logp = kw.pop("ref_logp")
    clean = lambda a: np.where(on, a, -1.0)  # padding is zeroed before any arithmetic
    l, g = ref_token_loss(clean(logp), clean(logmu), adv, ref_logp=None if ref_logp is None else clean(ref_logp),
                          **kw)
    c = ref_weights(mask, aggregation, max_len)
    terms = np.where(on, c * l, 0.0)
    return terms.sum(), np.where(on, c * g, 0.0), np.abs(terms).sum()


# ------------------------------------------------------------------------------------------------ random cases

def random_case(rng, with_ref):
    """B in 1..6, T in 1..7, prefix masks with ragged lengths (an all-masked row in about half the cases with
    B > 1); log rho spanning 1e-3..1e3 and beyond the cap; some log pi = -inf on real tokens; advantages of both
    signs and exact zeros; padded positions hold nan / +-inf / junk."""
    B, T = int(rng.integers(1, 7)), int(rng.integers(1, 8))
    lens = rng.integers(0, T + 1, size=B)
    if B > 1 and rng.random() < 0.5:
        lens[rng.integers(B)] = 0
    if lens.max() == 0:
        lens[rng.integers(B)] = int(rng.integers(1, T + 1))
    mask = np.arange(T)[None, :] < lens[:, None]
    logp = -rng.exponential(2.0, size=(B, T))
    kind = rng.random((B, T))
    x = np.where(kind < 0.7, rng.uniform(-np.log(1e3), np.log(1e3), (B, T)),   # rho in 1e-3..1e3
                 np.where(kind < 0.85, rng.uniform(-0.3, 0.3, (B, T)),           # near the clip window
                          rng.uniform(CAP + 0.5, CAP + 15, (B, T))))             # beyond the cap
    logmu = logp - x
    outside = (rng.random((B, T)) < 0.08) & mask
    logp = np.where(outside, -np.inf, logp)
    adv = rng.choice([-1.0, 1.0], size=B) * rng.uniform(0.05, 3.0, size=B)
    adv[rng.random(B) < 0.2] = 0.0
    ref_logp = logp + rng.uniform(-5.0, 5.0, (B, T)) if with_ref else None
    junk = rng.choice([np.nan, np.inf, -np.inf, 3.7], size=(B, T))
    logp, logmu = np.where(mask, logp, junk), np.where(mask, logmu, junk)
    if with_ref:
        ref_logp = np.where(mask, np.where(outside, -1.5, ref_logp), junk)
    return logp, logmu, adv, mask, ref_logp


def run_grpo(logp, logmu, adv, mask, ref_logp, **kw):
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    lp = t(logp).requires_grad_(True)
    loss, _ = policy_loss(lp, t(logmu), t(adv), torch.tensor(mask), ref_logp=None if ref_logp is None else t(ref_logp),
                          **kw)
    loss.backward()
    return loss.item(), lp.grad.numpy()


def check(case, **kw):
    logp, logmu, adv, mask, ref_logp = case
    value, grad = run_grpo(logp, logmu, adv, mask, ref_logp, **kw)
    e_value, e_grad, scale = ref_policy_loss(logp, logmu, adv, mask, ref_logp=ref_logp, **kw)
    assert np.isfinite(value) and np.isfinite(grad).all()
    np.testing.assert_allclose(value, e_value, rtol=1e-10, atol=1e-14 * scale, err_msg=f"loss value {kw}")
    np.testing.assert_allclose(grad, e_grad, rtol=1e-10, atol=1e-300, err_msg=f"d loss / d log pi {kw}")


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("beta", [0.0, 0.07])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)     # the registries: a variant or an aggregation added
@pytest.mark.parametrize("grad", ["detached", "surrogate"])
@pytest.mark.parametrize("variant", grpo.VARIANTS)             # to grpo fails here until the reference has it too
def test_policy_loss_matches_oracle_on_random_cases(variant, grad, aggregation, clip_eps, beta):
    rng = np.random.default_rng([zlib.crc32(f"{variant} {grad} {aggregation}".encode()), clip_eps is None, beta > 0])
    for i in range(25):
        case = random_case(rng, with_ref=beta > 0 or i % 3 == 0)  # a ref with beta = 0 must not change the loss
        lam = (1.0 if i % 4 == 0 else float(rng.uniform(0.05, 1.0))) if variant == "retrace" else 1.0
        max_len = case[0].shape[1] + int(rng.integers(0, 3)) if aggregation == "dr_grpo" else None
        check(case, variant=variant, lam=lam, grad=grad, clip_eps=clip_eps, aggregation=aggregation,
              max_len=max_len, beta=beta)


def test_detached_and_surrogate_differ_exactly_where_the_spec_says():
    # One sequence, A = 2, token mean over 4 tokens; log rho = [-1, 0.5, 25, -inf on log pi].
    # Values agree in both modes. Gradients (times 1/4):
    #   base      detached -rho A (the capped rho 4.85e8 beyond the cap)    surrogate -rho A below the cap, 0 above
    #   retrace   detached -lam min(1, rho) A                              surrogate -lam rho A for rho < 1, 0 above
    #   practical -A in both
    logp = np.array([[-2.0, -1.0, -0.5, -np.inf]])
    logmu = np.array([[-1.0, -1.5, -25.5, -3.0]])
    case = (logp, logmu, np.array([2.0]), np.ones((1, 4), bool), None)
    rho = np.exp([-1.0, 0.5, 20.0, -np.inf])
    lam = 0.6
    expect = {
        ("base", "detached"): -2 * rho, ("base", "surrogate"): -2 * rho * [1, 1, 0, 0],
        ("retrace", "detached"): -2 * lam * np.minimum(1, rho), ("retrace", "surrogate"): -2 * lam * rho * [1, 0, 0, 0],
        ("practical", "detached"): -2.0 * np.array([1, 1, 1, 0]), ("practical", "surrogate"): -2.0 * np.array([1, 1, 1, 0]),
    }
    for (variant, grad), e in expect.items():
        kw = dict(variant=variant, lam=lam if variant == "retrace" else 1.0, aggregation="token_mean")
        v_det, g = run_grpo(*case[:4], None, grad=grad, **kw)
        v_sur, _ = run_grpo(*case[:4], None, grad="surrogate" if grad == "detached" else "detached", **kw)
        assert v_det == pytest.approx(v_sur, rel=1e-15)
        np.testing.assert_allclose(g[0], np.array(e) / 4, rtol=1e-12, atol=0)
        check(case, grad=grad, clip_eps=None, max_len=None, beta=0.0, **kw)
    assert not np.allclose(run_grpo(*case[:4], None, variant="retrace", lam=lam, grad="detached")[1],
                           run_grpo(*case[:4], None, variant="retrace", lam=lam, grad="surrogate")[1])


def test_outside_nucleus_token_is_zero_even_where_clip_or_kl_would_act():
    # log pi = -inf, A < 0: PPO's clip branch would give -(1 - eps) A, the k3 KL would give exp(20) - 21;
    # the README says the token adds nothing and no gradient in every variant, yet counts in the normaliser.
    logp = np.array([[-np.inf, -1.0]])
    logmu = np.array([[-2.0, -1.0]])
    for variant in ("base", "practical", "retrace"):
        for grad in ("detached", "surrogate"):
            for clip_eps, beta in ((None, 0.0), (0.2, 0.0), (0.2, 0.1)):
                v, g = run_grpo(logp, logmu, np.array([-1.5]), np.ones((1, 2), bool), np.full((1, 2), -1.0),
                                variant=variant, grad=grad, clip_eps=clip_eps, beta=beta)
                # second token: rho = 1, f = 1, KL(d = 0) = 0 -> loss = -(1)(-1.5) / 2
                assert v == pytest.approx(0.75, rel=1e-14) and g[0, 0] == 0.0 and g[0, 1] == pytest.approx(0.75)


def test_kl_beyond_its_cap():
    # d = ref - log pi = +-30: value k3 at d = +-20; gradient 0 above the cap, 1 - exp(-20) below (kl_k3 docstring).
    logp = np.array([[-1.0, -2.0, -3.0]])
    case = (logp, logp.copy(), np.array([0.0]), np.ones((1, 3), bool), logp + [30.0, -30.0, 0.5])
    for grad in ("detached", "surrogate"):
        check(case, variant="base", lam=1.0, grad=grad, clip_eps=None, aggregation="token_mean", max_len=None,
              beta=0.3)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_oracle(scale):
    rng = np.random.default_rng(7 + scale)
    for _ in range(200):
        G, n = int(rng.integers(2, 9)), int(rng.integers(1, 5))
        kind = rng.random()
        R = (rng.integers(0, 2, size=n * G).astype(np.float64) if kind < 0.5 else
             rng.normal(size=n * G) * 10 ** rng.uniform(-3, 2) if kind < 0.8 else
             np.repeat(rng.choice([0.1, 1 / 3, 7.0, 0.0], size=n), G))       # equal groups: A = 0 exactly
        got = group_advantages(torch.tensor(R), G, scale=scale).double().numpy()
        expect = ref_group_advantages(R, G, scale=scale)
        np.testing.assert_allclose(got, expect, rtol=2e-6, atol=2e-6 * np.abs(expect).max(initial=0) + 1e-30)
        assert (got[expect == 0] == 0).all()
