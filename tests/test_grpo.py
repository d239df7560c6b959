"""grpo.py: advantages, ratios, the three off-policy weights, loss forms and aggregations, diagnostics.

Golden values are worked out by hand in the comments (not re-derived with the code under test).
"""
import math
import re

import pytest
import torch

import grpo
from grpo import (aggregate, group_advantages, importance_ratio, loss_normaliser, offpolicy_stats, offpolicy_weight,
                  policy_loss, reward_stats, token_entropy, token_logprobs)

LN2 = math.log(2.0)


def close(a, b, atol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    # group 1: R = [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.5773503
    #          A = +-0.5 / (0.5773503 + 1e-4) = +-0.8658754
    # group 2: R = [0, 1, 1, 1]: mean 0.75, deviations [-0.75, 0.25, 0.25, 0.25], var = (0.5625 + 3*0.0625)/3 = 0.25
    #          A = [-0.75, 0.25, 0.25, 0.25] / 0.5001 = [-1.4997001, 0.4999000, ...]
    # group 3: all equal -> A = 0
    R = torch.tensor([1., 0., 0., 1., 0., 1., 1., 1., 1., 1., 1., 1.])
    A = group_advantages(R, 4)
    expect = [0.8658754, -0.8658754, -0.8658754, 0.8658754,
              -1.4997001, 0.4999000, 0.4999000, 0.4999000, 0, 0, 0, 0]
    assert A.dtype == torch.float32 and A.shape == (12,)
    assert close(A, expect)
    # Dr. GRPO: no std division
    assert close(group_advantages(R, 4, scale=False),
                 [0.5, -0.5, -0.5, 0.5, -0.75, 0.25, 0.25, 0.25, 0, 0, 0, 0])
    # R = [0, 1, 2]: mean 1, std 1 -> [-1/1.0001, 0, 1/1.0001]
    assert close(group_advantages(torch.tensor([0., 1., 2.]), 3), [-0.99990001, 0, 0.99990001])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(torch.zeros(6), 1)
    assert close(group_advantages(torch.tensor([3., 5.]), 1, scale=False), [0, 0])
    # NaN / inf rewards (a custom reward function) gave NaN advantages, so a NaN loss and weights, silently; a list
    # was an AttributeError; reward_stats took group_size 0 (ZeroDivisionError), 2.0 (a view() TypeError), True (1)
    for f in (group_advantages, reward_stats):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="rewards: expected finite numbers"):
                f(torch.tensor([1.0, bad, 0.0, 1.0]), 2)
        with pytest.raises(TypeError, match="rewards: expected a 1-D tensor, got list"):
            f([1.0, 0.0], 2)
        for g in (0, 2.0, True, "2"):
            with pytest.raises(ValueError, match=f"group_size={g!r}"):
                f(torch.ones(4), g)
    assert close(group_advantages(torch.tensor([1, 0, 1, 1]), 2), [0.7070, -0.7070, 0, 0], atol=1e-4)   # ints: fine


# ---------------------------------------------------------------------------------------------- log-probs

