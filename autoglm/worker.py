"""One ingest worker process: the Faust CDC processor and the search API over one embedded index.

The API runs in a thread of the worker process so that searches read the index the worker
writes, with no second copy to reload. The Faust worker owns the main thread and its signal
handling: SIGINT/SIGTERM stop the stream, then the API, then close the index.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

from autoglm import topics
from autoglm.settings import Settings

log = logging.getLogger(__name__)


class DataDirInUse(RuntimeError):
    pass


def lock_data_dir(settings: Settings):
    """Hold an exclusive lock on the data dir for the life of the process (released by the OS on exit)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(settings.lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise DataDirInUse(f"data dir {settings.data_dir} is in use by {holder}; stop it first "
                           f"or pass another --data-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


class BrokerProbe:
    """Answers 'is the broker up' without asking it on every health check."""

    def __init__(self, broker: str, ttl_s: float = 2.0):
        self.broker, self.ttl_s = broker, ttl_s
        self._checked_at, self._error = 0.0, None

    def __call__(self) -> str | None:
        if time.monotonic() - self._checked_at > self.ttl_s:
            try:
                topics.list_topics(self.broker, timeout=2.0)
                self._error = None
            except Exception as exc:
                self._error = f"broker {self.broker} unreachable ({type(exc).__name__})"
            self._checked_at = time.monotonic()
        return self._error


def open_index(settings: Settings):
    """The index backend the settings name."""
    if settings.index_backend == "elasticsearch":
        from search.elasticsearch import ElasticsearchIndex

        if not settings.es_url:
            raise ValueError("--index elasticsearch needs --es-url")
        return ElasticsearchIndex(settings.es_url, settings.es_index, refresh=settings.es_refresh)
    from search.embedded import EmbeddedIndex

    return EmbeddedIndex(settings.index_dir)


def serving_encoder(settings: Settings, encoder):
    """The query encoder as it serves: compiled to ONNX Runtime unless the settings say torch."""
    if settings.query_runtime == "torch":
        return encoder
    from autoglm.onnx_encoder import OnnxQueryEncoder

    return OnnxQueryEncoder(encoder)


def start_serving(settings: Settings, registry):
    """The arms that answer queries, and (with a registry) the follower that keeps them on the
    versions the MLflow aliases name. Without a registry the base model serves alone."""
    from autoglm.encoder import Encoder
    from registry.follower import AliasFollower
    from search.serving import ServedModels

    if registry is None:
        return ServedModels(serving_encoder(settings, Encoder())), None
    base = serving_encoder(settings, Encoder())
    models = ServedModels(base, challenger_share=settings.challenger_share)

    def load(version: str | None):
        return registry.load_encoder(version) if version else Encoder()

    follower = AliasFollower(registry, models, load, base.version, lambda loaded: serving_encoder(settings, loaded),
                             poll_seconds=settings.alias_poll_s)
    try:
        follower.sync()  # the champion (and challenger) serve from the first request on
    except Exception as exc:  # MLflow unreachable: serve the base model, the follower keeps trying
        log.warning("could not read the MLflow aliases at start (%s); the base model serves until it can", exc)
    return models, follower.start()


def register_alias_hook(settings: Settings, follower):
    """Ask MLflow to call /hooks/mlflow when an alias moves; returns (hook, webhook id), or
    (None, None) when webhooks are off or the server refuses (polling still follows)."""
    from registry import webhooks
    from search.api import AliasHook

    if not (settings.webhooks and follower):
        return None, None
    secret = webhooks.webhook_secret(settings.data_dir / "mlflow-webhook.secret")
    url = f"http://{settings.api_host}:{settings.api_port}/hooks/mlflow"
    try:
        webhook_id = webhooks.register_receiver(settings.mlflow_uri, webhooks.receiver_name(settings.data_dir),
                                                url, secret)
    except Exception as exc:
        log.warning("could not register the MLflow webhook (%s); following aliases by polling every %.0f s",
                    exc, settings.alias_poll_s)
        return None, None
    return AliasHook(secret, follower.wake), webhook_id


def start_trainer(settings: Settings, index, examples, registry, follower):
    """The trainer consumer, in a thread of this process: it reads the index's document vectors."""
    from autoglm.datasets import document_id
    from consumers.gate import GateConfig
    from consumers.finetune import TrainConfig
    from consumers.trainer import GateSet, Trainer, TrainerConfig, TrainingConsumer

    gate = None
    if settings.gate_dataset:
        gate = GateSet.dev_split(settings.gate_dataset, lambda cid: document_id(settings.gate_dataset, cid))
    trainer = Trainer(index, examples, registry, settings.data_dir / "feedback" / "replay.json", gate,
                      TrainerConfig(train=TrainConfig(lr=settings.learning_rate, max_seconds=settings.train_max_seconds),
                                    gate=GateConfig(fusion_weights=settings.fusion_weights, rrf_k=settings.rrf_k),
                                    promote_champion=settings.promote_champion), on_new_champion=follower.sync)
    return TrainingConsumer(settings.broker, trainer, group_id=f"{settings.group_id}-trainer").start()


def run_worker(settings: Settings) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import faust
    import uvicorn

    from autoglm.encoder import Encoder
    from autoglm.publisher import EventPublisher
    from registry.overview import models_overview
    from registry.rollback import RollbackGuard
    from registry.webhooks import unregister_receiver
    from search.api import create_app
    from search.limits import client_limits_protocol
    from search.query import SearchService
    from streams.cdc import CdcProcessor
    from feedback.store import ExampleStore
    from registry.models import ModelRegistry
    from streams.faust_app import create_faust_app
    from streams.feedback import FeedbackProcessor
    from streams.ingest import IngestSink
    from streams.mapping import Mapper

    lock = lock_data_dir(settings)
    mapper = Mapper.from_file(settings.mapping_file)
    topics.ensure_topics(settings.broker, topics.PLATFORM_TOPICS, partitions=1)
    index = open_index(settings)
    document_encoder = Encoder()
    registry = ModelRegistry(settings.mlflow_uri) if settings.mlflow_uri else None
    # The query side has its own encoders: queries never wait behind a document batch, and
    # fine-tuned versions (query side only) swap in without touching document vectors.
    models, follower = start_serving(settings, registry)
    alias_hook, webhook_id = register_alias_hook(settings, follower)

    app = create_faust_app(settings.group_id, settings)
    sink = IngestSink(index, document_encoder)
    repaired = sink.repair()
    if repaired:
        log.warning("re-embedded %d documents whose last commit was cut short", repaired)
    processor = CdcProcessor(app, settings, mapper, sink)
    examples = ExampleStore(settings.data_dir / "feedback" / "examples.db")
    feedback = FeedbackProcessor(app, settings, examples)
    guard = None
    if follower and settings.auto_rollback:
        guard = RollbackGuard(registry, models, feedback.online, follower.wake, settings.rollback_alpha,
                              settings.rollback_min_impressions, settings.champion_watch).start()
        follower.promotion_listeners.append(guard.promoted)
    training = start_trainer(settings, index, examples, registry, follower) if registry else None
    assigned = threading.Event()

    @app.on_partitions_assigned.connect
    async def on_assigned(*_args, **_kwargs) -> None:
        assigned.set()

    broker_probe = BrokerProbe(settings.broker)

    def health() -> dict[str, str | None]:
        worker_down = None
        if not assigned.is_set():
            worker_down = "stream processor has not joined its consumer group yet"
        elif processor.retrying:
            worker_down = processor.retrying.describe()
        elif training and training.last_error:
            worker_down = training.last_error
        try:
            index.count()
            index_down = None
        except Exception as exc:
            index_down = f"index unavailable ({type(exc).__name__})"
        return {"broker": broker_probe(), "worker": worker_down, "index": index_down}

    def overview() -> dict:
        def reason(verdict) -> str | None:
            return verdict.reason if verdict else None

        return models_overview(registry, models, feedback.online, settings.rollback_alpha,
                               reason(guard and guard.last_verdict), reason(guard and guard.last_champion_verdict))

    service = SearchService(index, models, settings.fusion_weights, settings.rrf_k, settings.fusion_candidates)
    publisher = EventPublisher(settings.broker)
    limits = settings.api_limits
    api = create_app(service, health, publisher, alias_hook, overview, limits, settings.feedback_retention_s)
    server = uvicorn.Server(uvicorn.Config(api, host=settings.api_host, port=settings.api_port, log_level="warning",
                                           lifespan="off", http=client_limits_protocol(limits.header_timeout_s)))
    api_thread = threading.Thread(target=server.run, name="search-api", daemon=True)
    api_thread.start()
    try:
        worker = faust.Worker(app, loglevel=logging.getLogger().level, quiet=True)
        worker.spinner = None  # a terminal spinner only garbles logs
        worker.execute_from_commandline()
    finally:
        server.should_exit = True
        api_thread.join(timeout=5)
        if training:
            training.stop()
        if guard:
            guard.stop()
        if follower:
            follower.stop()
        if webhook_id:
            try:
                unregister_receiver(settings.mlflow_uri, webhook_id)
            except Exception as exc:  # the server may already be gone; the next start replaces it
                log.warning("could not remove the MLflow webhook %s: %s", webhook_id, exc)
        publisher.close()
        index.close()
        examples.close()
        lock.close()
