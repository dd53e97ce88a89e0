"""Ingest, freshness, query-latency and retrieval-quality benchmark of one worker on BEIR SciFact.

One run measures, in this order (each phase needs the state the previous one left):

1. raw encoder throughput: the document encoder alone, in this process, before the worker
   starts, so the two never compete for the CPU;
2. end-to-end throughput: the corpus published as a Debezium snapshot (op "r") through the
   embedded broker into a fresh worker, until its ``autoglm_documents`` gauge shows every document;
3. query latency per mode over HTTP (query encoding included) and
4. nDCG@10 per mode on the dev split of the train queries, through the API;
5. the worker stops, and the RRF fusion weights are swept in-process on the index it left
   (one process owns an index directory), i.e. on exactly the documents phase 4 ranked;
6. the worker restarts on the same index and broker: freshness of single updates on an idle
   system, then
7. freshness under a steady load of new documents at half the raw encoder throughput.

Targets (from the project brief) are printed next to each number, and so is the share of the
CPU that other processes took during each phase: on 2 cores a neighbour skews everything.
Results go to a JSON file and a PNG beside it.

Usage: ``bench/ingest.py [--quick] [--limit N] [--dataset PATH] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import platform
import queue
import signal
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from autoglm.beir import (CorpusDocument, mean_ndcg, read_corpus, read_qrels, read_queries,  # noqa: E402
                          split_train)
from autoglm.broker import EmbeddedBroker  # noqa: E402
from autoglm.datasets import corpus_id  # noqa: E402
from autoglm.debezium import change_event, producer  # noqa: E402
from autoglm.encoder import Encoder  # noqa: E402
from autoglm.settings import FusionWeights, Settings  # noqa: E402
from autoglm.topics import ensure_topics  # noqa: E402
from bench.report import finish, git_version, log_tail  # noqa: E402
from roles.harness import RoleProcess  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402
from search.protocol import Document  # noqa: E402
from search.query import MODES, SearchService  # noqa: E402
from search.serving import ServedModels  # noqa: E402

SCHEMA, TABLE = "beir", "scifact"
TOPIC = f"cdc.{SCHEMA}.{TABLE}"
ENCODE_CHUNK = Settings().batch_max  # the worker's largest micro-batch
GAUGE_POLL_S = 0.5
VISIBILITY_POLL_S = 0.005  # a GET costs the worker ~1 ms of CPU: faster polling slows what it measures
NDCG_K = 10  # every search asks for this many hits: the depth nDCG is measured at
TARGETS = {"e2e_over_raw": 0.9, "idle_p99_ms": 250.0, "load_p99_ms": 1500.0, "hybrid_p50_ms": 20.0}
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


class Source:
    """The database side: change events of one table, numbered by one increasing log position."""

    def __init__(self, broker: str):
        # linger 0: each change is sent at once, so freshness is the worker's, not a batch wait.
        self.producer = producer(broker, **{"linger.ms": 0})
        self._lsn = itertools.count(1)

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

    def close(self) -> None:
        """Deliver what is queued; closed before the broker stops, or librdkafka retries noisily."""
        self.producer.close()


def metric_samples(worker: RoleProcess) -> dict[tuple[str, tuple], float]:
    """Every sample of the worker's /metrics, keyed by (sample name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(worker.client.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def document_count(worker: RoleProcess) -> int:
    return int(metric_samples(worker)[("autoglm_documents", ())])


def wait_for_count(worker: RoleProcess, expected: int, timeout: float, progress: tqdm | None = None) -> float:
    """Poll the live-document gauge until it equals expected; returns perf_counter() when seen."""
    deadline = time.monotonic() + timeout
    while True:
        count = document_count(worker)
        if progress is not None:
            progress.update(count - progress.n)
        if count == expected:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker holds {count} documents, expected {expected}, "
                               f"after {timeout:.0f} s")
        time.sleep(GAUGE_POLL_S)


