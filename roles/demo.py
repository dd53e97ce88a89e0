"""`autoglm demo`: the whole loop on the embedded default, end to end, with a table and a plot.

It runs ``autoglm up`` (embedded broker, MLflow server, worker with the trainer allowed to
promote) through the process harness, roles/harness.py, with its output in DATA_DIR/up.log;
publishes a BEIR corpus through the broker as Debezium snapshot events, then for each round
lets simulated users search and click until a window trains, gates and registers a model,
and measures nDCG@10 on the dev split (never on test) once search serves the new champion.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from autoglm import beir
from autoglm.datasets import corpus_id, publish_corpus
from autoglm.metrics import sample_value
from autoglm.settings import DEMO_LEARNING_RATE, DEMO_TRAIN_SECONDS
from autoglm.simulate import simulate
from roles.harness import RoleProcess


@dataclass
class Round:
    round: int
    model_version: str
    dense_ndcg: float
    hybrid_ndcg: float
    searches: int
    outcome: str  # of this round's training: registered, rejected (or "-" for the base row)
    training_seconds: float | None  # this round's training, start to decision
    trigger_to_version_seconds: float | None  # this round's window request -> registered version
    totals: dict[str, float] = field(default_factory=dict, repr=False)  # cumulative counters, for deltas


@dataclass
class DemoResult:
    rounds: list[Round]
    test: dict[str, dict[str, float]] | None  # {"base": {mode: nDCG}, "final": {...}} when asked for


def judged_set(root: Path, published: set[str], split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries and qrels of "dev" (carved from train) or "test", restricted to published documents."""
    texts = beir.read_queries(root)
    qrels = beir.split_train(beir.read_qrels(root, "train"))[1] if split == "dev" else beir.read_qrels(root, split)
    qrels = {q: {d: g for d, g in docs.items() if d in published} for q, docs in qrels.items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    return {q: texts[q] for q in qrels}, qrels


def evaluate(client: httpx.Client, queries: dict[str, str], qrels: dict, mode: str) -> tuple[float, str]:
    """Mean nDCG@10 of one mode through the API (impressions not logged), and the serving version."""
    run, version = {}, ""
    for query_id, text in queries.items():
        body = client.get("/search", params={"q": text, "k": 10, "mode": mode, "log": "false"}).json()
        run[query_id] = [corpus_id(hit["id"]) for hit in body["hits"]]
        version = body["model_version"]
    return beir.mean_ndcg(run, qrels), version


def run_demo(dataset: Path, data_dir: Path, rounds: int, window: int, docs: int | None,
             out: Path, max_searches_per_round: int = 20_000, report_test: bool = False,
             learning_rate: float = DEMO_LEARNING_RATE, train_seconds: float = DEMO_TRAIN_SECONDS) -> DemoResult:
    """Run the loop; with report_test, the test split is scored for the base and the final model
    and shown only at the end (nothing is tuned on it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    up = RoleProcess("up", None, data_dir, data_dir / "up.log",
                     ["--cdc-topics", r"^cdc\.beir\.", "--window-size", str(window), "--gate-dataset", str(dataset.resolve()),
                      "--promote-champion", "--learning-rate", str(learning_rate),
                      "--train-seconds", str(train_seconds)],
                     http_timeout=120)
    try:
        up.wait_healthy(timeout=300)
        broker, mlflow = up.printed(r"^broker: (\S+)").group(1), up.printed(r"^mlflow: (\S+)").group(1)
        api = up.url
        print(f"broker {broker} · MLflow UI {mlflow} · API {api} · log {up.log_path}")
        _, count = publish_corpus(broker, dataset, limit=docs)
        published = {doc.id for doc, _ in zip(beir.read_corpus(dataset), range(count))}
        client = up.client
        with tqdm(total=count, desc="indexing (embedding documents)", unit="doc") as bar:
            while (indexed := sample_value(client.get("/metrics").text, "autoglm_documents")) < count:
                bar.update(int(indexed) - bar.n)
                time.sleep(1)
            bar.update(count - bar.n)
        queries, qrels = judged_set(dataset, published, "dev")
        test = judged_set(dataset, published, "test") if report_test else None
        base_test = _test_scores(client, *test) if test else None
        results = [_measure(client, queries, qrels, 0, 0, None)]
        print(_table(results))
        for number in range(1, rounds + 1):
            results.append(_round(client, api, dataset, queries, qrels, number, max_searches_per_round,
                                  results[-1]))
            print(_table(results))
        outcome = DemoResult(results, {"base": base_test, "final": _test_scores(client, *test)} if test else None)
        _save(outcome, out)
        return outcome
    finally:
        up.stop(timeout=30)


def _round(client, api, dataset, queries, qrels, number, max_searches, previous: Round) -> Round:
    """Simulate users until a window closes, then wait for its training and measure what serves.

    The simulated users pause while the model trains: they search as fast as the API answers,
    a load no real audience puts on 2 cores, and trigger -> version would measure that load.
    """
    def counter(name: str) -> float:
        return sample_value(client.get("/metrics").text, name)

    windows, trainings, searches = counter("autoglm_training_windows_total"), counter("autoglm_trainings_total"), 0
    while counter("autoglm_training_windows_total") == windows and searches < max_searches:
        simulate(api, dataset, searches=100, seed=number * 100_000 + searches, progress=False)
        searches += 100
    while counter("autoglm_trainings_total") == trainings:
        time.sleep(2)
    return _measure(client, queries, qrels, number, searches, previous)


def _measure(client, queries, qrels, number, searches, previous: Round | None) -> Round:
    """Scores of what serves now, and this round's training from the worker's counters (the
    difference of each histogram's sum and count since the previous round)."""
    dense, version = evaluate(client, queries, qrels, "dense")
    hybrid, _ = evaluate(client, queries, qrels, "hybrid")
    metrics = client.get("/metrics").text
    names = [f"{h}_{part}" for h in ("autoglm_training_seconds", "autoglm_trigger_to_version_seconds")
             for part in ("sum", "count")]
    totals = {name: sample_value(metrics, name) for name in names}
    totals["registered"] = sample_value(metrics, "autoglm_trainings_total", outcome="registered")
    before = previous.totals if previous else {name: 0.0 for name in totals}

    def mean_since(histogram: str) -> float | None:
        count = totals[f"{histogram}_count"] - before[f"{histogram}_count"]
        return (totals[f"{histogram}_sum"] - before[f"{histogram}_sum"]) / count if count else None

    outcome = "-" if previous is None else (
        "registered" if totals["registered"] > before["registered"] else "rejected")
    return Round(number, version, dense, hybrid, searches, outcome, mean_since("autoglm_training_seconds"),
                 mean_since("autoglm_trigger_to_version_seconds"), totals)


def _test_scores(client, queries, qrels) -> dict[str, float]:
    return {mode: evaluate(client, queries, qrels, mode)[0] for mode in ("bm25", "dense", "hybrid")}


def _table(results: list[Round]) -> str:
    def seconds(value: float | None) -> str:
        return f"{value:.0f}" if value is not None else "-"

    lines = ["round  model                                   dense nDCG@10  hybrid nDCG@10  searches  "
             "training    trigger->version s",
             *(f"{r.round:>5}  {r.model_version:<38}  {r.dense_ndcg:>13.4f}  {r.hybrid_ndcg:>14.4f}  "
               f"{r.searches:>8}  {r.outcome:<10}  {seconds(r.trigger_to_version_seconds):>18}" for r in results)]
    return "\n".join(lines)


def _save(outcome: DemoResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = outcome.rounds
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(asdict(outcome), indent=2))
    if outcome.test:
        print("test split (reported once):", json.dumps(outcome.test))
    figure, axis = plt.subplots(figsize=(7, 4))
    rounds = [r.round for r in results]
    axis.plot(rounds, [r.dense_ndcg for r in results], marker="o", label="dense")
    axis.plot(rounds, [r.hybrid_ndcg for r in results], marker="o", label="hybrid")
    axis.set_xlabel("round (0 = base model)")
    axis.set_ylabel("nDCG@10, dev split")
    axis.set_title("Online query-side fine-tuning from simulated clicks")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "demo.png", dpi=120)
    print(f"saved {out / 'demo.png'} and {out / 'demo.json'}")
