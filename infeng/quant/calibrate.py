"""Activation statistics for calibration-aware quantization (`infeng calibrate`).

Text is cut into windows of ``ctx`` tokens (each document from BOS, documents concatenated) and
every window goes through the C forward pass with its trace buffer on (the mechanism of
``infeng profile --dump-activations``). For every layer and every linear-layer input

    attn_in  = attention-norm output     → wq, wk, wv
    o_in     = attention output          → wo
    ffn_in   = ffn-norm output           → w_gate, w_up
    down_in  = silu(gate) · up           → w_down

it accumulates, per input channel, max |x|, mean x² and mean |x|, and per tensor a histogram of
log2 |x| (exact counts, ``BINS_PER_OCTAVE`` bins per octave) from which the percentiles and the
99.9 % clipping value are read. It also keeps a fixed random sample of token rows of every input
(the first tokens of the text, the same rows for all inputs, with their positions): the
activations the scale search (``infeng.quant.awq``) measures output error on. The sample goes to a sibling ``.npz`` named in the JSON, with its sha256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from infeng.errors import InfengError
from infeng.telemetry import atomic_path

FORMAT = "infeng.calibration/1"
# input name → (op whose output it is, in the C trace; the matrices that consume it)
INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attn_in": ("attn_norm", ("wq", "wk", "wv")),
    "o_in": ("attention", ("wo",)),
    "ffn_in": ("ffn_norm", ("w_gate", "w_up")),
    "down_in": ("silu_mul", ("w_down",)),
}
# and once per model: the final-norm output → the output matrix (the tied embedding table when
# the model shares them); not in the C trace, so computed from the last residual with the norm
OUTPUT_INPUT = "out_in"
BINS_PER_OCTAVE = 4
LOG2_MIN, LOG2_MAX = -32, 32           # |x| below 2^-32 (and 0) counts in bin 0, above 2^32 in the last
N_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE + 2
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CLIP_PERCENTILE = 99.9
TRACE_BYTES = 512 << 20                # cap on the C trace buffer when choosing the default window


def log2_hist(x: np.ndarray) -> np.ndarray:
    """Counts of |x| in log2 bins: bin 0 = below 2^LOG2_MIN, bin i ≥ 1 = [2^(LOG2_MIN+(i-1)/B), …)."""
    a = np.abs(np.asarray(x, np.float32)).ravel()
    with np.errstate(divide="ignore"):
        l2 = np.log2(a.astype(np.float64))
    idx = np.floor((l2 - LOG2_MIN) * BINS_PER_OCTAVE) + 1
    idx = np.clip(np.nan_to_num(idx, neginf=0, posinf=N_BINS - 1), 0, N_BINS - 1).astype(np.int64)
    return np.bincount(idx, minlength=N_BINS)


def hist_percentile(hist: np.ndarray, q: float) -> float:
    """The q-th percentile of |x| read from a log2 histogram (geometric interpolation inside the
    bin: exact to within one bin, a factor 2^(1/BINS_PER_OCTAVE))."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    target = q / 100.0 * total
    cum = np.cumsum(hist)
    i = int(np.searchsorted(cum, target, side="left"))
    if i == 0:
        return 0.0
    below = cum[i - 1]
    frac = (target - below) / max(hist[i], 1)
    lo = LOG2_MIN + (i - 1) / BINS_PER_OCTAVE
    return float(2.0 ** (lo + frac / BINS_PER_OCTAVE))


@dataclass
class InputStats:
    """Running statistics of one linear-layer input [tokens, channels]."""
    channels: int
    n: int = 0
    absmax: np.ndarray = None
    sum_sq: np.ndarray = None
    sum_abs: np.ndarray = None
    hist: np.ndarray = None

    def __post_init__(self):
        self.absmax = np.zeros(self.channels, np.float32)
        self.sum_sq = np.zeros(self.channels, np.float64)
        self.sum_abs = np.zeros(self.channels, np.float64)
        self.hist = np.zeros(N_BINS, np.int64)

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x)
        self.n += x.shape[0]
        self.absmax = np.maximum(self.absmax, a.max(0))
        self.sum_sq += np.einsum("tc,tc->c", x.astype(np.float64), x.astype(np.float64))
        self.sum_abs += a.sum(0, dtype=np.float64)
        self.hist += log2_hist(a)

    def to_json(self, matrices: tuple[str, ...]) -> dict[str, Any]:
        pct = {f"p{q:g}": hist_percentile(self.hist, q) for q in PERCENTILES}
        clip = hist_percentile(self.hist, CLIP_PERCENTILE)
        clip_bin = int(np.floor((np.log2(clip) - LOG2_MIN) * BINS_PER_OCTAVE)) + 1 if clip > 0 else 0
        clip_bin = int(np.clip(clip_bin, 0, N_BINS - 1))
        return {"matrices": list(matrices), "channels": self.channels, "tokens": self.n,
                "absmax": _floats(self.absmax), "mean_sq": _floats(self.sum_sq / max(self.n, 1)),
                "mean_abs": _floats(self.sum_abs / max(self.n, 1)),
                "percentiles": {**pct, "max": float(self.absmax.max())},
                "clip": clip, "clip_percentile": CLIP_PERCENTILE,
                # histogram cut at the clipping value: bins up to the one holding it, then the rest
                "hist_log2": [int(c) for c in self.hist[:clip_bin + 1]],
                "hist_above_clip": int(self.hist[clip_bin + 1:].sum())}