def wait_visible(worker: RoleProcess, pk: str, title: str, sent: float, timeout: float = 60.0) -> float:
    """Seconds from a send until GET /documents shows its title: what a reader of the API sees."""
    doc_id = f"{SCHEMA}.{TABLE}:{pk}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = worker.document(doc_id)
        if document is not None and document["title"] == title:
            return time.perf_counter() - sent
        time.sleep(VISIBILITY_POLL_S)
    raise TimeoutError(f"/documents/{doc_id} did not show title {title!r} within {timeout:.0f} s")


@contextmanager
def running_broker(data_dir: Path) -> Iterator[str]:
    """The embedded broker with the CDC topic (1 partition, Debezium's default); yields its address.

    The topic exists before any worker starts: a worker subscribes to the matching topics it
    finds at start. The broker outlives the workers, so a restarted worker resumes its offsets.
    """
    broker = EmbeddedBroker(log_file=data_dir / "broker.log").start()
    try:
        ensure_topics(broker.address, [TOPIC], partitions=1)
        yield broker.address
    finally:
        broker.stop()


@contextmanager
def running_worker(broker: str, data_dir: Path, outcome: dict) -> Iterator[RoleProcess]:
    """One worker process on data_dir, stopped with SIGTERM even on errors.

    ``outcome`` gets the seconds until it was healthy (it answers /healthz 200 once it has
    joined its consumer group, ~15 s), its exit code and its shutdown time.
    """
    log_path = data_dir / "worker.log"
    started = time.perf_counter()
    worker = RoleProcess("worker", broker, data_dir, log_path, ["--cdc-topics", r"^cdc\."])
    try:
        worker.wait_healthy(timeout=120.0)
        outcome["healthy_after_s"] = round(time.perf_counter() - started, 1)
        yield worker
    except BaseException:
        console.print(f"[red]worker log tail ({log_path}):[/red]\n{log_tail(log_path)}")
        raise
    finally:
        stop_worker(worker, outcome)


def stop_worker(worker: RoleProcess, outcome: dict, timeout: float = 30.0) -> None:
    """SIGTERM, as an operator would; the exit code and shutdown time tell whether it stops cleanly."""
    started = time.perf_counter()
    outcome["exit_code"] = worker.stop(timeout=timeout)
    if outcome["exit_code"] == -signal.SIGKILL:  # stop() kills what SIGTERM did not end in time
        outcome["killed_after_s"] = timeout
    outcome["shutdown_s"] = round(time.perf_counter() - started, 2)


# -- noisy neighbours ---------------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds of this process and its descendants), from /proc.

    On 2 cores any other busy process skews every number here, so each phase reports its share.
    """
    tick = os.sysconf("SC_CLK_TCK")
    cpu = Path("/proc/stat").read_text().split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, cpu)
    parents, own = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        own[pid] = sum(int(value) for value in fields[11:15])  # utime, stime, and of reaped children
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
    return (user + nice + system + irq + softirq + steal) / tick, sum(own.get(pid, 0) for pid in tree) / tick


@contextmanager
def phase(title: str, name: str, interference: dict) -> Iterator[None]:
    """Announce a phase and record the share of the machine's CPU that other processes took meanwhile."""
    console.rule(title)
    started, (busy, ours) = time.perf_counter(), cpu_seconds()
    yield
    wall, (busy_after, ours_after) = time.perf_counter() - started, cpu_seconds()
    foreign = max(0.0, (busy_after - busy) - (ours_after - ours))
    interference[name] = round(foreign / (wall * os.cpu_count()), 3)


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


