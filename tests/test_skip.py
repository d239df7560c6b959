"""Layer skipping (nested_reft.py, Definitions 1-3): k, the valid set, uniform masks, the seeded sampler, errors."""
import itertools

import pytest
import torch

from nested_reft import SkipSampler, draw_skip_mask, num_skipped, skipped_layers, valid_layers


def test_k_for_the_paper_settings():
    # Table 1 (N = 28): r = 5 % -> 1.4 -> 1, 10 % -> 2.8 -> 3, 15 % -> 4.2 -> 4
    assert [num_skipped(r, 28) for r in (0.0, 0.05, 0.10, 0.15)] == [0, 1, 3, 4]
    assert 0.1 * 28 == 2.8000000000000003 and num_skipped(0.1, 28) == 3


def test_k_rounding_is_decimal_and_half_up():
    assert num_skipped(0.125, 20) == 3        # exactly 2.5 -> up (Python's round() would give 2)
    assert num_skipped(0.125, 28) == 4        # 3.5 -> 4
    assert 0.58 * 25 == 14.499999999999998    # float noise below the half ...
    assert num_skipped(0.58, 25) == 15        # ... but 0.58 * 25 = 14.5 -> 15
    assert num_skipped(0.02, 28) == 1         # 0.56 -> 1
    assert num_skipped(0.01, 28) == 0         # 0.28 -> 0


def test_valid_set():
    # N = 28, e = 1: paper layers 2..27 = 0-based 1..26, |V| = 26
    assert valid_layers(28, 1) == list(range(1, 27))
    assert valid_layers(28, 0) == list(range(28))
    assert valid_layers(6, 2) == [2, 3]
    assert valid_layers(4, 2) == []


@pytest.mark.parametrize("ratio, k", [(0.05, 1), (0.10, 3), (0.15, 4)])
def test_masks_have_k_valid_layers_and_never_touch_the_border(ratio, k):
    g = torch.Generator().manual_seed(0)
    for border in (1, 3):
        for _ in range(300):
            mask = draw_skip_mask(28, ratio, border, g)
            assert len(mask) == 28 and sum(mask) == k
            assert not any(mask[:border]) and not any(mask[28 - border:])
            assert set(skipped_layers(mask)) <= set(valid_layers(28, border))


def test_k_equal_to_the_valid_set_is_allowed():
    # k = |V| is the largest legal k: every valid layer is skipped, the border layers are kept
    g = torch.Generator().manual_seed(0)
    assert draw_skip_mask(4, 0.5, 1, g) == [False, True, True, False]          # k = 2 = |{1, 2}|
    assert SkipSampler(28, 0.5, 7, seed=0).next() == [False] * 7 + [True] * 14 + [False] * 7   # k = 14 = |V|


def test_r0_skips_nothing_and_draws_nothing():
    g = torch.Generator().manual_seed(5)
    before = g.get_state().clone()
    assert draw_skip_mask(28, 0.0, 0, g) == [False] * 28
    assert torch.equal(g.get_state(), before)


def test_every_valid_layer_skipped_with_frequency_k_over_V():
    # N = 28, e = 1, r = 0.15: k = 4, |V| = 26, p = 4/26 per layer. n = 20000 draws, fixed seed.
    # Counts per layer ~ Binomial(n, p): mean 3076.9, sd 51.0. Chi-square over the 26 layers (about 25 dof,
    # mean 25, sd ~7) must stay below 80; every layer within 5 sd; border layers never.
    n, p = 20_000, 4 / 26
    sampler = SkipSampler(28, 0.15, 1, seed=0)
    counts = torch.zeros(28)
    for _ in range(n):
        counts += torch.tensor(sampler.next(), dtype=torch.float32)
    assert counts[0] == 0 and counts[27] == 0
    c = counts[1:27]
    expect, sd = n * p, (n * p * (1 - p)) ** 0.5
    assert ((c - expect).abs() < 5 * sd).all()
    assert ((c - expect) ** 2 / expect).sum() < 80


