"""The ONNX Runtime query encoder gives torch's vectors, for the base model and fine-tuned weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm import beir
from autoglm.encoder import Encoder
from autoglm.onnx_encoder import CompiledEncoderMismatch, OnnxQueryEncoder, verify_against
from tests.scifact_problem import SCIFACT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> Encoder:
    return Encoder()


@pytest.fixture(scope="module")
def shifted(base: Encoder) -> Encoder:
    """Weights moved away from the base, as a fine-tuned version's are."""
    generator = torch.Generator().manual_seed(7)
    state = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
             if tensor.dtype.is_floating_point else tensor
             for name, tensor in base.model.state_dict().items()}
    return Encoder(state_dict=state, version="models:/autoglm-query-encoder/7")


def real_queries(count: int) -> list[str]:
    return list(beir.read_queries(SCIFACT).values())[:count]


@pytest.mark.parametrize("which", ["base", "shifted"])
def test_compiled_encoder_matches_torch_on_real_queries(which, request):
    encoder = request.getfixturevalue(which)
    compiled = OnnxQueryEncoder(encoder)
    queries = real_queries(64)
    expected = encoder.embed(queries)
    one_at_a_time = np.stack([compiled.embed_one(query) for query in queries])
    padded_batch = compiled.embed(queries)
    assert np.abs(one_at_a_time - expected).max() < 1e-4
    assert np.abs(padded_batch - expected).max() < 1e-4
    assert np.allclose(np.linalg.norm(one_at_a_time, axis=1), 1.0, atol=1e-5)
    assert compiled.version == encoder.version


def test_compiled_encoder_follows_the_weights_it_was_built_from(base, shifted):
    query = real_queries(1)[0]
    from_base, from_shifted = OnnxQueryEncoder(base), OnnxQueryEncoder(shifted)
    assert float(np.dot(from_base.embed_one(query), from_shifted.embed_one(query))) < 0.99


def test_verification_refuses_a_graph_that_does_not_match(base, shifted):
    with pytest.raises(CompiledEncoderMismatch, match="differs from torch"):
        verify_against(shifted, OnnxQueryEncoder(base))


def test_empty_input_gives_no_vectors(base):
    assert OnnxQueryEncoder(base).embed([]).shape == (0, Encoder.dimension)


def test_the_index_and_the_compiled_encoder_load_into_one_process():
    """usearch 2.26 loaded before onnxruntime (1.28 to 1.31) crashes the process at import, in
    libstdc++'s locale code; search/embedded.py imports onnxruntime first."""
    script = "import search.embedded, autoglm.onnx_encoder, usearch.index, onnxruntime; print('loaded')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]
