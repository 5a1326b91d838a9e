"""llama.cpp's own quantizations, measured exactly as infeng's are: KL-divergence and perplexity
against one f32 baseline, on the same token ids, reduced by the same code (infeng.evals.perplexity).

    infeng bench --suite kld.yaml --json kld.json     # kind: llamacpp_kld (bench/llamacpp_kld.yaml)

BASE (a native f32 or bf16 file) is scored by infeng as the baseline (top-k log-probs + rest, as
``infeng eval --kld``), exported to GGUF (infeng.converters.gguf_write), and quantized by
llama.cpp's own quantizer (``llama_model_quantize``, the code behind its llama-quantize tool,
through llama-cpp-python; the files are cached beside the export). Each GGUF — the unquantized
export too, which shows the floor two engines reach on identical weights — is scored by llama.cpp
(logits of every position, the same windows as infeng's Scorer), and each ``compare`` native file
by infeng. One table: bits per weight (file bytes × 8 ÷ parameters), file size, mean / p99 KLD,
PPL and ΔPPL, top-1 agreement. Bits per weight count the tensors' bytes only (on a 260K-parameter
model the tokenizer in the file would otherwise dominate).

llama.cpp's K/V cache is kept in f32 here (as infeng's is), so the figures compare weight
formats, not cache formats. llama_cpp is imported only here; without it the llama.cpp rows are
skipped with a note.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from infeng.bench.peers import PeerSkip, _import
from infeng.bench.synthetic import gguf_cache_dir
from infeng.converters import gguf_write
from infeng.converters.gguf_file import GGUFFile
from infeng.errors import InfengError
from infeng.evals import perplexity as P
from infeng.model.loader import load_model
from infeng.runtime.scorer import Scorer
from infeng.telemetry import atomic_path

# llama.cpp's file types (enum llama_ftype in llama.h); the names its llama-quantize tool takes
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}


class LlamaCppScorer:
    """infeng's Scorer interface (``logits`` of a window, ``windows`` over a document) on the
    logits llama.cpp computes, so every metric is reduced by the same code."""
    windows = Scorer.windows
    check_stride = Scorer.check_stride

    def __init__(self, gguf: Path, ctx: int, threads: int, type_k: int = 0, type_v: int = 0,
                 flash_attn: bool | None = None):
        """type_k / type_v: GGML types of the K/V cache (0 = F32, as infeng's default); a
        quantized V cache needs flash_attn."""
        lc = _import("llama_cpp", "llama-cpp-python not installed (pip install -e '.[peers]')")
        self.ctx = ctx
        kw = {} if flash_attn is None else {"flash_attn": flash_attn}
        self.llm = lc.Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512),
                            n_threads=threads, n_threads_batch=threads, logits_all=True,
                            type_k=type_k, type_v=type_v, verbose=False, **kw)

    def logits(self, ids) -> np.ndarray:
        llm = self.llm
        llm.reset()
        llm.eval(list(int(i) for i in ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def quantize_gguf(src: Path, ftype: str, threads: int) -> Path:
    """``src`` quantized by llama.cpp to ``ftype`` (cached next to it while newer than src)."""
    lc = _import("llama_cpp", "llama-cpp-python not installed (pip install -e '.[peers]')")
    out = src.with_name(f"{src.stem}.llamacpp-{ftype}.gguf")
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    with atomic_path(out) as tmp:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise PeerSkip(f"llama.cpp could not quantize {src.name} to {ftype} (code {rc})")
    return out


def _count(dtypes) -> str:
    """"q4_0 30, f32 11" — how many tensors of each type a file holds."""
    from collections import Counter
    return ", ".join(f"{t} {n}" for t, n in Counter(dtypes).most_common())


def run(base_path: Path, text: Path, types: list[str], compare: list[tuple[str, Path]], ctx: int,
        threads: int, top_k: int = 128, stride: int | None = None, log=print) -> tuple[list[dict], list[str]]:
    bad = [t for t in types if t not in FTYPES]
    if bad:
        raise InfengError(f"--types: unknown llama.cpp type {bad[0]!r} (known: {', '.join(FTYPES)})")
    base_model = load_model(base_path, verify=False)
    params = sum(int(a.size) for _, a in base_model.tensors.values())    # unquantized: one element a weight
    if base_model.weight_dtype not in ("f32", "bf16", "f16"):
        raise InfengError(f"{base_path}: the baseline must be unquantized (f32/bf16/f16), not {base_model.weight_dtype}")
    sc = Scorer(base_model, threads=threads, ctx=ctx)
    docs = P.read_documents(text)
    ids = P.tokenize_documents(sc, docs)
    t0 = time.perf_counter()
    base = P.compute_base(sc, ids, top_k, stride, {"model": str(base_path), "text": str(text)})
    log(f"baseline {base_path.name}: {len(base.nll)} positions in {time.perf_counter() - t0:.1f} s")
    rows, notes = [], []

    def add(name, runner, path, scorer, tensor_bytes, types):
        t = time.perf_counter()
        s = P.score(scorer, ids, stride, base)
        m, _ = P.kld_metrics(s, base, len(ids))
        size = Path(path).stat().st_size
        rows.append({"name": name, "runner": runner, "file": str(path), "file_mb": size / 2**20,
                     "bits_per_weight": tensor_bytes * 8 / params, "tensor_types": types,
                     **m, "seconds": time.perf_counter() - t})
        log(f"{runner:9s} {name:10s} {tensor_bytes * 8 / params:5.2f} bits/weight  KLD mean {m['kld_mean']:.3g} "
            f"p99 {m['kld_p99']:.3g}  ΔPPL {m['delta_ppl']:+.4f}  ({size / 2**20:.1f} MiB; {types})")

    for name, path in compare:
        m = load_model(path, verify=False)
        nbytes = sum(m.tensors.nbytes(n) for n in m.tensors)
        add(name, "infeng", path, Scorer(m, threads=threads, ctx=ctx), nbytes, _count(m.tensors.dtype(n) for n in m.tensors))
    try:
        gguf = gguf_write.export_cached(base_model, gguf_cache_dir(), base_path)
        for ft in ["F32" if base_model.weight_dtype == "f32" else base_model.weight_dtype.upper()] + types:
            path = gguf if ft.lower() == base_model.weight_dtype else quantize_gguf(gguf, ft, threads)
            g = GGUFFile(path)
            nbytes = sum(t.nbytes for t in g.tensors.values())
            types_ = _count(t.type_name.lower() for t in g.tensors.values())
            lsc = LlamaCppScorer(path, sc.ctx, threads)
            try:
                add(ft, "llama.cpp", path, lsc, nbytes, types_)
            finally:
                lsc.close()
    except PeerSkip as e:
        notes.append(f"llama.cpp rows skipped: {e}")
        log(notes[-1])
    return rows, notes
