"""The query encoder compiled to ONNX Runtime, for serving.

Why: a hybrid query's latency is mostly the encoding of one short text. On these 2-core
machines torch takes about 10-19 ms for it and ONNX Runtime about 4 ms with the same weights.

Any ``Encoder`` (the base model or a fine-tuned version) is compiled the same way: its weights
are loaded into an eager-attention copy of the model and exported. Eager, because the SDPA
attention code bakes the traced sequence length into the graph and gives wrong vectors for
other lengths. Before a compiled encoder serves, it is checked against torch on probe texts
of several lengths (padded batches included); a mismatch raises instead of serving bad vectors.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from typing import Sequence

import numpy as np
import onnxruntime
import torch
from transformers import AutoModel

from autoglm.encoder import Encoder

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PROBE_TEXTS = (
    "cells",
    "Does vitamin D supplementation reduce the risk of fractures in older adults?",
    "query syntax: \"quoted\" (parens) * ~ ^ - AND OR NOT",
    "A long probe that runs past the usual query length so that the check covers longer inputs "
    "too, with numbers like 0.05 and 1,000 and words like immunohistochemistry. " * 8,
)
MAX_ABS_DIFFERENCE = 1e-4  # float32 kernels differ in summation order, not more


class CompiledEncoderMismatch(RuntimeError):
    """The ONNX graph's vectors differ from torch's: serving it would return wrong results."""


class OnnxQueryEncoder:
    """Same interface as ``Encoder`` (``embed``, ``embed_one``, ``version``), inference only."""

    dimension = Encoder.dimension

    def __init__(self, encoder: Encoder, threads: int = 2):
        self.version = encoder.version
        self.tokenizer = encoder.tokenizer
        self.max_seq_length = encoder.max_seq_length
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(export_onnx(encoder), options,
                                                     providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()  # one run at a time: the session already uses every core
        verify_against(encoder, self)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length,
                               return_tensors="np")
        feeds = {name: batch[name].astype(np.int64) for name in INPUT_NAMES}
        with self._lock:
            hidden = self._session.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


class _LastHiddenState(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx(encoder: Encoder) -> bytes:
    """The encoder's weights as an ONNX graph with dynamic batch and sequence axes."""
    # The same architecture with eager attention, built from a copy of the config (the encoder's
    # own stays as it is): no second read of the weights from disk.
    model = AutoModel.from_config(copy.deepcopy(encoder.model.config), attn_implementation="eager").eval()
    model.load_state_dict(encoder.model.state_dict())
    example = encoder.tokenizer(["an example query"], return_tensors="pt")
    graph = io.BytesIO()
    dynamic = {name: {0: "batch", 1: "tokens"} for name in (*INPUT_NAMES, "last_hidden_state")}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about shape-dependent Python branches
        torch.onnx.export(_LastHiddenState(model), tuple(example[name] for name in INPUT_NAMES), graph,
                          input_names=list(INPUT_NAMES), output_names=["last_hidden_state"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return graph.getvalue()


def verify_against(reference: Encoder, compiled: OnnxQueryEncoder) -> None:
    """Raise unless the compiled encoder matches torch, one text at a time and padded together."""
    expected = reference.embed(list(PROBE_TEXTS))
    for got in (np.stack([compiled.embed_one(text) for text in PROBE_TEXTS]), compiled.embed(list(PROBE_TEXTS))):
        difference = float(np.abs(got - expected).max())
        if difference > MAX_ABS_DIFFERENCE:
            raise CompiledEncoderMismatch(
                f"ONNX encoder for {reference.version} differs from torch by {difference:.2e} "
                f"(allowed {MAX_ABS_DIFFERENCE:.0e})")
