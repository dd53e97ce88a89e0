"""The parts the process roles are built from, one builder per part (roles/ingest.py,
serve.py, learn.py and worker.py put them together)."""

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


def index_probe(index):
    def probe() -> str | None:
        try:
            index.count()
            return None
        except Exception as exc:
            return f"index unavailable ({type(exc).__name__})"
    return probe


def open_index(settings: Settings):
    """The index backend the settings name."""
    if settings.index_backend == "elasticsearch":
        from search.elasticsearch import ElasticsearchIndex

        if not settings.es_url:
            raise ValueError("--index elasticsearch needs --es-url")
        return ElasticsearchIndex(settings.es_url, settings.es_index, refresh=settings.es_refresh)
    from search.embedded import EmbeddedIndex

    return EmbeddedIndex(settings.index_dir)


def open_example_store(settings: Settings):
    """Examples and windows where every learner sees them: beside the documents in Elasticsearch,
    or in SQLite under the data dir for the embedded default (one process holds everything)."""
    if settings.index_backend == "elasticsearch":
        from feedback.elasticsearch_store import ElasticsearchExampleStore

        return ElasticsearchExampleStore(settings.es_url, settings.es_index)
    from feedback.sqlite_store import SqliteExampleStore

    return SqliteExampleStore(settings.data_dir / "feedback" / "examples.db")


def open_registry(settings: Settings):
    from registry.models import ModelRegistry

    return ModelRegistry(settings.mlflow_uri) if settings.mlflow_uri else None


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
    """Ask MLflow to call this replica's /hooks/mlflow, at its advertised URL and under a name of
    its own, when an alias moves; returns (hook, webhook id), or (None, None) when webhooks are
    off or the server refuses (polling still follows)."""
    from registry import webhooks

    if not (settings.webhooks and follower):
        return None, None
    secret = webhooks.webhook_secret(settings.data_dir / "mlflow-webhook.secret")
    url = f"{settings.advertised_url}/hooks/mlflow"
    try:
        webhook_id = webhooks.register_receiver(settings.mlflow_uri, webhooks.receiver_name(url), url, secret)
    except Exception as exc:
        log.warning("could not register the MLflow webhook (%s); following aliases by polling every %.0f s",
                    exc, settings.alias_poll_s)
        return None, None
    return webhooks.AliasHook(secret, follower.wake), webhook_id


def unregister_alias_hook(settings: Settings, webhook_id: str | None) -> None:
    from registry.webhooks import unregister_receiver

    if not webhook_id:
        return
    try:
        unregister_receiver(settings.mlflow_uri, webhook_id)
    except Exception as exc:  # the server may already be gone; the next start replaces it
        log.warning("could not remove the MLflow webhook %s: %s", webhook_id, exc)


def start_trainer(settings: Settings, index, examples, registry, on_new_champion, group_id: str,
                  active=None):
    """The trainer consumer, in a thread: one member of ``group_id`` trains each request; with
    ``active``, only while it says so (the active learner)."""
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
                                    promote_champion=settings.promote_champion), on_new_champion=on_new_champion)
    return TrainingConsumer(settings.broker, trainer, group_id=group_id, active=active).start()


class HttpServer:
    """A FastAPI app served by uvicorn in a thread of this process, with the API's client limits."""

    def __init__(self, app, settings: Settings, name: str):
        import uvicorn

        from search.limits import client_limits_protocol

        self.server = uvicorn.Server(uvicorn.Config(
            app, host=settings.api_host, port=settings.api_port, log_level="warning", lifespan="off",
            http=client_limits_protocol(settings.api_limits.header_timeout_s)))
        self._thread = threading.Thread(target=self.server.run, name=name, daemon=True)

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)


def run_faust(app) -> None:
    """Run a Faust app's worker on the main thread until SIGINT/SIGTERM (Faust handles the signals)."""
    import faust

    worker = faust.Worker(app, loglevel=logging.getLogger().level, quiet=True)
    worker.spinner = None  # a terminal spinner only garbles logs
    worker.execute_from_commandline()


def wait_for_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM (roles without a Faust worker)."""
    import signal

    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(1.0):
        pass
