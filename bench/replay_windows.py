"""Replay recorded click windows through the real trainer, offline: how the learning settings were chosen.

A learning benchmark run leaves its example store behind (``examples_store`` in learning.json).
This replays that store's windows, in order, through ``consumers.trainer.Trainer`` (the live
loop's gate, carried windows and MLflow registration, promoting each passing version like the
demo) on an index of the dataset built once with the base encoder. The same clicks then
compare settings in minutes instead of a live run's quarter hour; per window it prints the
gate's dev nDCG@10 (dense, hybrid) of candidate and champion and the decision.

    .venv/bin/python bench/replay_windows.py --examples PATH/examples.db [--lr 2e-5] [--epochs 2] \\
        [--max-windows 2] [--windows 5] [--propensities stored|prior|none]

``--propensities`` keeps the weights the run stored (``stored``) or recomputes every example's
weight from its rank: ``prior`` (1 / rank ** 0.8), ``none`` (weight 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from autoglm import beir
from autoglm.datasets import document_id, table_name
from autoglm.encoder import Encoder
from autoglm.settings import DEMO_LEARNING_RATE
from consumers.finetune import TrainConfig
from consumers.trainer import GateSet, Trainer, TrainerConfig
from feedback.examples import TrainingExample
from feedback.propensity import PositionBiasModel
from feedback.sqlite_store import SqliteExampleStore
from registry.models import ModelRegistry
from search.embedded import EmbeddedIndex
from search.protocol import Document, Upsert

REPO = Path(__file__).resolve().parent.parent


def open_index(dataset: Path, directory: Path, batch: int = 256) -> EmbeddedIndex:
    """The dataset's corpus in an embedded index with base-model vectors, as the live loop indexes it."""
    if (directory / "manifest.json").exists():
        return EmbeddedIndex(directory)
    index, encoder, table = EmbeddedIndex(directory), Encoder(), f"beir.{table_name(dataset)}"
    documents = [Document(id=document_id(dataset, d.id), table=table, title=d.title, text=d.text)
                 for d in beir.read_corpus(dataset)]
    for start in tqdm(range(0, len(documents), batch), desc="index corpus", unit="batch"):
        chunk = documents[start:start + batch]
        vectors = encoder.embed([d.embedding_text for d in chunk])
        index.write_batch([Upsert(d, v) for d, v in zip(chunk, vectors)], [])
    index.commit({})
    return index


class ReweightedStore(SqliteExampleStore):
    """The recorded windows, each example weighted again by its rank under ``bias`` (None: weight 1)."""

    def __init__(self, path: Path, bias: PositionBiasModel | None):
        super().__init__(path)
        self.bias = bias

    def examples_in(self, window_id: int) -> list[TrainingExample]:
        return [replace(e, weight=self.bias.weight(e.rank) if self.bias else 1.0)
                for e in super().examples_in(window_id)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", required=True, help="a run's example store (feedback/examples.db)")
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--index-dir", default=str(Path(tempfile.gettempdir()) / "autoglm-replay-index"),
                        help="built on first use, reused after")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--lr", type=float, default=DEMO_LEARNING_RATE)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--max-windows", type=int, default=TrainerConfig.max_windows)
    parser.add_argument("--propensities", choices=("stored", "prior", "none"), default="stored",
                        help="the run's stored weights (default), or recomputed from each rank")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "replay_windows.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = Path(args.dataset)
    index = open_index(dataset, Path(args.index_dir))
    work = Path(tempfile.mkdtemp(prefix="autoglm-replay-"))
    try:
        shutil.copy(args.examples, work / "examples.db")  # the trainer writes nothing there, but stays off the original
        store = SqliteExampleStore(work / "examples.db") if args.propensities == "stored" else \
            ReweightedStore(work / "examples.db", PositionBiasModel() if args.propensities == "prior" else None)
        registry = ModelRegistry(f"sqlite:///{work / 'mlflow.db'}", artifact_root=work / "artifacts")
        gate = GateSet.dev_split(dataset, lambda cid: document_id(dataset, cid))
        config = TrainerConfig(train=TrainConfig(lr=args.lr, epochs=args.epochs), max_windows=args.max_windows,
                               promote_champion=True)
        trainer = Trainer(index, store, registry, work / "replay.json", gate, config)
        rounds = []
        for window in range(1, args.windows + 1):
            outcome = trainer.train([window])
            if outcome is None:
                break
            m = outcome.metrics
            rounds.append({"window": window, "registered": outcome.passed, "seconds": outcome.seconds,
                           "dense": m["candidate.gate.ndcg@10"], "hybrid": m["candidate.gate.hybrid.ndcg@10"],
                           "champion_dense": m["champion.gate.ndcg@10"],
                           "champion_hybrid": m["champion.gate.hybrid.ndcg@10"],
                           "rejected_on": [r for r in outcome.reasons if " < " in r]})
            print(f"window {window}: {'registered' if outcome.passed else 'rejected'} in {outcome.seconds:.0f} s; "
                  f"candidate dense {m['candidate.gate.ndcg@10']:.4f} hybrid {m['candidate.gate.hybrid.ndcg@10']:.4f}"
                  f" | champion dense {m['champion.gate.ndcg@10']:.4f} hybrid {m['champion.gate.hybrid.ndcg@10']:.4f}"
                  + "".join(f"\n    {r}" for r in rounds[-1]["rejected_on"]), flush=True)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    last = rounds[-1]
    final = {mode: last[mode] if last["registered"] else last[f"champion_{mode}"] for mode in ("dense", "hybrid")}
    summary = {"config": vars(args), "rounds": rounds,
               "dense_gain_points": 100 * (final["dense"] - rounds[0]["champion_dense"]),
               "hybrid_gain_points": 100 * (final["hybrid"] - rounds[0]["champion_hybrid"])}
    print(f"after {len(rounds)} windows: dense {summary['dense_gain_points']:+.2f} points, "
          f"hybrid {summary['hybrid_gain_points']:+.2f} points over the base model")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
