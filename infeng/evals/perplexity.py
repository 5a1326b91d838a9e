"""Perplexity and KL-divergence over a text file.

Documents are split on a separator and each is scored from BOS (sliding window past the
context, see ``infeng.runtime.scorer``). PPL = exp(mean NLL over every predicted token); its
standard error comes from the NLLs' standard error by the delta method (PPL · se(NLL)), as
llama.cpp's perplexity tool reports it.

KL-divergence compares the model's next-token distribution with a baseline's at every predicted
position. The baseline is reduced to its top-k log-probabilities plus the mass of the remaining
tokens (one "rest" bucket), as llama.cpp's KL mode keeps it compact, so a saved baseline and a
live one give the same numbers: KL(P_base || Q_model) over the k + 1 buckets. That is a lower
bound on the full-vocabulary KL and equals it when k ≥ vocab (or the rest mass is zero).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from infeng.errors import InfengError
from infeng.runtime.scorer import Scorer, log_softmax
from infeng.telemetry import atomic_path

DEFAULT_SEPARATOR = "<|endoftext|>"
BASE_FORMAT = "infeng.kld-base/1"
_ROWS = 64   # rows per float64 block


def read_documents(path: Path, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InfengError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InfengError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not separator:
        raise InfengError("--separator must not be empty")
    docs = [d.strip() for d in text.split(separator)]
    docs = [d for d in docs if d]
    if not docs:
        raise InfengError(f"{path}: no text to score")
    return docs


def tokenize_documents(scorer: Scorer, docs: list[str]) -> list[list[int]]:
    """Each document from BOS (when the model has one)."""
    out = []
    bos = scorer.cfg.bos_id
    for d in docs:
        ids = scorer.tokenizer.encode(d)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        out.append(ids)
    return out


def nll_stats(nll: np.ndarray) -> dict[str, float]:
    n = len(nll)
    if n == 0:
        raise InfengError("no token to predict: every document is a single token")
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    ppl = float(np.exp(mean))
    return {"ppl": ppl, "ppl_se": ppl * se, "mean_nll": mean, "nll_se": se, "tokens": n}


@dataclass
class Scored:
    """Per predicted position: the model's NLL and argmax (and KL when a baseline was given)."""
    doc: np.ndarray          # document index
    nll: np.ndarray
    argmax: np.ndarray
    kld: np.ndarray | None = None


# ---- baseline top-k log-probs ---------------------------------------------------------------
@dataclass
class BaseLogits:
    """A baseline model's next-token distributions, reduced to top-k + rest, for every predicted
    position of a tokenized text (``tokens``/``doc_offsets`` identify that text)."""
    topk_idx: np.ndarray     # (N, k) int32, most likely first
    topk_logp: np.ndarray    # (N, k) float32 log-probabilities
    rest: np.ndarray         # (N,) float32 probability mass outside the top k
    nll: np.ndarray          # (N,) float32 NLL of the actual next token
    tokens: np.ndarray       # (T,) int32 all documents' ids, concatenated
    doc_offsets: np.ndarray  # (D + 1,) int64 document boundaries in ``tokens``
    meta: dict

    @property
    def k(self) -> int:
        return self.topk_idx.shape[1]