def test_token_logprobs_by_hand_and_temperature():
    # one position, logits [0, ln 3]: softmax = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])   # [1, 2, 2]
    tokens = torch.tensor([[0, 1]])
    assert close(token_logprobs(logits, tokens), [[math.log(0.25), math.log(0.75)]])
    # temperature 0.5: logits [0, 2 ln 3] -> softmax [1/10, 9/10]
    assert close(token_logprobs(logits, tokens, temperature=0.5), [[math.log(0.1), math.log(0.9)]])
    # bf16 input -> fp32 output
    out = token_logprobs(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32
    # temperature 0 (greedy): the log-probs of the temperature-1 distribution (contract)
    assert close(token_logprobs(logits, tokens, temperature=0.0), [[math.log(0.25), math.log(0.75)]])
    with pytest.raises(ValueError, match="temperature=-1"):
        token_logprobs(logits, tokens, temperature=-1)
    # what generate() refuses the scorers refuse too, naming the argument: top_p = 0 / -1 scored NaN, temperature
    # NaN the temperature-1 distribution, valid_vocab_size 0 NaN and -1 masked the last id, an eos id -1 banned the
    # last id, 3.7 was id 3, a bare int or None a TypeError deep inside
    for kw, err, match in [(dict(temperature=float("nan")), ValueError, "temperature=nan"),
                           (dict(temperature=float("inf")), ValueError, "temperature=inf"),
                           (dict(temperature="0.7"), TypeError, "temperature='0.7'"),
                           (dict(top_p=0.0), ValueError, "top_p=0.0"), (dict(top_p=-1), ValueError, "top_p=-1"),
                           (dict(top_p=1.5), ValueError, "top_p=1.5"),
                           (dict(top_p=float("nan")), ValueError, "top_p=nan"),
                           (dict(valid_vocab_size=0), ValueError, "valid_vocab_size=0"),
                           (dict(valid_vocab_size=-1), ValueError, "valid_vocab_size=-1"),
                           (dict(valid_vocab_size=3), ValueError, "valid_vocab_size=3"),
                           (dict(eos_token_ids=(-1,), min_new_tokens=1), ValueError, "eos_token_ids"),
                           (dict(eos_token_ids=(2,), min_new_tokens=1), ValueError, "eos_token_ids"),
                           (dict(eos_token_ids=(1.7,), min_new_tokens=1), TypeError, "eos_token_ids"),
                           (dict(eos_token_ids=1, min_new_tokens=1), TypeError, "eos_token_ids=1"),
                           (dict(eos_token_ids=None), TypeError, "eos_token_ids=None"),
                           (dict(min_new_tokens=-1), ValueError, "min_new_tokens=-1")]:
        for f in (lambda: token_logprobs(logits, tokens, **kw), lambda: token_entropy(logits, **kw),
                  lambda: token_logprobs(logits[:0], tokens[:0], **kw)):    # no rows to score: refused all the same
            with pytest.raises(err, match=re.escape(match)):
                f()
    assert close(token_logprobs(logits, tokens, eos_token_ids={1}, min_new_tokens=1),       # a set of ids is fine
                 [[0.0, math.log(0.75)]])
    # valid_vocab_size = 2 masks id 2: logits [0, ln 3, 5] -> softmax over the first two = [1/4, 3/4]
    wide = torch.tensor([[[0.0, math.log(3.0), 5.0]] * 2])
    assert close(token_logprobs(wide, tokens, valid_vocab_size=2), [[math.log(0.25), math.log(0.75)]])
    # top_p = 0.7 on [1/4, 3/4]: only id 1 is kept -> log 1 = 0
    assert close(token_logprobs(logits, tokens, top_p=0.7)[0, 1], 0.0)
    # EOS (id 0) banned before min_new_tokens = 1: position 0 -> only id 1 left (log 1 = 0); position 1 unchanged
    assert close(token_logprobs(logits, torch.tensor([[1, 1]]), eos_token_ids=(0,), min_new_tokens=1),
                 [[0.0, math.log(0.75)]])


def test_token_logprobs_matches_log_softmax_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ours = token_logprobs(logits, tokens, temperature=0.7)
    ref = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert close(ours, ref, atol=1e-5)
    ours.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_token_entropy():
    # uniform over 4 -> ln 4 ; one-hot-ish [0, -1e4] -> ~0
    logits = torch.tensor([[[0., 0., 0., 0.], [0., -1e4, -1e4, -1e4]]])
    assert close(token_entropy(logits), [[math.log(4.0), 0.0]])
    # logits [0, ln 3]: p = [1/4, 3/4], H = (1/4) ln 4 + (3/4) ln(4/3) = 0.5623351
    # temperature 0.5: logits [0, 2 ln 3], p = [1/10, 9/10], H = 0.1 ln 10 + 0.9 ln(10/9) = 0.3250830
    skewed = torch.tensor([[[0.0, math.log(3.0)]]])
    assert close(token_entropy(skewed), [[0.5623351]])
    assert close(token_entropy(skewed, temperature=0.5), [[0.3250830]])


def test_token_entropy_of_the_scored_distribution():
    # The entropy of the distribution token_logprobs scores (the sampler's): V = 5, id 4 >= valid_vocab_size = 4 is
    # masked, EOS = id 3 is banned at completion positions t < min_new_tokens = 1. Logits [0, 0, 0, ln 3, 100]:
    #   raw softmax: p_4 ~ 1 -> H ~ 0 (what a plain entropy of the logits would log)
    #   t = 0 (EOS banned, id 4 masked): uniform over {0, 1, 2} -> H = ln 3
    #   t = 1 (EOS allowed): p = [1/6, 1/6, 1/6, 1/2] -> H = 3 (1/6) ln 6 + (1/2) ln 2 = (1/2) ln 12
    # top_p = 0.4 keeps the ids whose mass strictly before them is < 0.4:
    #   t = 0: [1/3, 1/3, 1/3] -> before [0, 1/3, 2/3]: two ids kept, H = ln 2
    #   t = 1: EOS (1/2) first -> before [0, 1/2, ...]: EOS alone, H = 0
    z = torch.tensor([0.0, 0.0, 0.0, math.log(3.0), 100.0]).expand(1, 2, 5)
    kw = dict(valid_vocab_size=4, eos_token_ids=(3,), min_new_tokens=1)
    assert close(token_entropy(z), [[0.0, 0.0]], atol=1e-6)
    assert close(token_entropy(z, **kw), [[math.log(3.0), 0.5 * math.log(12.0)]])
    assert close(token_entropy(z, top_p=0.4, **kw), [[LN2, 0.0]])
    # temperature: t = 1 at tau = 0.5 (EOS allowed): logits [0, 0, 0, 2 ln 3] -> p = [1, 1, 1, 9] / 12
    #   H = 3 (1/12) ln 12 + (9/12) ln(12/9) = 0.25 ln 12 + 0.75 ln(4/3) = 0.8369882
    assert close(token_entropy(z, temperature=0.5, **kw)[0, 1], 0.25 * math.log(12.0) + 0.75 * math.log(4 / 3))


# ---------------------------------------------------------------------------------------------- ratio and f

def test_importance_ratio_and_overflow_guard():
    assert close(importance_ratio(torch.tensor([LN2, 0.0]), torch.tensor([0.0, LN2])), [2.0, 0.5])
    rho = importance_ratio(torch.tensor([1000.0]), torch.tensor([0.0]))
    assert torch.isfinite(rho).all() and close(rho, [math.exp(20.0)], atol=1e3)


def test_offpolicy_weights_by_hand():
    rho = torch.tensor([0.5, 1.0, 2.0])
    assert close(offpolicy_weight(rho, "base"), [0.5, 1.0, 2.0])                 # rho
    assert close(offpolicy_weight(rho, "practical"), [1.0, 1.0, 1.0])            # 1
    assert close(offpolicy_weight(rho, "retrace"), [0.5, 1.0, 1.0])              # min(1, rho)
    assert close(offpolicy_weight(rho, "retrace", lam=0.5), [0.25, 0.5, 0.5])    # 0.5 * min(1, rho)
    with pytest.raises(ValueError, match="variant='vtrace'"):
        offpolicy_weight(rho, "vtrace")
    with pytest.raises(ValueError, match="lam=1.5"):
        offpolicy_weight(rho, "retrace", lam=1.5)


# ---------------------------------------------------------------------------------------------- the hand example
# B = 2, T = 3, mask [[1, 1, 1], [1, 1, 0]], A = [2, -1]
# rho = [[2, 0.5, 1], [4, 0.25, (pad)]]   (the padded slot holds garbage: log-ratio 1000, logp_mu = -inf)
# per-token -f(rho) A:
#   base      [[-4, -1, -2], [4, 0.25]]      sum -2.75
#   retrace   [[-2, -1, -2], [1, 0.25]]      sum -3.75   (w = [1, .5, 1 | 1, .25])
#   practical [[-2, -2, -2], [1, 1]]         sum -4

def hand_example():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -0.7]], requires_grad=True)
    log_rho = torch.tensor([[LN2, -LN2, 0.0], [2 * LN2, -2 * LN2, 0.0]])
    logp_mu = logp.detach() - log_rho
    logp_mu[1, 2] = -math.inf                                        # garbage on padding must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    return logp, logp_mu, adv, mask


@pytest.mark.parametrize("variant, lam, aggregation, expect", [
    ("base", 1.0, "token_mean", -2.75 / 5),                      # -0.55
    ("base", 1.0, "seq_mean", (-7 / 3 + 4.25 / 2) / 2),          # -5/48
    ("base", 1.0, "dr_grpo", -2.75 / (2 * 4)),                   # max_len 4: -0.34375
    ("retrace", 1.0, "token_mean", -3.75 / 5),                   # -0.75
    ("retrace", 1.0, "seq_mean", (-5 / 3 + 1.25 / 2) / 2),       # -25/48
    ("retrace", 1.0, "dr_grpo", -3.75 / 8),
    ("retrace", 0.5, "token_mean", -0.375),
    ("practical", 1.0, "token_mean", -4 / 5),
    ("practical", 1.0, "seq_mean", (-6 / 3 + 2 / 2) / 2),        # -0.5
    ("practical", 1.0, "dr_grpo", -4 / 8),
])
def test_loss_values_by_hand(variant, lam, aggregation, expect):
    for grad in ("detached", "surrogate"):
        logp, logp_mu, adv, mask = hand_example()
        loss, stats = policy_loss(logp, logp_mu, adv, mask, variant=variant, lam=lam, grad=grad,
                                  aggregation=aggregation, max_len=4)
        assert close(loss.item(), expect), (grad, loss.item(), expect)
        assert close(stats["loss"], expect)


