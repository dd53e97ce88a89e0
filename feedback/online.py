"""Online metrics per serving arm, from joined impressions and feedback, with anytime-valid bounds.

Per (model version, arm), over impressions:
- ``ctr@10``: share of impressions with a click in the top 10;
- ``mrr``: mean reciprocal rank of the first click (0 without a click in the top 10);
- ``skip_rate``: share of impressions with a ``skip`` event.

Each impression counts once per metric, whatever the number of feedback events on it. All three
are means of values in [0, 1], so one bound serves them all: a confidence sequence (Howard et
al., 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", the stitched
boundary for 1/2-sub-Gaussian observations). Unlike a fixed-n interval it stays valid however
often it is looked at, so the rollback check can run after every event without inflating its
error rate:

    radius(n) = 0.85 * sqrt((log log(2n) + 0.72 log(5.2 / alpha)) / n)   (one-sided; n >= 2, else 1)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RANKS = 10  # CTR@10 and the reciprocal rank count clicks in the top 10 only
METRICS = ("ctr@10", "mrr", "skip_rate")


@dataclass
class ArmStats:
    impressions: int = 0
    clicked: int = 0
    reciprocal_rank_sum: float = 0.0
    skipped: int = 0

    def mean(self, metric: str) -> float:
        if not self.impressions:
            return float("nan")
        total = {"ctr@10": self.clicked, "mrr": self.reciprocal_rank_sum, "skip_rate": self.skipped}[metric]
        return total / self.impressions

    def bounds(self, metric: str, alpha: float) -> tuple[float, float]:
        """An anytime-valid (1 - alpha) confidence interval of the metric's mean (alpha / 2 per
        side), clipped to [0, 1]."""
        mean, radius = self.mean(metric), confidence_radius(self.impressions, alpha / 2)
        if math.isnan(mean):
            return 0.0, 1.0
        return max(0.0, mean - radius), min(1.0, mean + radius)

    def summary(self, alpha: float) -> dict:
        return {"impressions": self.impressions,
                **{metric: {"value": self.mean(metric), "interval": list(self.bounds(metric, alpha))}
                   for metric in METRICS}}

    def to_dict(self) -> dict:
        return asdict(self)

    def since(self, earlier: "ArmStats") -> "ArmStats":
        """What was observed after ``earlier`` (a snapshot of the same counters)."""
        return ArmStats(self.impressions - earlier.impressions, self.clicked - earlier.clicked,
                        self.reciprocal_rank_sum - earlier.reciprocal_rank_sum, self.skipped - earlier.skipped)


def confidence_radius(n: int, alpha: float) -> float:
    """One-sided radius (error alpha) of the stitched confidence sequence for means of [0, 1]
    values after n of them. log log(2n) is at least the paper's log log(n / 2): conservative."""
    if n < 2:
        return 1.0
    return 0.85 * math.sqrt((math.log(math.log(2 * n)) + 0.72 * math.log(5.2 / alpha)) / n)


@dataclass(frozen=True)
class Verdict:
    worse: bool
    reason: str


def challenger_verdict(champion: ArmStats, challenger: ArmStats, alpha: float = 0.05,
                       min_impressions: int = 50, metric: str = "ctr@10",
                       names: tuple[str, str] = ("challenger", "champion")) -> Verdict:
    """Worse when the challenger's upper bound is below the champion's lower bound, each one-sided
    at alpha / 2, so an equal challenger is called worse with probability at most alpha, ever.
    ``names`` are the two sides' names in the reason (a new champion against its predecessor, say)."""
    candidate, reference = names
    if min(champion.impressions, challenger.impressions) < min_impressions:
        return Verdict(False, f"too few impressions ({challenger.impressions} {candidate}, "
                              f"{champion.impressions} {reference}; {min_impressions} needed)")
    _, challenger_high = challenger.bounds(metric, alpha)
    champion_low, _ = champion.bounds(metric, alpha)
    worse = challenger_high < champion_low
    return Verdict(worse, f"{metric}: {candidate} {challenger.mean(metric):.3f} (upper bound {challenger_high:.3f}) "
                          f"{'<' if worse else '>='} {reference} {champion.mean(metric):.3f} (lower bound "
                          f"{champion_low:.3f}) after {challenger.impressions} / {champion.impressions} impressions")
