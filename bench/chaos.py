"""Chaos benchmark: a mixed change stream while the worker is killed with SIGKILL again and again.

Issue 9 asks "nothing lost, nothing stalls". This benchmark runs one embedded broker and one
``autoglm worker`` process on one data dir and, in one run:

1. generates a seeded stream of changes over several tables on a couple of topics (each table on
   one partition, so its order is defined): creates, updates, deletes with their tombstones,
   re-creates after a delete, truncates of a table, and bad records of several kinds (invalid
   JSON, a wrong envelope, an unknown op, an unmappable row, ``ts_ms`` "abc" beside a valid lsn,
   a row nested 100,000 levels deep, a value of about 2 MB). One table is a ts_ms-only source (no
   lsn) whose updates often share a millisecond; the others carry a Postgres lsn;
2. publishes it at a steady rate from a producer thread while the main thread kills the worker
   with SIGKILL at random points, one in each equal slice of the stream, and restarts it on the
   same data dir each time, waiting until it is healthy;
3. publishes an end marker per partition and waits until every marker is searchable (or a
   timeout: a stalled partition is reported, never waited for forever);
4. computes the final state from the stream itself and compares it with what the API serves:
   ``lost`` (expected live, ``GET /documents`` says 404), ``stale`` (served with an older revision
   than the stream's last), ``ghosts`` (deleted, yet ``/documents`` or a ``/search`` for the
   document's unique word returns it);
5. reads ``autoglm.dlq`` and matches each dead letter to the record it names (headers
   ``source.topic``/``partition``/``offset``).

Dead letters per delivery: a record can be read again after a SIGKILL (its batch was not yet
durable), so it may rightly be dead-lettered once per worker run that read it. The broker cannot
say how often a record was delivered; what is measurable is which worker run produced each dead
letter (its Kafka timestamp against the runs' start and end times). The target is every bad record
dead-lettered at least once, never twice by one worker run, and no good record dead-lettered.

Targets: every kill survived (exit by SIGKILL, healthy again), 0 lost, 0 ghosts, 0 stale, every
marker applied, the dead-letter target above. Exit code 1 when one is missed.

Usage: ``bench/chaos.py [--changes 20000] [--kills 20] [--seed 9] [--tables 6] [--topics 2]
[--partitions 2] [--rate 40] [--out FILE] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from autoglm.broker import EmbeddedBroker  # noqa: E402
from autoglm.debezium import change_event, producer  # noqa: E402
from autoglm.metrics import sample_value  # noqa: E402
from autoglm.topics import DEAD_LETTERS, PLATFORM_TOPICS, ensure_topics  # noqa: E402
from bench.report import finish, git_version, log_tail  # noqa: E402
from roles.harness import RoleExited, RoleProcess  # noqa: E402

SCHEMA = "chaos"
TOPIC_PREFIX = f"cdc.{SCHEMA}"
MARKER_TABLE = "end_markers"
GOOD_KINDS = ("change", "tombstone", "marker")  # every other kind of record is a bad one
SMALL_BAD_KINDS = ("invalid_json", "wrong_envelope", "unknown_op", "unmappable_row", "ts_ms_text",
                   "deep_nesting")
OVERSIZED_KIND = "oversized"
OVERSIZED_BYTES = 2 * 1024 * 1024
DEEP_NESTING = 100_000
PRODUCER_MAX_BYTES = 8 * 1024 * 1024  # the embedded broker took 12 MB records when measured
HEALTHY_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 0.5
SEARCH_K = 10
DEAD_LETTER_COLUMNS = ("sent", "found", "missing", "not_reached", "dead_letters", "in_several_runs", "excess",
                       "indexed_instead")

console = Console()


@dataclass(frozen=True)
class Plan:
    changes: int
    kills: int
    seed: int
    tables: int
    topics: int
    partitions: int
    rate: float  # records per second from the producer thread
    bad_share: float
    oversized: int
    drain_timeout_s: float

    @property
    def keys_per_table(self) -> int:
        """About five changes per document: enough updates, deletes and re-creates per id."""
        return max(10, self.changes // (5 * self.tables))


@dataclass
class Record:
    """One Kafka record of the stream, with what the benchmark knows it means."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    kind: str  # "change", "tombstone", "marker" or a bad-record kind
    table: str  # "<schema>.<table>"
    doc_id: str | None = None  # the document it touches (for a bad record: the id it would have)
    op: str | None = None
    rev: int | None = None  # the upsert's revision number, also the row's "rev" column
    offset: int | None = None  # set on delivery