# d loss / d logp, token_mean (1/5). Detached: -sg[f] A. Surrogate: -f'(rho) rho A  (d rho / d logp = rho):
#   base: -rho A for both; retrace surrogate: min(1, rho) is flat for rho > 1 (rho = 1 passes: clamp is inclusive);
#   practical: -A for both (its surrogate is pi / sg[pi]).
HAND_GRADS = {
    ("base", "detached"): [[-4, -1, -2], [4, 0.25, 0]],
    ("base", "surrogate"): [[-4, -1, -2], [4, 0.25, 0]],
    ("retrace", "detached"): [[-2, -1, -2], [1, 0.25, 0]],
    ("retrace", "surrogate"): [[0, -1, -2], [0, 0.25, 0]],
    ("practical", "detached"): [[-2, -2, -2], [1, 1, 0]],
    ("practical", "surrogate"): [[-2, -2, -2], [1, 1, 0]],
}


@pytest.mark.parametrize("variant, grad", list(HAND_GRADS))
def test_gradients_by_hand(variant, grad):
    logp, logp_mu, adv, mask = hand_example()
    loss, _ = policy_loss(logp, logp_mu, adv, mask, variant=variant, grad=grad)
    loss.backward()
    assert close(logp.grad, torch.tensor(HAND_GRADS[variant, grad]) / 5)


def test_gradients_other_aggregations_by_hand():
    logp, logp_mu, adv, mask = hand_example()
    policy_loss(logp, logp_mu, adv, mask, variant="base", aggregation="seq_mean")[0].backward()
    # seq_mean: row 1 has 3 tokens, row 2 has 2, B = 2 -> weights 1/6 and 1/4
    assert close(logp.grad, [[-4 / 6, -1 / 6, -2 / 6], [4 / 4, 0.25 / 4, 0]])
    logp, logp_mu, adv, mask = hand_example()
    policy_loss(logp, logp_mu, adv, mask, variant="base", aggregation="dr_grpo", max_len=4)[0].backward()
    assert close(logp.grad, [[-4 / 8, -1 / 8, -2 / 8], [4 / 8, 0.25 / 8, 0]])   # 1 / (B * max_len)


# eps = 0.2. Clip active where (A > 0, rho > 1.2) -> token (0,0), or (A < 0, rho < 0.8) -> token (1,1).
# There the token's value is -f(clip(rho)) A and its gradient 0:
# The unclipped tokens keep their gradient of HAND_GRADS (retrace surrogate: 0 at rho = 4 as min(1, rho) is flat there):
#   base:      values [-1.2*2, -1, -2 | 4, -0.8*(-1)] = [-2.4, -1, -2, 4, 0.8]  sum -0.6   grad [[0,-1,-2],[4,0,0]]
#   retrace:   values [-1*2, -1, -2 | 1, 0.8]                                  sum -3.2   grad [[0,-1,-2],[1,0,0]]
#                                                                               (surrogate)     [[0,-1,-2],[0,0,0]]
#   practical: values [-2, -2, -2 | 1, 1]                                      sum -4     grad [[0,-2,-2],[1,0,0]]
@pytest.mark.parametrize("variant, grad, value, grad_", [
    ("base", "detached", -0.6 / 5, [[0, -1, -2], [4, 0, 0]]),
    ("base", "surrogate", -0.6 / 5, [[0, -1, -2], [4, 0, 0]]),
    ("retrace", "detached", -3.2 / 5, [[0, -1, -2], [1, 0, 0]]),
    ("retrace", "surrogate", -3.2 / 5, [[0, -1, -2], [0, 0, 0]]),
    ("practical", "detached", -4 / 5, [[0, -2, -2], [1, 0, 0]]),
    ("practical", "surrogate", -4 / 5, [[0, -2, -2], [1, 0, 0]]),
])
def test_ppo_clip_by_hand(variant, grad, value, grad_):
    logp, logp_mu, adv, mask = hand_example()
    loss, stats = policy_loss(logp, logp_mu, adv, mask, variant=variant, grad=grad, clip_eps=0.2)
    loss.backward()
    assert close(loss.item(), value) and close(logp.grad, torch.tensor(grad_) / 5)
    assert close(stats["clip_frac"], 2 / 5)


def test_ppo_clip_retrace_lambda_by_hand():
    # Retrace-lambda under the eps-clip: the clipped tokens' constant value -lam * min(1, clip(rho)) * A carries lambda
    # too, so lam = 0.5 halves test_ppo_clip_by_hand's retrace rows:
    #   values [-1, -0.5, -1 | 0.5, 0.4] sum -1.6;  grad detached [[0, -.5, -1], [.5, 0, 0]], surrogate [[0, -.5, -1], [0, 0, 0]]
    for grad, grad_ in (("detached", [[0, -0.5, -1], [0.5, 0, 0]]), ("surrogate", [[0, -0.5, -1], [0, 0, 0]])):
        logp, logp_mu, adv, mask = hand_example()
        loss, _ = policy_loss(logp, logp_mu, adv, mask, variant="retrace", lam=0.5, grad=grad, clip_eps=0.2)
        loss.backward()
        assert close(loss.item(), -1.6 / 5) and close(logp.grad, torch.tensor(grad_) / 5), grad


def test_per_token_advantages_by_hand():
    # advantages [B, T] (one A per token) instead of [B]: the hand example with A = [[2, 1, -1], [-1, 3, pad 7]],
    # rho = [[2, .5, 1], [4, .25]], base, token mean over 5 tokens:
    #   -rho A = [[-4, -0.5, 1], [4, -0.75]]  sum -0.25;  grad (detached) the same / 5
    # eps-clip 0.2, on each token's own A: only (0, 0) (A = 2 > 0, rho = 2 > 1.2): value -1.2 * 2 = -2.4, no gradient
    #   sum -0.25 + 4 - 2.4 = 1.35
    adv_bt = torch.tensor([[2.0, 1.0, -1.0], [-1.0, 3.0, 7.0]])
    for clip_eps, value, grad_ in ((None, -0.25, [[-4, -0.5, 1], [4, -0.75, 0]]), (0.2, 1.35, [[0, -0.5, 1], [4, -0.75, 0]])):
        logp, logp_mu, _, mask = hand_example()
        loss, stats = policy_loss(logp, logp_mu, adv_bt, mask, variant="base", clip_eps=clip_eps)
        loss.backward()
        assert close(loss.item(), value / 5) and close(logp.grad, torch.tensor(grad_) / 5), clip_eps
        assert close(stats["clip_frac"], 0.0 if clip_eps is None else 1 / 5)


