"""Where the C forward pass departs from the numpy reference: a model-debugging tool.

``trace_forward`` runs one forward call with the trace buffer switched on (``struct
ifg_scratch.trace``: every layer's op outputs); ``diff_reference`` compares them with the numpy
reference model: per layer (the residual after the layer, ReferenceModel's ``trace``) and, in the
first layer that departs, op by op, each op recomputed in numpy from the C pass's own inputs to
that op, so the first op that disagrees is the one that is wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infeng.model import reference as R
from infeng.telemetry import atomic_path, write_text_atomic

# ops whose outputs the trace buffer holds, with the buffer each copies
TRACED = ("attn_norm", "wq", "wk", "wv", "attention", "wo", "ffn_norm", "w_gate", "w_up", "silu_mul", "w_down")


def widths(cfg) -> dict[str, int]:
    return {"attn_norm": cfg.dim, "wq": cfg.q_dim, "wk": cfg.kv_dim, "wv": cfg.kv_dim, "attention": cfg.q_dim,
            "wo": cfg.dim, "ffn_norm": cfg.dim, "w_gate": cfg.hidden_dim, "w_up": cfg.hidden_dim,
            "silu_mul": cfg.hidden_dim, "w_down": cfg.dim}


@dataclass
class Activations:
    tokens: list[int]
    layers: list[dict[str, np.ndarray]]     # per layer: op → [T, width] (op outputs as the C pass left them)
    logits: np.ndarray                       # [vocab] of the last token

    def save(self, out_dir: str | Path) -> list[Path]:
        """One .npy per layer and op (``layer03.w_up.npy``), ``tokens.npy``, ``logits.npy`` and an
        ``index.json`` saying what each holds. No pickle."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        written = []

        def put(name, arr):
            with atomic_path(d / name, ".npy") as tmp:
                np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
            written.append(d / name)
        put("tokens.npy", np.asarray(self.tokens, np.int32))
        for l, ops in enumerate(self.layers):
            for op, a in ops.items():
                put(f"layer{l:02d}.{op}.npy", a)
        put("logits.npy", self.logits)
        index = {"tokens": len(self.tokens), "layers": len(self.layers), "ops": list(TRACED),
                 "files": "layerNN.OP.npy: [tokens, width] f32, the output of OP in layer NN "
                          "(wq/wk before RoPE; wo and w_down: the residual stream after the add)"}
        write_text_atomic(d / "index.json", json.dumps(index, indent=1) + "\n")
        return written


def trace_forward(net, kv, ids: list[int]) -> Activations:
    """One forward call of the C pass ``net`` (a LlamaC taking at least len(ids) tokens) over
    ``ids`` at positions 0..T-1 in KV slot 0 (which must hold T positions), with the trace buffer
    on: every layer's op outputs."""
    c = net.cfg
    T = len(ids)
    per_tok = net.kern.lib.ifg_trace_floats_per_token(net.m)
    trace = net.record_trace(T)
    net.tokens[:T] = ids
    net.pos[:T] = np.arange(T)
    net.seq[:T] = 0
    net.out_rows[0] = T - 1
    try:
        net.step(kv, T, 1)
    finally:
        net.record_trace(0)
    w = widths(c)
    layers = []
    for l in range(c.n_layers):
        block = trace[l * per_tok * T:(l + 1) * per_tok * T]
        off, ops = 0, {}
        for op in TRACED:
            ops[op] = block[off * T:(off + w[op]) * T].reshape(T, w[op]).copy()
            off += w[op]
        layers.append(ops)
    return Activations(list(ids), layers, net.logits[0].copy())