@dataclass
class WorkerRun:
    """One life of the worker process, from start to its end (SIGKILL, a crash, or the final stop)."""

    started_at: float
    healthy_after_s: float | None = None
    ended_at: float | None = None
    ended_by: str | None = None
    exit_code: int | None = None


# -- the stream ---------------------------------------------------------------------------------


def table_names(plan: Plan) -> list[str]:
    return [f"t{index}" for index in range(plan.tables)]


def placement(plan: Plan, index: int) -> tuple[str, int]:
    """Topic and partition of table ``index``: tables spread over topics first, then partitions."""
    return f"{TOPIC_PREFIX}.s{index % plan.topics}", (index // plan.topics) % plan.partitions


def partitions_used(plan: Plan) -> list[tuple[str, int]]:
    return sorted({placement(plan, index) for index in range(plan.tables)})


def unique_word(table: str, pk: int) -> str:
    """A word only this document's text holds, so a search for it finds exactly this document."""
    return f"zq{table}x{pk}"


class StreamWriter:
    """Builds the seeded stream record by record; ``generate_stream`` decides what comes next."""

    def __init__(self, plan: Plan, rng: random.Random):
        self.plan, self.rng = plan, rng
        self.tables = table_names(plan)
        self.ts_only = self.tables[-1] if plan.tables > 1 else None  # a source without lsn
        self.live: dict[str, set[int]] = {table: set() for table in self.tables}
        self.deleted: set[str] = set()
        self.lsn = itertools.count(10_000, 16)
        self.revision = itertools.count(1)
        self.clock_ms = int(time.time() * 1000)
        self.records: list[Record] = []
        self.counts: dict[str, int] = {}
        self._bad = itertools.count()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _position(self, table: str, same_ms: bool = False) -> dict:
        """An lsn, or for the ts_ms-only table a clock that often stays on the same millisecond."""
        if table != self.ts_only:
            return {"lsn": next(self.lsn), "ts_ms": int(time.time() * 1000)}
        if not same_ms:
            self.clock_ms += self.rng.choice((0, 1, 3))
        return {"lsn": None, "ts_ms": self.clock_ms}

    def _append(self, table: str, key: bytes | None, value: bytes | None, kind: str, **fields) -> None:
        topic, partition = placement(self.plan, self.tables.index(table))
        self.records.append(Record(topic, partition, key, value, kind, f"{SCHEMA}.{table}", **fields))

    def change(self) -> None:
        table = self.rng.choice(self.tables)
        pk = self.rng.randrange(self.plan.keys_per_table)
        doc_id = f"{SCHEMA}.{table}:{pk}"
        if pk not in self.live[table]:
            self._count("re-create" if doc_id in self.deleted else "create")
            self._upsert("c", table, pk, self._position(table))
        elif self.rng.random() < 0.2:
            key, value = change_event("d", SCHEMA, table, {"id": pk}, before={"id": pk}, **self._position(table))
            self._append(table, key, value, "change", doc_id=doc_id, op="d")
            self._append(table, key, None, "tombstone", doc_id=doc_id)  # Debezium follows a delete with one
            self.live[table].discard(pk)
            self.deleted.add(doc_id)
            self._count("delete")
        else:
            self._count("update")
            self._upsert("u", table, pk, self._position(table))
            if table == self.ts_only and self.rng.random() < 0.3:  # a second write within the millisecond
                self._count("update in the same ms as the previous one")
                self._upsert("u", table, pk, self._position(table, same_ms=True))

    def _upsert(self, op: str, table: str, pk: int, position: dict) -> None:
        rev = next(self.revision)
        row = {"id": pk, "title": f"{table} row {pk} rev {rev}",
               "body": f"{unique_word(table, pk)} revision {rev} of a short chaos row", "rev": rev}
        key, value = change_event(op, SCHEMA, table, {"id": pk}, after=row, **position)
        self._append(table, key, value, "change", doc_id=f"{SCHEMA}.{table}:{pk}", op=op, rev=rev)
        self.live[table].add(pk)

    def truncate(self) -> None:
        table = self.rng.choice(self.tables)
        _, value = change_event("t", SCHEMA, table, {}, **self._position(table))
        self._append(table, None, value, "change", op="t")
        self.deleted |= {f"{SCHEMA}.{table}:{pk}" for pk in self.live[table]}
        self.live[table].clear()
        self._count("truncate")

    def bad(self, kind: str) -> None:
        """A record that must end in the dead-letter topic; its id is never used by a good change."""
        table = self.rng.choice(self.tables)
        pk = f"bad{next(self._bad)}"
        row = {"id": pk, "title": f"bad record {pk}", "body": "must be dead-lettered"}
        key, value = change_event("c", SCHEMA, table, {"id": pk}, after=row, lsn=next(self.lsn))
        event = json.loads(value)
        if kind == "invalid_json":
            value = value[: len(value) // 2]
        elif kind == "wrong_envelope":
            value = json.dumps(row).encode()
        elif kind == "unknown_op":
            value = json.dumps({**event, "op": "x"}).encode()
        elif kind == "unmappable_row":
            value = json.dumps({**event, "after": {"id": pk, "colour": "red"}}).encode()
        elif kind == "ts_ms_text":
            value = json.dumps({**event, "source": {**event["source"], "ts_ms": "abc"}}).encode()
        elif kind == "deep_nesting":
            nested = "[" * DEEP_NESTING + "]" * DEEP_NESTING
            value = json.dumps({**event, "after": {**row, "extra": "NESTED"}}).replace('"NESTED"', nested).encode()
        elif kind == OVERSIZED_KIND:  # a change event cut off inside a 2 MB string: invalid JSON
            value = value[:-2] + b', "blob": "' + b"x" * OVERSIZED_BYTES
        self._append(table, key, value, kind, doc_id=f"{SCHEMA}.{table}:{pk}")
        self._count(f"bad: {kind}")


def generate_stream(plan: Plan) -> tuple[list[Record], dict[str, int]]:
    """The whole stream, the same for the same plan; and how many of each kind it holds."""
    rng = random.Random(plan.seed)
    writer = StreamWriter(plan, rng)
    oversized_at = {int((index + 0.5) * plan.changes / plan.oversized) for index in range(plan.oversized)}
    truncates = max(1, plan.changes // 4000)
    truncate_at = set(rng.sample(range(plan.changes // 5, plan.changes), truncates))
    small_bad = itertools.cycle(SMALL_BAD_KINDS)
    for step in range(plan.changes):
        if step in oversized_at:
            writer.bad(OVERSIZED_KIND)
        elif step in truncate_at:
            writer.truncate()
        elif rng.random() < plan.bad_share:
            writer.bad(next(small_bad))
        else:
            writer.change()
    return writer.records, writer.counts


def end_markers(plan: Plan) -> list[Record]:
    """One change per partition after everything else: once it is served, its partition is read."""
    markers = []
    for topic, partition in partitions_used(plan):
        pk = f"{topic}-{partition}"
        key, value = change_event("c", SCHEMA, MARKER_TABLE, {"id": pk}, after={"id": pk, "title": "end"},
                                  lsn=10**15)
        markers.append(Record(topic, partition, key, value, "marker", f"{SCHEMA}.{MARKER_TABLE}",
                              doc_id=f"{SCHEMA}.{MARKER_TABLE}:{pk}"))
    return markers


def expected_state(records: list[Record]) -> dict[str, int | None]:
    """Per document, the revision the stream leaves it at, None when deleted.

    Folded in stream order: each table sits on one partition and its positions never decrease
    along the stream (equal ts_ms values are ordered by offset), so the newest change by source
    position is the last one; a truncate deletes the table's live documents at its place.
    """
    state: dict[str, int | None] = {}
    for record in records:
        if record.kind != "change":
            continue
        if record.op == "t":
            for doc_id, rev in state.items():
                if rev is not None and doc_id.startswith(f"{record.table}:"):
                    state[doc_id] = None
        else:
            state[record.doc_id] = None if record.op == "d" else record.rev
    return state


# -- the system under test ----------------------------------------------------------------------


class Publisher(threading.Thread):
    """Produces records at a steady rate, the way a database writes its log, and notes each offset."""

    def __init__(self, broker: str, records: list[Record], rate: float):
        super().__init__(name="publisher", daemon=True)
        self.kafka = producer(broker, **{"message.max.bytes": PRODUCER_MAX_BYTES})
        self.records, self.rate = records, rate
        self.produced = 0
        self.undelivered: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        with tqdm(total=len(self.records), desc="published", unit="rec", position=0, mininterval=1) as progress:
            for index, record in enumerate(self.records):
                wait = started + index / self.rate - time.monotonic()
                if self.stopping.wait(max(0.0, wait)):
                    return
                self.send(record)
                self.produced = index + 1
                progress.update()
        self.kafka.flush(60)

    def send(self, record: Record) -> None:
        def delivered(error, message) -> None:
            if error is None:
                record.offset = message.offset()
            else:
                self.undelivered.append(f"{record.topic}[{record.partition}] {record.kind}: {error}")

        while True:
            try:
                self.kafka.produce(record.topic, key=record.key, value=record.value,
                                   partition=record.partition, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self.kafka.poll(0.1)
        self.kafka.poll(0)

    def close(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(10)
        self.kafka.flush(30)


def metrics_text(worker: RoleProcess) -> str | None:
    """The worker's /metrics, or None while its API is down (a sample never waits long on it)."""
    try:
        response = worker.client.get("/metrics", timeout=2)
        return response.text if response.status_code == 200 else None
    except httpx.TransportError:
        return None


class Progress:
    """Samples of the worker's counters over time (None while its API is down); counters restart
    with each process, so the totals add up the last value each run reached."""

    COUNTERS = ("received", "applied")

    def __init__(self, started: float):
        self.started = started
        self.samples: list[dict] = []
        self._done_runs = {name: 0.0 for name in self.COUNTERS}
        self._current = dict(self._done_runs)

    def sample(self, worker: RoleProcess, published: int) -> None:
        sample = {"t": round(time.time() - self.started, 2), "published": published, "documents": None,
                  **{name: None for name in self.COUNTERS}}
        text = metrics_text(worker)
        if text is not None:
            self._current = {"received": sample_value(text, "autoglm_events_received_total"),
                             "applied": sample_value(text, "autoglm_events_total", outcome="applied")}
            sample.update(documents=sample_value(text, "autoglm_documents"),
                          **{name: self._done_runs[name] + value for name, value in self._current.items()})
        self.samples.append(sample)

    def run_ended(self) -> None:
        self._done_runs = {name: self._done_runs[name] + self._current[name] for name in self.COUNTERS}
        self._current = {name: 0.0 for name in self.COUNTERS}


# -- the run ------------------------------------------------------------------------------------


class Chaos:
    """Owns the broker address, the current worker, and everything recorded about them."""

    def __init__(self, plan: Plan, broker: str, data_dir: Path):
        self.plan, self.broker, self.data_dir = plan, broker, data_dir
        self.log_path = data_dir / "worker.log"
        self.started = time.time()
        self.progress = Progress(self.started)
        self.runs: list[WorkerRun] = []
        self.kills: list[dict] = []
        self.crashes: list[dict] = []
        self.worker: RoleProcess | None = None
        self.published = 0

    def start_worker(self) -> bool:
        """A new worker run on the same data dir and consumer group; whether it got healthy."""
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== chaos: worker start at {time.ctime()} =====\n".encode())
        run = WorkerRun(started_at=time.time())
        self.runs.append(run)
        self.worker = RoleProcess("worker", self.broker, self.data_dir, self.log_path,
                                  ["--group-id", "chaos-ingest", "--cdc-topics", rf"^{TOPIC_PREFIX}\."],
                                  http_timeout=10)
        try:
            self.worker.wait_healthy(HEALTHY_TIMEOUT_S)
        except (RoleExited, TimeoutError):
            return False
        run.healthy_after_s = round(time.time() - run.started_at, 2)
        return True

    def end_worker(self, how: str) -> int:
        """End the current run with SIGKILL ("kill -9") or SIGTERM ("stop"); returns its exit code."""
        self.progress.sample(self.worker, self.published)
        run = self.runs[-1]
        if self.worker.process.poll() is not None:
            how = "exited by itself"
        code = self.worker.stop(signal.SIGKILL if how == "kill -9" else signal.SIGTERM, timeout=30)
        if how == "stop" and code == -signal.SIGKILL:  # stop() kills what SIGTERM did not end in time
            how += ", then SIGKILL after 30 s"
        run.ended_at, run.ended_by, run.exit_code = time.time(), how, code
        self.progress.run_ended()
        return code

    def keep_alive(self) -> bool:
        """Restart a worker that exited on its own (recorded as a crash); False if it cannot come up."""
        if self.worker.process.poll() is None:
            return True
        code = self.end_worker("exited by itself")
        self.crashes.append({"at_s": round(time.time() - self.started, 1), "exit_code": code})
        console.print(f"[red]worker exited by itself with code {code}; restarting")
        return self.start_worker()

    def kill_and_restart(self, index: int, published: int, stream_done: bool) -> bool:
        killed = self.runs[-1]
        code = self.end_worker("kill -9")
        healthy = self.start_worker()
        self.kills.append({"kill": index + 1, "at_s": round(killed.ended_at - self.started, 2),
                           "published": published, "after_stream_end": stream_done, "exit_code": code,
                           "restart_healthy_after_s": self.runs[-1].healthy_after_s,
                           "survived": code == -signal.SIGKILL and healthy})
        return healthy

    def stream_with_kills(self, publisher: Publisher, kill_rng: random.Random) -> None:
        """Kill number k comes at a random point of the k-th equal slice of the stream (by records
        published), once the worker has been healthy a random 0-2 s; kills the stream outran
        come after its end and are marked so. A worker that dies by itself is restarted (and
        counted); one that stays up but never gets healthy ends the kills."""
        total = len(publisher.records)
        slice_size = total / max(1, self.plan.kills)
        thresholds = [int((index + kill_rng.random()) * slice_size) for index in range(self.plan.kills)]
        publisher.start()
        next_kill, not_before = 0, time.monotonic() + kill_rng.uniform(0, 2)
        with tqdm(total=self.plan.kills, desc="kill -9", unit="kill", position=1) as bar:
            while publisher.is_alive() or next_kill < self.plan.kills:
                self.published = publisher.produced
                self.progress.sample(self.worker, self.published)
                if not self.keep_alive():
                    console.print("[red]worker did not come back: no more kills")
                    break
                if (next_kill < self.plan.kills and publisher.produced >= thresholds[next_kill]
                        and time.monotonic() >= not_before):
                    healthy = self.kill_and_restart(next_kill, publisher.produced, not publisher.is_alive())
                    next_kill += 1
                    if not healthy and self.worker.process.poll() is None:
                        console.print(f"[red]worker alive but not healthy {HEALTHY_TIMEOUT_S:.0f} s after kill "
                                      f"{next_kill}: no more kills")
                        break
                    bar.update()
                    not_before = time.monotonic() + kill_rng.uniform(0, 2)
                time.sleep(SAMPLE_EVERY_S)
        publisher.join()
        self.published = publisher.produced

    def drain(self, markers: list[Record]) -> dict[str, float | None]:
        """Seconds from the markers' send until each is served; None for those that never were."""
        sent = time.time()
        seen: dict[str, float | None] = {marker.doc_id: None for marker in markers}
        deadline = time.monotonic() + self.plan.drain_timeout_s
        with tqdm(total=len(markers), desc="end markers served", position=2) as bar:
            while None in seen.values() and time.monotonic() < deadline:
                self.progress.sample(self.worker, self.published)
                if not self.keep_alive():
                    break
                for doc_id in [doc_id for doc_id, at in seen.items() if at is None]:
                    try:
                        if self.worker.document(doc_id) is not None:
                            seen[doc_id] = round(time.time() - sent, 2)
                            bar.update()
                    except httpx.TransportError:
                        pass
                time.sleep(SAMPLE_EVERY_S)
        return seen


# -- verification -------------------------------------------------------------------------------


def partition_of(plan: Plan, doc_id: str) -> tuple[str, int]:
    table = doc_id.removeprefix(f"{SCHEMA}.").split(":")[0]
    return placement(plan, table_names(plan).index(table))


def compare_documents(worker: RoleProcess, expected: dict[str, int | None], plan: Plan,
                      stalled: set[tuple[str, int]]) -> dict:
    """Lost, stale and ghost documents: the final state the stream defines against what the API serves.

    A partition whose end marker was never served has not been read to its end: its documents'
    differences are counted as ``behind_in_stalled_partitions``, not as losses (the markers
    target reports the stall)."""
    found: dict[str, dict[str, object]] = {kind: {} for kind in ("lost", "stale", "newer_than_stream", "ghosts")}
    behind = set()

    def differs(kind: str, doc_id: str, detail: object = None) -> None:
        if partition_of(plan, doc_id) in stalled:
            behind.add(doc_id)
        else:
            found[kind].setdefault(doc_id, detail or doc_id)

    for doc_id, rev in tqdm(expected.items(), desc="GET /documents", unit="doc", position=3, mininterval=1):
        served = worker.document(doc_id)
        served_rev = served["metadata"].get("rev") if served else None
        if rev is None and served is not None:
            differs("ghosts", doc_id)
        elif rev is not None and served is None:
            differs("lost", doc_id)
        elif rev is not None and served_rev != rev:
            differs("stale" if (served_rev or 0) < rev else "newer_than_stream", doc_id,
                    {"id": doc_id, "expected_rev": rev, "served_rev": served_rev})
    deleted = [doc_id for doc_id, rev in expected.items() if rev is None]
    for doc_id in tqdm(deleted, desc="/search deleted", unit="query", position=3, mininterval=1):
        table, pk = doc_id.removeprefix(f"{SCHEMA}.").split(":")
        # Any deleted document in the hits is a ghost, not only the one searched for.
        for hit in worker.search_ids(unique_word(table, int(pk)), k=SEARCH_K, log=False):
            if hit in expected and expected[hit] is None:
                differs("ghosts", hit)
    return {"documents_seen": len(expected), "expected_live": len(expected) - len(deleted),
            "expected_deleted": len(deleted), **{kind: len(items) for kind, items in found.items()},
            "behind_in_stalled_partitions": len(behind),
            "examples": {kind: list(items.values())[:10] for kind, items in found.items()}}


def read_dead_letters(broker: str, idle_s: float = 5.0, timeout: float = 120.0) -> list[dict]:
    """Every record of the dead-letter topic (its source headers and Kafka timestamp), read until
    none came for idle_s: the broker's high watermarks are not to be trusted (broker notes)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker, "group.id": "chaos-dlq-reader", "enable.auto.commit": False,
                         "fetch.max.bytes": 4 * PRODUCER_MAX_BYTES, "max.partition.fetch.bytes": 4 * PRODUCER_MAX_BYTES,
                         "receive.message.max.bytes": 5 * PRODUCER_MAX_BYTES})
    letters = []
    try:
        partitions = consumer.list_topics(DEAD_LETTERS, timeout=10).topics[DEAD_LETTERS].partitions
        consumer.assign([TopicPartition(DEAD_LETTERS, p, OFFSET_BEGINNING) for p in partitions])
        deadline, last = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            last = time.monotonic()
            headers = {name: raw.decode(errors="replace") for name, raw in message.headers() or []}
            letters.append({"topic": headers.get("source.topic"),
                            "partition": int(headers.get("source.partition", -1)),
                            "offset": int(headers.get("source.offset", -1)), "error": headers.get("error", ""),
                            "timestamp_ms": message.timestamp()[1], "bytes": len(message.value() or b"")})
    finally:
        consumer.close()
    return letters


def bad_records(records: list[Record]) -> list[Record]:
    return [record for record in records if record.kind not in GOOD_KINDS]


def check_dead_letters(records: list[Record], letters: list[dict], runs: list[WorkerRun],
                       indexed: set[str], stalled: set[tuple[str, int]]) -> dict:
    """Per bad-record kind: sent, dead-lettered at least once, missing, not reached (no dead letter,
    on a partition that stalled before its end), dead-lettered by more than one worker run (a
    replay after a kill: allowed), twice by one run (excess), and indexed instead.
    Dead letters naming a record that was not bad are counted as unexpected."""
    by_source = {(r.topic, r.partition, r.offset): r for r in records if r.offset is not None}
    letters_of: dict[int, list[dict]] = {}
    unexpected = []
    for letter in letters:
        record = by_source.get((letter["topic"], letter["partition"], letter["offset"]))
        if record is None or record.kind in GOOD_KINDS:
            unexpected.append({**letter, "kind": record.kind if record else "unknown", "doc_id": record and record.doc_id})
        else:
            letters_of.setdefault(id(record), []).append(letter)

    def run_of(letter: dict) -> int:
        """The worker run that sent it: the last one started before its timestamp."""
        started = [index for index, run in enumerate(runs) if run.started_at * 1000 <= letter["timestamp_ms"]]
        return started[-1] if started else 0

    kinds: dict[str, dict] = {}
    for record in bad_records(records):
        row = kinds.setdefault(record.kind, dict.fromkeys(DEAD_LETTER_COLUMNS, 0))
        found = letters_of.get(id(record), [])
        per_run = [run_of(letter) for letter in found]
        row["sent"] += 1
        row["found"] += bool(found)
        row["missing"] += not found and (record.topic, record.partition) not in stalled
        row["not_reached"] += not found and (record.topic, record.partition) in stalled
        row["dead_letters"] += len(found)
        row["in_several_runs"] += len(set(per_run)) > 1
        row["excess"] += len(per_run) - len(set(per_run))
        row["indexed_instead"] += record.doc_id in indexed
    total = {name: sum(row[name] for row in kinds.values()) for name in DEAD_LETTER_COLUMNS}
    reasons = sorted({letter["error"].split(":")[0] for letter in letters})
    return {"by_kind": kinds, "total": total, "unexpected": len(unexpected), "unexpected_examples": unexpected[:10],
            "read": len(letters), "reasons": reasons}


def served_ids(worker: RoleProcess, doc_ids: list[str]) -> set[str]:
    return {doc_id for doc_id in doc_ids if worker.document(doc_id) is not None}


def target_checks(results: dict) -> dict:
    """Each target with its value and whether the run met it."""
    plan, docs, letters = results["parameters"], results.get("documents") or {}, results.get("dead_letters") or {}
    survived = sum(kill["survived"] for kill in results["kills"])
    checks = {"kills_survived": (f"{survived}/{plan['kills']}", survived == plan["kills"]),
              "worker_exits_by_itself": (len(results["crashes"]), not results["crashes"]),
              "markers_served": (f"{results['markers']['served']}/{results['markers']['sent']}",
                                 results["markers"]["served"] == results["markers"]["sent"]),
              "undelivered_records": (len(results["undelivered"]), not results["undelivered"])}
    for name in ("lost", "stale", "newer_than_stream", "ghosts", "behind_in_stalled_partitions"):
        checks[name] = (docs.get(name, "not verified"), docs.get(name) == 0)
    total = letters.get("total", {})
    checks["dead_letters_missing"] = (total.get("missing", "not read"), total.get("missing") == 0)
    checks["dead_letters_not_reached"] = (total.get("not_reached", "not read"), total.get("not_reached") == 0)
    checks["dead_letters_twice_in_one_run"] = (total.get("excess", "not read"), total.get("excess") == 0)
    checks["good_records_dead_lettered"] = (letters.get("unexpected", "not read"), letters.get("unexpected") == 0)
    return {name: {"value": value, "met": met} for name, (value, met) in checks.items()}


# -- the run ------------------------------------------------------------------------------------


def run(plan: Plan, data_dir: Path) -> dict:
    """Every phase; the worker, the producer and the broker are gone when it returns."""
    started = time.time()
    records, counts = generate_stream(plan)
    markers = end_markers(plan)
    expected = expected_state(records)
    results: dict = {"parameters": asdict(plan), "git": git_version(), "data_dir": str(data_dir),
                     "stream": {"records": len(records), "bytes": sum(len(r.value or b"") for r in records),
                                "partitions": [f"{t}:{p}" for t, p in partitions_used(plan)], "kinds": counts}}
    durations = results["durations_s"] = {}
    with ExitStack() as stack:
        broker = EmbeddedBroker(log_file=data_dir / "broker.log").start()
        stack.callback(broker.stop)
        ensure_topics(broker.address, sorted({topic for topic, _ in partitions_used(plan)}), plan.partitions)
        ensure_topics(broker.address, PLATFORM_TOPICS)
        publisher = Publisher(broker.address, records, plan.rate)
        stack.callback(publisher.close)  # before the broker stops, or librdkafka retries noisily
        chaos = Chaos(plan, broker.address, data_dir)
        stack.callback(lambda: chaos.worker and chaos.worker.process.poll() is None and chaos.end_worker("stop"))
        if not chaos.start_worker():
            raise RuntimeError(f"the worker did not become healthy:\n{log_tail(chaos.log_path)}")
        mark = time.time()
        chaos.stream_with_kills(publisher, random.Random(plan.seed + 1))
        durations["stream_and_kills"] = round(time.time() - mark, 1)

        mark = time.time()
        for marker in markers:
            publisher.send(marker)
        publisher.kafka.flush(30)
        served = chaos.drain(markers)
        durations["drain"] = round(time.time() - mark, 1)
        results["markers"] = {"sent": len(markers), "served": sum(at is not None for at in served.values()),
                              "seconds_after_send": served}

        mark = time.time()
        indexed: set[str] = set()
        stalled = {(marker.topic, marker.partition) for marker in markers if served[marker.doc_id] is None}
        try:
            results["documents"] = compare_documents(chaos.worker, expected, plan, stalled)
            indexed = served_ids(chaos.worker, [record.doc_id for record in bad_records(records)])
        except httpx.HTTPError as exc:
            results["documents"] = None
            results["verification_error"] = repr(exc)
        results["dead_letters"] = check_dead_letters(records + markers, read_dead_letters(broker.address),
                                                     chaos.runs, indexed, stalled)
        durations["verify"] = round(time.time() - mark, 1)
        chaos.end_worker("stop")
        results.update(kills=chaos.kills, crashes=chaos.crashes, runs=[asdict(run) for run in chaos.runs],
                       undelivered=publisher.undelivered[:20])
        results["samples"] = chaos.progress.samples
        if any(not check["met"] for check in target_checks(results).values()):
            results["worker_log_tail"] = log_tail(chaos.log_path, 40).splitlines()
    results["targets"] = target_checks(results)
    results["git_at_end"] = git_version()
    durations["total"] = round(time.time() - started, 1)
    return results


# -- output ---------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    plan, targets = results["parameters"], results["targets"]
    table = Table(title=f"Chaos benchmark · {plan['changes']} changes · {plan['kills']} kill -9 · "
                        f"{results['durations_s']['total']:.0f} s")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    for name, check in targets.items():
        table.add_row(name.replace("_", " "), str(check["value"]), "[green]ok" if check["met"] else "[red]missed")
    restarts = [kill["restart_healthy_after_s"] for kill in results["kills"] if kill["restart_healthy_after_s"]]
    if restarts:
        table.add_row("restart to healthy (mean / max)", f"{sum(restarts) / len(restarts):.1f} / {max(restarts):.1f} s", "")
    final = results["runs"][-1]
    table.add_row("final stop (SIGTERM)", f"{final['ended_by']}, exit code {final['exit_code']}", "")
    docs = results.get("documents")
    if docs:
        table.add_row("documents (live / deleted at the end)", f"{docs['expected_live']} / {docs['expected_deleted']}", "")
    console.print(table)
    letters = results["dead_letters"]["by_kind"]
    kinds = Table(title="Bad records and their dead letters")
    columns = DEAD_LETTER_COLUMNS
    for column in ("kind", *columns):
        kinds.add_column(column.replace("_", " "))
    for kind, row in letters.items():
        kinds.add_row(kind, *(str(row[column]) for column in columns))
    console.print(kinds)


def plot(results: dict, path: Path) -> None:
    """What the worker had read and applied (over all its runs) against what was published, with
    each kill and the time until the restarted worker was healthy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    figure, axis = plt.subplots(figsize=(12, 5))
    t = [sample["t"] for sample in samples]
    for name, label in (("published", "records published"), ("received", "records read (replays included)"),
                        ("applied", "changes applied"), ("documents", "live documents")):
        values = [float("nan") if sample[name] is None else sample[name] for sample in samples]
        axis.plot(t, values, label=label)  # gaps: the worker's API was down
    for kill in results["kills"]:
        axis.axvline(kill["at_s"], color="red", linestyle=":", linewidth=1)
        axis.axvspan(kill["at_s"], kill["at_s"] + (kill["restart_healthy_after_s"] or 0), color="red", alpha=0.08)
    axis.plot([], [], color="red", linestyle=":", label="kill -9 (shaded: until healthy again)")
    axis.set(xlabel="seconds", ylabel="count", title="chaos run: progress through the stream")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20_000, help="changes in the stream (default %(default)s)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9s of the worker (default %(default)s)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--tables", type=int, default=6, help="tables; the last is ts_ms-only (default %(default)s)")
    parser.add_argument("--topics", type=int, default=2, help="CDC topics (default %(default)s)")
    parser.add_argument("--partitions", type=int, default=2, help="partitions per topic (default %(default)s)")
    parser.add_argument("--rate", type=float, default=40.0, help="records published per second (default %(default)s)")
    parser.add_argument("--bad-share", type=float, default=0.01,
                        help="share of the changes that are small bad records (default %(default)s)")
    parser.add_argument("--oversized", type=int, default=4, help="~2 MB bad records (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the end markers after the stream (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, help="keep the index and logs here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json",
                        help="JSON results; the PNG goes beside it (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM becomes SystemExit so the finally clauses stop the worker and the broker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    plan = Plan(changes=args.changes, kills=args.kills, seed=args.seed, tables=args.tables, topics=args.topics,
                partitions=args.partitions, rate=args.rate, bad_share=args.bad_share, oversized=args.oversized,
                drain_timeout_s=args.drain_timeout)
    with ExitStack() as stack:
        data_dir = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autoglm-chaos-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        results = run(plan, data_dir)
    return finish(results, args.out, plot, print_table)


if __name__ == "__main__":
    sys.exit(main())