def measure_snapshot_ingest(source: Source, worker: RoleProcess, corpus: Sequence[CorpusDocument],
                            raw_docs_per_s: float) -> dict:
    """Documents/s from the first produced snapshot event until the worker counts them all."""
    started = time.perf_counter()
    for doc in corpus:
        source.publish("r", doc.id, doc.title, doc.text)
    source.producer.flush(30)
    produced_s = time.perf_counter() - started
    with tqdm(total=len(corpus), desc="end-to-end", unit="doc") as progress:
        done = wait_for_count(worker, len(corpus), timeout=max(600.0, 10 * len(corpus) / raw_docs_per_s),
                              progress=progress)
    seconds = done - started
    docs_per_s = len(corpus) / seconds
    return {"documents": len(corpus), "produce_s": round(produced_s, 2), "seconds": round(seconds, 2),
            "docs_per_s": round(docs_per_s, 2), "e2e_over_raw": round(docs_per_s / raw_docs_per_s, 3),
            "gauge_poll_s": GAUGE_POLL_S}


def measure_query_latency(worker: RoleProcess, queries: Sequence[str], plan: Plan) -> dict[str, list[float]]:
    """Client-side seconds per search, per mode; every query text is used once, so no cache can help.

    Searches log their impression, as a user's search does."""
    per_mode = plan.latency_warmup_per_mode + plan.latency_queries_per_mode
    if len(queries) < per_mode * len(MODES):
        raise ValueError(f"need {per_mode * len(MODES)} distinct queries, have {len(queries)}")
    latencies = {}
    for number, mode in enumerate(MODES):
        mine = queries[number * per_mode:(number + 1) * per_mode]
        for query in mine[:plan.latency_warmup_per_mode]:
            worker.search_ids(query, mode, k=NDCG_K)
        samples = []
        for query in tqdm(mine[plan.latency_warmup_per_mode:], desc=f"latency {mode}", unit="query"):
            started = time.perf_counter()
            worker.search_ids(query, mode, k=NDCG_K)
            samples.append(time.perf_counter() - started)
        latencies[mode] = samples
    return latencies


def measure_api_ndcg(worker: RoleProcess, queries: dict[str, str], dev: dict[str, dict[str, int]]) -> dict:
    """nDCG@10 per mode through the API, i.e. with the worker's own fusion settings (not logged as
    impressions: an evaluation is not user behaviour)."""
    scores = {}
    for mode in MODES:
        ranked = {qid: [corpus_id(hit) for hit in worker.search_ids(queries[qid], mode, k=NDCG_K, log=False)]
                  for qid in tqdm(dev, desc=f"nDCG {mode}", unit="query")}
        scores[mode] = round(mean_ndcg(ranked, dev, NDCG_K), 4)
    return scores


def measure_idle_freshness(source: Source, worker: RoleProcess, corpus: Sequence[CorpusDocument],
                           probes: int) -> list[float]:
    """Seconds until an update is readable, one update at a time, the system otherwise idle.

    Every probe rewrites the same extra row with a unique title, so it is a real update that
    must be re-embedded. The first probe (which creates the row) is not counted.
    """
    samples = []
    for number in tqdm(range(probes + 1), desc="idle freshness", unit="update"):
        doc = corpus[number % len(corpus)]
        title = f"Probe {number}: {doc.title}"
        seconds = wait_visible(worker, "probe", title, source.publish("u", "probe", title, doc.text))
        if number:
            samples.append(seconds)
        time.sleep(0.1)  # let the worker ack and fall idle again
    return samples


def produce_steadily(source: Source, corpus: Sequence[CorpusDocument], rate: float, seconds: float,
                     sent_events: queue.Queue) -> tuple[int, float]:
    """New unique documents at a fixed rate (on a schedule, so a slow send does not lower the rate).

    Returns how many it sent and perf_counter() at the last send."""
    started = sent = time.perf_counter()
    count = 0
    while (due := started + count / rate) < started + seconds:
        time.sleep(max(0.0, due - time.perf_counter()))
        doc = corpus[count % len(corpus)]
        pk, title = f"load-{count}", f"Load {count}: {doc.title}"
        sent = source.publish("c", pk, title, doc.text)
        sent_events.put((pk, title, sent))
        count += 1
    return count, sent


