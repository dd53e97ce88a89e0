"""Ingest, freshness, query-latency and retrieval-quality benchmark of one worker on BEIR SciFact.

One run measures, in this order (each phase needs the state the previous one left):

1. raw encoder throughput: the document encoder alone, in this process, before the worker
   starts, so the two never compete for the CPU;
2. end-to-end throughput: the corpus published as a Debezium snapshot (op "r") through the
   embedded broker into a fresh worker, until its ``autoglm_documents`` gauge shows every document;
3. query latency per mode over HTTP (query encoding included) and
4. nDCG@10 per mode on the dev split of the train queries, both on the pristine snapshot;
5. freshness of single updates on an idle system, then
6. freshness under a steady load of new documents at half the raw encoder throughput;
7. the synthetic documents of 5-6 are deleted again, the worker is stopped, and the RRF fusion
   weights are swept in-process on the index it left behind (same dev split).

Targets (from the project brief) are printed next to each number. Results go to a JSON file and
a PNG beside it. Usage: ``bench/ingest.py [--quick] [--limit N] [--dataset PATH] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from autoglm.beir import CorpusDocument, mean_ndcg, read_corpus, read_qrels, read_queries, split_train  # noqa: E402
from autoglm.broker import EmbeddedBroker, free_port  # noqa: E402
from autoglm.debezium import change_event, producer  # noqa: E402
from autoglm.encoder import Encoder  # noqa: E402
from autoglm.process import die_with_parent  # noqa: E402
from autoglm.settings import FusionWeights, Settings  # noqa: E402
from autoglm.topics import ensure_topics  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402
from search.protocol import Document  # noqa: E402
from search.query import MODES, SearchService  # noqa: E402

SCHEMA, TABLE = "beir", "scifact"
TOPIC = f"cdc.{SCHEMA}.{TABLE}"
ENCODE_CHUNK = Settings().batch_max  # the worker's largest micro-batch
GAUGE_POLL_S = 0.5
VISIBILITY_POLL_S = 0.003
NDCG_K = 10
TARGETS = {"e2e_over_raw": 0.9, "idle_p99_s": 0.25, "load_p99_s": 1.5, "hybrid_p50_ms": 20.0}
SWEEP_DENSE_OVER_BM25 = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)  # RRF ranks depend on the ratio only
SWEEP_RRF_K = (5, 10, 20, 40, 60, 100)

console = Console()


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run; --quick shrinks everything to debug the script itself."""

    limit: int | None
    idle_probes: int
    load_seconds: float
    latency_queries_per_mode: int
    latency_warmup_per_mode: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Plan":
        if args.quick:
            return cls(limit=args.limit or 500, idle_probes=20, load_seconds=15,
                       latency_queries_per_mode=50, latency_warmup_per_mode=5)
        return cls(limit=args.limit, idle_probes=100, load_seconds=45,
                   latency_queries_per_mode=250, latency_warmup_per_mode=10)


# -- the system under test ------------------------------------------------------------------


