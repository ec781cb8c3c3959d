"""GGUF tensor names: which tensors are quantizable, their layer and kind, llama.cpp's order."""

from __future__ import annotations

_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
    "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight", "rope_freqs",
)


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's rule: 2-D+ ``*.weight`` tensors except norms, MoE routers and position embeddings."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


def layer_of(name: str) -> int | None:
    """Block index of a GGUF tensor name (``blk.N.*``), else None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1])
    return None


def kind_of(name: str) -> str:
    """Tensor kind within a block: ``attn_q``, ``ffn_down`` ... or the whole name outside blocks."""
    parts = name.split(".")
    if layer_of(name) is not None:
        return parts[2]
    return parts[0]


def sort_key(name: str):
    layer = layer_of(name)
    if name.startswith("token_embd"):
        return (0, 0, name)
    if layer is not None:
        return (1, layer, name)
    return (2, 0, name)
