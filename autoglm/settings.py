"""Runtime settings, in one place, so the CLI, the worker and the tests agree on defaults."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path

from autoglm.interactions import FEEDBACK_RETENTION_S


# The demo's (and learning benchmark's) learning rate. Replaying five recorded click windows on
# the dev split, 2e-5 x 2 epochs improved every window (+4.2 points dense after five); 1e-5, the
# product default, ends at +3.7 but its first window falls below the base model, so the gate
# rejects it and the next training has to carry it.
DEMO_LEARNING_RATE = 2e-5
# The demo's time limit of a fine-tuning run: a window becomes a version within 120 s on 2 cores
# (issue 3), and a training that carries a rejected window fits two windows, ~110 s there.
DEMO_TRAIN_SECONDS = 90.0


@dataclass(frozen=True)
class FusionWeights:
    """Weights of the rankers fused by reciprocal rank fusion. Equal weights with k=60 are the
    untuned default; bench/ingest.py sweeps weights and k on the SciFact dev split."""

    bm25: float = 1.0
    dense: float = 1.0


@dataclass(frozen=True)
class ApiLimits:
    """What one request may make the search API hold; search/limits.py says why each limit exists."""

    max_body_bytes: int = 1_048_576  # 413 beyond; checked on Content-Length and while reading
    max_webhook_body_bytes: int = 65_536  # /hooks/mlflow, before its signature is computed
    max_feedback_items: int = 1000  # per POST /feedback; 413 beyond
    max_query_chars: int = 2000  # /search q; 422 beyond
    header_timeout_s: float = 10.0  # to send the request line and headers; 408 after
    body_timeout_s: float = 30.0  # to send the whole body; 408 after
    max_concurrent_requests: int = 64  # 503 with Retry-After beyond (/healthz and /metrics exempt)


@dataclass(frozen=True)
class Settings:
    broker: str = "127.0.0.1:9092"
    # Kafka consumer group of the ingest workers; one group per index.
    group_id: str = "autoglm-ingest"
    # Consumer group of the learners: the one holding the feedback partition is active.
    learn_group_id: str = "autoglm-learn"
    data_dir: Path = Path("./autoglm-data")
    # Where a process role's HTTP server listens, and the URL others (MLflow's webhooks) use to
    # reach it; None: http://<host>:<port>, with this machine's hostname for a wildcard host.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    advertise_url: str | None = None
    cdc_topics: str = r"^cdc\."
    mapping_file: Path | None = None
    # Micro-batching of the ingest stream: a batch closes when it holds batch_max events
    # or batch_linger_s after its first event, whichever comes first.
    batch_max: int = 64
    batch_linger_s: float = 0.02
    # How often the worker looks for new topics matching cdc_topics.
    topic_refresh_s: float = 5.0
    topic_partitions: int = 4
    # A dead letter larger than this (key + value + headers) is sent as a reference to the record
    # (streams/dead_letters.py); below the 1 MB a Kafka producer and broker accept by default.
    dead_letter_max_bytes: int = 900_000
    # Feedback -> training windows (issue 3).
    window_size: int = 1000  # close a window when this many new examples exist
    window_minutes: float = 60.0  # ... or after this long, with at least window_min of them
    window_min: int = 100
    session_share: float = 0.05  # at most this share of a window from one session
    impression_ttl_s: float = 3600.0  # feedback is joined to impressions younger than this
    feedback_max_wait_s: float = 60.0  # feedback waits this long for its impression
    feedback_retention_s: float = FEEDBACK_RETENTION_S  # older feedback (by its ts) is refused
    feedback_per_query: int = 100  # events the join keeps per query_id; more are dead-lettered
    # Learning loop: the MLflow tracking URI enables the trainer; gate_dataset is a BEIR folder
    # whose dev split scores every candidate; promote_champion lets the trainer move the
    # champion alias itself (demo only: a person does it in the MLflow UI).
    mlflow_uri: str | None = None
    learning_rate: float = 1e-5  # AdamW, query-side fine-tuning of each window
    train_max_seconds: float = 900.0  # a fine-tuning run stops before a step that would end later
    # Click propensities per rank: "prior" (1 / rank ** 0.8) or "log" (click-through rate per rank
    # relative to rank 1; confounded with relevance, see feedback/propensity.py).
    propensities: str = "prior"
    gate_dataset: Path | None = None
    promote_champion: bool = False
    # How queries are encoded while serving: "onnx" (ONNX Runtime, checked against torch at
    # load; about 2.5x faster for one query on 2 cores) or "torch".
    query_runtime: str = "onnx"
    # Serving follows the MLflow aliases (issue 4): the challenger answers this share of
    # sessions; aliases are read every alias_poll_s, and at once on a webhook when enabled.
    challenger_share: float = 0.05
    alias_poll_s: float = 30.0
    webhooks: bool = True
    # Automatic rollback: the challenger alias is removed once its CTR@10 is worse than the
    # champion's by anytime-valid bounds at this error rate (feedback/online.py), and a newly
    # promoted champion worse than its predecessor in its first champion_watch impressions
    # gives the alias back to the predecessor (0: no watch).
    auto_rollback: bool = True
    online_settle_s: float = 30.0  # an impression counts in the online metrics this long after it opened
    rollback_alpha: float = 0.05
    rollback_min_impressions: int = 50
    champion_watch: int = 1000
    # Index backend: "embedded" (tantivy + usearch + SQLite under data_dir) or "elasticsearch".
    index_backend: str = "embedded"
    es_url: str | None = None
    es_index: str = "autoglm-documents"  # an alias; `autoglm reindex` swaps what it points at
    es_refresh: str = "wait_for"  # per commit: wait_for (fresh), true, or false (refresh_interval decides)
    rrf_k: int = 60
    fusion_weights: FusionWeights = field(default_factory=FusionWeights)
    fusion_candidates: int = 100
    api_limits: ApiLimits = field(default_factory=ApiLimits)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def advertised_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = socket.gethostname() if self.api_host in ("0.0.0.0", "::", "") else self.api_host
        return f"http://{host}:{self.api_port}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "worker.lock"
