"""Error-compensating rounding (GPTQ-class) for the symmetric block formats.

For W [N, K] fed by inputs x with second moment H = E[xᵀx] (from the calibration sample), the
columns are rounded one at a time, left to right; the rounding error of column i, divided by the
Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU, U upper), is pushed onto the columns not yet rounded:

    W[:, j] -= (w_i − q_i) / U[i, i] · U[i, j]   (j > i)

which minimises E‖x Wᵀ − x Qᵀ‖² given the choices already made. The block scale of each row and
32-column block is fixed from the (already compensated) weights when the block starts, as the
format's own quantizer would set it, and the element that defines it is pinned to its grid end,
so that the ordinary quantizer, run on the result, reproduces it exactly (checked): the output
file is written by the same code as plain quantization.

Grids (``GRIDS``) exist for q4_0, q5_0 and q8_0. Other block formats (e.g. a k-quant) have no grid
here; ``infeng.quant.awq`` handles those.
"""
from __future__ import annotations

import numpy as np

from infeng.errors import InfengError
from infeng.quant import QK, dequantize, quantize

METHOD = "gptq"
DAMP = 0.01          # fraction of the mean diagonal added to H (keeps the Cholesky stable)


def _signed_max_grid(levels: int):
    """(scale, round) for q4_0 (levels 8) / q5_0 (16). scale: row scales d [N] and pinned column
    [N] of a [N, 32] block, as quantize_q4_0 / quantize_q5_0 set them: d = m / -levels (m the
    signed element of largest magnitude, first one), stored as fp16."""
    def scale(blk: np.ndarray):
        idx = np.abs(blk).argmax(-1)
        m = blk[np.arange(blk.shape[0]), idx]
        d = (m / np.float32(-levels)).astype(np.float16).astype(np.float32)
        return d, idx, np.float32(-levels)

    def round_to(x: np.ndarray, d: np.ndarray) -> np.ndarray:
        inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
        q = np.clip(np.trunc(x * inv + np.float32(levels + 0.5)), 0, 2 * levels - 1) - levels
        return (q * d).astype(np.float32)
    return scale, round_to


def _scale_q8_0(blk: np.ndarray):
    idx = np.abs(blk).argmax(-1)
    m = blk[np.arange(blk.shape[0]), idx]
    d = (np.abs(m) / np.float32(127)).astype(np.float16).astype(np.float32)
    return d, idx, np.where(m < 0, np.float32(-127), np.float32(127))


def _round_q8_0(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = x * inv
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)), -127, 127)
    return (q * d).astype(np.float32)


GRIDS = {"q4_0": _signed_max_grid(8), "q5_0": _signed_max_grid(16), "q8_0": (_scale_q8_0, _round_q8_0)}


def hessian(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.T @ x / max(x.shape[0], 1)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U upper with H⁻¹ = UᵀU, after damping."""
    h = h.copy()
    k = h.shape[0]
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), 1e-12)
    hinv = np.linalg.inv(h)
    return np.linalg.cholesky(hinv).T          # cholesky gives lower L with L Lᵀ = H⁻¹; Lᵀ is upper


def prepare(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(dead-channel mask, U) of an input's H: computed once for all the matrices it feeds."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0                      # channels the sample never excites: any value works
    h[dead, dead] = 1.0
    return dead, inverse_cholesky(h, damp)


def gptq(w: np.ndarray, h: np.ndarray, qtype: str, damp: float = DAMP, prepared=None) -> np.ndarray:
    """The f32 matrix whose ``qtype`` encoding is the error-compensated rounding of ``w``
    (``prepared``: ``prepare(h, damp)``, to share it between the matrices of one input)."""
    if qtype not in GRIDS:
        raise InfengError(f"gptq has no grid for {qtype} (only {', '.join(GRIDS)})")
    scale_of, round_to = GRIDS[qtype]
    W = np.array(w, np.float64)
    N, K = W.shape
    if K % QK:
        raise InfengError(f"gptq: rows of {K} are not a multiple of {QK}")
    dead, U = prepared if prepared is not None else prepare(h, damp)
    W[:, dead] = 0.0
    Q = np.zeros((N, K), np.float32)
    for b0 in range(0, K, QK):
        b1 = b0 + QK
        d, pin, code = scale_of(W[:, b0:b1].astype(np.float32))
        err = np.zeros((N, QK))
        for i in range(b0, b1):
            q = round_to(W[:, i].astype(np.float32), d)
            pinned = pin == i - b0
            q[pinned] = (code * d)[pinned] if np.ndim(code) else code * d[pinned]
            e = (W[:, i] - q) / U[i, i]
            W[:, i + 1:b1] -= np.outer(e, U[i, i + 1:b1])
            err[:, i - b0] = e
            Q[:, i] = q
        W[:, b1:] -= err @ U[b0:b1, b1:]
    back = dequantize(quantize(Q, qtype), qtype)
    if not np.array_equal(back, Q):   # pragma: no cover - the pinning guarantees it
        raise InfengError(f"gptq: the {qtype} quantizer does not reproduce the compensated rounding")
    return Q


# matrix → the calibration input that feeds it
FED_BY = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
          "w_gate": "ffn_in", "w_up": "ffn_in", "w_down": "down_in"}


def targets(model, items) -> list[tuple[str, int | None, str]]:
    """(matrix, layer or None for the output matrix, input) for every matrix stored in a type
    with a grid. A tied embedding table is rounded for its use as the output matrix (where its
    error reaches the logits directly); the embedding lookup reads the same rows."""
    dtype = {it.name: it.dtype for it in items}
    out = [(f"layers.{l}.{m}", l, inp) for l in range(model.config.n_layers) for m, inp in FED_BY.items()]
    out.append((model.output_name, None, "out_in"))
    return [t for t in out if dtype[t[0]] in GRIDS]


def apply(model, items, cal, damp: float = DAMP, progress=None):
    """The model's tensors with every matrix that has a grid replaced by its compensated rounding
    (as f32, on the grid: ``plan`` again and quantize as usual), and per matrix the relative
    output error on the calibration sample: (round-to-nearest, gptq)."""
    dtype = {it.name: it.dtype for it in items}
    tensors = dict(model.tensors)
    errors: dict[str, tuple[float, float]] = {}
    hs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}   # (layer, input) → prepare(H)
    for name, l, inp in targets(model, items):
        x = cal.sample(l, inp)
        if (l, inp) not in hs:
            hs[(l, inp)] = prepare(hessian(x), damp)
        w = model.f32(name)
        q = gptq(w, None, dtype[name], damp, prepared=hs[(l, inp)])
        ref = x @ w.T
        rtn = x @ dequantize(quantize(w, dtype[name]), dtype[name]).T
        norm = float(np.sum(ref.astype(np.float64) ** 2)) or 1.0
        errors[name] = (float(np.sum((rtn - ref).astype(np.float64) ** 2)) / norm,
                        float(np.sum((x @ q.T - ref).astype(np.float64) ** 2)) / norm)
        tensors[name] = ("f32", q)
        if progress:
            progress(name)
    return tensors, errors
