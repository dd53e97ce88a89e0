"""The trainer: a Kafka consumer of training requests that fine-tunes, gates and registers models.

For each request (a window of examples; requests that arrive during a run are coalesced
into the next one):

1. load the current champion from MLflow, or the base encoder when there is none;
2. add the newest earlier windows the champion has not learned from (a rejected window's
   clicks are not thrown away), up to ``max_windows`` in all;
3. hold out a slice of the windows, fine-tune the query side on the rest plus a replay
   sample of older examples (documents stay frozen, so promotion needs no re-indexing);
4. score candidate and champion on the gate set, on the held-out slice and on gate
   queries outside the window's topics (forgetting);
5. log the run to MLflow; register the candidate and give it the ``challenger`` alias only
   if it is nowhere worse than the champion by more than epsilon (on the small forgetting
   and held-out subsets: by more than their noise, see ``gate.noise_tolerance``), else
   record the rejection;
6. add the new windows to the replay reservoir (a file in the data dir, logged with every run);
7. commit the request's offsets.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from confluent_kafka import Consumer, KafkaError
from prometheus_client import Counter, Histogram

from autoglm import beir, topics
from autoglm.encoder import Encoder
from autoglm.interactions import TrainingRequest
from consumers.finetune import TrainConfig, fine_tune
from consumers.gate import (GateConfig, GateDecision, decide, forgetting_subset, holdout_reciprocal_ranks,
                           noise_tolerance, per_query)
from consumers.replay import ReplayBuffer
from feedback.examples import TrainingExample
from feedback.store import ExampleStore  # the interface; either backend
from registry.models import CHALLENGER, CHAMPION, ModelRegistry
from search.protocol import Index

log = logging.getLogger(__name__)

FORGETTING = "forgetting.ndcg@10"
HOLDOUT = "holdout.mrr@10"
REPLAY_ARTIFACT = "replay.json"  # the reservoir as logged with each training run
BASE_FLOORED = ("gate.ndcg@10", "gate.hybrid.ndcg@10")
# Few queries each: compared within their noise, not epsilon. The gate set's own metrics keep
# epsilon: a rejected window is not lost (the next training carries it), so the gate can be strict.
NOISY_SUBSETS = (FORGETTING, HOLDOUT)
PerQuery = dict[str, dict[str, float]]  # metric -> query -> score

TRAININGS = Counter("autoglm_trainings", "Trainings by outcome (registered, rejected, failed, skipped)", ["outcome"])
TRIGGER_TO_VERSION = Histogram("autoglm_trigger_to_version_seconds", "From a window's training request to "
                               "its registered version", buckets=(10, 30, 60, 90, 120, 180, 300, 600, 1200))
TRAINING_SECONDS = Histogram("autoglm_training_seconds", "From a training's start to its registered or "
                             "rejected candidate", buckets=(10, 30, 60, 90, 120, 180, 300, 600, 1200))


@dataclass(frozen=True)
class GateSet:
    """Fixed queries and qrels every candidate is scored on (BEIR format)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str

    @classmethod
    def dev_split(cls, root: Path, document_id: Callable[[str], str]) -> "GateSet":
        """The dev split of a BEIR dataset's train queries, with corpus ids mapped to index ids."""
        texts = beir.read_queries(root)
        _, dev = beir.split_train(beir.read_qrels(root, "train"))
        qrels = {qid: {document_id(doc): grade for doc, grade in docs.items()} for qid, docs in dev.items()}
        return cls({qid: texts[qid] for qid in dev}, qrels, f"{Path(root).name}-dev")


@dataclass(frozen=True)
class TrainerConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    holdout_share: float = 0.1
    # A held-out slice with fewer distinct queries is logged but does not gate: one query
    # moving one rank would swing its MRR by more than any sensible epsilon.
    min_holdout_queries: int = 30
    # A training fits the request's windows plus the newest earlier ones its champion has not
    # learned from (rejected, or registered but never promoted), up to this many windows in all:
    # one window of clicks is often too little to beat the gate's noise, and two are.
    max_windows: int = 2
    promote_champion: bool = False  # demo only: a person normally moves the champion alias