def _floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, np.float32)]


@dataclass
class Calibration:
    """What `infeng calibrate` writes, and what `infeng quantize --calibration` reads back."""
    doc: dict[str, Any]                                         # the JSON document
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # "layer3.ffn_in" → [n, channels]
    path: Path | None = None
    sha256: str = ""

    def layer(self, l: int, name: str) -> dict[str, Any]:
        return self.doc["layers"][l][name]

    def channel(self, l: int, name: str, stat: str) -> np.ndarray:
        return np.asarray(self.layer(l, name)[stat], np.float32)

    def sample(self, l: int | None, name: str) -> np.ndarray:
        """Layer l's sample of input ``name``; l None: the output matrix's input."""
        return self.samples[OUTPUT_INPUT if l is None else f"layer{l}.{name}"]

    @property
    def positions(self) -> np.ndarray:
        """Position of every sample row in its sequence (a 0 starts a new sequence)."""
        return self.samples["positions"]


def default_ctx(cfg, per_token_floats: int) -> int:
    """The model's context, at most 512, and small enough that the trace fits in TRACE_BYTES."""
    fit = TRACE_BYTES // (4 * per_token_floats * cfg.n_layers)
    return int(max(16, min(cfg.max_seq_len, 512, fit)))


def windows(docs_ids: list[list[int]], ctx: int, max_tokens: int | None) -> list[list[int]]:
    stream = [t for d in docs_ids for t in d]
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return [stream[i:i + ctx] for i in range(0, len(stream), ctx)]


def collect(model, docs_ids: list[list[int]], ctx: int, dump: Callable[[list[int]], Any],
            max_tokens: int | None = None, n_samples: int = 512,
            progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, InputStats]], dict[str, np.ndarray], int]:
    """Run the windows through ``dump`` (token ids → the C forward pass's activations, as
    ``infeng.model.activations``); per layer the InputStats of each input (then one more entry:
    {OUTPUT_INPUT: stats}), the sampled rows of each input, and the number of windows."""
    c = model.config
    if ctx < 1 or ctx > c.max_seq_len:
        raise InfengError(f"--ctx must be in 1..{c.max_seq_len} (the model's context), got {ctx}")
    wins = windows(docs_ids, ctx, max_tokens)
    total = sum(len(w) for w in wins)
    if total == 0:
        raise InfengError("no calibration tokens")
    width = {"attn_in": c.dim, "o_in": c.q_dim, "ffn_in": c.dim, "down_in": c.hidden_dim}
    stats = [{name: InputStats(width[name]) for name in INPUTS} for _ in range(c.n_layers)]
    # the sample is the first n_samples tokens (whole sequences from position 0), so that the
    # search can run attention over it
    picked = np.arange(min(n_samples, total))
    positions: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {f"layer{l}.{n}": [] for l in range(c.n_layers) for n in INPUTS}
    parts[OUTPUT_INPUT] = []
    out_stats = InputStats(c.dim)
    norm = model.f32("norm")
    start = 0
    for w in wins:
        acts = dump(w)
        rows = picked[(picked >= start) & (picked < start + len(w))] - start
        positions.append(rows.astype(np.int32))
        for l, ops in enumerate(acts.layers):
            for name, (op, _) in INPUTS.items():
                x = ops[op]
                stats[l][name].add(x)
                parts[f"layer{l}.{name}"].append(x[rows])
        x = final_norm(acts.layers[-1]["w_down"], norm, c.norm_eps)
        out_stats.add(x)
        parts[OUTPUT_INPUT].append(x[rows])
        start += len(w)
        if progress:
            progress(len(w))
    samples = {k: np.ascontiguousarray(np.concatenate(v), np.float32) for k, v in parts.items()}
    samples["positions"] = np.concatenate(positions)
    return stats + [{OUTPUT_INPUT: out_stats}], samples, len(wins)


def final_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """The final RMSNorm as the C pass computes it (f32)."""
    ms = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))).astype(np.float32) * w


