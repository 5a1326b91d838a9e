"""What a compressed KV cache costs and buys, side by side with llama.cpp's K/V cache types.

    infeng bench --suite bench/kv.yaml --json kv.json      # kind: kv_cache

Quality: on a real model and real text, each KV kind (``--kv-dtype`` / ``--kv-policy`` /
``--kv-rotate`` of the same weights) against the f32-KV run, by KL-divergence and ΔPPL on the
same token windows, reduced by infeng.evals.perplexity; llama.cpp's ``type_k``/``type_v`` kinds
the same way against its own f32-KV run (flash attention on: llama.cpp needs it for a quantized
V cache), so both engines measure only what their cache changes.

Speed: decode tok/s after a prompt of each depth on a synthetic model, per KV kind, infeng and
llama.cpp alternating, with the prefill tok/s of that prompt; ratios against the f32 cache of
the same engine in the same run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from infeng.bench import synthetic
from infeng.bench.comparison_base import Comparison, positive_ints
from infeng.bench.kinds import prompt
from infeng.bench.llamacpp_kld import LlamaCppScorer
from infeng.bench.peers import LlamaCppPeer, PeerSkip
from infeng.errors import InfengError
from infeng.evals import perplexity as P
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.kvspec import kv_spec
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.scorer import Scorer
from infeng.runtime.types import StepStats

# llama.cpp's GGML types for its K/V cache (enum ggml_type in ggml.h), under infeng's names
GGML_KV = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}


def kind_options(kind: dict[str, Any]) -> dict[str, Any]:
    """Engine keywords of one infeng kind: {dtype, policy?, rotate?, group?}."""
    out = {"kv_dtype": kind.get("dtype", "f32")}
    if kind.get("group"):
        out["kv_group"] = kind["group"]
    if kind.get("policy"):
        out["kv_policy"] = kind["policy"]
    if kind.get("rotate"):
        out["kv_rotate"] = kind["rotate"]
    return out


def kind_label(kind: dict[str, Any]) -> str:
    lab = kind.get("dtype", "f32")
    if kind.get("policy"):
        lab += f" [{kind['policy']}]"
    if kind.get("rotate"):
        lab += f" rotate={kind['rotate']}"
    if kind.get("group"):
        lab += f" group={kind['group']}"
    return lab


# ---- quality ----------------------------------------------------------------------------------
def quality(model_path: Path, text: Path, ctxs: list[int], kinds: list[dict], llamacpp: list[str],
            gguf: Path | None, threads: int, top_k: int, log, windows: int = 0) -> tuple[list[dict], list[str]]:
    """``windows`` > 0: score only the first windows × ctx tokens of the text at each ctx (a long
    text then bounds the work, not the attention depth)."""
    model = load_model(model_path, verify=False)
    rows, notes = [], []
    docs = P.read_documents(text)
    for ctx in ctxs:
        if ctx > model.config.max_seq_len:
            notes.append(f"ctx {ctx} skipped: the model's context is {model.config.max_seq_len}")
            log(notes[-1])
            continue
        base_sc = Scorer(model, threads=threads, ctx=ctx)
        ids = _first_tokens(P.tokenize_documents(base_sc, docs), windows * ctx)
        base = P.compute_base(base_sc, ids, top_k, None, {"model": str(model_path), "text": str(text)})
        bpt = base_sc.kv.bytes_per_token
        log(f"ctx {ctx}: f32-KV baseline over {len(base.nll)} positions")
        for kind in kinds:
            sc = Scorer(model, threads=threads, ctx=ctx, **kind_options(kind))
            rows.append(_row("infeng", kind_label(kind), ctx, sc, ids, base, sc.kv.bytes_per_token / bpt, log,
                             rotated=sum(sc.kv.spec.rotate),
                             rotated_v=sum(sc.kv.spec.rotate_v)))
        if llamacpp:
            try:
                rows += _llamacpp_quality(gguf, ctx, llamacpp, ids, threads, top_k, model.config, log)
            except PeerSkip as e:
                notes.append(f"llama.cpp quality rows skipped: {e}")
                log(notes[-1])
    return rows, notes


def _first_tokens(docs: list[list[int]], n: int) -> list[list[int]]:
    """The documents cut to n tokens in all (n <= 0: all of them)."""
    if n <= 0:
        return docs
    out = []
    for d in docs:
        if n <= 1:
            break
        out.append(d[:n])
        n -= len(out[-1])
    return out


def _row(runner, label, ctx, scorer, ids, base, bytes_ratio, log, **extra):
    t = time.perf_counter()
    m, _ = P.kld_metrics(P.score(scorer, ids, None, base), base, len(ids))
    row = {"part": "quality", "runner": runner, "kv": label, "ctx": ctx, "kv_bytes_vs_f32": bytes_ratio,
           "kld_mean": m["kld_mean"], "kld_p99": m["kld_p99"], "ppl": m["ppl"], "base_ppl": m["base_ppl"],
           "delta_ppl_pct": 100 * (m["ppl"] / m["base_ppl"] - 1), "top1_agreement": m["top1_agreement"],
           "seconds": time.perf_counter() - t, **extra}
    log(f"{runner:9s} ctx {ctx:5d} {label:28s} KLD {row['kld_mean']:.3g} (p99 {row['kld_p99']:.3g})  "
        f"ΔPPL {row['delta_ppl_pct']:+.3f}%  bytes {bytes_ratio:.3f}× f32")
    return row


def _llamacpp_quality(gguf, ctx, kinds, ids, threads, top_k, cfg, log) -> list[dict]:
    if gguf is None or not Path(gguf).is_file():
        raise PeerSkip(f"`gguf` {gguf!r} is not a file (llama.cpp scores the model's own GGUF)")
    base_sc = LlamaCppScorer(Path(gguf), ctx, threads, type_k=0, type_v=0, flash_attn=True)
    base_sc.cfg = cfg                   # compute_base reads the vocabulary size there
    try:
        base = P.compute_base(base_sc, ids, top_k, None, {"model": str(gguf)})
    finally:
        base_sc.close()
    rows = []
    for kind in kinds:
        k, v = kind.split(",") if "," in kind else (kind, kind)
        if k not in GGML_KV or v not in GGML_KV:
            raise PeerSkip(f"llama.cpp kind {kind!r}: K/V types are {', '.join(GGML_KV)}")
        sc = LlamaCppScorer(Path(gguf), ctx, threads, type_k=GGML_KV[k], type_v=GGML_KV[v], flash_attn=True)
        try:
            rows.append(_row("llama.cpp", kind, ctx, sc, ids, base, float("nan"), log))
        finally:
            sc.close()
    return rows


# ---- speed --------------------------------------------------------------------------------------
def _infeng_decode(model, threads, kind, ids, n) -> tuple[float, float]:
    eng = Engine(model, threads=threads, max_batch=1, max_batch_tokens=512, max_seq_len=len(ids) + n + 16,
                 detokenize=False, prefix_cache=False, **kind_options(kind))
    eng.stats = StepStats()
    req = Request(id="0", prompt_ids=list(ids), params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    list(eng.generate([req]))
    st = eng.stats
    return st.prefill_tokens / st.prefill_s, st.decode_tokens / st.decode_s


def _llamacpp_decode(model, threads, kind, ids, n, gguf) -> tuple[float, float]:
    k, v = kind.split(",") if "," in kind else (kind, kind)
    peer = LlamaCppPeer(model, threads, len(ids) + n + 16, gguf, None, flash_attn=True,
                        type_k=GGML_KV[k], type_v=GGML_KV[v])
    try:
        pt, ps = peer.prefill(ids)
        dt, ds = peer.decode(ids, n)
        return pt / ps, dt / ds
    finally:
        peer.close()


def speed(model_path: Path, depths: list[int], tokens: int, kinds: list[dict], llamacpp: list[str],
          gguf: Path | None, threads: int, repeats: int, log) -> tuple[list[dict], list[str]]:
    model = load_model(model_path, verify=False)
    rows, notes = [], []
    runs = [("infeng", kind_label(k), lambda ids, k=k: _infeng_decode(model, threads, k, ids, tokens)) for k in kinds]
    runs += [("llama.cpp", k, lambda ids, k=k: _llamacpp_decode(model, threads, k, ids, tokens, gguf)) for k in llamacpp]
    for depth in depths:
        ids = prompt(model.config.vocab_size, max(depth, 1), 0)
        got: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rep in range(repeats):                      # runners alternate within a repeat
            for runner, label, fn in runs:
                if (runner, label) in got and got[(runner, label)] is None:
                    continue
                try:
                    got.setdefault((runner, label), []).append(fn(ids))
                except PeerSkip as e:
                    got[(runner, label)] = None
                    notes.append(f"{runner} {label} skipped: {e}")
        for runner, label, _ in runs:
            vals = got.get((runner, label))
            if not vals:
                continue
            pp, tg = (float(np.median([v[i] for v in vals])) for i in (0, 1))
            rows.append({"part": "speed", "runner": runner, "kv": label, "depth": depth, "tokens": tokens,
                         "prefill_tok_s": pp, "decode_tok_s": tg, "repeats": len(vals)})
        for r in rows:
            if r["part"] == "speed" and r["depth"] == depth:
                ref = next((x for x in rows if x["part"] == "speed" and x["depth"] == depth and x["runner"] == r["runner"]
                            and x["kv"] in ("f32", "f32,f32")), None)
                if ref:
                    r["decode_vs_f32"] = r["decode_tok_s"] / ref["decode_tok_s"]
                    r["prefill_vs_f32"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
                vs = f"({r['decode_vs_f32']:.2f}× f32)  " if "decode_vs_f32" in r else ""   # no f32 row: no ratio
                log(f"{r['runner']:9s} depth {depth:5d} {r['kv']:20s} decode {r['decode_tok_s']:7.2f} tok/s "
                    f"{vs}prefill {r['prefill_tok_s']:7.1f} tok/s")
    return rows, notes


def check_kinds(kinds: Any, model_cfg, where: str) -> list[dict]:
    """The YAML's infeng kinds, each checked now (a bad one fails before any work)."""
    if not isinstance(kinds, list) or not all(isinstance(k, dict) for k in kinds):
        raise_bad(where, "`kinds` must be a list of {dtype, policy?, rotate?, group?}")
    for k in kinds:
        extra = set(k) - {"dtype", "policy", "rotate", "group"}
        if extra:
            raise_bad(where, f"kind {k}: unknown key(s) {', '.join(sorted(extra))}")
        if model_cfg is not None:
            kv_spec(model_cfg, k.get("dtype", "f32"), k.get("policy"), k.get("rotate", "auto"), k.get("group"))
    return kinds


