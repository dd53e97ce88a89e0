"""Per-arm online metrics and the rollback verdict: anytime-valid, so checking after every event
neither misses a worse challenger nor raises alarms on an equal one."""

from __future__ import annotations

import numpy as np

from feedback.online import ArmStats, challenger_verdict, confidence_radius


def observe(stats: ArmStats, clicked: bool, rank: int = 1, skipped: bool = False) -> None:
    stats.impressions += 1
    stats.clicked += clicked
    stats.reciprocal_rank_sum += 1.0 / rank if clicked else 0.0
    stats.skipped += skipped


def test_metrics_and_intervals():
    stats = ArmStats()
    assert np.isnan(stats.mean("ctr@10")) and stats.bounds("ctr@10", 0.05) == (0.0, 1.0)
    for n in range(200):
        observe(stats, clicked=n % 2 == 0, rank=2, skipped=n % 4 == 1)
    assert stats.mean("ctr@10") == 0.5 and stats.mean("mrr") == 0.25 and stats.mean("skip_rate") == 0.25
    low, high = stats.bounds("ctr@10", 0.05)
    assert low < 0.5 < high and high - low < 0.5
    assert confidence_radius(10_000, 0.05) < confidence_radius(1_000, 0.05) < confidence_radius(100, 0.05)
    summary = stats.summary(0.05)
    assert summary["impressions"] == 200 and summary["mrr"]["value"] == 0.25


def run(champion_ctr: float, challenger_ctr: float, rng: np.random.Generator, steps: int = 3000,
        challenger_share: float = 0.2) -> int | None:
    """Impressions until the verdict first says worse (checked after every one), or None."""
    champion, challenger = ArmStats(), ArmStats()
    for step in range(steps):
        if rng.random() < challenger_share:
            observe(challenger, rng.random() < challenger_ctr)
        else:
            observe(champion, rng.random() < champion_ctr)
        if challenger_verdict(champion, challenger, alpha=0.05, min_impressions=50).worse:
            return step + 1
    return None


def test_an_equal_challenger_is_not_rolled_back_however_often_it_is_checked():
    rng = np.random.default_rng(1)
    alarms = sum(run(0.4, 0.4, rng) is not None for _ in range(200))
    assert alarms <= 4  # alpha is 5%; the bound is conservative, so it should be far below that


def test_a_worse_challenger_is_rolled_back():
    rng = np.random.default_rng(2)
    detected = [run(0.6, 0.2, rng) for _ in range(50)]
    assert all(step is not None for step in detected)
    assert np.median(detected) < 1500
    verdict = challenger_verdict(ArmStats(1000, 600, 400.0, 0), ArmStats(300, 60, 40.0, 0))
    assert verdict.worse and "ctr@10: challenger 0.200" in verdict.reason
    too_early = challenger_verdict(ArmStats(1000, 600, 400.0, 0), ArmStats(20, 0, 0.0, 0))
    assert not too_early.worse and "too few impressions" in too_early.reason
