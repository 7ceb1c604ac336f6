import math

import torch

from analysis.evaluation.metrics import (
    ReconstructionStats,
    ce_loss_recovered,
    cross_entropy,
    dead_fraction,
    dense_fraction,
    fvu,
    kl_per_token,
    l0,
    repetition_rate,
)


def test_fvu_is_relative_to_the_mean_not_zero():
    x = torch.tensor([[1.0, 10.0], [3.0, 10.0]])  # mean (2, 10); variance about mean = 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 10.0], [2.0, 10.0]])  # error = 1
    assert math.isclose(fvu(x, x_hat), 0.5)


def test_streaming_stats_match_the_batch_formula():
    x, x_hat = torch.randn(100, 4) + 3, torch.randn(100, 4)
    f = torch.relu(torch.randn(100, 6))
    stats = ReconstructionStats(6)
    stats.update(x[:37], x_hat[:37], f[:37])
    stats.update(x[37:], x_hat[37:], f[37:])
    assert math.isclose(stats.fvu, fvu(x, x_hat), rel_tol=1e-9)
    assert math.isclose(stats.l0, l0(f), rel_tol=1e-6)


def test_l0_dead_dense():
    f = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])
    assert l0(f) == 1.5
    counts = (f != 0).sum(0)
    assert math.isclose(dead_fraction(counts), 1 / 3)
    assert math.isclose(dense_fraction(counts, n_tokens=2, threshold=0.6), 1 / 3)  # only feature 1 fires on >60%


def test_ce_loss_recovered_by_hand():
    assert math.isclose(ce_loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0), 0.9)


def test_cross_entropy_and_kl_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    tokens = torch.tensor([[0, 1]])
    assert torch.allclose(cross_entropy(logits, tokens), torch.tensor([[math.log(2)]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.25, 0.75]]]))
    kl = kl_per_token(logits, q)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert torch.allclose(kl[0, 0], torch.tensor(expected), atol=1e-6) and abs(kl[0, 1]) < 1e-6


def test_repetition_rate_by_hand():
    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0
    # trigrams of 1 2 3 1 2 3: (123)(231)(312)(123) -> 3 unique of 4
    assert math.isclose(repetition_rate([1, 2, 3, 1, 2, 3]), 0.25)
    assert math.isclose(repetition_rate([7] * 6, n=2), 0.8)  # 5 bigrams, 1 unique
    assert math.isnan(repetition_rate([1, 2]))


def test_registered_held_out_metrics_reach_the_eval_result():
    from analysis.evaluation.metrics import HELD_OUT_METRICS, ReconstructionStats, ultralow_fraction

    stats = ReconstructionStats(4)
    stats.n, stats.fire_counts = 1_000_000, torch.tensor([0, 5, 50, 500_000])  # dead, ultralow, rare, dense
    assert ultralow_fraction(stats) == 1 / 4  # by hand: one of four features fires on 5 of 1M tokens (< 10 per 1M)
    assert HELD_OUT_METRICS["ultralow_fraction"] is ultralow_fraction
