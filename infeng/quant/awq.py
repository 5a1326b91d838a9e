"""Activation-aware weight scaling (AWQ-class) before block quantization.

For an input x [T, K] consumed by matrices W [N, K], a per-input-channel scale s > 0 leaves the
product unchanged in exact arithmetic: x Wᵀ = (x / s)(W · s)ᵀ. Quantizing W · s instead of W
gives the channels that carry large activations more resolution inside each block. Per layer
and input, s = mean|x|^α (normalised so √(max·min) = 1), with α from a grid search minimising

    Σ_W ‖x Wᵀ − a(x / s) Q(W · s)ᵀ‖²

on the calibration sample, where Q is the target format's quantize→dequantize and a() the int8
rounding the C kernels apply to the activations of a block-quantized product. α = 0 (s = 1) is
plain round-to-nearest and is in the grid, so the search never does worse on the sample.

The 1/s is folded into the op that produces x, exactly and at no run-time cost:

    attn_in → wq, wk, wv    into the attention RMSNorm weight
    ffn_in  → w_gate, w_up  into the FFN RMSNorm weight
    down_in → w_down        into the rows of w_up     (silu(g) · (u / s) = (silu(g) · u) / s)
    o_in    → wo            into the rows of wv: attention output channel (head h, d) is a
                            mix of v channel (h // group, d), so s is tied across the query heads
                            that share a KV head (mean|x| averaged over them) — always foldable
                            under GQA; without the tie it would not be

An input is left alone when none of its consumers is stored in a block type (e.g. stories260K's
w_down, rows of 172, falls back to bf16): there is nothing to protect.

Format-agnostic: the transform acts on f32 weights before the ordinary quantizer runs. A
quantizer that accepts per-input-column importance (``weights=``, e.g. a k-quant) registers in
``WEIGHTED_QUANTIZERS`` and then gets mean (x / s)² of the calibration activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from infeng.quant import QTYPES, dequantize, policy as q, quantize, quantize_activations
from infeng.quant.calibrate import Calibration

METHOD = "awq"
GRID = 20                     # α ∈ {0, 1/20, …, 1}
# qtype → quantize(x [N][K] f32, weights=[K] importance) → storage; e.g. "q4_k": quantize_q4_k
WEIGHTED_QUANTIZERS: dict[str, Callable[..., np.ndarray]] = {}
# fold order within a layer: wv and w_up get their row scales (from o_in, down_in) before their
# own input's search measures them
ORDER = ("o_in", "down_in", "attn_in", "ffn_in")
CONSUMERS = {"attn_in": ("wq", "wk", "wv"), "o_in": ("wo",), "ffn_in": ("w_gate", "w_up"), "down_in": ("w_down",)}


@dataclass
class Choice:
    layer: int
    input: str
    alpha: float | None           # None: skipped
    loss_rtn: float               # output error at α = 0 (plain round-to-nearest)
    loss: float                   # at the chosen α
    note: str = ""


def is_block(dtype: str) -> bool:
    return dtype in QTYPES or dtype in WEIGHTED_QUANTIZERS


def fake_quant(w: np.ndarray, dtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """What ``dtype`` storage gives back for f32 ``w`` (identity for float types)."""
    if dtype in WEIGHTED_QUANTIZERS and importance is not None:
        return dequantize(WEIGHTED_QUANTIZERS[dtype](w, weights=importance), dtype)
    if dtype in QTYPES or dtype in WEIGHTED_QUANTIZERS:
        return dequantize(quantize(w, dtype), dtype)
    return w


def int8_rows(x: np.ndarray) -> np.ndarray:
    """x as the C block-quantized GEMV/GEMM sees it (int8 per 32-block, then back to f32)."""
    q, d = quantize_activations(x)
    return (q.reshape(x.shape[0], -1, 32).astype(np.float32) * d[..., None]).reshape(x.shape)


def scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs.astype(np.float64), 1e-8) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.maximum(s, 1e-4).astype(np.float32)


def output_error(x: np.ndarray, ws: list[np.ndarray], dtypes: list[str], s: np.ndarray) -> float:
    xs = (x / s).astype(np.float32)
    imp = np.mean(xs.astype(np.float64) ** 2, axis=0).astype(np.float32)
    err = 0.0
    for w, dt in zip(ws, dtypes):
        ref = x @ w.T
        xa = int8_rows(xs) if is_block(dt) else xs
        got = xa @ fake_quant((w * s).astype(np.float32), dt, imp).T
        err += float(np.sum((got.astype(np.float64) - ref) ** 2))
    return err


def search(x: np.ndarray, mean_abs: np.ndarray, ws: list[np.ndarray], dtypes: list[str],
           grid: int = GRID) -> tuple[float, float, float]:
    """(best α, loss at α = 0, loss at best α)."""
    losses = [(output_error(x, ws, dtypes, scales(mean_abs, a / grid)), a / grid) for a in range(grid + 1)]
    best_loss, best_a = min(losses, key=lambda t: (t[0], t[1]))
    return best_a, losses[0][0], best_loss


def transform(w: dict[str, np.ndarray], dtype_of: Callable[[str], str], cal: Calibration, cfg,
              grid: int = GRID, progress: Callable[[int, str], None] | None = None
              ) -> tuple[dict[str, np.ndarray], list[Choice], dict[str, np.ndarray]]:
    """The f32 weights ``w`` (native names) with every foldable scale applied; the choice per
    layer and input; per matrix the importance (mean (x / s)² per input column) of its input."""
    w = dict(w)
    choices: list[Choice] = []
    importance: dict[str, np.ndarray] = {}
    group = cfg.n_heads // cfg.n_kv_heads
    for l in range(cfg.n_layers):
        L = f"layers.{l}."
        for name in ORDER:
            mats = [L + m for m in CONSUMERS[name]]
            dts = [dtype_of(m) for m in mats]
            x = cal.sample(l, name)
            mean_abs = cal.channel(l, name, "mean_abs")
            if name == "o_in":     # tie across the query heads of one KV head
                kv = mean_abs.reshape(cfg.n_kv_heads, group, cfg.head_dim).mean(1)
                mean_abs = np.repeat(kv[:, None, :], group, axis=1).reshape(-1)
            ws = [w[m] for m in mats]
            if not any(is_block(d) for d in dts):
                choices.append(Choice(l, name, None, 0.0, 0.0, f"{', '.join(CONSUMERS[name])} not block-quantized"))
            else:
                alpha, loss0, loss = search(x, mean_abs, ws, dts, grid)
                choices.append(Choice(l, name, alpha, loss0, loss))
                if alpha > 0:
                    s = scales(mean_abs, alpha)
                    for m in mats:
                        w[m] = (w[m] * s).astype(np.float32)
                    fold(w, L, name, s, cfg, group)
                    x = (x / s).astype(np.float32)
            imp = np.mean(x.astype(np.float64) ** 2, axis=0).astype(np.float32)
            for m in mats:
                importance[m] = imp
            if progress:
                progress(l, name)
    return w, choices, importance


def fold(w: dict[str, np.ndarray], L: str, name: str, s: np.ndarray, cfg, group: int) -> None:
    """Divide the producer of input ``name`` by s (see the module doc)."""
    if name == "attn_in":
        w[L + "attn_norm"] = (w[L + "attn_norm"] / s).astype(np.float32)
    elif name == "ffn_in":
        w[L + "ffn_norm"] = (w[L + "ffn_norm"] / s).astype(np.float32)
    elif name == "down_in":
        w[L + "w_up"] = (w[L + "w_up"] / s[:, None]).astype(np.float32)
    elif name == "o_in":
        s_kv = s.reshape(cfg.n_kv_heads, group, cfg.head_dim)[:, 0, :].reshape(-1)
        w[L + "wv"] = (w[L + "wv"] / s_kv[:, None]).astype(np.float32)


def apply(model, items, cal: Calibration, grid: int = GRID, progress: Callable[[int, str], None] | None = None):
    """The model's tensors with the scales folded in (transformed tensors become f32; ``plan``
    them again for storage), the choices, and the per-matrix importance."""
    dtype_of = {it.name: it.dtype for it in items}.__getitem__
    cfg = model.config
    names = [f"layers.{l}.{m}" for l in range(cfg.n_layers)
             for m in ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    w, choices, importance = transform({n: model.f32(n) for n in names}, dtype_of, cal, cfg, grid, progress)
    tensors = dict(model.tensors)
    for n in names:
        if w[n] is not None and not np.array_equal(w[n], model.f32(n)):
            tensors[n] = ("f32", np.ascontiguousarray(w[n], np.float32))
    return tensors, choices, importance


def lineage_params(choices: list[Choice], grid: int = GRID) -> dict:
    """α per layer and input (null: skipped), for the lineage entry."""
    alpha: dict[str, dict[str, float | None]] = {}
    for c in choices:
        alpha.setdefault(str(c.layer), {})[c.input] = c.alpha
    return {"grid": grid, "alpha": alpha}


def quantize_tensors(tensors, items, importance: dict[str, np.ndarray], progress=None):
    """``policy.quantize_tensors``, except that importance-aware quantizers get ``weights=``."""
    out = {}
    for it in items:
        if it.dtype in WEIGHTED_QUANTIZERS and it.name in importance:
            src, arr = tensors[it.name]
            f32 = np.asarray(q.to_f32(arr, src), np.float32)
            out[it.name] = (it.dtype, WEIGHTED_QUANTIZERS[it.dtype](f32, weights=importance[it.name]))
            if progress:
                progress(it.name, int(np.prod(it.shape)))
        else:
            out.update(q.quantize_tensors(tensors, [it], progress))
    return out
