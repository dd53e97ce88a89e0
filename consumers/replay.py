"""A fixed-size, uniform sample of every training example seen so far, rehearsed in later runs.

Reservoir sampling (Vitter's Algorithm R) keeps each of the ``seen`` examples with the same
probability capacity / seen, however long the stream runs, so old topics stay represented
without storing the whole history. The buffer is saved as JSON next to the model it trained
(an MLflow artifact), so a model version and the memory it was trained with travel together.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from autoglm.files import write_atomically
from feedback.examples import TrainingExample


class ReplayBuffer:
    def __init__(self, capacity: int = 5000, seed: int = 0):
        self.capacity = capacity
        self.seen = 0  # examples offered to the buffer, kept or not
        self._items: list[TrainingExample] = []
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[TrainingExample]:
        """The buffered examples, as a copy: only ``add`` may change the reservoir."""
        return list(self._items)

    def add(self, examples: list[TrainingExample]) -> None:
        """Offer examples in stream order; after this each seen example is kept w.p. capacity / seen."""
        for example in examples:
            self.seen += 1
            if len(self._items) < self.capacity:
                self._items.append(example)
            else:
                slot = int(self._rng.integers(self.seen))
                if slot < self.capacity:
                    self._items[slot] = example

    def sample(self, n: int, rng: np.random.Generator) -> list[TrainingExample]:
        """Up to n distinct buffered examples, chosen uniformly."""
        picked = rng.choice(len(self._items), min(n, len(self._items)), replace=False)
        return [self._items[i] for i in picked]

    def save(self, path: Path) -> None:
        """Write JSON atomically and durably, random state included, so a loaded buffer continues
        exactly as this one would have."""
        body = {"capacity": self.capacity, "seen": self.seen, "rng": self._rng.bit_generator.state,
                "items": [asdict(e) for e in self._items]}
        write_atomically(Path(path), json.dumps(body).encode())

    @classmethod
    def load(cls, path: Path) -> "ReplayBuffer":
        body = json.loads(Path(path).read_text())
        buffer = cls(capacity=body["capacity"])
        buffer.seen = body["seen"]
        buffer._rng.bit_generator.state = body["rng"]
        buffer._items = [TrainingExample(**{**item, "negative_ids": tuple(item["negative_ids"])})
                        for item in body["items"]]
        return buffer