def raise_bad(where: str, msg: str):
    raise InfengError(f"{where}: {msg}")


class KVCacheKinds(Comparison):
    """Compressed KV caches: quality (KLD, ΔPPL against the f32 cache, real model and text) and
    decode speed at depth, beside llama.cpp's K/V cache types (infeng.bench.kv_cache)."""
    name, model_param = "kv_cache", "model"
    may_be_zero = ("windows",)                      # 0: score the whole text
    defaults = {"model": "", "gguf": "", "text": "", "ctx": [512, 2048], "windows": 0, "top_k": 128,
                "kinds": [{"dtype": "bf16"}, {"dtype": "int8"}, {"dtype": "int4"}],
                "llamacpp": ["q8_0", "q4_0"],
                "speed_model": "tinyllama-1.1b:q4_0", "depths": [0, 1024, 4096], "tokens": 32,
                "speed_kinds": [{"dtype": "f32"}, {"dtype": "int8"}, {"dtype": "int4"}],
                "speed_llamacpp": ["f32", "q8_0", "q4_0"], "threads": 2, "repeats": 2,
                "parts": ["quality", "speed"]}

    def run(self, p, log):
        bad = [x for x in p["parts"] if x not in ("quality", "speed")]
        if bad:
            raise InfengError(f"{self.name}: `parts`: {bad[0]!r} is not quality or speed")
        rows, notes = [], []
        p = {**p, **{k: str(Path(p[k]).expanduser()) for k in ("model", "gguf", "text") if p[k]}}
        gguf = Path(p["gguf"]) if p["gguf"] else None
        if "quality" in p["parts"]:
            if not p["model"] or not Path(p["model"]).exists():
                raise InfengError(f"{self.name}: `model` {p['model']!r}: no such model file or folder (the quality part needs it)")
            if not p["text"] or not Path(p["text"]).is_file():
                raise InfengError(f"{self.name}: `text` {p['text']!r} is not a file (the quality part needs it)")
            positive_ints(p["ctx"], "ctx", self.name)
            cfg = load_model(p["model"], verify=False).config
            kinds = check_kinds(p["kinds"], cfg, self.name)
            r, n = quality(Path(p["model"]), Path(p["text"]), p["ctx"], kinds, p["llamacpp"],
                           gguf, p["threads"], p["top_k"], log, p["windows"])
            rows, notes = rows + r, notes + n
        if "speed" in p["parts"]:
            if not p["depths"] or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in p["depths"]):
                raise InfengError(f"{self.name}: `depths` must be a list of integers >= 0, got {p['depths']!r}")
            path = _model_path(p["speed_model"])
            cfg = load_model(path, verify=False).config
            kinds = check_kinds(p["speed_kinds"], cfg, self.name)
            r, n = speed(path, p["depths"], p["tokens"], kinds, p["speed_llamacpp"],
                                  gguf if p["speed_model"] == p["model"] else None,
                                  p["threads"], p["repeats"], log)
            rows, notes = rows + r, notes + n
        return rows, notes

    def metrics(self, records):
        out = {}
        for r in records:
            key = f"{r['part']}.{r['runner']}.{r['kv']}".replace(" ", "_")
            if r["part"] == "quality":
                out[f"{key}.ctx{r['ctx']}.kld_mean"] = r["kld_mean"]
                out[f"{key}.ctx{r['ctx']}.delta_ppl_pct"] = r["delta_ppl_pct"]
            else:
                out[f"{key}.d{r['depth']}.decode_tok_s"] = r["decode_tok_s"]
                if "decode_vs_f32" in r:
                    out[f"{key}.d{r['depth']}.decode_vs_f32"] = r["decode_vs_f32"]
        return out


def _model_path(spec: str) -> Path:
    """A model file or folder, or ARCH:DTYPE for a synthetic model (infeng.bench.synthetic)."""
    if Path(spec).exists():
        return Path(spec)
    arch, _, dtype = spec.partition(":")
    if arch not in synthetic.ARCHS:
        raise InfengError(f"kv_cache: `speed_model` {spec!r} is neither a file nor ARCH:DTYPE "
                          f"(archs: {', '.join(synthetic.ARCHS)})")
    return synthetic.make(arch, dtype or "bf16")
