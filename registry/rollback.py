"""Automatic rollback of a version users like less, and manual rollback.

The guard runs in a thread of the worker and makes two checks every ``interval_s``, both on
the online metrics of feedback/online.py (CTR@10 with anytime-valid bounds, so checking this
often does not inflate the false-alarm rate):

- **Challenger against champion**, over the same period: the champion's counters are taken
  from the moment the guard first saw this challenger, so traffic before the canary started
  (another season, another mix of queries) does not count. When the challenger is worse, the
  ``challenger`` alias is removed.
- **A new champion against its predecessor**, during its first ``champion_watch`` impressions
  after a promotion the alias follower saw happen (not a rollback, not the start-up): the
  predecessor's counters are those of its whole time as champion in this worker. When the new
  one is worse, ``champion`` goes back to the predecessor. The two periods differ, so a change
  in traffic can look like a worse model; the watch is short and the bar (disjoint 95% bounds) high.

Either way (and for a manual rollback) the version is tagged with the reason before its alias
moves: whoever sees the alias gone finds the reason, and a failure in between is retried. The
alias follower is then woken so that serving follows at once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from prometheus_client import Counter

from feedback.online import ArmStats, Verdict, challenger_verdict
from registry.models import PREVIOUS_CHAMPION_TAG, ROLLBACK_TAG, ModelRegistry, registry_version, version_uri
from search.serving import CHALLENGER, CHAMPION, ServedModels

log = logging.getLogger(__name__)

ROLLBACKS = Counter("autoglm_rollbacks", "Versions taken out of serving, by arm and cause", ["arm", "cause"])

OnlineStats = Callable[[], dict[tuple[str, str], ArmStats]]  # (version, arm) -> stats


@dataclass(frozen=True)
class _ChampionWatch:
    """A promotion the follower saw: the new champion, the one it replaced, and the new one's
    champion counters at that moment (it may have been champion before)."""

    champion: str
    predecessor: str
    baseline: ArmStats


class RollbackGuard:
    def __init__(self, registry: ModelRegistry, models: ServedModels, online: OnlineStats,
                 on_rollback: Callable[[], None], alpha: float = 0.05, min_impressions: int = 50,
                 champion_watch: int = 1000, interval_s: float = 2.0, active: Callable[[], bool] = lambda: True):
        """``active``: whether this process is the one learner that counts the arms (a standby's
        counts are stale, so it must not judge them)."""
        self.registry, self.models, self.online, self.on_rollback = registry, models, online, on_rollback
        self.active = active
        self.alpha, self.min_impressions, self.interval_s = alpha, min_impressions, interval_s
        if 0 < champion_watch < min_impressions:
            raise ValueError(f"a champion watch of {champion_watch} impressions ends before the "
                             f"{min_impressions} a comparison needs")
        self.champion_watch = champion_watch  # impressions of a new champion to watch; 0: none
        self.last_verdict: Verdict | None = None  # challenger against champion
        self.last_champion_verdict: Verdict | None = None  # new champion against its predecessor
        # (challenger, champion) -> both arms' counters when the guard first saw this pair
        self._baseline: tuple[tuple[str, str], ArmStats, ArmStats] | None = None
        self._watch: _ChampionWatch | None = None
        self._watch_lock = threading.Lock()  # promoted() runs in the follower's thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollback-guard", daemon=True)

    def start(self) -> "RollbackGuard":
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
                _retire_challenger(self.registry, version, f"automatic: {verdict.reason}")
                ROLLBACKS.labels(CHALLENGER, "automatic").inc()
                log.warning("challenger version %s rolled back: %s", version, verdict.reason)
                self.on_rollback()
        return verdict

    def promoted(self, champion: str, predecessor: str) -> None:
        """The follower swapped in a promoted champion: watch it (a promotion listener)."""
        if self.champion_watch > 0:
            baseline = self.online().get((champion, CHAMPION), ArmStats())
            with self._watch_lock:
                self._watch = _ChampionWatch(champion, predecessor, baseline)

    def check_champion(self) -> Verdict | None:
        """Put the predecessor back if the champion being watched is worse than it was; returns
        the verdict (None: no promotion being watched)."""
        with self._watch_lock:
            watch = self._watch
        if watch is None:
            return None
        if self.models.champion.version != watch.champion:  # the alias moved on meanwhile
            self._end_watch(watch)
            return None
        stats = self.online()
        fresh = stats.get((watch.champion, CHAMPION), ArmStats()).since(watch.baseline)
        verdict = challenger_verdict(stats.get((watch.predecessor, CHAMPION), ArmStats()), fresh, self.alpha,
                                     self.min_impressions, names=("new champion", "its predecessor"))
        self.last_champion_verdict = verdict
        if verdict.worse:
            self._restore_predecessor(watch, verdict)
        elif fresh.impressions >= self.champion_watch:
            log.info("champion %s kept after %d impressions: %s", watch.champion, fresh.impressions, verdict.reason)
            self._end_watch(watch)
        return verdict

    def _end_watch(self, watch: _ChampionWatch) -> None:
        with self._watch_lock:
            if self._watch is watch:  # not a newer promotion's
                self._watch = None

    def _restore_predecessor(self, watch: _ChampionWatch, verdict: Verdict) -> None:
        """Move ``champion`` back; the watch ends only once that is done, so a failure is retried
        at the next tick."""
        version = self.registry.version_for(CHAMPION)
        predecessor = registry_version(watch.predecessor)
        if (version is None or version_uri(version) != watch.champion  # a person moved the alias: theirs is newer
                or (predecessor and ROLLBACK_TAG in self.registry.version_tags(predecessor))):
            self._end_watch(watch)
            return
        _replace_champion(self.registry, version, f"automatic: {verdict.reason}", predecessor)
        self._end_watch(watch)
        ROLLBACKS.labels(CHAMPION, "automatic").inc()
        log.warning("champion version %s replaced by its predecessor %s: %s",
                    version, watch.predecessor, verdict.reason)
        self.on_rollback()  # the follower's move back is no promotion: this version is tagged

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.active():
                continue
            for check in (self.check, self.check_champion):
                try:
                    check()
                except Exception:  # MLflow unreachable: try again at the next tick
                    log.exception("rollback check failed")


def roll_back(registry: ModelRegistry, reason: str = "manual") -> str:
    """Take the serving version out: the challenger when there is one, else the champion, whose
    alias goes back to the version it replaced (the base model when none). Returns what it did."""
    challenger = registry.version_for(CHALLENGER)
    if challenger is not None:
        _retire_challenger(registry, challenger, reason)
        ROLLBACKS.labels(CHALLENGER, "manual").inc()
        return f"challenger version {challenger} removed; the champion serves all traffic"
    champion = registry.version_for(CHAMPION)
    if champion is None:
        raise LookupError("nothing to roll back: no challenger, and the base model is the champion")
    previous = registry.version_tags(champion).get(PREVIOUS_CHAMPION_TAG, "base")
    _replace_champion(registry, champion, reason, None if previous == "base" else previous)
    ROLLBACKS.labels(CHAMPION, "manual").inc()
    return f"champion version {champion} replaced by {'the base model' if previous == 'base' else f'version {previous}'}"


def _retire_challenger(registry: ModelRegistry, version: str, reason: str) -> None:
    """Tag, then remove the alias (see the module docstring)."""
    registry.tag_version(version, ROLLBACK_TAG, reason)
    registry.delete_alias(CHALLENGER)


def _replace_champion(registry: ModelRegistry, version: str, reason: str, predecessor: str | None) -> None:
    """Tag, then point ``champion`` at the predecessor (None: the base model, no alias)."""
    registry.tag_version(version, ROLLBACK_TAG, reason)
    if predecessor is None:
        registry.delete_alias(CHAMPION)
    else:
        registry.set_alias(CHAMPION, predecessor)