def measure_loaded_freshness(source: Source, worker: RoleProcess, corpus: Sequence[CorpusDocument], rate: float,
                             seconds: float) -> dict:
    """Freshness of marked events while a background source writes at ``rate`` documents/s.

    The prober always takes the next event sent after its previous probe finished, so it starts
    polling within milliseconds of the send and never polls more than one id at a time. At the
    end it waits for the backlog: a worker that cannot keep up shows it there first.
    """
    baseline = document_count(worker)
    sent_events: queue.Queue = queue.Queue()
    samples = []
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(desc="loaded freshness", unit="probe") as progress:
        load: Future = pool.submit(produce_steadily, source, corpus, rate, seconds, sent_events)
        while not load.done():
            drain(sent_events)
            try:
                pk, title, sent = sent_events.get(timeout=1.0)
            except queue.Empty:
                continue
            samples.append(wait_visible(worker, pk, title, sent))
            progress.update()
        published, last_sent = load.result()
    caught_up = wait_for_count(worker, baseline + published, timeout=300)
    return {"rate_docs_per_s": round(rate, 2), "seconds": seconds, "published": published,
            "catch_up_after_last_send_s": round(caught_up - last_sent, 2), "samples": samples}


def drain(events: queue.Queue) -> None:
    """Drop events sent while the prober was busy: one may be visible already, and probing it late
    would time the prober, not the worker."""
    while True:
        try:
            events.get_nowait()
        except queue.Empty:
            return


class MemoisedEncoder:
    """The query encoder, each query embedded once: the sweep ranks the same queries many times."""

    def __init__(self, encoder: Encoder):
        self.version = encoder.version
        self.embed_one = functools.lru_cache(maxsize=None)(encoder.embed_one)


def sweep_fusion(index_dir: Path, encoder: Encoder, queries: dict[str, str], dev: dict) -> dict:
    """Dev nDCG@10 of hybrid search over a grid of RRF weights and k, on the index the worker left.

    It runs after the worker has stopped, because one process owns an index directory. The
    index holds what the API ranked in phase 4, so the default row reproduces the API's hybrid.
    """
    served = ServedModels(MemoisedEncoder(encoder))
    defaults = Settings()
    grid = []
    index = EmbeddedIndex(index_dir)
    try:
        for ratio, rrf_k in tqdm(list(itertools.product(SWEEP_DENSE_OVER_BM25, SWEEP_RRF_K)),
                                 desc="fusion sweep"):
            service = SearchService(index, served, weights=FusionWeights(bm25=1.0, dense=ratio), rrf_k=rrf_k,
                                    candidates=defaults.fusion_candidates)
            ranked = {}
            for qid in dev:
                result = service.search(queries[qid], NDCG_K, mode="hybrid")
                ranked[qid] = [corpus_id(hit.id) for hit, _ in result.hits]
            grid.append({"bm25": 1.0, "dense": ratio, "rrf_k": rrf_k,
                         "ndcg": round(mean_ndcg(ranked, dev, NDCG_K), 4)})
    finally:
        index.close()
    default_ratio = defaults.fusion_weights.dense / defaults.fusion_weights.bm25
    default = next(row for row in grid
                   if row["rrf_k"] == defaults.rrf_k and row["dense"] / row["bm25"] == default_ratio)
    return {"default": default, "best": max(grid, key=lambda row: row["ndcg"]), "grid": grid}


# -- summaries ------------------------------------------------------------------------------------


def restrict_qrels(qrels: dict[str, dict[str, int]], indexed: set[str]) -> dict[str, dict[str, int]]:
    """Judgements of indexed documents only (all of them on the full corpus); --limit runs need this
    or every unindexed relevant document would count as a miss."""
    kept = {qid: {doc: rel for doc, rel in judged.items() if doc in indexed} for qid, judged in qrels.items()}
    return {qid: judged for qid, judged in kept.items() if judged}


def milliseconds(samples_s: Sequence[float]) -> list[float]:
    return [round(value * 1000, 2) for value in samples_s]


