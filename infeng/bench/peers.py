"""Peers run side by side with infeng in one bench run: llama.cpp (llama-cpp-python) and PyTorch
eager. Both are optional; a missing one is skipped with a one-line note, never an error.

Every runner (infeng's own in ``infeng.bench.suite`` and the peers here) answers the same three
questions, each returning (tokens, seconds) for the part that is timed:

    prefill(ids)               the prompt through the model once        → prefill tok/s
    decode(ids, n)             n greedy tokens after the prompt         → decode tok/s (prefill excluded)
    batch_decode(prompts, n)   n tokens for each prompt, all together   → aggregate decode tok/s

The engine never imports these packages; only this module does, lazily.
"""
from __future__ import annotations

import importlib
import time
import warnings
from pathlib import Path

import numpy as np

from infeng.bench.synthetic import gguf_cache_dir
from infeng.converters import gguf_write
from infeng.errors import InfengError


class PeerSkip(Exception):
    """This peer cannot run here; the message says why, in one line."""


def _import(name: str, hint: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise PeerSkip(hint) from None
    except Exception as e:  # a broken install that raises something else
        raise PeerSkip(f"{hint} (import failed: {type(e).__name__}: {e})") from None


# ---- PyTorch eager ------------------------------------------------------------------------------
class TorchPeer:
    """A plain-torch Llama forward pass (no transformers) from the same weights, same threads.
    bf16 models run in torch bf16; every other dtype runs in f32 (noted)."""
    name = "torch"

    def __init__(self, model, threads: int, max_ctx: int):
        torch = self.torch = _import("torch", "PyTorch not installed (pip install torch==2.13.0, the CPU wheel)")
        torch.set_num_threads(threads)
        c = self.cfg = model.config
        self.dtype = torch.bfloat16 if model.weight_dtype == "bf16" else torch.float32
        self.note = "" if model.weight_dtype in ("bf16", "f32") else f"{model.weight_dtype} weights run as f32"

        def t(name):      # read-only (mapped) arrays are fine: the peer never writes its weights
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(model.f32(name))).to(self.dtype)
        self.emb = t("tok_embeddings")
        self.out = self.emb if model.output_name == "tok_embeddings" else t(model.output_name)
        self.norm = t("norm")
        self.layers = []
        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers.append({k: t(p + k) for k in
                                ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")})
        self.inv_freq = torch.from_numpy(np.asarray(c.inv_freq(), np.float32))
        if c.rope_past() and max_ctx > c.rope_past():     # its RoPE is one fixed set of frequencies
            raise PeerSkip(f"the torch peer does not switch RoPE frequencies past {c.rope_past()} positions "
                           f"({c.rope_scaling['rope_type']}); context {max_ctx}")
        self.max_ctx = max_ctx

    def _rms(self, x, w):
        torch = self.torch
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(self.dtype) * w

    def _rope(self, x, pos):
        torch = self.torch
        ang = pos.float()[:, None] * self.inv_freq[None, :]                 # [T, hd/2]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[None, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[None, None]
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def _cache(self, B):
        c, torch = self.cfg, self.torch
        shape = (c.n_layers, B, c.n_kv_heads, self.max_ctx, c.head_dim)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def _forward(self, ids, start, kc, vc):
        """ids [B, T] at positions start..start+T; returns last-position logits [B, vocab]."""
        torch, c = self.torch, self.cfg
        F = torch.nn.functional
        B, T = ids.shape
        pos = torch.arange(start, start + T)
        x = self.emb[ids]
        G = c.n_heads // c.n_kv_heads
        for i, L in enumerate(self.layers):
            h = self._rms(x, L["attn_norm"])
            q = F.linear(h, L["wq"]).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
            k = F.linear(h, L["wk"]).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
            v = F.linear(h, L["wv"]).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            kc[i, :, :, start:start + T] = k
            vc[i, :, :, start:start + T] = v
            K = kc[i, :, :, :start + T].repeat_interleave(G, dim=1)
            V = vc[i, :, :, :start + T].repeat_interleave(G, dim=1)
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
                o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
            else:
                o = F.scaled_dot_product_attention(q, K, V)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), L["wo"])
            h = self._rms(x, L["ffn_norm"])
            x = x + F.linear(F.silu(F.linear(h, L["w_gate"])) * F.linear(h, L["w_up"]), L["w_down"])
        return F.linear(self._rms(x[:, -1], self.norm), self.out)

    def logits(self, ids) -> np.ndarray:
        """Last-position logits of one prompt (for checking the peer against infeng)."""
        torch = self.torch
        with torch.inference_mode():
            kc, vc = self._cache(1)
            return self._forward(torch.tensor([list(ids)]), 0, kc, vc).float().numpy()[0]

    def prefill(self, ids):
        torch = self.torch
        with torch.inference_mode():
            kc, vc = self._cache(1)
            t0 = time.perf_counter()
            self._forward(torch.tensor([list(ids)]), 0, kc, vc)
            return len(ids), time.perf_counter() - t0

    def batch_decode(self, prompts, n):
        torch = self.torch
        with torch.inference_mode():
            B, P = len(prompts), len(prompts[0])
            kc, vc = self._cache(B)
            nxt = self._forward(torch.tensor(prompts), 0, kc, vc).argmax(-1)
            t0 = time.perf_counter()
            for j in range(n - 1):
                nxt = self._forward(nxt[:, None], P + j, kc, vc).argmax(-1)
            return B * (n - 1), time.perf_counter() - t0

    def decode(self, ids, n):
        return self.batch_decode([list(ids)], n)

    def close(self):
        pass