def test_ppo_clip_base_matches_trl_formula():
    # independent implementation of TRL's clipped objective: -min(rho A, clip(rho, 1-eps, 1+eps) A), token mean
    g = torch.Generator().manual_seed(1)
    logp0 = -torch.rand(4, 6, generator=g) * 3
    logp_mu = logp0 + 0.6 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.8
    a = logp0.clone().requires_grad_()
    rho = torch.exp(a - logp_mu)
    trl = -torch.min(rho * adv[:, None], torch.clamp(rho, 0.8, 1.2) * adv[:, None])
    ref = (trl * mask).sum() / mask.sum()
    ref.backward()
    for grad in ("detached", "surrogate"):
        b = logp0.clone().requires_grad_()
        loss, _ = policy_loss(b, logp_mu, adv, mask, variant="base", grad=grad, clip_eps=0.2)
        loss.backward()
        assert close(loss.item(), ref.item()) and close(b.grad, a.grad)


def test_kl_k3_by_hand():
    # d = ref - logp = [[ln2, -ln2, 0], [0, ln2, pad]];  k3 = e^d - d - 1 = [1-ln2, ln2-1/2, 0 | 0, 1-ln2]
    # mean over 5 tokens = (2(1-ln2) + ln2 - 1/2)/5 = 0.16137056;  beta = 0.1 -> 0.016137056
    # d k3 / d logp = 1 - e^d = [[-1, 0.5, 0], [0, -1, 0]] -> grad = 0.1/5 * that
    logp, logp_mu, _, mask = hand_example()
    d = torch.tensor([[LN2, -LN2, 0.0], [0.0, LN2, 5.0]])
    ref = logp.detach() + d
    adv = torch.zeros(2)                                              # isolate the KL term
    loss, stats = policy_loss(logp, logp_mu, adv, mask, variant="practical", ref_logp=ref, beta=0.1)
    loss.backward()
    assert close(loss.item(), 0.016137056) and close(stats["kl_ref"], 0.16137056)
    assert close(logp.grad, [[-0.02, 0.01, 0.0], [0.0, -0.02, 0.0]])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp_mu, adv, mask, variant="base", beta=0.1)
    # pi_ref far below pi_theta (d = -30, or -inf: a token outside pi_ref's top-p nucleus): d is raised to -20, the
    # value stays finite, k3 = e^-20 + 19, and the gradient still pulls back: d k3 / d logp = 1 - e^-20
    for gap in (-30.0, -math.inf):
        lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        ref = torch.tensor([[-1.0 + gap, -2.0]])
        loss, stats = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool),
                                  variant="practical", ref_logp=ref, beta=0.5)
        loss.backward()
        k3 = math.exp(-20) + 19
        assert close(loss.item(), 0.5 * k3 / 2) and close(stats["kl_ref"], k3 / 2)
        assert close(lp.grad, [[0.5 / 2 * (1 - math.exp(-20)), 0.0]])
    # pi_ref far ABOVE pi_theta (d = +30): d is capped at +20 like the ratio, k3 = e^20 - 21 = 4.8516519e8 (e^30 would
    # be 1.1e13, and e^d overflows fp32 from d ~ 88.7); above the cap the clamp passes no gradient
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), variant="practical",
                              ref_logp=torch.tensor([[29.0, -2.0]]), beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (math.exp(20) - 21) / 2, rel=1e-6)
    assert stats["kl_ref"] == pytest.approx((math.exp(20) - 21) / 2, rel=1e-6)
    assert close(lp.grad, [[0.0, 0.0]])


def test_overflow_guard_in_loss():
    # log pi - log mu = 1000 on a real token: rho would be inf in fp32; loss and gradient must stay finite
    for variant in grpo.VARIANTS:
        for grad in grpo.GRADS:
            logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
            logp_mu = torch.tensor([[-1000.0, -1.0]])
            loss, stats = policy_loss(logp, logp_mu, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                                      variant=variant, grad=grad)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (variant, grad)
            assert math.isfinite(stats["ratio_max"]) and math.isfinite(stats["ess_ratio"])


def test_token_outside_pi_nucleus_has_rho_zero():
    # top_p < 1: the second token was drawn from mu's nucleus but lies outside pi_theta's (log pi = -inf).
    # rho = 0 there: term 0, no gradient, still in the normaliser. Token 1: rho = 2, A = 1, 2 tokens:
    #   base  -2/2 = -1   (grad -2/2)      retrace  -1/2   (grad -1/2)      practical  -1/2   (grad -1/2)
    # i.e. -f(2)/2 (f(2) pinned by test_offpolicy_weights_by_hand), so a variant added to VARIANTS is checked too;
    # its gradient where it is -f(2)/2 as well: detached, and the surrogate of base (d rho = rho) and practical
    assert [offpolicy_weight(torch.tensor(2.0), v).item() for v in ("base", "retrace", "practical")] == [2, 1, 1]
    for variant in grpo.VARIANTS:
        for grad in grpo.GRADS:
            for clip_eps in (None, 0.2):
                logits = torch.tensor([[[math.log(3.0), 0.0], [5.0, 0.0]]], requires_grad=True)   # [1, 2, 2]
                logp = token_logprobs(logits, torch.tensor([[0, 1]]), top_p=0.9)   # [[log 3/4, -inf]]
                assert logp[0, 1] == -math.inf
                logp_mu = torch.tensor([[math.log(0.375), math.log(0.5)]])         # rho_1 = 0.75 / 0.375 = 2
                ref = torch.tensor([[math.log(0.75), -math.inf]])
                loss, stats = policy_loss(logp, logp_mu, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                                          variant=variant, grad=grad, clip_eps=clip_eps, ref_logp=ref, beta=0.1)
                loss.backward()
                assert torch.isfinite(logits.grad).all(), (variant, grad, clip_eps)
                assert logits.grad[0, 1].abs().sum() == 0                       # no gradient from the outside token
                if clip_eps is None:
                    value = dlogp = -offpolicy_weight(torch.tensor(2.0), variant).item() / 2
                    assert close(loss.item(), value), (variant, grad, loss.item())
                    if grad == "detached" or variant in ("base", "practical"):
                        # d loss / d logit_0 of position 0 = dlogp * (1 - p_0) = dlogp * 1/4
                        assert close(logits.grad[0, 0, 0].item(), dlogp / 4, atol=1e-6), (variant, grad)
                assert stats["ratio_min"] == 0.0 and close(stats["ratio_max"], 2.0)
                assert close(stats["ratio_mean"], 1.0)                          # (2 + 0) / 2: rho = 0 counts
                assert close(stats["kl_ref"], 0.0)                               # only token 1 counts: d = 0
                assert stats["outside_frac"] == 0.5                               # the KLs skip token 2:
                assert close(stats["kl_mu_pi"], -math.log(2.0))                   # log mu - log pi = -ln 2
                assert close(stats["kl_mu_pi_k3"], 1 - math.log(2.0))             # 2 - 1 - ln 2
                assert close(stats["neg_logp"], -math.log(0.75))