@dataclass
class TrainingOutcome:
    windows: list[int]
    run_id: str
    passed: bool
    version: str | None
    reasons: list[str]
    metrics: dict[str, float]
    seconds: float


class Trainer:
    def __init__(self, index: Index, store: ExampleStore, registry: ModelRegistry, reservoir_path: Path,
                 gate_set: GateSet | None = None, config: TrainerConfig = TrainerConfig(),
                 on_new_champion: Callable[[], None] | None = None):
        """``on_new_champion``: called after the trainer itself moved the champion alias (demo
        only), so serving can follow at once instead of at its next alias poll."""
        self.index, self.store, self.registry = index, store, registry
        self.gate_set, self.config, self.on_new_champion = gate_set, config, on_new_champion
        self.reservoir_path = reservoir_path
        reservoir_path.parent.mkdir(parents=True, exist_ok=True)
        self.replay = ReplayBuffer.load(reservoir_path) if reservoir_path.exists() else ReplayBuffer()
        self._base: PerQuery | None = None

    def train(self, windows: list[int]) -> TrainingOutcome | None:
        """None when the windows hold no example, or a run already trained and judged this very
        request (a learner died after deciding, before committing the request)."""
        started = time.monotonic()
        request = request_name(windows)
        done = self.registry.decided_training(request)
        if done:
            log.warning("windows %s were trained already by run %s; not training them again", windows, done)
            return None
        new_examples = [example for window in windows for example in self.store.examples_in(window)]
        if not new_examples:
            log.warning("windows %s hold no examples in this store: nothing to train", windows)
            return None
        champion_version = self.registry.version_for(CHAMPION)
        champion = self.registry.load_encoder(champion_version) if champion_version else Encoder()
        carried = self._carried_windows(champion_version, windows)
        examples = [example for window in carried for example in self.store.examples_in(window)] + new_examples
        fit, held_out = split_holdout(examples, self.config.holdout_share)
        self._catch_up_replay()

        # Enough replayed items for replay_ratio of every batch, drawn from the reservoir.
        replay_size = int(len(fit) * self.config.train.epochs * self.config.train.replay_ratio) + 1
        replay = self.replay.sample(replay_size, np.random.default_rng(self.config.train.seed + len(windows)))
        corpus = self.index.sample_vectors(self.config.train.corpus_negatives, seed=max(windows)) \
            if self.config.train.corpus_negatives else {}
        result = fine_tune(champion, fit, replay, self.index.vectors, self.config.train, corpus=corpus)
        candidate = Encoder(state_dict=result.state_dict, version="candidate")
        candidate_scores = self._score(candidate, held_out, examples)
        champion_scores = self._score(champion, held_out, examples)
        candidate_metrics, champion_metrics = _means(candidate_scores), _means(champion_scores)
        decision = self._decide(candidate_scores, champion_scores, held_out)

        new_ids = {e.example_id for e in new_examples}
        self.replay.add([e for e in fit if e.example_id in new_ids])  # carried ones are in already
        self.replay.save(self.reservoir_path)
        metrics = {**{f"candidate.{k}": v for k, v in candidate_metrics.items()},
                   **{f"champion.{k}": v for k, v in champion_metrics.items()}}
        trained = sorted({*carried, *windows})
        lineage = {"request": request, "windows": ",".join(map(str, trained)), "carried_windows": ",".join(map(str, carried)),
                   "parent_version": champion_version or "base",
                   "examples": str(len(examples)), "examples_trained": str(result.examples_used),
                   "examples_held_out": str(len(held_out)), "replay_seen": str(self.replay.seen),
                   "gate_set": self.gate_set.name if self.gate_set else "none"}
        params = {**asdict(self.config.train), "holdout_share": self.config.holdout_share,
                  "epsilon": self.config.gate.epsilon}
        run_id = self.registry.log_training(params, result.loss_curve, metrics, lineage, result.state_dict,
                                            {REPLAY_ARTIFACT: self.reservoir_path})
        version = None
        if decision.passed:
            version = self.registry.register(run_id, {"gate": "passed", "windows": lineage["windows"],
                                                      "parent_version": lineage["parent_version"]})
            self.registry.set_alias(CHALLENGER, version)
            if self.config.promote_champion:
                self.registry.set_alias(CHAMPION, version)
                if self.on_new_champion:
                    try:
                        self.on_new_champion()
                    except Exception:  # serving catches up at its next alias poll; no retraining
                        log.exception("serving could not switch to the new champion %s yet", version)
        else:
            self.registry.record_rejection(run_id, "; ".join(decision.reasons), metrics)
        outcome = TrainingOutcome(windows, run_id, decision.passed, version, decision.reasons, metrics,
                                  time.monotonic() - started)
        log.info("training on windows %s: %s", trained,
                 f"registered version {version}" if version else f"rejected ({'; '.join(decision.reasons)})")
        return outcome

    def _catch_up_replay(self) -> None:
        """Continue from the newest reservoir any learner logged, when it has seen more than this
        one's: after a failover the new active learner's file is older than the run it takes over
        from (or missing), and the reservoir would otherwise forget what the other one saw."""
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = self.registry.latest_training_artifact(REPLAY_ARTIFACT, Path(scratch))
            except Exception:  # the registry is away: training is refused later anyway, if it stays away
                log.exception("could not read the newest replay reservoir; continuing with this learner's")
                return
            if path is not None:
                logged = ReplayBuffer.load(path)
                if logged.seen > self.replay.seen:
                    log.info("replay reservoir: continuing from the newest run's (%d seen, this learner's %d)",
                             logged.seen, self.replay.seen)
                    self.replay = logged

    def _carried_windows(self, champion_version: str | None, windows: list[int]) -> list[int]:
        """The newest windows before ``windows`` and after the last one the champion was trained
        on, so that a rejected window's clicks count again in the next training."""
        room = self.config.max_windows - len(windows)
        if room <= 0:
            return []
        trained = self.registry.version_tags(champion_version).get("windows", "") if champion_version else ""
        learned = max((int(w) for w in trained.split(",") if w), default=0)
        return sorted(range(min(windows) - 1, learned, -1)[:room])

    def _decide(self, candidate: PerQuery, champion: PerQuery, held_out: list[TrainingExample]) -> GateDecision:
        """Not worse than the champion on any metric by more than epsilon (the small subsets: by
        more than their noise), and not below the base model on the gate set's nDCG (dense and
        hybrid) at all, so small allowed losses cannot add up over versions."""
        epsilon = self.config.gate.epsilon
        gated = set(candidate)
        if len({e.query.lower() for e in held_out}) < self.config.min_holdout_queries:
            gated.discard(HOLDOUT)
        tolerances = {name: noise_tolerance(candidate[name], champion[name], epsilon, self.config.gate.noise_z)
                      for name in gated if name in champion and name in NOISY_SUBSETS}
        versus_champion = decide({name: _mean(candidate[name]) for name in gated}, _means(champion), epsilon,
                                 tolerances)
        if not self.gate_set:
            return versus_champion
        floors = {name: value for name, value in _means(self._base_scores()).items() if name in BASE_FLOORED}
        versus_base = decide({name: _mean(candidate[name]) for name in floors}, floors, 0.0)
        return GateDecision(versus_champion.passed and versus_base.passed,
                            versus_champion.reasons + [f"base floor {reason}" for reason in versus_base.reasons])

    def _base_scores(self) -> PerQuery:
        """The base model's gate scores, computed once: the floor no version may go below."""
        if self._base is None:
            self._base = self._score(Encoder(), [], [])
        return self._base

    def _score(self, encoder: Encoder, held_out: list[TrainingExample], window: list[TrainingExample]) -> PerQuery:
        """Per-query scores of every gate metric (metric -> query -> value)."""
        scores: PerQuery = {}
        if held_out:
            scores[HOLDOUT] = holdout_reciprocal_ranks(encoder.embed, self.index, held_out, window=window)
        if self.gate_set:
            dense = per_query(encoder.embed, self.index, self.gate_set.queries, self.gate_set.qrels)
            scores["gate.ndcg@10"], scores["gate.mrr@10"] = dense["ndcg@10"], dense["mrr@10"]
            scores["gate.hybrid.ndcg@10"] = per_query(encoder.embed, self.index, self.gate_set.queries,
                                                      self.gate_set.qrels, hybrid=self.config.gate)["ndcg@10"]
            outside = forgetting_subset(self.gate_set.qrels, window)
            if outside:
                scores[FORGETTING] = per_query(encoder.embed, self.index, self.gate_set.queries, outside)["ndcg@10"]
        return scores


