"""Scorer: logits for every position of a token sequence (perplexity, KL-divergence).

A forward session (the Engine's C forward pass) with one KV slot and ``out_rows`` = every
position. A sequence that fits the context is run in chunks of ``max_tokens`` positions
(the KV cache carries the earlier chunks); a longer one is scored with a sliding window of the
context length that moves by ``stride`` tokens, each window scoring only the targets the previous
windows did not (the Hugging Face "strided perplexity" recipe). A window that starts past 0 sees
only its own tokens (no BOS is inserted).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from infeng import kernels
from infeng.errors import InfengError
from infeng.kernels import default_threads
from infeng.model.loader import Model
from infeng.runtime.adapters import AdapterManager
from infeng.runtime.kvspec import kv_spec
from infeng.runtime.session import ForwardSession
from infeng.runtime.tokenizer import Tokenizer


class Scorer:
    def __init__(self, model: Model, threads: int | None = None, ctx: int | None = None,
                 max_tokens: int = 256, isa: str | None = None, adapter=None, kv_dtype: str = "f32",
                 kv_policy: str | None = None, kv_rotate: str = "auto", kv_group: int | None = None):
        self.model, self.cfg = model, model.config
        self.kern = kernels.load(isa) if isa else kernels.active()
        self.isa = self.kern.ffi.string(self.kern.lib.ifg_isa()).decode()
        self.threads = threads or default_threads()
        if ctx is not None and not 1 < ctx <= self.cfg.max_seq_len:
            raise InfengError(f"--ctx {ctx} must be in 2..{self.cfg.max_seq_len} (the model's maximum)")
        self.ctx = ctx or min(self.cfg.max_seq_len, 4096)
        self.max_tokens = max(1, min(max_tokens, self.ctx))
        self.tokenizer = Tokenizer(model.tokenizer, self.cfg.bos_id, self.cfg.eos_ids)
        self.session = ForwardSession(self.kern, model, max_tokens=self.max_tokens, max_out=self.max_tokens,
                                      threads=self.threads, n_slots=1, max_seq_len=self.ctx, max_segments=1,
                                      kv_spec=kv_spec(self.cfg, kv_dtype, kv_policy, kv_rotate, kv_group))
        self.net, self.kv = self.session.net, self.session.kv
        self.net.seq[:] = 0
        self.forward_tokens = 0
        self.adapter = None
        self._table = None
        if adapter is not None:
            self._attach(adapter)

    def _attach(self, path) -> None:
        """Every position computes with one LoRA/DoRA adapter: one adapter segment over all rows."""
        self.adapters = AdapterManager(self.kern, self.model)
        la = self.adapter = self.adapters.load(path, "eval", pinned=True)
        self.session.lora.reserve(la.kernel_rank)
        self._table = la.table

    def logits(self, ids, out: np.ndarray | None = None) -> np.ndarray:
        """f32 logits (len(ids), vocab) of a sequence that fits the context, scored from position 0."""
        n = len(ids)
        if not 0 < n <= self.ctx:
            raise InfengError(f"a sequence of {n} tokens does not fit the context of {self.ctx}")
        ids = np.asarray(ids, np.int32)
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise InfengError(f"token id outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if out is None:
            out = np.empty((n, self.cfg.vocab_size), np.float32)
        net, kv = self.net, self.kv
        kv.release(0)
        if not kv.ensure(0, n):  # pragma: no cover - the pool holds one full context
            raise InfengError("KV cache cannot hold the window")
        for s in range(0, n, self.max_tokens):
            m = min(self.max_tokens, n - s)
            net.tokens[:m] = ids[s:s + m]
            net.pos[:m] = np.arange(s, s + m, dtype=np.int32)
            net.out_rows[:m] = np.arange(m, dtype=np.int32)
            lora = self.session.lora_segments([self._table], [0], m) if self._table is not None else None
            net.extent[:m] = n      # LongRoPE / dynamic NTK: the window is one call of n positions
            self.session.run(m, m, lora, extents=bool(net.rope_past))
            out[s:s + m] = net.logits[:m]
        kv.release(0)
        self.forward_tokens += n
        return out

    def check_stride(self, stride: int | None) -> int:
        """The window step (default: half the context); an error unless 1 <= stride < ctx."""
        stride = stride or max(1, self.ctx // 2)
        if not 0 < stride <= self.ctx - 1:
            raise InfengError(f"--stride {stride} must be in 1..{self.ctx - 1} (the context minus one)")
        return stride

    def windows(self, ids, stride: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(logits, targets, first) per window: ``logits[i]`` predicts ``targets[i]``, which is
        ``ids[first + i]``. Over all windows every token after the first is predicted once."""
        ids = list(ids)
        n = len(ids)
        if n < 2:
            return
        ctx = self.ctx
        stride = self.check_stride(stride)
        done = 1                      # ids[:done] are already predicted (or are the first token)
        begin = 0
        while done < n:
            end = min(begin + ctx, n)
            lg = self.logits(ids[begin:end])
            # rows predicting ids[done..end-1] are rows (done-1-begin)..(end-2-begin)
            r0 = done - 1 - begin
            yield lg[r0:end - 1 - begin], np.asarray(ids[done:end], np.int64), done
            done = end
            begin += stride


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    x -= m
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits (float64)."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]