def percentiles_ms(samples_s: Sequence[float]) -> dict:
    values = np.asarray(samples_s) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p99_ms": round(float(np.percentile(values, 99)), 1), "max_ms": round(float(values.max()), 1)}


def worker_view(before: dict, after: dict) -> dict:
    """The worker's own metrics over one phase: its freshness histogram (source ts_ms -> committed),
    reduced to the bucket bounds holding p50 and p99, and its mean commit time. Coarse, but
    independent of the client's polling."""
    def buckets(samples: dict) -> dict[float, float]:
        return {float(dict(labels)["le"]): value for (name, labels), value in samples.items()
                if name == "autoglm_freshness_seconds_bucket"}

    counts = {le: count - buckets(before).get(le, 0.0) for le, count in sorted(buckets(after).items())}
    total = counts[float("inf")]
    commits = after[("autoglm_commit_seconds_count", ())] - before[("autoglm_commit_seconds_count", ())]
    commit_s = after[("autoglm_commit_seconds_sum", ())] - before[("autoglm_commit_seconds_sum", ())]

    def bound(q: float) -> str:
        return f"{next(le for le, count in counts.items() if count >= q * total):g}"

    return {"events": int(total), "p50_at_most_s": bound(0.5), "p99_at_most_s": bound(0.99),
            "cumulative": {f"{le:g}": int(count) for le, count in counts.items()},
            "commits": int(commits), "commit_mean_ms": round(1000 * commit_s / max(commits, 1), 1)}


def target_checks(results: dict) -> dict:
    """Each target of the brief with the measured value and whether it is met."""
    ndcg = results["ndcg_at_10"]["api"]
    checks = {
        "e2e_over_raw": (results["end_to_end"]["e2e_over_raw"], ">="),
        "idle_p99_ms": (results["freshness_idle"]["client"]["p99_ms"], "<="),
        "load_p99_ms": (results["freshness_load"]["client"]["p99_ms"], "<="),
        "hybrid_p50_ms": (results["query_latency"]["modes"]["hybrid"]["p50_ms"], "<="),
    }
    table = {name: {"value": value, "target": f"{op} {TARGETS[name]:g}",
                    "met": value >= TARGETS[name] if op == ">=" else value <= TARGETS[name]}
             for name, (value, op) in checks.items()}
    best_single = max(ndcg["bm25"], ndcg["dense"])
    table["hybrid_ndcg_ge_both"] = {"value": ndcg["hybrid"], "target": f">= {best_single}",
                                    "met": ndcg["hybrid"] >= best_single}
    return table


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "git": git_version()}


# -- the run ----------------------------------------------------------------------------------------


def run_snapshot_phases(source: Source, worker: RoleProcess, corpus: list[CorpusDocument],
                        queries: dict[str, str], train: dict, dev: dict, raw: dict, plan: Plan,
                        interference: dict) -> tuple[dict, dict]:
    """Phases 2-4 on a fresh worker: ingest the snapshot, then query it. Returns (results, samples)."""
    results: dict = {}
    with phase("2. end-to-end snapshot ingest", "end_to_end", interference):
        before = metric_samples(worker)
        results["end_to_end"] = measure_snapshot_ingest(source, worker, corpus, raw["docs_per_s"])
        results["end_to_end"]["worker"] = worker_view(before, metric_samples(worker))

    with phase("3. query latency over the API", "query_latency", interference):
        latencies = measure_query_latency(worker, [queries[qid] for qid in train], plan)
    results["query_latency"] = {"impressions_logged": True,
                                "modes": {mode: percentiles_ms(values) for mode, values in latencies.items()}}

    with phase("4. nDCG@10 over the API", "ndcg", interference):
        results["ndcg_at_10"] = {"split": "dev of train (autoglm.beir.split_train)", "queries": len(dev),
                                 "api": measure_api_ndcg(worker, queries, dev)}
    return results, {"query_ms": {mode: milliseconds(values) for mode, values in latencies.items()}}