def test_skip_set_is_a_uniform_subset():
    # N = 6, e = 1: V = {1, 2, 3, 4}, r = 0.34 -> k = round(2.04) = 2: the 6 pairs must be equally likely.
    # n = 12000 draws: 2000 expected per pair; chi-square with 5 dof must stay below 30 (p ~ 1e-5).
    g = torch.Generator().manual_seed(1)
    pairs = {pair: 0 for pair in itertools.combinations(range(1, 5), 2)}
    n = 12_000
    for _ in range(n):
        pairs[tuple(skipped_layers(draw_skip_mask(6, 0.34, 1, g)))] += 1
    assert sum(pairs.values()) == n
    assert sum((c - n / 6) ** 2 / (n / 6) for c in pairs.values()) < 30


def test_sampler_is_seeded_and_leaves_global_rng_alone():
    a, b, c = SkipSampler(28, 0.1, 1, seed=7), SkipSampler(28, 0.1, 1, seed=7), SkipSampler(28, 0.1, 1, seed=8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    seq_a = [a.next() for _ in range(20)]
    assert torch.equal(torch.get_rng_state(), state)                 # global RNG untouched
    assert seq_a == [b.next() for _ in range(20)]
    assert seq_a != [c.next() for _ in range(20)]
    assert len({tuple(m) for m in seq_a}) > 1                         # redrawn every step
    for bad in (1.7, "7", None, True):                                # 1.7 was seed 1, silently
        with pytest.raises(TypeError, match="seed=.*expected an int"):
            SkipSampler(28, 0.1, 1, seed=bad)
    assert SkipSampler(28, 0.1, 1, seed=torch.tensor(7)).next() == SkipSampler(28, 0.1, 1, seed=7).next()


def test_sampler_state_dict_round_trip(tmp_path):
    s = SkipSampler(28, 0.15, 1, seed=3)
    for _ in range(5):
        s.next()
    state = s.state_dict()
    expected = [s.next() for _ in range(10)]                          # the uninterrupted run
    resumed = SkipSampler(28, 0.15, 1, seed=999)
    resumed.load_state_dict(state)
    assert resumed.draws == 5 and resumed.seed == 3
    assert [resumed.next() for _ in range(10)] == expected
    # the saved state is a copy: drawing more did not change it
    again = SkipSampler(28, 0.15, 1, seed=0)
    again.load_state_dict(state)
    assert [again.next() for _ in range(10)] == expected
    # through a checkpoint file (torch.save, then a weights-only torch.load) too
    torch.save(state, tmp_path / "skip.pt")
    loaded = SkipSampler(28, 0.15, 1, seed=0)
    loaded.load_state_dict(torch.load(tmp_path / "skip.pt", weights_only=True))
    assert [loaded.next() for _ in range(10)] == expected
    other = SkipSampler(28, 0.10, 1, seed=3)
    with pytest.raises(ValueError, match="ratio=0.15"):
        other.load_state_dict(state)


def test_errors_name_the_value():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"r=1\.0.*\[0, 1\)"):
        num_skipped(1.0, 28)
    with pytest.raises(ValueError, match=r"r=-0\.1"):
        num_skipped(-0.1, 28)
    with pytest.raises(ValueError, match=r"r=nan"):
        num_skipped(float("nan"), 28)
    with pytest.raises(ValueError, match=r"r='0\.1'"):
        num_skipped("0.1", 28)
    with pytest.raises(ValueError, match=r"e=-1"):
        valid_layers(28, -1)
    with pytest.raises(ValueError, match=r"N=0"):
        valid_layers(0, 0)
    with pytest.raises(ValueError, match=r"k=round\(r\*N\)=2.*\|V\|=N-2e=0"):
        draw_skip_mask(4, 0.5, 2, g)
    with pytest.raises(ValueError, match=r"k=round\(r\*N\)=14.*\|V\|=N-2e=12"):
        SkipSampler(28, 0.5, 8, seed=0)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        draw_skip_mask(28, 0.1, 1, generator=None)


def test_sampler_state_of_other_skip_settings_is_refused():
    """A checkpoint's sampler state drawn for another N or border e is refused, naming the setting (its masks would
    not be this run's); the same settings load whatever the seed."""
    state = SkipSampler(28, 0.1, 1, seed=3).state_dict()
    with pytest.raises(ValueError, match="border=1 but this run has border=2"):
        SkipSampler(28, 0.1, 2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="n_layers=28 but this run has n_layers=24"):
        SkipSampler(24, 0.1, 1, seed=3).load_state_dict(state)
    SkipSampler(28, 0.1, 1, seed=4).load_state_dict(state)