def test_padding_log_probs_may_be_inf_or_nan():
    # The padded slot of the hand example holds log pi = -inf (a pad token outside pi_theta's top-p nucleus) or NaN
    # instead of -0.7: loss, gradient and statistics are those of the clean example, the padded gradient is 0.
    for junk in (-math.inf, math.nan):
        for variant in grpo.VARIANTS:
            for grad in grpo.GRADS:
                logp, logp_mu, adv, mask = hand_example()
                clean, clean_stats = policy_loss(logp, logp_mu, adv, mask, variant=variant, grad=grad, clip_eps=0.2)
                clean.backward()
                dirty_logp = logp.detach().clone()
                dirty_logp[1, 2] = junk
                dirty_logp.requires_grad_()
                loss, stats = policy_loss(dirty_logp, logp_mu, adv, mask, variant=variant, grad=grad, clip_eps=0.2)
                loss.backward()
                assert close(loss.item(), clean.item()), (junk, variant, grad)
                assert torch.isfinite(dirty_logp.grad).all() and dirty_logp.grad[1, 2] == 0, (junk, variant, grad)
                assert close(dirty_logp.grad, logp.grad)
                assert stats == clean_stats


def test_no_gradient_flows_into_the_advantages():
    # A is a constant of the loss (spec §3.5: computed from rewards); a caller's differentiable A gets no gradient
    logp, logp_mu, adv, mask = hand_example()
    adv.requires_grad_()
    for grad in grpo.GRADS:
        policy_loss(logp, logp_mu, adv, mask, variant="base", grad=grad)[0].backward()
    assert adv.grad is None and logp.grad is not None


def test_no_gradient_flows_into_mu_or_the_reference():
    # log mu (recorded at sampling time, spec §3.4) and log pi_ref (frozen) are constants of the loss, even when the
    # caller's tensors are still attached to a graph: here log mu IS logp (the on-policy case r = 0 written naively)
    # and the reference is a leaf that requires grad. Base surrogate, hand example, beta = 0.1, ref - logp = 0.5:
    #   rho = pi / sg[mu] = 1 in value, d rho / d logp = 1 -> policy part: value -sum A m / 5 = -4/5, grad -A m / 5
    #   k3 = e^0.5 - 0.5 - 1 = 0.1487213 on each of the 5 tokens -> + 0.1 * 0.1487213;  grad + 0.1 (1 - e^0.5) m / 5
    # (with a live log mu, rho = exp(logp - logp) would be constant: no policy gradient at all)
    logp, _, adv, mask = hand_example()
    ref = (logp.detach() + 0.5).requires_grad_()
    loss, _ = policy_loss(logp, logp, adv, mask, variant="base", grad="surrogate", ref_logp=ref, beta=0.1)
    loss.backward()
    assert close(loss.item(), -0.8 + 0.1 * (math.exp(0.5) - 1.5))
    assert close(logp.grad, (-adv[:, None] + 0.1 * (1 - math.exp(0.5))) * mask / 5)
    assert ref.grad is None


# ---------------------------------------------------------------------------------------------- sanity facts

def random_batch(seed, B=6, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp_mu = logp + 0.7 * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])[:B]                   # includes an empty completion
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    return logp, logp_mu, adv, mask, ref


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_r0_all_variants_equal_plain_grpo(clip_eps):
    # mu = pi_theta_old = pi_theta in value (r = 0): every variant, both gradient forms, must give
    # d L / d logp = -A m / #tokens (plain GRPO, token mean) and L = -sum A m / #tokens.
    logp0, _, adv, mask, _ = random_batch(2)
    n = mask.sum()
    expect_grad = -(adv[:, None] * mask) / n
    expect_loss = -(adv[:, None] * mask).sum() / n
    for variant in grpo.VARIANTS:
        for grad in grpo.GRADS:
            logp = logp0.clone().requires_grad_()
            loss, stats = policy_loss(logp, logp0.clone(), adv, mask, variant=variant, lam=1.0, grad=grad,
                                      clip_eps=clip_eps)
            loss.backward()
            assert close(loss.item(), expect_loss.item()), (variant, grad)
            assert close(logp.grad, expect_grad), (variant, grad)
            assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["trunc_frac"] == 0.0


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("variant, grad, clip_eps, beta", [
    ("base", "detached", None, 0.0), ("retrace", "surrogate", 0.2, 0.0), ("practical", "detached", None, 0.05),
])
def test_micro_batch_accumulation_equals_full_batch(aggregation, variant, grad, clip_eps, beta):
    logp0, logp_mu, adv, mask, ref = random_batch(3)
    kw = dict(variant=variant, grad=grad, clip_eps=clip_eps, aggregation=aggregation, max_len=7,
              ref_logp=ref, beta=beta)
    full = logp0.clone().requires_grad_()
    full_loss, _ = policy_loss(full, logp_mu, adv, mask, **{**kw, "ref_logp": ref})
    full_loss.backward()

    splits = [(0, 2), (2, 5), (5, 6)]
    Z = loss_normaliser(mask, aggregation, max_len=7)
    assert Z == sum(loss_normaliser(mask[a:b], aggregation, max_len=7) for a, b in splits)   # additive
    part = logp0.clone().requires_grad_()
    total = 0.0
    for a, b in splits:
        T = max(int(mask[a:b].sum(1).max()), 1)                        # trim each micro-batch to its longest row
        loss, _ = policy_loss(part[a:b, :T], logp_mu[a:b, :T], adv[a:b], mask[a:b, :T],
                              **{**kw, "ref_logp": ref[a:b, :T]}, token_normaliser=Z)
        loss.backward()                                                 # gradients accumulate in part.grad
        total += loss.item()
    assert close(total, full_loss.item(), atol=1e-12)
    assert close(part.grad, full.grad, atol=1e-12)


