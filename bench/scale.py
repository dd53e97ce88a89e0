"""Scaling benchmark (issue 10): what more processes of each role buy on this machine.

One embedded broker and one Elasticsearch (the noida-db emulator, or ``AUTOGLM_ES_URL``); in one run:

1. **the encoder alone**, in this process: documents/s of ``Encoder.embed`` over the same
   documents, the ceiling any number of ingest workers shares on these cores;
2. **ingest**: for 1, 2 and 3 ``autoglm ingest`` workers in one consumer group, a fresh index
   and topic (6 partitions); the workers are started and warmed up (one document per partition
   applied, so every partition is assigned and every encoder loaded), then ``--docs`` SciFact
   documents are published and timed from the first publish to the last one counted in the index;
3. **serve**: two ``autoglm serve`` replicas on the last index; ``--queries`` hybrid searches
   (SciFact query texts, not logged as impressions) from ``--clients`` concurrent clients, all to
   one replica, then spread over both: queries/s and latency percentiles;
4. **learner failover**: two ``autoglm learn`` processes in one group; the active one is killed
   with SIGKILL ``--failovers`` times (restarted as the standby each time), timed until the other
   reports itself active.

Ratios are against the 1-worker and 1-replica runs of the same invocation (the machine is noisy).
On a 2-core machine every worker's encoder shares the same two cores, so the ingest curve
flattens at the encoder's rate: the benchmark reports that rather than hiding it.

Targets (exit 1 when missed): every ingest run indexed every document; every failover within 30 s.

Usage: ``bench/scale.py [--docs 1500] [--workers 1,2,3] [--queries 400] [--clients 8] [--failovers 3]
[--dataset ../shared/data/scifact] [--out bench/results/scale.json]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from autoglm import beir  # noqa: E402
from autoglm.broker import EmbeddedBroker  # noqa: E402
from autoglm.datasets import publish_corpus  # noqa: E402
from autoglm.debezium import change_event, producer  # noqa: E402
from autoglm.topics import ensure_topics  # noqa: E402
from bench.report import console, finish, git_version  # noqa: E402
from roles.harness import RoleProcess  # noqa: E402
from tests.es_server import elasticsearch_url  # noqa: E402

PARTITIONS = 6
FAILOVER_TARGET_S = 30.0


def live_count(es, name: str) -> int:
    es.indices.refresh(index=name)
    return es.count(index=name, query={"term": {"deleted": False}})["count"]


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def encoder_ceiling(documents: list[beir.CorpusDocument]) -> dict:
    """Documents/s of the encoder alone, in batches as the ingest sink sends them."""
    from autoglm.encoder import Encoder

    encoder = Encoder()
    texts = [f"{d.title} {d.text}".strip() for d in documents]
    encoder.embed(texts[:32])  # warm-up
    started = time.perf_counter()
    for start in tqdm(range(0, len(texts), 64), desc="encoder alone", unit="batch"):
        encoder.embed(texts[start:start + 64])
    seconds = time.perf_counter() - started
    return {"documents": len(texts), "seconds": round(seconds, 2), "docs_per_s": round(len(texts) / seconds, 1)}


def ingest_run(workers: int, broker: str, es, es_url: str, dataset: Path, docs: int, work: Path) -> dict:
    name = f"scale-{workers}w-{uuid.uuid4().hex[:6]}"
    prefix = f"cdc.{name}"
    topic, warmup_topic = f"{prefix}.public.{dataset.resolve().name}", f"{prefix}.public.warmup"
    ensure_topics(broker, [topic, warmup_topic], partitions=PARTITIONS)
    args = ["--index", "elasticsearch", "--es-url", es_url, "--es-index", name, "--group-id", name,
            "--cdc-topics", rf"^cdc\.{name}\."]
    processes = [RoleProcess("ingest", broker, work / f"{name}-{n}", work / f"{name}-{n}.log", args)
                 for n in range(workers)]
    try:
        for process in processes:
            process.wait_healthy(300)
        kafka = producer(broker)
        for n in range(4 * PARTITIONS):  # keys spread over every partition
            key, value = change_event("c", "public", "warmup", {"id": n}, after={"id": n, "title": f"warm {n}"},
                                      lsn=n + 1)
            kafka.produce(warmup_topic, key=key, value=value)
        kafka.flush(30)
        wait_for(lambda: live_count(es, name) == 4 * PARTITIONS, 300, "warm-up documents to be indexed")
        started = time.monotonic()
        _, published = publish_corpus(broker, dataset, topic_prefix=prefix, limit=docs, progress=False)
        expected = published + 4 * PARTITIONS
        with tqdm(total=published, desc=f"ingest, {workers} worker(s)", unit="doc") as bar:
            def indexed():
                count = live_count(es, name) - 4 * PARTITIONS
                bar.update(count - bar.n)
                return count + 4 * PARTITIONS >= expected
            complete = True
            try:
                wait_for(indexed, 1800, f"{published} documents with {workers} workers", interval=0.5)
            except TimeoutError:
                complete = False
        seconds = time.monotonic() - started
        applied = [p.metric("autoglm_events_total", outcome="applied") for p in processes]
        return {"workers": workers, "index": name, "documents": published, "seconds": round(seconds, 2),
                "docs_per_s": round(published / seconds, 1), "complete": complete,
                "applied_per_worker": applied}
    finally:
        for process in processes:
            process.stop()


def serve_run(broker: str, es_url: str, index: str, queries: list[str], clients: int, work: Path) -> list[dict]:
    args = ["--index", "elasticsearch", "--es-url", es_url, "--es-index", index]
    replicas = [RoleProcess("serve", broker, work / f"serve-{n}", work / f"serve-{n}.log", args) for n in range(2)]
    try:
        for replica in replicas:
            replica.wait_healthy(300)
        for replica in replicas:  # warm-up: first requests compile and fill caches
            for query in queries[:20]:
                replica.get_json("/search", q=query, k=10, log="false")
        return [load(replicas[:count], queries, clients) for count in (1, 2)]
    finally:
        for replica in replicas:
            replica.stop()


def load(replicas: list[RoleProcess], queries: list[str], clients: int) -> dict:
    """Every query once, from ``clients`` threads, round-robin over ``replicas``."""
    def one(n: int) -> float:
        started = time.perf_counter()
        replicas[n % len(replicas)].get_json("/search", q=queries[n], k=10, log="false")
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(tqdm(pool.map(one, range(len(queries))), total=len(queries),
                              desc=f"serve, {len(replicas)} replica(s)", unit="query"))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"replicas": len(replicas), "queries": len(queries), "clients": clients, "seconds": round(seconds, 2),
            "qps": round(len(queries) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1)}


def failover_run(broker: str, es_url: str, index: str, failovers: int, work: Path) -> list[dict]:
    group = f"scale-learn-{uuid.uuid4().hex[:6]}"
    args = ["--index", "elasticsearch", "--es-url", es_url, "--es-index", index, "--learn-group-id", group]

    def start(n: int) -> RoleProcess:
        return RoleProcess("learn", broker, work / f"learn-{n}", work / f"learn-{n}.log", args).wait_healthy(300)

    def active(process: RoleProcess) -> bool:
        return process.process.poll() is None and bool((process.health() or {}).get("active"))

    learners = [start(n) for n in range(2)]
    times = []
    try:
        wait_for(lambda: sum(map(active, learners)) == 1, 120, "one learner to be active")
        for round_ in tqdm(range(failovers), desc="learner failovers", unit="kill"):
            victim = next(p for p in learners if active(p))
            standby = next(p for p in learners if p is not victim)
            victim.kill()
            killed = time.monotonic()
            try:
                wait_for(lambda: active(standby), 120, "the standby to take over", interval=0.1)
                seconds = time.monotonic() - killed
            except TimeoutError:
                seconds = None
            times.append({"round": round_ + 1, "seconds": round(seconds, 2) if seconds is not None else None})
            learners[learners.index(victim)] = start(10 + round_)  # the next standby
            time.sleep(3)  # let it join the group as the standby
        return times
    finally:
        for process in learners:
            process.stop()


def print_table(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"scaling on {results['machine']['cpus']} cores")
    for column in ("what", "processes", "rate", "vs 1", "notes"):
        table.add_column(column)
    ceiling = results["encoder_alone"]["docs_per_s"]
    table.add_row("encoder alone", "0 (in-process)", f"{ceiling} docs/s", "", "the ceiling on these cores")
    base = results["ingest"][0]["docs_per_s"]
    for run in results["ingest"]:
        table.add_row("ingest", str(run["workers"]), f"{run['docs_per_s']} docs/s", f"{run['docs_per_s'] / base:.2f}x",
                      f"{run['docs_per_s'] / ceiling:.0%} of the encoder; {'complete' if run['complete'] else 'INCOMPLETE'}")
    base = results["serve"][0]["qps"]
    for run in results["serve"]:
        table.add_row("serve", str(run["replicas"]), f"{run['qps']} q/s", f"{run['qps'] / base:.2f}x",
                      f"p50 {run['p50_ms']} ms, p95 {run['p95_ms']} ms, {run['clients']} clients")
    times = [t["seconds"] for t in results["failover"]]
    table.add_row("learner failover", "2", ", ".join(f"{t} s" if t is not None else "none" for t in times), "",
                  "SIGKILL of the active learner until the standby is active")
    console.print(table)
    for name, check in results["targets"].items():
        console.print(f"{'[green]met' if check['met'] else '[red]MISSED'}[/] {name}: {check['value']}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ingest, serve, failover) = plt.subplots(1, 3, figsize=(15, 4.5))
    workers = [run["workers"] for run in results["ingest"]]
    ingest.plot(workers, [run["docs_per_s"] for run in results["ingest"]], marker="o", label="ingest workers")
    ingest.axhline(results["encoder_alone"]["docs_per_s"], color="grey", linestyle="--",
                   label="encoder alone (same cores)")
    ingest.set(xlabel="ingest workers", ylabel="documents/s", xticks=workers,
               title=f"ingest on {results['machine']['cpus']} cores", ylim=(0, None))
    ingest.legend()
    replicas = [run["replicas"] for run in results["serve"]]
    serve.bar([str(r) for r in replicas], [run["qps"] for run in results["serve"]])
    serve.set(xlabel="serve replicas", ylabel="queries/s (hybrid)", title="search throughput")
    rounds = [t["round"] for t in results["failover"]]
    failover.bar([str(r) for r in rounds], [t["seconds"] or 0 for t in results["failover"]], color="tab:orange")
    failover.axhline(FAILOVER_TARGET_S, color="red", linestyle=":", label="target")
    failover.set(xlabel="kill -9 of the active learner", ylabel="seconds until the standby is active",
                 title="learner failover")
    failover.legend()
    for axis in (ingest, serve, failover):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1500, help="documents per ingest run (default %(default)s)")
    parser.add_argument("--workers", default="1,2,3", help="ingest worker counts (default %(default)s)")
    parser.add_argument("--queries", type=int, default=400, help="searches per serve run (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent search clients (default %(default)s)")
    parser.add_argument("--failovers", type=int, default=3, help="kills of the active learner (default %(default)s)")
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "scifact")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    worker_counts = [int(n) for n in args.workers.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    version_at_start = git_version()
    documents = [d for _, d in zip(range(args.docs), beir.read_corpus(args.dataset))]
    queries = list(beir.read_queries(args.dataset).values())
    queries = (queries * (args.queries // len(queries) + 1))[:args.queries]
    results = {"benchmark": "scale", "parameters": {**vars(args), "dataset": str(args.dataset), "out": str(args.out),
                                                     "partitions": PARTITIONS},
               "machine": {"cpus": os.cpu_count()}}
    results["encoder_alone"] = encoder_ceiling(documents)
    from elasticsearch import Elasticsearch

    with tempfile.TemporaryDirectory(prefix="autoglm-scale-") as scratch:
        work = Path(scratch)
        (work / "es").mkdir()
        with elasticsearch_url(work / "es") as es_url, EmbeddedBroker(log_file=work / "broker.log") as broker:
            es = Elasticsearch(es_url, request_timeout=60)
            results["elasticsearch"] = es.info()["version"]["number"] + (
                " (AUTOGLM_ES_URL)" if os.environ.get("AUTOGLM_ES_URL") else " (noida-db emulator)")
            results["ingest"] = [ingest_run(n, broker.address, es, es_url, args.dataset, args.docs, work)
                                 for n in worker_counts]
            last_index = results["ingest"][-1]["index"]
            results["serve"] = serve_run(broker.address, es_url, last_index, queries, args.clients, work)
            results["failover"] = failover_run(broker.address, es_url, last_index, args.failovers, work)
    times = [t["seconds"] for t in results["failover"]]
    results["targets"] = {
        "every ingest run indexed every document": {"value": [r["complete"] for r in results["ingest"]],
                                                    "met": all(r["complete"] for r in results["ingest"])},
        f"every learner failover within {FAILOVER_TARGET_S:.0f} s": {
            "value": times, "met": all(t is not None and t <= FAILOVER_TARGET_S for t in times)},
    }
    results["version"] = {"at_start": version_at_start, "at_end": git_version()}
    return finish(results, args.out, plot, print_table)


if __name__ == "__main__":
    sys.exit(main())