def build(model, stats, n_windows: int, text: dict[str, Any], ctx: int) -> dict[str, Any]:
    c = model.config
    return {"format": FORMAT,
            "model": {"identity": model.identity(), "source": model.source, "n_layers": c.n_layers,
                      "dim": c.dim, "hidden_dim": c.hidden_dim, "n_heads": c.n_heads,
                      "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim},
            "text": {**text, "tokens": int(stats[0]["attn_in"].n), "windows": n_windows, "ctx": ctx},
            "inputs": {**{n: {"op": op, "matrices": list(m)} for n, (op, m) in INPUTS.items()},
                       OUTPUT_INPUT: {"op": "final_norm", "matrices": [model.output_name]}},
            "histogram": {"of": "log2 |x|", "bins_per_octave": BINS_PER_OCTAVE, "log2_min": LOG2_MIN,
                          "bin0": f"|x| < 2^{LOG2_MIN} (and 0)"},
            "layers": [{n: s.to_json(INPUTS[n][1]) for n, s in layer.items()} for layer in stats[:-1]],
            "output": stats[-1][OUTPUT_INPUT].to_json((model.output_name,))}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def samples_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".samples.npz")


def write(doc: dict[str, Any], samples: dict[str, np.ndarray], path: Path) -> Path:
    """The sample .npz first, then the JSON naming it (with its sha256); both through a temporary
    name and a rename, so a reader never sees a JSON without its samples or a half file."""
    path = Path(path)
    npz = samples_path(path)
    # the inner block ends first: the samples are in place before the JSON naming them
    with atomic_path(path) as tmpj, atomic_path(npz, ".npz") as tmp:
        np.savez(tmp, **samples)
        digest = sha256_file(tmp)
        doc = {**doc, "samples": {"file": npz.name, "sha256": digest,
                                  "rows": int(samples["positions"].shape[0]) if samples else 0}}
        tmpj.write_text(json.dumps(doc) + "\n")
    return npz


def load(path: str | Path) -> Calibration:
    p = Path(path)
    if not p.is_file():
        raise InfengError(f"{p}: no such calibration file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InfengError(f"{p}: not a calibration file (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InfengError(f"{p}: not a calibration file (format is not {FORMAT!r}); make one with `infeng calibrate`")
    try:
        n_layers = int(doc["model"]["n_layers"])
        layers = doc["layers"]
        int(doc["output"]["channels"])
        ident = doc["model"]["identity"]
        smp = doc["samples"]
        if not isinstance(layers, list) or len(layers) != n_layers or not isinstance(ident, str):
            raise ValueError("layers")
        for l, layer in enumerate(layers):
            for name in INPUTS:
                e = layer[name]
                k = int(e["channels"])
                if any(len(e[s]) != k for s in ("absmax", "mean_sq", "mean_abs")):
                    raise ValueError(f"layers[{l}].{name}")
    except (KeyError, TypeError, ValueError) as e:
        raise InfengError(f"{p}: calibration file is incomplete or malformed (at {e})") from None
    npz = p.with_name(str(smp.get("file", "")))
    if not smp.get("file") or not npz.is_file():
        raise InfengError(f"{p}: its activation sample {npz.name!r} is missing (expected beside it)")
    if sha256_file(npz) != smp.get("sha256"):
        raise InfengError(f"{npz}: sha256 differs from the one {p.name} records (the sample was changed or is from another run)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            samples = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise InfengError(f"{npz}: cannot read ({e})") from None
    pos = samples.get("positions")
    if pos is None or pos.ndim != 1 or (pos.size and pos[0] != 0):
        raise InfengError(f"{npz}: sample positions are missing or do not start a sequence")
    for l, layer in enumerate(layers):
        for name in INPUTS:
            s = samples.get(f"layer{l}.{name}")
            if s is None or s.ndim != 2 or s.shape != (pos.size, int(layer[name]["channels"])):
                raise InfengError(f"{npz}: sample layer{l}.{name} is missing or has the wrong width")
    s = samples.get(OUTPUT_INPUT)
    if s is None or s.shape != (pos.size, int(doc["output"]["channels"])):
        raise InfengError(f"{npz}: sample {OUTPUT_INPUT} is missing or has the wrong width")
    return Calibration(doc, samples, p, sha256_file(p))


def check_model(cal: Calibration, model, where: str) -> None:
    """The statistics must come from this very model (same weights): scales fitted to another
    model's activations would be wrong for this one."""
    if cal.doc["model"]["identity"] != model.identity():
        src = cal.doc["model"].get("source") or "another model"
        raise InfengError(f"{cal.path}: statistics were recorded on {src}, not on {where} "
                          f"(model identity differs); run `infeng calibrate {where}`")


def lineage_entry(cal: Calibration, method: str, params: dict[str, Any]) -> str:
    """One lineage string recording a calibrated quantization: which statistics (the file's
    sha256), of which model, which method and its per-layer choices. Deliberately not the source
    model's identity: the transformed weights are no longer those an adapter made for the source
    was trained against (AWQ even rescales what the linear layers see)."""
    return "calibration:" + json.dumps({"method": method, "stats_sha256": cal.sha256,
                                        "stats_file": cal.path.name if cal.path else None,
                                        "model": cal.doc["model"]["identity"], **params},
                                       separators=(",", ":"))
