"""Training windows: cut from the stored examples, each announced to the trainer.

A window is closed when ``window_size`` examples are pending, checked whenever examples are
added, or when ``window_minutes`` passed since the last window (with none yet: since this worker
started or took over the join) with at least ``window_min`` pending, checked by the sweep every
10 s. Closing one (``ExampleStore.close_window``) caps each session's share of it; its training
request is then published to ``autoglm.training``, and the window counts as closed once the
broker has it. Both checks run in the feedback agent, so only the worker that owns the join
partition, the active learner, closes windows (streams/feedback.py).
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter

from autoglm.interactions import TrainingRequest
from autoglm.settings import Settings
from feedback.store import ExampleStore

log = logging.getLogger(__name__)

WINDOWS = Counter("autoglm_training_windows", "Training windows closed", ["reason"])

_CHECK_ON_TIME_S = 10.0


class TrainingWindows:
    def __init__(self, store: ExampleStore, settings: Settings, training_topic):
        self.store, self.settings, self.training = store, settings, training_topic
        self._started_at = time.time()
        self._last_time_check = 0.0

    def restart_clock(self) -> None:
        """This worker took over the join: with no window yet, one closed on time counts from now."""
        self._started_at = time.time()

    async def close_if_full(self) -> None:
        if self.store.pending() >= self.settings.window_size:
            await self._close("size")

    async def close_if_due(self, now: float) -> None:
        """At most once per check interval, close a window on time; a failure (the store away)
        waits for the next check."""
        if now - self._last_time_check < _CHECK_ON_TIME_S:
            return
        self._last_time_check = now
        try:
            await self._close_on_time()
        except Exception:  # the store may be away; the next check tries again
            log.exception("closing a window on time failed")

    async def _close_on_time(self) -> None:
        last = self.store.last_window()
        opened = last.created_at if last else self._started_at
        if (time.time() - opened >= self.settings.window_minutes * 60
                and self.store.pending() >= self.settings.window_min):
            await self._close("time")

    async def _close(self, reason: str) -> None:
        window = self.store.close_window(reason, self.settings.session_share)
        if window is None:
            return
        WINDOWS.labels(reason).inc()
        request = TrainingRequest(**{k: v for k, v in window.__dict__.items() if k != "created_at"})
        delivery = await self.training.send(key=str(window.window_id).encode(),
                                            value=request.model_dump_json().encode())
        await delivery
        log.info("window %d closed (%s): %d examples from %d sessions, %d capped", window.window_id,
                 reason, window.examples, window.sessions, window.dropped_by_session_cap)
