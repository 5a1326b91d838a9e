"""The decode roofline's numerator: bytes one decode step reads (weights + the K/V cache)."""
from __future__ import annotations


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every tensor but the embedding table (one row of it
    is read), which counts only when it doubles as the output matrix."""
    total = 0
    for name in model.tensors:
        if name == "tok_embeddings" and model.output_name != "tok_embeddings":
            continue
        total += model.tensors.nbytes(name)
    return total


def kv_bytes_per_position(model) -> int:
    c = model.config
    return 2 * c.n_layers * c.kv_dim * 4          # K and V, f32


def decode_step_bytes(model, batch: int, mean_ctx: float) -> float:
    return weight_bytes(model) + batch * mean_ctx * kv_bytes_per_position(model)
