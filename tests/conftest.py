"""Shared fixtures: real packaged models, their float32 reference GGUFs, llama.cpp loading."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TASA_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def smollm_path():
    from tasa_edge.zoo import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from tasa_edge.model import ModelSource

    return ModelSource.open(smollm_path)


@pytest.fixture(scope="session")
def smollm_f32(smollm):
    """The reference: the packaged Q4_1 model dequantized to an F32 GGUF, by the one reference
    builder (cached in tasa-edge's cache directory, as the CLI, the harness and the benchmark use it)."""
    from exporters.reference import reference_gguf

    return reference_gguf(smollm)


def gguf_tensors(path):
    """name -> (type name, raw bytes) of every tensor in a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path, "r")
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in r.tensors}


@pytest.fixture
def tiny_gguf(tmp_path):
    """A syntactically valid GGUF with one tensor (enough to reach the device / connection checks)."""
    import numpy as np
    from gguf import GGUFWriter

    p = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p