# ---- llama.cpp ----------------------------------------------------------------------------------
class LlamaCppPeer:
    """llama.cpp through llama-cpp-python, on a GGUF file of the same model: the suite's
    ``gguf:`` file, else the model exported by infeng.converters.gguf_write (cached)."""
    name = "llama.cpp"

    def __init__(self, model, threads: int, max_ctx: int, gguf: str | Path | None = None, source=None,
                 flash_attn: bool | None = None, type_k: int | None = None, type_v: int | None = None):
        """``flash_attn``: None keeps llama.cpp's default; the peer names ``llama.cpp:fa=0`` and
        ``llama.cpp:fa=1`` set it (its attention at depth differs a lot between the two).
        ``type_k`` / ``type_v``: GGML types of its K/V cache (None: llama.cpp's default, f16)."""
        if flash_attn is not None:
            self.name = f"llama.cpp:fa={int(flash_attn)}"
        llama_cpp = _import("llama_cpp", "llama-cpp-python not installed (pip install -e '.[peers]')")
        if not gguf:
            try:
                gguf = gguf_write.export_cached(model, gguf_cache_dir(), source)
            except InfengError as e:
                raise PeerSkip(f"llama.cpp needs the model as GGUF and the export failed: {e}") from None
        if not Path(gguf).is_file():
            raise PeerSkip(f"llama.cpp: GGUF file {gguf} not found")
        self.n_ctx, self.threads, self.flash_attn, self._seqs = max_ctx, threads, flash_attn, None
        # llama.cpp's own default (flash_attn_type AUTO) turns flash attention on for the CPU;
        # llama-cpp-python's Llama(flash_attn=False) default would turn it off, so say it
        kw = {"flash_attn": True if flash_attn is None else bool(flash_attn)}
        kw.update({k: t for k, t in (("type_k", type_k), ("type_v", type_v)) if t is not None})
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=max_ctx, n_batch=512, logits_all=False, verbose=False, **kw)
        self._lc, self.n_vocab = llama_cpp, self.llm.n_vocab()
        self.note = ""

    def prefill(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(list(ids))
        return len(ids), time.perf_counter() - t0

    def _next(self) -> int:
        """Greedy next token from the last evaluated position (Llama.scores stays zero without
        logits_all in llama-cpp-python 0.3: read llama.cpp's own last logits row)."""
        row = self._lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, (self.n_vocab,))))

    def decode(self, ids, n):
        llm = self.llm
        llm.reset()
        llm.eval(list(ids))
        tok = self._next()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = self._next()
        return n - 1, time.perf_counter() - t0

    def batch_decode(self, prompts, n):
        """All rows prefilled in one llama_decode (not timed), then n - 1 steps that decode one
        token of every row together: the same work infeng's batched decode times."""
        if len(prompts) == 1:
            return self.decode(prompts[0], n)
        B, P = len(prompts), len(prompts[0])
        need = B * (P + n) + 64
        if self._seqs is None or self._seqs.n_seq != B or self._seqs.n_ctx < need:
            if self._seqs is not None:
                self._seqs.close()
            self._seqs = LlamaCppSeqs(self.llm, self.threads, need, max(512, B * P), B, self.flash_attn)
        seqs = self._seqs
        seqs.clear()
        nxt = seqs.decode([(i, list(p), 0) for i, p in enumerate(prompts)])
        t0 = time.perf_counter()
        for j in range(n - 1):
            nxt = seqs.decode([(i, [t], P + j) for i, t in enumerate(nxt)])
        return B * (n - 1), time.perf_counter() - t0

    def close(self):
        if self._seqs is not None:
            self._seqs.close()
        self.llm.close() if hasattr(self.llm, "close") else None


