"""infeng against llama.cpp on the same GGUF file (a real model): greedy agreement on ten prompts
and the KL-divergence of infeng's next-token distributions from llama.cpp's on a text.

    infeng bench --suite bench/llamacpp_agreement.yaml --model MODEL.gguf [--json out.json]  (kind: llamacpp_agreement)

Both engines read the very same file (infeng converts it in memory, weights copied byte for byte)
and the same token ids: the prompts are rendered with the model's chat template and tokenized by
infeng (tests/test_smollm2.py checks that llama.cpp's tokenizer gives the same ids). Greedy: each
prompt continued ``n`` tokens by both (end-of-turn tokens do not stop them), reported as the
tokens equal before the first divergence and the positions equal overall. KLD: llama.cpp's
logits are the baseline (top-k log-probs + rest, as `infeng eval --kld`), reduced by
infeng.evals.perplexity. llama_cpp is imported only here (the `peers` extra).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from infeng.bench.llamacpp_kld import LlamaCppScorer
from infeng.bench.peers import _import
from infeng.evals import perplexity as P
from infeng.model.loader import load_gguf
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.scorer import Scorer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain photosynthesis in one sentence."}],
    [{"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
]
PLAIN = ["The quick brown fox", "Once upon a time, in a small village,", "def fibonacci(n):\n",
         "The three laws of thermodynamics are"]


def prompt_ids(tok) -> list[list[int]]:
    """The ten prompts as infeng tokenizes them (chats through the model's template)."""
    return [tok.chat_ids(m) for m in CHATS] + [tok.encode(t) for t in PLAIN]


def infeng_greedy(engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, seed=0)
    got = {r.id: r.token_ids for r in engine.generate(
        [Request(id=str(i), prompt_ids=p, params=params) for i, p in enumerate(prompts)])}
    return [got[str(i)] for i in range(len(prompts))]


def llamacpp_greedy(llm, lc, prompts: list[list[int]], n: int) -> list[list[int]]:
    vocab = llm.n_vocab()
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(list(ids))
        toks = []
        for _ in range(n):
            row = lc.llama_get_logits_ith(llm._ctx.ctx, -1)     # llama.cpp's own last logits row
            toks.append(int(np.argmax(np.ctypeslib.as_array(row, (vocab,)))))
            llm.eval([toks[-1]])
        out.append(toks)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    leading = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        leading.append(k)
    total = sum(len(y) for y in b)
    return {"prompts": len(b), "identical_prompts": sum(x == y for x, y in zip(a, b)),
            "leading_equal": leading, "positions_equal": sum(int(p == q) for x, y in zip(a, b) for p, q in zip(x, y)),
            "positions": total}


def run(gguf: Path, text: Path, threads: int, ctx: int, n: int, top_k: int, log=print, greedy: bool = True) -> dict:
    lc = _import("llama_cpp", "llama-cpp-python not installed (pip install -e '.[peers]')")
    model, _ = load_gguf(gguf)
    ours = theirs = agree = None
    if greedy:
        engine = Engine(model, threads=threads, max_batch=len(CHATS) + len(PLAIN), max_seq_len=ctx)
        prompts = prompt_ids(engine.tokenizer)
        t0 = time.perf_counter()
        ours = infeng_greedy(engine, prompts, n)
        log(f"infeng greedy: {time.perf_counter() - t0:.1f} s")
        llm = lc.Llama(model_path=str(gguf), n_ctx=ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                       logits_all=False, verbose=False)
        try:
            theirs = llamacpp_greedy(llm, lc, prompts, n)
        finally:
            llm.close() if hasattr(llm, "close") else None
        agree = agreement(ours, theirs)
        log(f"greedy: {agree['identical_prompts']}/{agree['prompts']} prompts identical over {n} tokens; "
            f"{agree['positions_equal']}/{agree['positions']} positions equal; leading equal {agree['leading_equal']}")
    sc = Scorer(model, threads=threads, ctx=ctx)
    docs = P.tokenize_documents(sc, P.read_documents(text))
    lsc = LlamaCppScorer(gguf, ctx, threads)
    lsc.cfg = sc.cfg            # the same model: compute_base reads the vocabulary size there
    try:
        base = P.compute_base(lsc, docs, top_k, None, {"model": str(gguf), "text": str(text), "runner": "llama.cpp"})
    finally:
        lsc.close()
    kld, _ = P.kld_metrics(P.score(sc, docs, None, base), base, len(docs))
    log(f"KLD(llama.cpp ‖ infeng) on {kld['tokens']} positions: mean {kld['kld_mean']:.3g} "
        f"median {kld['kld_median']:.3g} p99 {kld['kld_p99']:.3g} max {kld['kld_max']:.3g}; top-1 agreement "
        f"{kld['top1_agreement']:.4f}; PPL infeng {kld['ppl']:.4f} llama.cpp {kld['base_ppl']:.4f}")
    return {"gguf": str(gguf), "text": str(text), "threads": threads, "ctx": ctx, "n_greedy": n,
            "llama_cpp_python": getattr(lc, "__version__", "?"), "greedy": agree, "kld": kld,
            "infeng_tokens": ours, "llamacpp_tokens": theirs}
