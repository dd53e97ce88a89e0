"""Serving follows the MLflow aliases: `champion` serves, `challenger` takes its share of traffic.

A person moves an alias in the MLflow UI. The follower notices in two ways:
- a webhook (``model_version_alias.created`` / ``.deleted``) that the API receives, verifies
  and turns into ``wake()``: seconds from the click to serving;
- polling every ``poll_seconds``, the fallback when a delivery is lost or no webhook is set.

Each sync compares the versions the aliases name with the versions that serve (no champion
alias: the base model). A changed arm's version is loaded in this thread while the old one
keeps answering, then swapped in with one assignment (search/serving.py). It serves as loaded
(torch) at once, and is then compiled for speed (ONNX Runtime) and swapped again, so a promotion
does not wait for the compiler. A version the other arm already serves (the challenger being
promoted) is reused without loading. A load that fails leaves the old version serving, is logged
and counted, and is retried only every ``retry_failed_s``, so a broken version does not cost a
download every poll.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from prometheus_client import Counter, Gauge

from registry.models import PREVIOUS_CHAMPION_TAG, ROLLBACK_TAG, ModelRegistry, registry_version, version_uri
from search.serving import ARMS, CHALLENGER, CHAMPION, QueryEncoder, ServedModels

log = logging.getLogger(__name__)

LOADS = Counter("autoglm_model_loads", "Model versions loaded for serving, by arm and outcome", ["arm", "outcome"])
SERVING = Gauge("autoglm_serving_version", "1 for the version each arm serves", ["arm", "version"])

LoadVersion = Callable[[str | None], QueryEncoder]  # version number (None: the base model) -> encoder
Compile = Callable[[QueryEncoder], QueryEncoder]  # a loaded encoder -> the faster one that serves


class AliasFollower:
    def __init__(self, registry: ModelRegistry, models: ServedModels, load: LoadVersion, base_version: str,
                 compile_for_serving: Compile | None = None, poll_seconds: float = 30.0,
                 retry_failed_s: float = 300.0):
        """``base_version``: how the base model names itself (``Encoder.version``)."""
        self.registry, self.models, self.load, self.base_version = registry, models, load, base_version
        self.compile_for_serving = compile_for_serving
        self.poll_seconds, self.retry_failed_s = poll_seconds, retry_failed_s
        self.last_error: str | None = None
        self._failed: dict[str, tuple[str | None, float]] = {}  # arm -> (version, when its load failed)
        self._synced_once = False  # the first sync is start-up, not a promotion
        # Called as listener(new champion, the one it replaced), both as served versions, after
        # a promotion seen live has been swapped in (the rollback guard watches the new one).
        self.promotion_listeners: list[Callable[[str, str], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)

    def start(self) -> "AliasFollower":
        self._publish_gauges()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        """Sync now (a webhook said an alias moved) instead of at the next poll."""
        self._wake.set()

    def sync(self) -> None:
        """Bring both arms to the versions their aliases name; safe to call from any thread."""
        with self._sync_lock:
            for arm in ARMS:
                self._sync_arm(arm, self.registry.version_for(arm))
            self._publish_gauges()
            self._synced_once = True

    def _sync_arm(self, arm: str, version: str | None) -> None:
        """``version`` None: no alias. Then the challenger arm closes and the champion arm
        serves the base model."""
        serving = self.models.encoder(arm)
        if version is None and arm == CHALLENGER:
            if serving is not None:
                self.models.swap(CHALLENGER, None)
                log.info("challenger alias removed: all traffic on the champion")
            return
        wanted = version_uri(version) if version is not None else self.base_version
        if serving is not None and serving.version == wanted:
            return
        failed = self._failed.get(arm)
        if failed and failed[0] == version and time.monotonic() - failed[1] < self.retry_failed_s:
            return
        other = self.models.encoder(CHALLENGER if arm == CHAMPION else CHAMPION)
        reused = other is not None and other.version == wanted
        encoder = other if reused else self._load(arm, version, serving)
        if encoder is None:
            return
        promoted = (arm == CHAMPION and version is not None and serving is not None and self._synced_once
                    and self._record_promotion(version, serving.version))  # a promotion seen live
        self.models.swap(arm, encoder)
        log.info("%s now serves %s (was %s)", arm, encoder.version, serving.version if serving else "none")
        if promoted:
            for listener in self.promotion_listeners:
                listener(encoder.version, serving.version)
        if not reused and self.compile_for_serving:
            # Compiling takes seconds: outside the sync lock, so a promotion meanwhile is not held up.
            threading.Thread(target=self._compile, args=(arm, encoder), name="compile-for-serving",
                             daemon=True).start()

    def _load(self, arm: str, version: str | None, serving: QueryEncoder | None) -> QueryEncoder | None:
        try:
            encoder = self.load(version)
        except Exception as exc:  # any failure keeps the old version serving
            LOADS.labels(arm, "failed").inc()
            self._failed[arm] = (version, time.monotonic())
            self.last_error = f"loading version {version} for {arm} failed: {exc!r}"
            log.exception("loading version %s for %s failed; %s keeps serving", version, arm,
                          serving.version if serving else "nothing")
            return None
        self._failed.pop(arm, None)
        LOADS.labels(arm, "loaded").inc()
        return encoder

    def _compile(self, arm: str, loaded: QueryEncoder) -> None:
        """Swap the compiled encoder in wherever the loaded one still serves (either arm: it may
        have been promoted meanwhile); on failure the loaded one keeps serving (slower, same answers)."""
        try:
            compiled = self.compile_for_serving(loaded)
        except Exception:
            LOADS.labels(arm, "compile_failed").inc()
            log.exception("compiling %s failed; it keeps serving uncompiled", loaded.version)
            return
        with self._sync_lock:
            for serving_arm in ARMS:
                if self.models.encoder(serving_arm) is loaded:
                    self.models.swap(serving_arm, compiled)
        LOADS.labels(arm, "compiled").inc()

    def _record_promotion(self, version: str, previous_uri: str) -> bool:
        """Whether moving the champion from ``previous_uri`` to ``version`` is a promotion: not when
        the one replaced was rolled back (then this move is the rollback). A promotion tags the new
        champion, on its first one, with the version it replaces, for ``autoglm rollback``."""
        previous = registry_version(previous_uri) or "base"
        if previous == version:
            return False
        try:
            if previous != "base" and ROLLBACK_TAG in self.registry.version_tags(previous):
                return False
            if PREVIOUS_CHAMPION_TAG not in self.registry.version_tags(version):
                self.registry.tag_version(version, PREVIOUS_CHAMPION_TAG, previous)
        except Exception as exc:  # a missing tag only costs the rollback its default target
            log.warning("could not tag version %s with its predecessor: %s", version, exc)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # the registry is unreachable: keep serving, try again later
                self.last_error = f"reading the MLflow aliases failed: {exc!r}"
                log.warning("%s", self.last_error)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _publish_gauges(self) -> None:
        SERVING.clear()
        for arm in (CHAMPION, CHALLENGER):
            encoder = self.models.encoder(arm)
            if encoder is not None:
                SERVING.labels(arm, encoder.version).set(1)
