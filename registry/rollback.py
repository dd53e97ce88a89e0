"""Automatic rollback of a challenger that users like less than the champion, and manual rollback.

The guard runs in a thread of the worker. Every ``interval_s`` it compares the online metrics of
the two arms (feedback/online.py: CTR@10 with anytime-valid bounds, so checking this often does
not inflate the false-alarm rate), over the same period: the champion's counters are taken from
the moment the guard first saw this challenger, so traffic before the canary started (another
season, another mix of queries) does not count. When the challenger is worse, it removes the ``challenger``
alias, tags the version with the reason, and wakes the alias follower so that the challenger's
share of traffic returns to the champion at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from prometheus_client import Counter

from feedback.online import ArmStats, Verdict, challenger_verdict
from registry.models import PREVIOUS_CHAMPION_TAG, ROLLBACK_TAG, ModelRegistry, version_uri
from search.serving import CHALLENGER, CHAMPION, ServedModels

log = logging.getLogger(__name__)

ROLLBACKS = Counter("autoglm_rollbacks", "Versions taken out of serving, by arm and cause", ["arm", "cause"])

OnlineStats = Callable[[], dict[tuple[str, str], ArmStats]]  # (version, arm) -> stats


class CanaryGuard:
    def __init__(self, registry: ModelRegistry, models: ServedModels, online: OnlineStats,
                 on_rollback: Callable[[], None], alpha: float = 0.05, min_impressions: int = 50,
                 interval_s: float = 2.0):
        self.registry, self.models, self.online, self.on_rollback = registry, models, online, on_rollback
        self.alpha, self.min_impressions, self.interval_s = alpha, min_impressions, interval_s
        self.last_verdict: Verdict | None = None
        # (challenger, champion) -> both arms' counters when the guard first saw this pair
        self._baseline: tuple[tuple[str, str], ArmStats, ArmStats] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary-guard", daemon=True)

    def start(self) -> "CanaryGuard":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def check(self) -> Verdict | None:
        """Roll the challenger back if it is worse; returns the verdict (None: nothing to compare)."""
        challenger, champion = self.models.challenger, self.models.champion
        if challenger is None:
            return None
        stats = self.online()
        champion_stats = stats.get((champion.version, CHAMPION), ArmStats())
        challenger_stats = stats.get((challenger.version, CHALLENGER), ArmStats())
        pair = (challenger.version, champion.version)
        if self._baseline is None or self._baseline[0] != pair:
            self._baseline = (pair, champion_stats, challenger_stats)
        verdict = challenger_verdict(champion_stats.since(self._baseline[1]),
                                     challenger_stats.since(self._baseline[2]), self.alpha, self.min_impressions)
        self.last_verdict = verdict
        if verdict.worse:
            version = self.registry.version_for(CHALLENGER)
            if version is not None and version_uri(version) == challenger.version:
                self.registry.delete_alias(CHALLENGER)
                self.registry.tag_version(version, ROLLBACK_TAG, f"automatic: {verdict.reason}")
                ROLLBACKS.labels(CHALLENGER, "automatic").inc()
                log.warning("challenger version %s rolled back: %s", version, verdict.reason)
                self.on_rollback()
        return verdict

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # MLflow unreachable: try again at the next tick
                log.exception("canary check failed")


def roll_back(registry: ModelRegistry, reason: str = "manual") -> str:
    """Take the serving version out: the challenger when there is one, else the champion, whose
    alias goes back to the version it replaced (the base model when none). Returns what it did."""
    challenger = registry.version_for(CHALLENGER)
    if challenger is not None:
        registry.delete_alias(CHALLENGER)
        registry.tag_version(challenger, ROLLBACK_TAG, reason)
        ROLLBACKS.labels(CHALLENGER, "manual").inc()
        return f"challenger version {challenger} removed; the champion serves all traffic"
    champion = registry.version_for(CHAMPION)
    if champion is None:
        raise LookupError("nothing to roll back: no challenger, and the base model is the champion")
    previous = registry.version_tags(champion).get(PREVIOUS_CHAMPION_TAG, "base")
    registry.tag_version(champion, ROLLBACK_TAG, reason)
    if previous == "base":
        registry.delete_alias(CHAMPION)
    else:
        registry.set_alias(CHAMPION, previous)
    ROLLBACKS.labels(CHAMPION, "manual").inc()
    return f"champion version {champion} replaced by {'the base model' if previous == 'base' else f'version {previous}'}"
