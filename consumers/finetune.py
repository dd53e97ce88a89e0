"""Query-side fine-tuning: a copy of the encoder learns from click examples; documents stay frozen.

Only queries are re-embedded during training. Documents are represented by the vectors the
index already stores, so a promoted model needs no re-indexing: its query vectors are trained
to land near those exact document vectors.

Each step embeds a batch of queries with the copy being trained and scores every query by
temperature-scaled cosine against one fixed set of frozen candidates: every document the run's
examples name (so the other items' positives, in-batch, and the hard negatives a user saw above
the click and passed over) plus a sample of the whole corpus. Corpus negatives matter: against
only a few dozen candidates a query learns to beat those, while search ranks it against every
document (../shared/notes/learning.md). The loss is cross-entropy towards the item's own
positive, with the query's other clicked documents masked out, weighted by inverse propensity
so that clicks at rarely examined ranks count for what they reveal. A small share of every batch replays older
examples, so earlier lessons are rehearsed instead of overwritten by the latest window.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

from autoglm.encoder import Encoder, mean_pool_normalised
from feedback.examples import TrainingExample

DocVectors = Callable[[list[str]], dict[str, np.ndarray]]  # e.g. Index.vectors
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01  # AdamW
    batch_size: int = 32
    epochs: int = 2  # tuned on the dev split: 1e-5 x 2 epochs lifts dense nDCG +3.7 over 5 click windows
    temperature: float = 0.05
    corpus_negatives: int = 8192  # documents sampled from the index as extra negatives (0: none)
    replay_ratio: float = 0.05  # share of batch items drawn from older examples
    warmup_share: float = 0.1  # of the planned steps: linear warm-up, then a constant rate
    max_seconds: float = 900.0  # the run stops before a step that would end past this
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.replay_ratio < 1.0 or self.batch_size * (1.0 - self.replay_ratio) < 1.0:
            raise ValueError("every batch needs at least one window example: lower replay_ratio")


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # for Encoder(state_dict=...)
    loss_curve: list[float]  # weighted batch loss, one per step
    steps: int
    seconds: float
    examples_used: int  # window examples whose positive has a stored vector
    stopped_early: bool  # max_seconds came before the last planned step
    window_items: int  # batch items taken from the window, over the steps run
    replay_items: int  # batch items taken from the replay examples


@dataclass(frozen=True)
class _Batch:
    window: list[TrainingExample]
    replay: list[TrainingExample]

    @property
    def items(self) -> list[TrainingExample]:
        return self.window + self.replay


def fine_tune(encoder: Encoder, examples: list[TrainingExample], replay: list[TrainingExample],
              doc_vectors: DocVectors, config: TrainConfig = TrainConfig(), progress: bool = True,
              corpus: dict[str, np.ndarray] | None = None) -> TrainResult:
    """Train a deep copy of ``encoder.model`` on a window of ``examples``; ``encoder`` is not touched.

    The tokenizer is copied too: a fast tokenizer shared with a thread that serves queries can
    fail with "Already borrowed".

    Examples whose positive has no stored vector (deleted or not yet indexed) are skipped, and
    so are such hard negatives. ``corpus`` (e.g. ``Index.sample_vectors``) adds negatives.
    The same seed and inputs give the same batches and weights.
    """
    started = time.monotonic()
    vectors = _unit_vectors(examples + replay, doc_vectors)
    window = [e for e in examples if e.positive_id in vectors]
    older = [e for e in replay if e.positive_id in vectors]
    batches = _plan_batches(window, older, config, np.random.default_rng(config.seed))
    candidates = _Candidates.build(window + older, vectors, corpus or {})

    model = copy.deepcopy(encoder.model).train()
    tokenize = functools.partial(copy.deepcopy(encoder.tokenizer), padding=True, truncation=True,
                                 max_length=encoder.max_seq_length, return_tensors="pt")  # dynamic padding
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_constant_schedule_with_warmup(optimizer, round(config.warmup_share * len(batches)))
    losses: list[float] = []
    window_items = replay_items = 0
    stopped_early, last_step_seconds = False, 0.0
    with torch.random.fork_rng(devices=[]), tqdm(batches, desc="fine-tune", unit="step",
                                                 disable=not progress) as bar:
        torch.manual_seed(config.seed)  # dropout masks
        for batch in bar:
            if time.monotonic() - started + last_step_seconds > config.max_seconds:
                stopped_early = True
                break
            step_started = time.monotonic()
            loss = _batch_loss(model, tokenize, batch.items, candidates, config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            window_items += len(batch.window)
            replay_items += len(batch.replay)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            last_step_seconds = time.monotonic() - step_started
    model.eval()
    return TrainResult(state_dict=model.state_dict(), loss_curve=losses, steps=len(losses),
                       seconds=time.monotonic() - started, examples_used=len(window),
                       stopped_early=stopped_early, window_items=window_items, replay_items=replay_items)


def _unit_vectors(examples: list[TrainingExample], doc_vectors: DocVectors) -> dict[str, np.ndarray]:
    """The stored vectors of every document the examples name, normalised so dot product = cosine."""
    ids = list(dict.fromkeys(doc_id for e in examples for doc_id in (e.positive_id, *e.negative_ids)))
    return _normalised(doc_vectors(ids) if ids else {})


def _normalised(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {doc_id: (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32) for doc_id, v in vectors.items()}


@dataclass(frozen=True)
class _Candidates:
    """The frozen documents every query is scored against, and which of them answer which query."""

    ids: list[str]
    matrix: torch.Tensor  # one unit vector per id, in order
    column: dict[str, int]
    clicked: dict[str, set[int]]  # normalised query text -> columns of every positive clicked for it

    @classmethod
    def build(cls, examples: list[TrainingExample], vectors: dict[str, np.ndarray],
              corpus: dict[str, np.ndarray]) -> "_Candidates":
        pool = {**_normalised(corpus), **vectors}
        ids = list(pool)
        column = {doc_id: j for j, doc_id in enumerate(ids)}
        clicked: dict[str, set[int]] = {}
        for e in examples:
            clicked.setdefault(_query_key(e), set()).add(column[e.positive_id])
        matrix = torch.from_numpy(np.stack([pool[doc_id] for doc_id in ids])) if ids else torch.zeros(0)
        return cls(ids, matrix, column, clicked)

    def other_positives(self, items: list[TrainingExample]) -> torch.Tensor:
        """Mask[i, j]: candidate j is another click on item i's query, so not a negative for it.

        Two searches with the same text can each click a different relevant document; each
        document must not be pushed away from the query that the other one answers.
        """
        mask = torch.zeros(len(items), len(self.ids), dtype=torch.bool)
        for i, item in enumerate(items):
            others = self.clicked[_query_key(item)] - {self.column[item.positive_id]}
            mask[i, list(others)] = True
        return mask


def _plan_batches(window: list[TrainingExample], replay: list[TrainingExample], config: TrainConfig,
                  rng: np.random.Generator) -> list[_Batch]:
    """All batches of all epochs up front, so warm-up knows the step count.

    The window is reshuffled each epoch. Replay slots per batch carry their fractional part
    over (5% of 32 = 1.6: batches get 1 or 2), so the replay share of the run is replay_ratio.
    """
    batches: list[_Batch] = []
    owed = 0.0
    for _ in range(config.epochs):
        order = [window[i] for i in rng.permutation(len(window))]
        while order:
            owed += config.batch_size * config.replay_ratio
            replay_slots = min(int(owed), len(replay))
            owed -= int(owed)
            picked = rng.choice(len(replay), replay_slots, replace=False)
            take = config.batch_size - replay_slots
            batches.append(_Batch(order[:take], [replay[i] for i in picked]))
            order = order[take:]
    return batches


def _batch_loss(model: torch.nn.Module, tokenize: Tokenize, items: list[TrainingExample],
                candidates: _Candidates, temperature: float) -> torch.Tensor:
    """Weighted cross-entropy of each query against every frozen candidate document."""
    logits = _embed(model, tokenize, [e.query for e in items]) @ candidates.matrix.T / temperature
    logits = logits.masked_fill(candidates.other_positives(items), float("-inf"))
    targets = torch.tensor([candidates.column[e.positive_id] for e in items])
    weights = torch.tensor([e.weight for e in items], dtype=torch.float32)
    weights = weights / weights.mean()
    return (weights * F.cross_entropy(logits, targets, reduction="none")).mean()


def _embed(model: torch.nn.Module, tokenize: Tokenize, queries: list[str]) -> torch.Tensor:
    """Query vectors with gradients."""
    batch = tokenize(queries)
    return mean_pool_normalised(model(**batch).last_hidden_state, batch["attention_mask"])


def _query_key(example: TrainingExample) -> str:
    """Searches with the same text are the same query, whatever their query ids."""
    return example.query.strip().lower()