class LlamaCppSeqs:
    """A llama.cpp context of ``n_seq`` sequences on a loaded model (llama-cpp-python's high-level
    Llama holds one sequence, so this uses its low-level API), and one llama_decode over a ragged
    batch of rows of those sequences."""

    def __init__(self, llm, threads: int, n_ctx: int, n_batch: int, n_seq: int, flash_attn: bool | None = None):
        lc = self.lc = _import("llama_cpp", "llama-cpp-python not installed (pip install -e '.[peers]')")
        self.llm, self.n_seq, self.n_ctx = llm, n_seq, n_ctx
        self.model = llm._model.model
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        p.n_threads = p.n_threads_batch = threads
        if flash_attn is not None:
            if hasattr(p, "flash_attn_type"):
                p.flash_attn_type = int(bool(flash_attn))     # LLAMA_FLASH_ATTN_TYPE_DISABLED / _ENABLED
            else:
                p.flash_attn = bool(flash_attn)
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise PeerSkip(f"llama.cpp: could not create a context for {n_seq} sequences")
        self.n_vocab = llm.n_vocab()
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)

    def decode(self, rows: list[tuple[int, list[int], int]]) -> list[int]:
        """rows: (seq id, tokens, first position); logits of each row's last token → argmax."""
        b, lc = self.batch, self.lc
        n, last = 0, []
        for seq, toks, pos in rows:
            for j, t in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = t, pos + j, 1, seq
                b.logits[n] = j == len(toks) - 1
                n += 1
            last.append(n - 1)
        b.n_tokens = n
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise PeerSkip(f"llama.cpp: llama_decode failed ({rc}) on {n} tokens")
        return [int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), (self.n_vocab,))))
                for i in last]

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if self.ctx:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx = None


PEERS = {"torch": TorchPeer, "llama.cpp": LlamaCppPeer, "llama.cpp:fa=0": LlamaCppPeer,
         "llama.cpp:fa=1": LlamaCppPeer}


def make_peer(name: str, model, threads: int, max_ctx: int, gguf=None, source=None):
    """The named peer ready to run, or PeerSkip with the reason."""
    if name not in PEERS:
        raise PeerSkip(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    if name.startswith("llama.cpp"):
        fa = None if name == "llama.cpp" else name.endswith("1")
        return LlamaCppPeer(model, threads, max_ctx, gguf, source, flash_attn=fa)
    return PEERS[name](model, threads, max_ctx)