def test_aggregate_direct():
    per_token = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert close(aggregate(per_token, mask, "token_mean"), 6 / 3)
    assert close(aggregate(per_token, mask, "seq_mean"), (1.5 + 3) / 2)
    assert close(aggregate(per_token, mask, "dr_grpo", max_len=5), 6 / 10)
    assert close(aggregate(per_token, mask, "token_mean", token_normaliser=12), 6 / 12)
    assert close(aggregate(per_token, torch.zeros_like(mask), "token_mean"), 0.0)      # empty batch -> 0
    # padding may hold inf or NaN (0 * inf would be NaN): it never reaches the value
    for junk in (math.inf, -math.inf, math.nan):
        dirty = torch.where(mask, per_token, torch.tensor(junk))
        for agg, expect in (("token_mean", 6 / 3), ("seq_mean", (1.5 + 3) / 2), ("dr_grpo", 6 / 10)):
            assert close(aggregate(dirty, mask, agg, max_len=5), expect), (junk, agg)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="max_len=2"):
        aggregate(per_token, mask, "dr_grpo", max_len=2)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        aggregate(per_token, mask, "mean")
    # a mask of another shape broadcast silently: [B, 1] counted every padded position, [T] the wrong rows
    for bad in (mask[:, :1], mask[0], mask[None]):
        with pytest.raises(ValueError, match=r"per_token \(2, 3\) and mask"):
            aggregate(per_token, bad)
    with pytest.raises(ValueError, match=r"per_token \(2,\)"):
        aggregate(per_token[:, 0], mask[:, 0], "seq_mean")
    # a 0/1 mask of another dtype is a mask as in policy_loss (nonzero = token)
    assert close(aggregate(per_token, mask.float(), "token_mean"), 6 / 3)


def test_loss_normaliser_by_hand():
    # 2 sequences of 3 and 1 tokens in T = 3 positions; the completion budget max_len = 5 > T (every completion of
    # the batch ended early): Dr. GRPO divides by B * max_len = 10, not by B * T = 6
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert loss_normaliser(mask, "token_mean") == 4
    assert loss_normaliser(mask, "seq_mean") == 2
    assert loss_normaliser(mask, "dr_grpo", max_len=5) == 10
    assert loss_normaliser(mask, "dr_grpo", max_len=3) == 6
    # aggregate, policy_loss and offpolicy_stats count nonzero entries as tokens; loss_normaliser summed the values
    # (a mask of 2s or 0.5s gave twice or half the token count: micro-batch losses no longer summed to the batch's)
    for other in (mask.float() * 0.5, mask.long() * 2):
        assert loss_normaliser(other, "token_mean") == 4
    with pytest.raises(ValueError, match=r"mask \(3,\): expected \[B, T\]"):        # was an IndexError
        loss_normaliser(mask[0], "dr_grpo", max_len=5)