@dataclass
class Diff:
    tol: float
    layers: list[dict[str, float]]            # per layer: rel error of the residual vs the reference
    first_layer: int | None                   # first layer beyond tol (None: agreement)
    first_op: str | None                      # the op in that layer that departs first
    ops: dict[str, float]                     # that layer's per-op errors (each op from C's own inputs)
    logits_err: float

    @property
    def agree(self) -> bool:
        return self.first_layer is None and self.logits_err <= self.tol

    def message(self) -> str:
        if self.agree:
            worst = max((d["rel_err"] for d in self.layers), default=0.0)
            return (f"C forward pass and numpy reference agree: {len(self.layers)} layers, worst residual "
                    f"error {worst:.2e}, logits {self.logits_err:.2e} (tolerance {self.tol:g})")
        if self.first_layer is None:
            return f"the layers agree but the logits part: error {self.logits_err:.2e} > {self.tol:g} (final norm / output)"
        e = self.layers[self.first_layer]["rel_err"]
        where = f"op {self.first_op}" if self.first_op else "no single op (accumulated drift)"
        return (f"first disagreement: layer {self.first_layer}, {where} "
                f"(residual error {e:.2e} > {self.tol:g}; op error {self.ops.get(self.first_op, float('nan')):.2e})")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the reference's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def diff_reference(acts: Activations, ref_model, tol: float = 1e-3) -> Diff:
    """Compare a C activation dump with the numpy reference on the same tokens. ``ref_model``
    is the Model the reference runs (normally the same one the C pass ran)."""
    ref = R.ReferenceModel(ref_model)
    trace: list[np.ndarray] = []
    logits = ref.forward(acts.tokens, trace=trace)
    layers = [{"layer": l, "rel_err": rel_err(acts.layers[l]["w_down"], trace[l])} for l in range(len(trace))]
    first = next((d["layer"] for d in layers if d["rel_err"] > tol), None)
    ops: dict[str, float] = {}
    first_op = None
    if first is not None:
        ops = op_errors(acts, ref, first)
        first_op = next((op for op in TRACED if ops.get(op, 0.0) > tol), None)
    return Diff(tol, layers, first, first_op, ops, rel_err(acts.logits, logits[-1]))


def op_errors(acts: Activations, ref, l: int) -> dict[str, float]:
    """Each op of layer l recomputed in numpy (the reference's functions and weights) from the C
    pass's own inputs to that op; error of the C output against it."""
    c, w = ref.cfg, ref.w
    L = f"layers.{l}."
    A = acts.layers[l]
    T = len(acts.tokens)
    x_in = acts.layers[l - 1]["w_down"] if l > 0 else w["tok_embeddings"][np.asarray(acts.tokens)].astype(np.float32)
    pos = np.arange(T)
    e = {}
    e["attn_norm"] = rel_err(A["attn_norm"], R.rmsnorm(x_in, w[L + "attn_norm"], c.norm_eps))
    for m in ("wq", "wk", "wv"):
        e[m] = rel_err(A[m], ref.mm(A["attn_norm"], L + m))
    q = R.rope(A["wq"].reshape(T, c.n_heads, c.head_dim), pos, ref.inv_freq)
    k = R.rope(A["wk"].reshape(T, c.n_kv_heads, c.head_dim), pos, ref.inv_freq)
    v = A["wv"].reshape(T, c.n_kv_heads, c.head_dim)
    g = c.n_heads // c.n_kv_heads
    K, V = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    att = np.einsum("thd,shd->hts", q, K) / np.sqrt(c.head_dim)
    att = np.where((np.arange(T)[None, :] > pos[:, None])[None], -np.inf, att)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    e["attention"] = rel_err(A["attention"], np.einsum("hts,shd->thd", att, V).reshape(T, c.q_dim))
    e["wo"] = rel_err(A["wo"], x_in + ref.mm(A["attention"], L + "wo"))
    e["ffn_norm"] = rel_err(A["ffn_norm"], R.rmsnorm(A["wo"], w[L + "ffn_norm"], c.norm_eps))
    for m in ("w_gate", "w_up"):
        e[m] = rel_err(A[m], ref.mm(A["ffn_norm"], L + m))
    e["silu_mul"] = rel_err(A["silu_mul"], R.silu(A["w_gate"]) * A["w_up"])
    e["w_down"] = rel_err(A["w_down"], A["wo"] + ref.mm(A["silu_mul"], L + "w_down"))
    return e
