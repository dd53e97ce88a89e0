"""Online metrics per model version and arm, counted from settled interactions.

An interaction counts once, in the metrics of the arm that answered it (feedback/online.py),
when the join hands it on as settled, ``online_settle_s`` after it opened: counting an
impression before its clicks could arrive would bias the arm with the most recent traffic (a
new challenger) downwards. Feedback after that still makes examples but no longer changes the
online metrics. The counts live in the Faust table ``arm_stats`` (streams/feedback.py), keyed
``version|arm``, so they survive a restart; they are shown as gauges, with the bounds of their
anytime-valid interval, and read by the rollback guard and the board through ``online()``.
"""

from __future__ import annotations

import logging
from typing import MutableMapping

from prometheus_client import Gauge

from feedback.join import Interaction
from feedback.online import METRICS, RANKS, ArmStats

log = logging.getLogger(__name__)

ONLINE = Gauge("autoglm_online_metric", "Online metrics per model version and arm, with the bounds of "
               "their anytime-valid confidence interval", ["version", "arm", "metric", "stat"])
ONLINE_IMPRESSIONS = Gauge("autoglm_online_impressions", "Impressions joined per model version and arm",
                           ["version", "arm"])


class OnlineMetrics:
    def __init__(self, arm_stats: MutableMapping, alpha: float):
        self.arm_stats, self.alpha = arm_stats, alpha
        self._online: dict[tuple[str, str], ArmStats] = {}

    def online(self) -> dict[tuple[str, str], ArmStats]:
        """(model version, arm) -> online metrics so far; a copy, safe to read from other threads."""
        return dict(self._online)

    def publish_restored(self) -> None:
        """After a restart, before anything is counted: show what the table holds."""
        if not self._online and self.arm_stats:
            for key in list(self.arm_stats.keys()):
                self._publish(*key.split("|", 1), self._read(key))

    def count(self, interaction: Interaction) -> None:
        """Fold a settled interaction into its arm's metrics: one impression, its first click in
        the top 10 (by time), whether it was skipped."""
        impression = interaction.impression
        key = f"{impression.model_version}|{impression.arm}"
        stats = self._read(key)
        stats.impressions += 1
        events = interaction.events
        first_click = next((e for e in events if e.type == "click" and e.position <= RANKS), None)
        if first_click:
            stats.clicked += 1
            stats.reciprocal_rank_sum += 1.0 / first_click.position
        stats.skipped += any(e.type == "skip" for e in events)
        self.arm_stats[key] = stats.to_dict()
        self._publish(impression.model_version, impression.arm, stats)

    def _read(self, key: str) -> ArmStats:
        """The arm's counts so far; a record that cannot be read (another version wrote it) starts afresh."""
        counts = self.arm_stats.get(key) or {}
        try:
            return ArmStats(**counts)
        except TypeError:
            log.warning("online metrics of %r unreadable: %.200r; counting afresh", key, counts)
            return ArmStats()

    def _publish(self, version: str, arm: str, stats: ArmStats) -> None:
        self._online[(version, arm)] = stats
        ONLINE_IMPRESSIONS.labels(version, arm).set(stats.impressions)
        for metric in METRICS:
            low, high = stats.bounds(metric, self.alpha)
            for stat, value in (("value", stats.mean(metric)), ("lower", low), ("upper", high)):
                ONLINE.labels(version, arm, metric, stat).set(value)