def run_freshness_phases(source: Source, worker: RoleProcess, corpus: list[CorpusDocument], raw: dict, plan: Plan,
                         interference: dict) -> tuple[dict, dict]:
    """Phases 6-7 on the restarted worker. Returns (results, samples)."""
    results: dict = {}
    with phase("6. freshness, idle", "freshness_idle", interference):
        before = metric_samples(worker)
        idle = measure_idle_freshness(source, worker, corpus, plan.idle_probes)
        results["freshness_idle"] = {"client": percentiles_ms(idle), "poll_s": VISIBILITY_POLL_S,
                                     "worker": worker_view(before, metric_samples(worker))}

    with phase("7. freshness under load", "freshness_load", interference):
        before = metric_samples(worker)
        load = measure_loaded_freshness(source, worker, corpus, raw["docs_per_s"] / 2, plan.load_seconds)
        results["freshness_load"] = {**{key: value for key, value in load.items() if key != "samples"},
                                     "client": percentiles_ms(load["samples"]), "poll_s": VISIBILITY_POLL_S,
                                     "worker": worker_view(before, metric_samples(worker))}
    return results, {"idle_ms": milliseconds(idle), "load_ms": milliseconds(load["samples"])}


def run(dataset: Path, plan: Plan) -> dict:
    """All phases; the workers and the broker are gone when it returns, whatever happened."""
    started = time.perf_counter()
    corpus = list(islice(read_corpus(dataset), plan.limit))
    queries = read_queries(dataset)
    train = read_qrels(dataset, "train")
    dev = restrict_qrels(split_train(train)[1], {doc.id for doc in corpus})
    interference: dict = {}
    workers: dict = {"snapshot": {}, "restarted": {}}
    results = {"dataset": str(dataset), "plan": dataclasses.asdict(plan), "environment": environment(),
               "other_processes_cpu_share": interference, "workers": workers}

    encoder = Encoder()
    with phase(f"1. raw encoder ({len(corpus)} documents)", "raw_encoder", interference):
        results["raw_encoder"] = measure_raw_encoder(encoder, corpus)
    raw = results["raw_encoder"]
    with ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autoglm-bench-")))
        broker = stack.enter_context(running_broker(data_dir))
        source = stack.enter_context(closing(Source(broker)))
        with running_worker(broker, data_dir, workers["snapshot"]) as worker:
            snapshot, samples = run_snapshot_phases(source, worker, corpus, queries, train, dev, raw, plan,
                                                    interference)
        with phase("5. fusion weight sweep (worker stopped)", "fusion_sweep", interference):
            snapshot["ndcg_at_10"]["fusion_sweep"] = sweep_fusion(data_dir / "index", encoder, queries, dev)
        with running_worker(broker, data_dir, workers["restarted"]) as worker:
            freshness, freshness_samples = run_freshness_phases(source, worker, corpus, raw, plan, interference)
    results.update(snapshot, **freshness)
    results["targets"] = target_checks(results)
    results["environment"]["git_at_end"] = git_version()
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    results["samples"] = {**samples, **freshness_samples}
    return results