def test_empty_completions_count_as_sequences():
    # A row with no completion token (all padding) is still one of the B sequences: seq_mean = (1/B) sum_b with the
    # row's own length clamped to 1 (TRL "grpo": the mean over ALL rows), dr_grpo divides by B * max_len; token_mean
    # counts tokens only. per_token [[1, 2, x], [x, x, x], [3, x, x]], B = 3:
    #   token_mean 6 / 3 = 2    seq_mean (1.5 + 0 + 3) / 3 = 1.5    dr_grpo (max_len 4) 6 / 12 = 0.5
    per_token = torch.tensor([[1.0, 2.0, 99.0], [99.0, 99.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert [loss_normaliser(mask, agg, max_len=4) for agg in ("token_mean", "seq_mean", "dr_grpo")] == [3, 3, 12]
    for agg, expect in (("token_mean", 2.0), ("seq_mean", 1.5), ("dr_grpo", 0.5)):
        assert close(aggregate(per_token, mask, agg, max_len=4), expect), agg
    # the statistics: completion_len = mean over the 3 completions of (2, 0, 1) tokens = 1
    s = offpolicy_stats(torch.zeros(3, 3), torch.zeros(3, 3), mask)
    assert s["completion_len"] == 1.0 and s["n_seqs"] == 3 and s["n_tokens"] == 3


def test_ppo_clip_boundaries():
    # TRL: -min(rho A, clip(rho, 1-eps, 1+eps) A): at rho = 1 +- eps exactly both branches are equal and the
    # gradient still flows, so the clip is active only strictly outside [1 - eps, 1 + eps] (on A's side).
    rho = torch.tensor([0.79, 0.8, 1.0, 1.2, 1.21], dtype=torch.float64)      # 1 - 0.2 == 0.8, 1 + 0.2 == 1.2
    assert grpo.ppo_clipped(rho, torch.ones(5, dtype=torch.float64), 0.2).tolist() == [False] * 4 + [True]
    assert grpo.ppo_clipped(rho, -torch.ones(5, dtype=torch.float64), 0.2).tolist() == [True] + [False] * 4
    assert not grpo.ppo_clipped(rho, torch.zeros(5, dtype=torch.float64), 0.2).any()   # A = 0: nothing to clip


def test_per_sequence_advantages_and_shapes_in_the_primitives():
    """ppo_clipped(rho [B, T], adv [B]) broadcast adv along T when B == T (token t got sequence t's advantage) and
    failed with a size mismatch otherwise; importance_ratio / kl_k3 broadcast a [B] or [B, 1] second argument."""
    rho = torch.tensor([[2.0, 2.0], [0.5, 0.5]])                       # B = T = 2
    adv = torch.tensor([1.0, -1.0])                 # seq 0: A > 0, rho > 1.2; seq 1: A < 0, rho < 0.8
    assert grpo.ppo_clipped(rho, adv, 0.2).tolist() == [[True, True], [True, True]]
    assert grpo.ppo_clipped(rho, adv[:, None], 0.2).tolist() == [[True, True], [True, True]]
    assert grpo.ppo_clipped(torch.ones(3, 2) * 2, torch.ones(3), 0.2).all()                  # B != T
    with pytest.raises(ValueError, match=r"rho \(3, 2\) and adv \(2,\)"):
        grpo.ppo_clipped(torch.ones(3, 2), torch.ones(2), 0.2)
    for eps in (None, 0.0, 1.0, 1.5, math.nan):                     # (0, 1) open: eps = 1 clipped nothing below
        with pytest.raises(ValueError, match="clip_eps="):
            grpo.ppo_clipped(rho, adv, eps)
    for f, names in ((importance_ratio, "logp .* and logp_mu"), (grpo.kl_k3, "logp .* and ref_logp")):
        for other in (torch.zeros(2), torch.zeros(2, 1)):
            with pytest.raises(ValueError, match=names):
                f(torch.zeros(2, 2), other)


def test_policy_loss_errors():
    logp, logp_mu, adv, mask = hand_example()
    with pytest.raises(ValueError, match="grad='exact'"):
        policy_loss(logp, logp_mu, adv, mask, variant="base", grad="exact")
    with pytest.raises(ValueError, match="clip_eps=1.5"):
        policy_loss(logp, logp_mu, adv, mask, variant="base", clip_eps=1.5)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp_mu, torch.zeros(3), mask, variant="base")
    with pytest.raises(ValueError, match=r"logp \(2, 3\)"):
        policy_loss(logp, logp_mu[:, :2], adv, mask, variant="base")
    # silently wrong before: an integer logp truncated logp_mu and the advantages to integers; beta NaN dropped the
    # KL term; a negative token_normaliser became 1 and NaN gave a NaN loss; a str was torch's "new(): invalid data
    # type"; a tensor on another device was torch's device error naming no argument
    with pytest.raises(TypeError, match="logp of dtype torch.int64"):
        policy_loss(logp.long(), logp_mu, adv, mask, variant="base")
    with pytest.raises(ValueError, match="beta=nan"):
        policy_loss(logp, logp_mu, adv, mask, variant="base", beta=math.nan, ref_logp=logp_mu)
    for z in (-4, math.nan, math.inf, "4", True):               # True would be the normaliser 1
        with pytest.raises(ValueError, match=f"token_normaliser={z!r}"):
            policy_loss(logp, logp_mu, adv, mask, variant="base", token_normaliser=z)
    for z in (0, 4, 4.0, torch.tensor(4)):                      # 0: an all-empty batch (loss 0)
        policy_loss(logp, logp_mu, adv, mask, variant="base", token_normaliser=z)
    with pytest.raises(ValueError, match="advantages on meta"):
        policy_loss(logp, logp_mu, adv.to("meta"), mask, variant="base")
    with pytest.raises(ValueError, match="logp on meta"):
        offpolicy_stats(logp.to("meta"), logp_mu, mask)


# ---------------------------------------------------------------------------------------------- diagnostics

def test_offpolicy_stats_by_hand():
    logp, logp_mu, adv, mask = hand_example()
    s = offpolicy_stats(logp, logp_mu, mask, adv, variant="retrace")
    # rho over the 5 real tokens = [2, 0.5, 1, 4, 0.25]
    assert close(s["ratio_min"], 0.25) and close(s["ratio_max"], 4.0) and close(s["ratio_mean"], 7.75 / 5)
    assert close(s["trunc_frac"], 2 / 5) and s["clip_frac"] == 0.0           # retrace: rho > 1 at 2 and 4
    # ESS of rho: (7.75)^2 / (5 * (4 + .25 + 1 + 16 + .0625)) = 60.0625 / 106.5625
    assert close(s["ess_ratio"], 60.0625 / 106.5625)
    # ESS of w = [1, .5, 1, 1, .25]: 3.75^2 / (5 * 3.3125)
    assert close(s["ess_weight"], 14.0625 / 16.5625)
    # KL(mu||pi) k1 = mean(-log rho) = -(ln2 - ln2 + 0 + 2ln2 - 2ln2)/5 = 0
    assert close(s["kl_mu_pi"], 0.0)
    # k3 = mean(rho - 1 - log rho) = ((1 - ln2) + (-.5 + ln2) + 0 + (3 - 2ln2) + (-.75 + 2ln2)) / 5 = 2.75 / 5
    assert close(s["kl_mu_pi_k3"], 0.55)
    assert close(s["neg_logp"], (1.0 + 2.0 + 0.5 + 0.3 + 1.5) / 5)
    assert close(s["completion_len"], 2.5) and s["n_tokens"] == 5 and s["n_seqs"] == 2
    assert "entropy" not in s
    s = offpolicy_stats(logp, logp_mu, mask, adv, variant="base", clip_eps=0.2,
                        logits=torch.zeros(2, 3, 4))                       # uniform over 4 -> entropy ln 4
    assert close(s["trunc_frac"], 2 / 5) and close(s["clip_frac"], 2 / 5)
    assert close(s["entropy"], math.log(4.0))
    # entropy at the sampling temperature: logits [0, ln 3] at tau = 0.5 -> p = [0.1, 0.9], H = 0.3250830
    skewed = torch.tensor([0.0, math.log(3.0)]).expand(2, 3, 2)
    assert close(offpolicy_stats(logp, logp_mu, mask, logits=skewed, temperature=0.5)["entropy"], 0.3250830)
    # the eps-clip on the A < 0 side: rho = [0.5, 1] with A = -1 -> only rho = 0.5 < 0.8 is clipped
    lp = torch.tensor([[-LN2, 0.0]])
    s = offpolicy_stats(lp, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([-1.0]),
                        clip_eps=0.2)
    assert close(s["clip_frac"], 0.5) and close(s["trunc_frac"], 0.5)
    # equal weights -> ESS 1; one weight dominating -> 1/n
    m = torch.ones(1, 4, dtype=torch.bool)
    assert close(offpolicy_stats(torch.zeros(1, 4), torch.zeros(1, 4), m)["ess_ratio"], 1.0)
    lp = torch.tensor([[0.0, -50.0, -50.0, -50.0]])
    assert close(offpolicy_stats(lp, torch.zeros(1, 4), m)["ess_ratio"], 0.25)


def test_offpolicy_stats_refuses_mismatched_shapes():
    """offpolicy_stats had no shape check: a [B, 1] ref_logp broadcast into a wrong kl_ref silently, the others failed
    with torch's size-mismatch RuntimeError naming no argument."""
    lp, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for kw, match in [(dict(ref_logp=torch.zeros(2, 1)), r"ref_logp \(2, 1\)"),
                      (dict(logp_mu=torch.zeros(2, 2)), r"logp_mu \(2, 2\)"),
                      (dict(mask=m[:, :1]), r"mask \(2, 1\)"),
                      (dict(advantages=torch.zeros(3), clip_eps=0.2), r"advantages \(3,\)"),
                      (dict(logits=torch.zeros(2, 4, 5)), r"logits \(2, 4, 5\)")]:
        args = {"logp": lp, "logp_mu": torch.zeros(2, 3), "mask": m, **kw}
        with pytest.raises(ValueError, match=match):
            offpolicy_stats(args.pop("logp"), args.pop("logp_mu"), args.pop("mask"), **args)


def test_reward_stats_by_hand():
    R = torch.tensor([1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 0., 0.])
    s = reward_stats(R, 4)
    assert close(s["reward_mean"], 6 / 12)
    assert close(s["zero_std_frac"], 2 / 3)                               # groups 2 and 3 have all-equal rewards
    assert close(s["reward_std"], math.sqrt(12 * 0.25 / 11))             # unbiased std of six 1s and six 0s


# ---------------------------------------------------------------------------------------------- Monte-Carlo

def test_monte_carlo_base_unbiased_retrace_biased_lower_variance():
    """Toy categorical policy pi = softmax(theta) over K = 4 actions, behaviour mu != pi (full support), reward r.

    Each sample a ~ mu is a one-token completion with advantage r_a; -d loss / d theta of the token-mean loss is the
    mean of the per-sample estimates f(rho_a) r_a grad log pi(a). Base's mean must match the exact gradient
    grad_theta E_pi[r] (within 5 standard errors); Retrace's mean matches its own exact expectation
    sum_a min(mu_a, pi_a) r_a grad log pi(a), which is far from the truth, with lower per-sample variance.
    """
    theta = torch.tensor([0.5, -0.3, 1.0, 0.0], dtype=torch.float64)
    theta_mu = torch.tensor([0.0, 0.8, -0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 2.0, -0.5], dtype=torch.float64)
    pi, mu = theta.softmax(0), theta_mu.softmax(0)

    th = theta.clone().requires_grad_()
    (th.softmax(0) * r).sum().backward()                                 # exact: grad_theta sum_a pi_a r_a
    true_grad = th.grad.clone()

    n = 100_000
    actions = torch.multinomial(mu, n, replacement=True, generator=torch.Generator().manual_seed(0))

    def per_sample_grads(variant):
        Th = theta.repeat(n, 1).requires_grad_()                       # one copy of theta per sample [n, K]
        logp = torch.log_softmax(Th, -1).gather(1, actions[:, None])    # [n, 1]
        logp_mu = torch.log(mu)[actions][:, None]                       # [n, 1]
        loss, _ = policy_loss(logp, logp_mu, r[actions], torch.ones(n, 1, dtype=torch.bool), variant=variant)
        loss.backward()
        return -n * Th.grad                                             # [n, K] per-sample ascent directions

    g_base, g_ret = per_sample_grads("base"), per_sample_grads("retrace")
    se_base, se_ret = g_base.std(0) / math.sqrt(n), g_ret.std(0) / math.sqrt(n)
    assert ((g_base.mean(0) - true_grad).abs() < 5 * se_base).all()      # Base: unbiased

    score = torch.eye(4, dtype=torch.float64) - pi                        # row a: grad log pi(a) = e_a - pi
    ret_expect = (torch.minimum(mu, pi)[:, None] * r[:, None] * score).sum(0)
    assert ((g_ret.mean(0) - ret_expect).abs() < 5 * se_ret).all()        # Retrace: estimates its own target ...
    assert ((g_ret.mean(0) - true_grad).abs() > 20 * se_ret).any()         # ... which is not the true gradient
    assert g_ret.var(0).sum() < 0.5 * g_base.var(0).sum()                 # ... with lower variance


def test_per_token_base_is_unbiased_only_for_one_token_completions():
    """What Base estimates when a completion has several tokens. Toy two-token completions: y1 ~ softmax(theta1),
    y2 | y1 ~ softmax(theta2[y1]) under pi; mu has other logits at both steps; reward r(y1, y2); A = r.

    The loss weights each token by its own ratio rho_t = pi(y_t | s_t) / mu(y_t | s_t) (the paper, TRL): that
    corrects the action at s_t, not the prefix mu generated nor the later tokens the reward depends on. So its
    expectation, E_mu[sum_t rho_t A grad log pi_t] (enumerated exactly here, without grpo), is not the on-policy
    gradient grad E_pi[r] = E_mu[rho_1 rho_2 A sum_t grad log pi_t]: Base is unbiased for one-token completions
    (test_monte_carlo_base_unbiased_retrace_biased_lower_variance), a biased per-token estimator for longer ones,
    as PPO / GRPO's token-level ratios are. Checked: the mean over 100,000 sampled sequences of grpo.policy_loss's
    per-sequence gradient matches the enumerated per-token expectation (5 standard errors) and misses the true
    gradient by far more."""
    K = 3
    g = torch.Generator().manual_seed(0)
    theta1 = torch.randn(K, generator=g, dtype=torch.float64)
    theta2 = torch.randn(K, K, generator=g, dtype=torch.float64)
    mu1 = torch.randn(K, generator=g, dtype=torch.float64).softmax(0)
    mu2 = torch.randn(K, K, generator=g, dtype=torch.float64).softmax(1)
    r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)

    t1, t2 = theta1.clone().requires_grad_(), theta2.clone().requires_grad_()
    logpi1, logpi2 = t1.log_softmax(0), t2.log_softmax(1)                      # [K], [K, K]
    grads = lambda f: torch.cat([x.flatten() for x in torch.autograd.grad(f, (t1, t2), retain_graph=True)])
    true_grad = grads((logpi1[:, None].exp() * logpi2.exp() * r).sum())     # exact grad of E_pi[r]
    rho1, rho2 = logpi1.detach().exp() / mu1, logpi2.detach().exp() / mu2
    # exact per-token expectation:
    #   sum_{a,b} mu(a) mu(b|a) r(a,b) [rho1(a) grad log pi1(a) + rho2(b|a) grad log pi2(b|a)]
    per_token = grads((mu1[:, None] * mu2 * r * (rho1[:, None] * logpi1[:, None] + rho2 * logpi2)).sum())

    n = 100_000
    y1 = torch.multinomial(mu1, n, replacement=True, generator=g)
    y2 = torch.multinomial(mu2[y1], 1, generator=g)[:, 0]
    T1, T2 = theta1.repeat(n, 1).requires_grad_(), theta2.repeat(n, 1, 1).requires_grad_()   # per-sample copies
    logp = torch.stack([T1.log_softmax(1).gather(1, y1[:, None])[:, 0],
                        T2[torch.arange(n), y1].log_softmax(1).gather(1, y2[:, None])[:, 0]], 1)   # [n, 2]
    logp_mu = torch.stack([mu1.log()[y1], mu2.log()[y1, y2]], 1)
    loss, _ = policy_loss(logp, logp_mu, r[y1, y2], torch.ones(n, 2, dtype=torch.bool), variant="base")
    loss.backward()                                                  # token mean: L = -(1/2n) sum_i sum_t ...
    per_sample = -2 * n * torch.cat([T1.grad, T2.grad.flatten(1)], 1)       # [n, K + K*K] ascent directions
    mean, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    assert ((mean - per_token).abs() < 5 * se + 1e-12).all()                 # grpo computes the per-token estimator
    assert ((per_token - true_grad).abs() > 20 * se).any()                  # ... which is not the true gradient