def request_name(windows: list[int]) -> str:
    """A training request's name in MLflow: the windows it was asked to train."""
    return "windows-" + ",".join(map(str, sorted(windows)))


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else float("nan")


def _means(scores: PerQuery) -> dict[str, float]:
    return {name: _mean(values) for name, values in scores.items()}


def split_holdout(examples: list[TrainingExample], share: float) -> tuple[list, list]:
    """A stable split by example id, so a replayed window holds out the same examples."""
    def held(example: TrainingExample) -> bool:
        digest = hashlib.sha256(example.example_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2 ** 32 < share
    return [e for e in examples if not held(e)], [e for e in examples if held(e)]


class TrainingConsumer:
    """Consumes ``autoglm.training`` in a thread; one training at a time, pending requests coalesced."""

    def __init__(self, broker: str, trainer: Trainer, group_id: str = "autoglm-trainer",
                 active: Callable[[], bool] | None = None):
        """``active``: whether this process should train now (a standby learner leaves the group,
        so the request goes to the active one; it joins when it takes over). None: always."""
        self.trainer, self.active = trainer, active
        self.outcomes: list[TrainingOutcome] = []
        self.last_error: str | None = None
        self._consumer = Consumer({"bootstrap.servers": broker, "group.id": group_id,
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                                   "max.poll.interval.ms": 3_600_000})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)

    def start(self) -> "TrainingConsumer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        subscribed = False
        try:
            while not self._stop.is_set():
                wanted = self.active is None or self.active()
                if wanted != subscribed:
                    if wanted:
                        self._consumer.subscribe([topics.TRAINING])
                    else:  # a request it did not commit goes to the one that took over
                        self._consumer.unsubscribe()
                    subscribed = wanted
                if not subscribed:
                    self._stop.wait(0.5)
                    continue
                requests = self._next_requests()
                if requests:
                    outcome = self._train(sorted({request.window_id for request in requests}))
                    if outcome and outcome.passed:
                        TRIGGER_TO_VERSION.observe(time.time() - min(r.ts for r in requests).timestamp())
                    self._consumer.commit(asynchronous=False)
        finally:
            self._consumer.close()

    def _train(self, windows: list[int], attempts: int = 2) -> TrainingOutcome | None:
        """Train once on the windows, retrying a failure once; a window that fails twice is
        logged, counted and skipped, so one poisonous window cannot stall the loop."""
        for attempt in range(1, attempts + 1):
            try:
                outcome = self.trainer.train(windows)
            except Exception as exc:
                TRAININGS.labels("failed").inc()
                # shown by /healthz: the exception's type, not its text (the log has that)
                self.last_error = f"training on windows {windows} failed (attempt {attempt}, {type(exc).__name__})"
                log.exception("training on windows %s failed (attempt %d of %d)", windows, attempt, attempts)
                self._stop.wait(5.0)
                continue
            if outcome is None:
                TRAININGS.labels("skipped").inc()
                return None
            TRAININGS.labels("registered" if outcome.passed else "rejected").inc()
            TRAINING_SECONDS.observe(outcome.seconds)
            self.outcomes.append(outcome)
            self.last_error = None
            return outcome
        return None

    def _next_requests(self) -> list[TrainingRequest]:
        """Block briefly for one request, then take every other one already waiting."""
        requests = []
        message = self._consumer.poll(0.5)
        while message is not None:
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("training topic: %s", message.error())
            else:
                try:
                    requests.append(TrainingRequest.model_validate_json(message.value()))
                except ValueError as exc:
                    log.error("ignoring an invalid training request: %s", exc)
            message = self._consumer.poll(0)
        return requests