class Pipeline:
    """A running broker + worker pair, seen the way a Debezium source and a search client see it."""

    def __init__(self, broker: str, api: str):
        self.client = httpx.Client(base_url=api, timeout=30)
        # linger 0: the source sends each change at once, so freshness is the worker's, not a batch wait.
        self.producer = producer(broker, **{"linger.ms": 0})
        self._lsn = itertools.count(1)  # one source, so one increasing log position for every event

    def publish(self, op: str, pk: str, title: str = "", text: str = "") -> float:
        """Send one change stamped with the current time; returns perf_counter() at the send."""
        row = {"id": pk, "title": title, "text": text}
        after, before = (None, {"id": pk}) if op == "d" else (row, None)
        key, value = change_event(op, SCHEMA, TABLE, {"id": pk}, after=after, before=before,
                                  lsn=next(self._lsn), ts_ms=int(time.time() * 1000))
        sent = time.perf_counter()
        self.producer.produce(TOPIC, key=key, value=value)
        self.producer.poll(0)
        return sent

    def metric_samples(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, keyed by (sample name, sorted labels)."""
        samples = {}
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def document_count(self) -> int:
        return int(self.metric_samples()[("autoglm_documents", ())])

    def freshness_buckets(self) -> dict[float, float]:
        """The worker's own freshness histogram: cumulative count per upper bound (le)."""
        return {float(dict(labels)["le"]): value for (name, labels), value in self.metric_samples().items()
                if name == "autoglm_freshness_seconds_bucket"}

    def wait_for_count(self, expected: int, timeout: float, progress: tqdm | None = None) -> float:
        """Poll the live-document gauge until it equals expected; returns perf_counter() when seen."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.document_count()
            if progress is not None:
                progress.update(count - progress.n)
            if count == expected:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker holds {count} documents, expected {expected}, after {timeout:.0f} s")
            time.sleep(GAUGE_POLL_S)

    def wait_visible(self, pk: str, title: str, sent: float, timeout: float = 60.0) -> float:
        """Seconds from a send until GET /documents shows its title: what a reader of the API sees."""
        path = f"/documents/{SCHEMA}.{TABLE}:{pk}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.client.get(path)
            if response.status_code == 200 and response.json()["title"] == title:
                return time.perf_counter() - sent
            time.sleep(VISIBILITY_POLL_S)
        raise TimeoutError(f"{path} did not show title {title!r} within {timeout:.0f} s")

    def search_ids(self, query: str, mode: str, k: int = NDCG_K) -> list[str]:
        response = self.client.get("/search", params={"q": query, "k": k, "mode": mode})
        response.raise_for_status()
        return [hit["id"] for hit in response.json()["hits"]]


@contextmanager
def running_pipeline(data_dir: Path, outcome: dict) -> Iterator[Pipeline]:
    """Broker, CDC topic and worker, torn down in reverse order even on errors.

    The topic exists before the worker starts because the worker subscribes to the matching
    topics it finds at start. The worker's exit code and shutdown time land in ``outcome``.
    """
    with ExitStack() as stack:
        broker = EmbeddedBroker(log_file=data_dir / "broker.log").start()
        stack.callback(broker.stop)
        ensure_topics(broker.address, [TOPIC], partitions=1)
        port = free_port()
        log_path = data_dir / "worker.log"
        log = stack.enter_context(open(log_path, "ab"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "autoglm.cli", "worker", "--broker", broker.address,
             "--data-dir", str(data_dir), "--api-port", str(port), "--cdc-topics", r"^cdc\."],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=die_with_parent)
        stack.callback(stop_worker, worker, outcome)
        try:
            pipeline = Pipeline(broker.address, f"http://127.0.0.1:{port}")
            stack.callback(pipeline.client.close)
            wait_healthy(pipeline.client, worker)
            yield pipeline
            pipeline.producer.flush(10)
        except BaseException:
            console.print(f"[red]worker log tail ({log_path}):[/red]\n{log_tail(log_path)}")
            raise


def wait_healthy(client: httpx.Client, worker: subprocess.Popen, timeout: float = 120.0) -> None:
    """The worker answers /healthz 200 once it has joined its consumer group (~15 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.returncode} before it was healthy")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"worker not healthy after {timeout:.0f} s")


def stop_worker(worker: subprocess.Popen, outcome: dict, timeout: float = 30.0) -> None:
    """SIGTERM, as an operator would; the exit code and shutdown time tell whether it stops cleanly."""
    started = time.perf_counter()
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            outcome["killed_after_s"] = timeout
    outcome.update(exit_code=worker.returncode, shutdown_s=round(time.perf_counter() - started, 2))


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- phases -----------------------------------------------------------------------------------


def measure_raw_encoder(encoder: Encoder, corpus: Sequence[CorpusDocument]) -> dict:
    """Documents/s of the encoder alone, fed exactly as the worker feeds it (its text, its batch size)."""
    texts = [Document(id=doc.id, table=f"{SCHEMA}.{TABLE}", title=doc.title, text=doc.text).embedding_text
             for doc in corpus]
    started = time.perf_counter()
    for start in tqdm(range(0, len(texts), ENCODE_CHUNK), desc="raw encoder", unit="batch"):
        encoder.embed(texts[start:start + ENCODE_CHUNK])
    seconds = time.perf_counter() - started
    return {"documents": len(texts), "chunk": ENCODE_CHUNK, "seconds": round(seconds, 2),
            "docs_per_s": round(len(texts) / seconds, 2)}


def measure_snapshot_ingest(pipeline: Pipeline, corpus: Sequence[CorpusDocument], raw_docs_per_s: float) -> dict:
    """Documents/s from the first produced snapshot event until the worker counts them all."""
    started = time.perf_counter()
    for doc in corpus:
        pipeline.publish("r", doc.id, doc.title, doc.text)
    pipeline.producer.flush(30)
    produced_s = time.perf_counter() - started
    with tqdm(total=len(corpus), desc="end-to-end", unit="doc") as progress:
        done = pipeline.wait_for_count(len(corpus), timeout=max(600.0, 10 * len(corpus) / raw_docs_per_s),
                                       progress=progress)
    seconds = done - started
    docs_per_s = len(corpus) / seconds
    return {"documents": len(corpus), "produce_s": round(produced_s, 2), "seconds": round(seconds, 2),
            "docs_per_s": round(docs_per_s, 2), "e2e_over_raw": round(docs_per_s / raw_docs_per_s, 3),
            "gauge_poll_s": GAUGE_POLL_S}


def measure_query_latency(pipeline: Pipeline, queries: Sequence[str], plan: Plan) -> dict[str, list[float]]:
    """Client-side seconds per search, per mode; every query text is used once, so no cache can help."""
    per_mode = plan.latency_warmup_per_mode + plan.latency_queries_per_mode
    if len(queries) < per_mode * len(MODES):
        raise ValueError(f"need {per_mode * len(MODES)} distinct queries, have {len(queries)}")
    latencies = {}
    for number, mode in enumerate(MODES):
        mine = queries[number * per_mode:(number + 1) * per_mode]
        for query in mine[:plan.latency_warmup_per_mode]:
            pipeline.search_ids(query, mode)
        samples = []
        for query in tqdm(mine[plan.latency_warmup_per_mode:], desc=f"latency {mode}", unit="query"):
            started = time.perf_counter()
            pipeline.search_ids(query, mode)
            samples.append(time.perf_counter() - started)
        latencies[mode] = samples
    return latencies


def measure_api_ndcg(pipeline: Pipeline, queries: dict[str, str], dev: dict[str, dict[str, int]]) -> dict:
    """nDCG@10 per mode through the API, i.e. with the worker's own fusion settings."""
    scores = {}
    for mode in MODES:
        run = {qid: [corpus_id(hit) for hit in pipeline.search_ids(queries[qid], mode)]
               for qid in tqdm(dev, desc=f"nDCG {mode}", unit="query")}
        scores[mode] = round(mean_ndcg(run, dev, NDCG_K), 4)
    return scores


def measure_idle_freshness(pipeline: Pipeline, corpus: Sequence[CorpusDocument], probes: int) -> list[float]:
    """Seconds until an update is readable, one update at a time, the system otherwise idle.

    Every probe rewrites the same extra row with a unique title, so it is a real update that
    must be re-embedded. The first probe (which creates the row) is not counted.
    """
    samples = []
    for number in tqdm(range(probes + 1), desc="idle freshness", unit="update"):
        doc = corpus[number % len(corpus)]
        title = f"Probe {number}: {doc.title}"
        seconds = pipeline.wait_visible("probe", title, pipeline.publish("u", "probe", title, doc.text))
        if number:
            samples.append(seconds)
        time.sleep(0.1)  # let the worker ack and fall idle again
    return samples


def produce_steadily(pipeline: Pipeline, corpus: Sequence[CorpusDocument], rate: float, seconds: float,
                     sent_events: queue.Queue) -> int:
    """New unique documents at a fixed rate (on a schedule, so a slow send does not lower the rate)."""
    started = time.perf_counter()
    count = 0
    while (due := started + count / rate) < started + seconds:
        time.sleep(max(0.0, due - time.perf_counter()))
        doc = corpus[count % len(corpus)]
        pk, title = f"load-{count}", f"Load {count}: {doc.title}"
        sent_events.put((pk, title, pipeline.publish("c", pk, title, doc.text)))
        count += 1
    return count


def measure_loaded_freshness(pipeline: Pipeline, corpus: Sequence[CorpusDocument], rate: float,
                             seconds: float) -> dict:
    """Freshness of marked events while a background source writes at ``rate`` documents/s.

    The prober always takes the next event sent after its previous probe finished, so it starts
    polling within milliseconds of the send and never polls more than one id at a time.
    """
    sent_events: queue.Queue = queue.Queue()
    samples = []
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(desc="loaded freshness", unit="probe") as progress:
        source: Future = pool.submit(produce_steadily, pipeline, corpus, rate, seconds, sent_events)
        while not source.done():
            drain(sent_events)
            try:
                pk, title, sent = sent_events.get(timeout=1.0)
            except queue.Empty:
                continue
            samples.append(pipeline.wait_visible(pk, title, sent))
            progress.update()
        published = source.result()
    return {"rate_docs_per_s": round(rate, 2), "seconds": seconds, "published": published, "samples": samples}


def drain(events: queue.Queue) -> None:
    """Drop events sent while the prober was busy: probing them late would understate their age."""
    while True:
        try:
            events.get_nowait()
        except queue.Empty:
            return