def reduce_topk(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 log-probs (n, V) → (idx int32, logp float32, rest float32), idx sorted by logp."""
    V = lp.shape[1]
    k = min(k, V)
    if k < V:
        part = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(V), lp.shape).copy()
    vals = np.take_along_axis(lp, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1).astype(np.int32)
    vals = np.take_along_axis(vals, order, axis=1)
    rest = np.clip(1.0 - np.exp(vals).sum(axis=1), 0.0, 1.0)
    return idx, vals.astype(np.float32), rest.astype(np.float32)


def kl_topk(lp_model: np.ndarray, idx: np.ndarray, blp: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """KL(P_base || Q_model) over the base's top-k buckets plus one rest bucket, per row."""
    blp = blp.astype(np.float64)
    p = np.exp(blp)
    qlp = np.take_along_axis(lp_model, idx.astype(np.int64), axis=1)
    kl = (p * (blp - qlp)).sum(axis=1)
    pr = rest.astype(np.float64)
    qr = np.clip(1.0 - np.exp(qlp).sum(axis=1), 1e-30, 1.0)
    has = pr > 0
    kl[has] += pr[has] * (np.log(pr[has]) - np.log(qr[has]))
    return kl


def text_meta(docs_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray([t for d in docs_ids for t in d], np.int32)
    offsets = np.zeros(len(docs_ids) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in docs_ids])
    return tokens, offsets


def compute_base(scorer: Scorer, docs_ids: list[list[int]], k: int, stride: int | None,
                 meta: dict, on_doc: Callable[[], None] | None = None) -> BaseLogits:
    idx, logp, rest, nll = [], [], [], []
    for ids in docs_ids:
        for lg, tg, _ in scorer.windows(ids, stride):
            for s in range(0, len(tg), _ROWS):
                lp = log_softmax(lg[s:s + _ROWS])
                i, v, r = reduce_topk(lp, k)
                idx.append(i), logp.append(v), rest.append(r)
                nll.append((-lp[np.arange(len(lp)), tg[s:s + _ROWS]]).astype(np.float32))
        if on_doc:
            on_doc()
    tokens, offsets = text_meta(docs_ids)
    V = scorer.cfg.vocab_size
    kk = min(k, V)
    cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))
    return BaseLogits(cat(idx, (0, kk), np.int32), cat(logp, (0, kk), np.float32), cat(rest, (0,), np.float32),
                      cat(nll, (0,), np.float32), tokens, offsets,
                      dict(meta, format=BASE_FORMAT, vocab_size=V, k=kk, ctx=scorer.ctx,
                           stride=stride or max(1, scorer.ctx // 2)))


def save_base(base: BaseLogits, path: Path) -> None:
    """Write a .npz (plain arrays; the metadata is UTF-8 JSON in a uint8 array), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InfengError(f"--save-logits {path}: the file name must end in .npz")
    if not path.parent.is_dir():
        raise InfengError(f"{path.parent}: no such directory (for {path.name})")
    buf = io.BytesIO()
    np.savez(buf, topk_idx=base.topk_idx, topk_logp=base.topk_logp, rest=base.rest, nll=base.nll,
             tokens=base.tokens, doc_offsets=base.doc_offsets,
             meta=np.frombuffer(json.dumps(base.meta, sort_keys=True).encode(), np.uint8))
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def is_base_file(path: Path) -> bool:
    """Saved baseline logits are .npz files; anything else names a model."""
    return Path(path).suffix.lower() == ".npz"


def load_base(path: Path) -> BaseLogits:
    """Read and validate a saved baseline (never unpickles: allow_pickle=False)."""
    p = Path(path)
    where = f"{p}: saved baseline logits"
    try:
        with np.load(p, allow_pickle=False) as z:
            need = {"topk_idx", "topk_logp", "rest", "nll", "tokens", "doc_offsets", "meta"}
            missing = need - set(z.files)
            if missing:
                raise InfengError(f"{where} lacks {', '.join(sorted(missing))}")
            a = {n: z[n] for n in need}
    except InfengError:
        raise
    except FileNotFoundError:
        raise InfengError(f"{p}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InfengError(f"{where} cannot be read ({e})") from None
    want = {"topk_idx": np.int32, "topk_logp": np.float32, "rest": np.float32, "nll": np.float32,
            "tokens": np.int32, "doc_offsets": np.int64, "meta": np.uint8}
    for n, dt in want.items():
        if a[n].dtype != dt:
            raise InfengError(f"{where}: {n} has dtype {a[n].dtype}, expected {np.dtype(dt)}")
    try:
        meta = json.loads(a["meta"].tobytes().decode())
        assert isinstance(meta, dict)
    except Exception:
        raise InfengError(f"{where}: metadata is not a JSON object") from None
    if meta.get("format") != BASE_FORMAT:
        raise InfengError(f"{where}: format {meta.get('format')!r}, expected {BASE_FORMAT!r}")
    V, k = meta.get("vocab_size"), meta.get("k")
    if not (isinstance(V, int) and isinstance(k, int) and 0 < k <= V):
        raise InfengError(f"{where}: bad vocab_size/k in metadata")
    idx, lp, rest, nll, tok, off = (a[n] for n in ("topk_idx", "topk_logp", "rest", "nll", "tokens", "doc_offsets"))
    N = len(nll)
    if idx.ndim != 2 or idx.shape != (N, k) or lp.shape != (N, k) or rest.shape != (N,) or tok.ndim != 1 or off.ndim != 1:
        raise InfengError(f"{where}: array shapes disagree (positions {N}, k {k})")
    if len(off) < 2 or off[0] != 0 or off[-1] != len(tok) or np.any(np.diff(off) < 1):
        raise InfengError(f"{where}: document offsets are inconsistent with the tokens")
    if N != int((np.diff(off) - 1).sum()):
        raise InfengError(f"{where}: {N} positions, the documents predict {int((np.diff(off) - 1).sum())}")
    if N and (idx.min() < 0 or idx.max() >= V) or (len(tok) and (tok.min() < 0 or tok.max() >= V)):
        raise InfengError(f"{where}: token index outside the vocabulary of {V}")
    if not (np.all(np.isfinite(lp)) and np.all(lp <= 1e-5) and np.all(np.isfinite(nll)) and np.all(nll >= -1e-5)
            and np.all((rest >= 0) & (rest <= 1))):
        raise InfengError(f"{where}: log-probabilities out of range (not finite, or > 0)")
    return BaseLogits(idx, lp, rest, nll, tok, off, meta)


# ---- the evaluations ------------------------------------------------------------------------
def score(scorer: Scorer, docs_ids: list[list[int]], stride: int | None = None, base: BaseLogits | None = None,
          on_doc: Callable[[], None] | None = None) -> Scored:
    """NLL and argmax at every predicted position; KL against ``base`` when given."""
    docs, nll, amax, kld = [], [], [], []
    pos = 0
    for d, ids in enumerate(docs_ids):
        for lg, tg, _ in scorer.windows(ids, stride):
            for s in range(0, len(tg), _ROWS):
                lp = log_softmax(lg[s:s + _ROWS])
                t = tg[s:s + _ROWS]
                nll.append(-lp[np.arange(len(t)), t])
                amax.append(lp.argmax(axis=1))
                docs.append(np.full(len(t), d))
                if base is not None:
                    sl = slice(pos, pos + len(t))
                    kld.append(kl_topk(lp, base.topk_idx[sl], base.topk_logp[sl], base.rest[sl]))
                pos += len(t)
        if on_doc:
            on_doc()
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    return Scored(cat(docs, np.int64), cat(nll, np.float64), cat(amax, np.int64),
                  cat(kld, np.float64) if base is not None else None)


def perplexity_metrics(sc: Scored, n_docs: int) -> tuple[dict, list[dict]]:
    m = nll_stats(sc.nll)
    m["documents"] = n_docs
    recs = []
    for d in range(n_docs):
        x = sc.nll[sc.doc == d]
        if len(x):
            recs.append({"doc": d, "tokens": int(len(x)), "mean_nll": float(x.mean()), "ppl": float(np.exp(x.mean()))})
    return m, recs


def check_base_matches(base: BaseLogits, tokens: np.ndarray, offsets: np.ndarray, vocab: int,
                       ctx: int, stride: int | None, where: str) -> None:
    if base.meta.get("vocab_size") != vocab:
        raise InfengError(f"{where}: baseline vocabulary {base.meta.get('vocab_size')} != the model's {vocab}")
    if not (np.array_equal(base.tokens, tokens) and np.array_equal(base.doc_offsets, offsets)):
        raise InfengError(f"{where}: the baseline was computed on other text (or another tokenizer/separator)")
    st = stride or max(1, ctx // 2)
    if (base.meta.get("ctx"), base.meta.get("stride")) != (ctx, st):
        raise InfengError(f"{where}: the baseline used --ctx {base.meta.get('ctx')} --stride {base.meta.get('stride')}, "
                          f"this run --ctx {ctx} --stride {st}")


def kld_metrics(sc: Scored, base: BaseLogits, n_docs: int) -> tuple[dict, list[dict]]:
    m, recs = perplexity_metrics(sc, n_docs)
    bm = nll_stats(base.nll.astype(np.float64))
    k = sc.kld
    n = len(k)
    dp = np.exp(-sc.nll) - np.exp(-base.nll.astype(np.float64))
    out = {"ppl": m["ppl"], "ppl_se": m["ppl_se"], "mean_nll": m["mean_nll"],
           "base_ppl": bm["ppl"], "base_ppl_se": bm["ppl_se"], "base_mean_nll": bm["mean_nll"],
           "ppl_ratio": m["ppl"] / bm["ppl"], "delta_ppl": m["ppl"] - bm["ppl"],
           "kld_mean": float(k.mean()), "kld_se": float(k.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
           "kld_median": float(np.median(k)), "kld_p99": float(np.percentile(k, 99)), "kld_max": float(k.max()),
           "top1_agreement": float(np.mean(sc.argmax == base.topk_idx[:, 0])),
           # probability of the actual next token, model minus baseline (llama.cpp's "Δp")
           "delta_p_mean": float(dp.mean()), "delta_p_rms": float(np.sqrt((dp ** 2).mean())),
           "tokens": n, "documents": n_docs, "base_top_k": base.k}
    for r in recs:
        sel = sc.doc == r["doc"]
        r["kld_mean"] = float(k[sel].mean())
    return out, recs


def manifest_bytes(path: Path) -> bytes:
    """The JSON manifest of a native file (it lists every tensor's checksum)."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        return fh.read(int.from_bytes(head[16:24], "little"))


def adapter_identity(path: Path, adapter) -> dict:
    return {"path": str(path), "sha256": hashlib.sha256(manifest_bytes(Path(path))).hexdigest(),
            "sha256_of": "manifest", "rank": adapter.rank, "dora": bool(adapter.use_dora)}


def model_identity(path: Path, model) -> dict:
    """Path, a sha256 of what identifies the weights (native: the manifest, which holds every
    tensor's checksum; HF folder: config.json + the safetensors headers), weight dtype."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.glob("config.json")) + sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                if f.suffix == ".safetensors":
                    head = fh.read(8)
                    h.update(head + fh.read(int.from_bytes(head, "little")))
                else:
                    h.update(fh.read())
        what = "config.json + safetensors headers"
    else:
        h.update(manifest_bytes(p))
        what = "manifest"
    return {"path": str(p), "sha256": h.hexdigest(), "sha256_of": what, "weight_dtype": model.weight_dtype,
            "vocab_size": model.config.vocab_size, "n_layers": model.config.n_layers, "dim": model.config.dim}