# -- output ---------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    raw, e2e = results["raw_encoder"], results["end_to_end"]
    idle, load = results["freshness_idle"], results["freshness_load"]
    ndcg, sweep = results["ndcg_at_10"]["api"], results["ndcg_at_10"]["fusion_sweep"]
    targets = results["targets"]

    def verdict(name: str) -> str:
        return f"{targets[name]['target']} {'[green]ok' if targets[name]['met'] else '[red]missed'}"

    table = Table(title=f"Ingest benchmark · {e2e['documents']} documents · {results['runtime_s']:.0f} s")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    table.add_row("raw encoder", f"{raw['docs_per_s']:.1f} docs/s ({raw['documents']} docs)", "")
    table.add_row("end-to-end", f"{e2e['docs_per_s']:.1f} docs/s ({e2e['seconds']:.0f} s)", "")
    table.add_row("end-to-end / raw", f"{e2e['e2e_over_raw']:.3f}", verdict("e2e_over_raw"))
    for label, fresh, target in (("freshness idle", idle, "idle_p99_ms"),
                                 (f"freshness at {load['rate_docs_per_s']:.1f} docs/s", load, "load_p99_ms")):
        client = fresh["client"]
        table.add_row(f"{label} p50 / p99",
                      f"{client['p50_ms']:.0f} / {client['p99_ms']:.0f} ms (n={client['n']}; "
                      f"worker p99 <= {fresh['worker']['p99_at_most_s']} s)", verdict(target))
    for mode, latency in results["query_latency"]["modes"].items():
        table.add_row(f"query {mode} p50 / p99", f"{latency['p50_ms']:.1f} / {latency['p99_ms']:.1f} ms",
                      verdict("hybrid_p50_ms") if mode == "hybrid" else "")
    table.add_row("nDCG@10 bm25 / dense / hybrid",
                  f"{ndcg['bm25']:.4f} / {ndcg['dense']:.4f} / {ndcg['hybrid']:.4f} "
                  f"({results['ndcg_at_10']['queries']} dev queries)", verdict("hybrid_ndcg_ge_both"))
    best, default = sweep["best"], sweep["default"]
    table.add_row("best RRF on dev (in-process)",
                  f"bm25 {best['bm25']:g}, dense {best['dense']:g}, k {best['rrf_k']}: {best['ndcg']:.4f} "
                  f"(default {default['ndcg']:.4f}, API {ndcg['hybrid']:.4f})", "")
    first, second = results["workers"]["snapshot"], results["workers"]["restarted"]
    table.add_row("worker healthy after start / restart",
                  f"{first['healthy_after_s']:.0f} / {second['healthy_after_s']:.0f} s "
                  f"(exit codes {first['exit_code']}, {second['exit_code']})", "")
    share = results["other_processes_cpu_share"]
    busiest = max(share, key=share.get)
    table.add_row("other processes' CPU (busiest phase)", f"{share[busiest]:.0%} of the machine in {busiest}",
                  "<= 5% for clean numbers " + ("[green]ok" if share[busiest] <= 0.05 else "[red]noisy"))
    console.print(table)


def plot(results: dict, path: Path) -> None:
    """Freshness distributions (idle vs load, log axis) and per-mode query latency, as ECDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    figure, (fresh, query) = plt.subplots(1, 2, figsize=(12, 4.5))
    load_label = f"load {results['freshness_load']['rate_docs_per_s']:.1f} docs/s"
    for label, values, target in (("idle", samples["idle_ms"], TARGETS["idle_p99_ms"]),
                                  (load_label, samples["load_ms"], TARGETS["load_p99_ms"])):
        line, = fresh.step(*ecdf(values), where="post", label=label)
        fresh.axvline(target, color=line.get_color(), linestyle=":", label=f"p99 target {target:g} ms")
    for mode, values in samples["query_ms"].items():
        query.step(*ecdf(values), where="post", label=mode)
    query.axvline(TARGETS["hybrid_p50_ms"], color="grey", linestyle=":", label="hybrid p50 target")
    fresh.set(xscale="log", xlabel="ms", ylabel="fraction of events",
              title="freshness: send -> readable via GET /documents")
    query.set(xlabel="ms", ylabel="fraction of queries", title="query latency over HTTP (encoding included)")
    for axis in (fresh, query):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ecdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the fraction of values at or below each: a distribution without binning."""
    return np.sort(values), np.arange(1, len(values) + 1) / len(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "scifact",
                        help="BEIR SciFact directory (default %(default)s)")
    parser.add_argument("--limit", type=int, help="first N corpus documents (default all; 500 with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json",
                        help="JSON results; the PNG goes beside it (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="~500 documents and short phases (~3 min)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM becomes SystemExit so the finally clauses stop the worker and the broker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = run(args.dataset.resolve(), Plan.from_args(args))
    return finish(results, args.out, plot, print_table)


if __name__ == "__main__":
    sys.exit(main())
