"""Kernel micro-benchmarks: one C call timed in a loop, with the bytes and flops it moves.

Each ``*_case`` function sets up its buffers once (outside the timing) and returns a ``Case``:
``run()`` does one timed unit of work (one kernel call, or one pass over the bandwidth buffer)
and ``bytes``/``flops`` say what that unit reads and computes, for GB/s and GFLOP/s.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from infeng.errors import InfengError
from infeng.format.schema import convert_dtype
from infeng.kernels import ptr

from infeng.kernels.abi import DTYPE, KV_TYPE, KVQ_SHAPE, PEAK_OP
from infeng.kernels.structs import Structs
from infeng.quant import quantize
from infeng.quant.interleave import INTERLEAVED, PLAIN, can_interleave, interleave
from infeng.quant.kvcache import KV_TYPES, part_bytes
from infeng.runtime.kvspec import default_group

# the C dtype codes (fp8 has no micro-benchmark case)
CDTYPE = {k: v for k, v in DTYPE.items() if k != "fp8"}


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    bytes: float = 0.0          # bytes read from memory by one run()
    flops: float = 0.0
    tokens: int = 0             # tokens one run() processes (0: not a token-level figure)
    keep: tuple = ()            # the arrays the C pointers of run() point into


def parse_shape(shape: str) -> tuple[int, int]:
    """"NxK" (rows = output features, cols = input width, as the weight is stored) → (N, K)."""
    try:
        n, k = (int(v) for v in str(shape).lower().split("x"))
    except ValueError:
        raise InfengError(f"shape {shape!r}: expected ROWSxCOLS, e.g. 2048x5632") from None
    if n < 1 or k < 1:
        raise InfengError(f"shape {shape!r}: both sides must be >= 1")
    return n, k


def random_weight(dtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """A random [n][k] weight in the storage layout of ``dtype`` (q8_0x16 / q4_0x16 / q4_kx16 / ...:
    the row-interleaved kernel layouts, n a multiple of 16; bf16_dp: bf16's bytes)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(1 / np.sqrt(k))
    if dtype in ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "q4_k", "q5_k", "q6_k") or dtype in PLAIN:
        block = 256 if dtype.startswith(("q4_k", "q5_k", "q6_k")) else 32
        if k % block:
            raise InfengError(f"{dtype} needs a row width that is a multiple of {block}, got {k}")
        if dtype in PLAIN:
            if n % 16:
                raise InfengError(f"{dtype} needs a row count that is a multiple of 16, got {n}")
            return np.ascontiguousarray(interleave(quantize(w, PLAIN[dtype]), PLAIN[dtype]))
        return np.ascontiguousarray(quantize(w, dtype))
    if dtype not in CDTYPE:
        raise InfengError(f"dtype {dtype!r} is not one of {', '.join(CDTYPE)}")
    return np.ascontiguousarray(convert_dtype(w, "f32", "bf16" if dtype == "bf16_dp" else dtype))


def aligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` at a 64-byte boundary, as the model file maps its tensors: where the heap
    put a buffer otherwise changed a GEMV's speed by up to 20 % from one process to the next."""
    buf = np.empty(a.nbytes + 64, np.uint8)
    off = -buf.ctypes.data % 64
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def matmul_case(kern, dtype: str, shape: str, tokens: int = 1, threads: int = 0, rotate_mb: float = 0) -> Case:
    """y = x · Wᵀ for ``tokens`` rows of x (1: the decode GEMV; more: the prefill GEMM).
    The types with a 16-row layout run in it when n % 16 == 0, as a loaded model does.
    ``rotate_mb``: each run() uses the next of as many copies of W as total that many MiB, so W
    comes from DRAM when that is well past the last-level cache, as a decode step's weights do.
    ``dtype`` + "+xq" (e.g. q6_k+xq): x quantized once beforehand and handed in (ifg_matmul_xq), as
    forward.c's projections get it (the k-quants' large batches then take X16R_TB-token tiles)."""
    dtype, xq_given = (dtype[:-3], True) if dtype.endswith("+xq") else (dtype, False)
    n, k = parse_shape(shape)
    if can_interleave(dtype, n):
        dtype = INTERLEAVED[dtype]
    w0 = random_weight(dtype, n, k)
    ws = [aligned(w0) for _ in range(max(1, math.ceil(rotate_mb * 2**20 / w0.nbytes)))]
    x = aligned(np.random.default_rng(1).standard_normal((tokens, k), dtype=np.float32))
    y = aligned(np.zeros((tokens, n), np.float32))
    pws = [kern.ffi.cast("void *", kern.ffi.from_buffer(w)) for w in ws]
    px, py = ptr(kern, x), ptr(kern, y)
    code = CDTYPE[dtype]
    turn = [0]
    xq, st = kern.ffi.NULL, Structs(kern)
    if xq_given:
        xq = st.new("struct ifg_xq", q=np.zeros((tokens, k), np.int8), d=np.zeros((tokens, k // 32), np.float32),
                    s=np.zeros((tokens, k // 32), np.int32), ldq=k, ldd=k // 32)
        kern.lib.ifg_quantize_x(xq.q, xq.d, xq.s, px, k, 0, tokens, 0, k, k, k // 32)

    def run():
        turn[0] = (turn[0] + 1) % len(pws)
        kern.lib.ifg_matmul_xq(py, n, px, k, pws[turn[0]], code, tokens, n, k, 0, xq, threads)
    kind = "gemv" if tokens == 1 else f"gemm{tokens}"
    return Case(f"{kind} {dtype} {n}x{k}", run, bytes=float(w0.nbytes + x.nbytes + y.nbytes),
                flops=2.0 * tokens * n * k, keep=(*ws, x, y) + ((st,) if xq_given else ()))


def attention_case(kern, depth: int, n_heads: int = 32, n_kv_heads: int = 4, head_dim: int = 64,
                   block_size: int = 16, threads: int = 0, kv: str = "f32") -> Case:
    """One decode token attending over ``depth`` cached positions (one layer, paged cache).
    ``kv``: f32 (the f32 cache and kernel), or bf16 / int8 / int4 / blocked-f32 (the compressed
    layout of kvq.h and its kernel; blocked-f32 is f32 values in that layout)."""
    if kv != "f32":
        return kvq_attention_case(kern, depth, n_heads, n_kv_heads, head_dim, block_size, threads, kv)
    ctx = depth + 1
    n_blocks = -(-ctx // block_size)
    rng = np.random.default_rng(2)
    kc = rng.standard_normal((n_blocks, block_size, n_kv_heads, head_dim), dtype=np.float32)
    vc = rng.standard_normal((n_blocks, block_size, n_kv_heads, head_dim), dtype=np.float32)
    table = np.arange(n_blocks, dtype=np.int32)
    q = rng.standard_normal((1, n_heads * head_dim), dtype=np.float32)
    out = np.zeros_like(q)
    seq, pos = np.zeros(1, np.int32), np.array([depth], np.int32)
    P = lambda a, t="float *": ptr(kern, a, t)   # noqa: E731
    args = (P(out), n_heads * head_dim, P(q), n_heads * head_dim, P(kc), P(vc), P(table, "int32_t *"),
            n_blocks, block_size, P(seq, "int32_t *"), P(pos, "int32_t *"), 1, n_heads, n_kv_heads,
            head_dim, float(1 / np.sqrt(head_dim)), threads)
    f = kern.lib.ifg_attention

    def run():
        f(*args)
    kv_bytes = 2.0 * ctx * n_kv_heads * head_dim * 4
    return Case(f"attention d{depth} {n_heads}/{n_kv_heads}x{head_dim}", run, bytes=kv_bytes,
                flops=4.0 * ctx * n_heads * head_dim, keep=(kc, vc, table, q, out, seq, pos))


def kvq_attention_case(kern, depth, n_heads, n_kv_heads, head_dim, block_size, threads, kv) -> Case:
    t = "f32" if kv == "blocked-f32" else kv
    if t not in KV_TYPES:
        raise InfengError(f"attention kv {kv!r}: one of f32, blocked-f32, {', '.join(KV_TYPES[1:])}")
    ctx, group = depth + 1, default_group(head_dim)
    vt = {"int8c": "int8", "int4c": "int4"}.get(t, t)        # per-channel keys beside their values
    n_blocks = -(-ctx // block_size)
    kc = np.zeros(n_blocks * n_kv_heads * part_bytes(t, block_size, head_dim, group), np.uint8)
    vc = np.zeros(n_blocks * n_kv_heads * part_bytes(vt, block_size, head_dim, group), np.uint8)
    S = 2 * KVQ_SHAPE["pos"]
    stage = np.zeros((S, n_kv_heads * head_dim), np.float32)
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((ctx, n_kv_heads * head_dim), dtype=np.float32)
    table = np.arange(n_blocks, dtype=np.int32)
    P = lambda a, t="float *": ptr(kern, a, t)   # noqa: E731
    seq, pos = np.zeros(ctx, np.int32), np.arange(ctx, dtype=np.int32)
    code, vcode, ld = KV_TYPE[t], KV_TYPE[vt], n_kv_heads * head_dim
    kern.lib.ifg_kvq_store(P(kc, "void *"), P(vc, "void *"), code, vcode, group, P(rows), P(rows), ld, P(stage), S,
                           P(table, "int32_t *"), n_blocks, block_size, P(seq, "int32_t *"), P(pos, "int32_t *"),
                           ctx, n_kv_heads, head_dim, threads)
    kern.lib.ifg_kvq_stage(P(stage), S, P(rows), ld, P(seq, "int32_t *"), P(pos, "int32_t *"), ctx, n_kv_heads,
                           head_dim, threads)
    q = rng.standard_normal((1, n_heads * head_dim), dtype=np.float32)
    out = np.zeros_like(q)
    seq1, pos1 = np.zeros(1, np.int32), np.array([depth], np.int32)
    args = (P(out), n_heads * head_dim, P(q), n_heads * head_dim, P(kc, "void *"), P(vc, "void *"), code, vcode, group,
            P(rows[depth:]), ld, P(stage), S, P(table, "int32_t *"), n_blocks, block_size, P(seq1, "int32_t *"), P(pos1, "int32_t *"), 1, n_heads,
            n_kv_heads, head_dim, float(1 / np.sqrt(head_dim)), 0, threads)
    f = kern.lib.ifg_kvq_attention

    def run():
        f(*args)
    return Case(f"attention {kv} d{depth} {n_heads}/{n_kv_heads}x{head_dim}", run, bytes=float(kc.nbytes + vc.nbytes),
                flops=4.0 * ctx * n_heads * head_dim, keep=(kc, vc, table, q, out, seq1, pos1, rows, stage))


def bandwidth_case(kern, mb: float = 256, threads: int = 0) -> Case:
    """One read pass over an ``mb`` MiB f32 buffer (STREAM-like sum, ifg_read_sum)."""
    n = int(mb * 2**20) // 4
    if n < 64:
        raise InfengError(f"bandwidth buffer of {mb} MiB is too small")
    buf = np.ones(n, np.float32)            # touched: the pages exist before timing
    p, f = ptr(kern, buf), kern.lib.ifg_read_sum

    def run():
        return f(p, n, threads)
    return Case(f"read bandwidth {mb:g} MiB", run, bytes=float(buf.nbytes), keep=(buf,))


# Operations per instruction of the throughput probe's ops (abi.PEAK_OP; a multiply-add counts
# 2). vpmaddubsw's 32 int8 products are summed in pairs, not accumulated.
PEAK_OPS_PER_INSTR = {"vpdpbusd_zmm": 128, "vdpbf16ps_zmm": 64, "vfmadd_zmm": 32, "vfmadd_ymm": 16,
                      "vpmaddubsw_ymm": 64}
PEAK_ROUNDS = 1 << 19    # 8M instructions a thread per call: ~1 ms at two a cycle
# What each kind of product runs on, widest first: the first the kernel build can issue is the
# ceiling of that build's kernels (AVX2's bf16 kernels widen to f32 and FMA).
PEAK_ROLES = {"int8_dot": ("vpdpbusd_zmm", "vpmaddubsw_ymm"), "bf16_dot": ("vdpbf16ps_zmm", "vfmadd_ymm"),
              "f32_fma": ("vfmadd_zmm", "vfmadd_ymm")}


def peak_case(kern, op: str, threads: int = 0) -> Case:
    """The machine's rate of one instruction the kernels are built from (16 independent chains per
    thread, ifg_peak), ``op`` by name or by role (PEAK_ROLES): ``flops`` are its operations, so the
    figure is GOP/s of all threads."""
    f, build = kern.lib.ifg_peak, kern.ffi.string(kern.lib.ifg_isa()).decode()
    if op in PEAK_ROLES:
        have = [o for o in PEAK_ROLES[op] if f(PEAK_OP[o], 1, 1)]
        if not have:
            raise InfengError(f"peak op {op!r}: the kernel build {build} issues none of {', '.join(PEAK_ROLES[op])}")
        op = have[0]
    if op not in PEAK_OP:
        raise InfengError(f"peak op {op!r}: expected one of {', '.join([*PEAK_ROLES, *PEAK_OP])}")
    code = PEAK_OP[op]
    issued = f(code, 1, threads)      # 16 per thread that ran
    if issued == 0:
        raise InfengError(f"peak op {op!r}: the kernel build {build} cannot issue it")
    case = Case(f"peak {op}", lambda: f(code, PEAK_ROUNDS, threads))
    case.flops = float(issued * PEAK_ROUNDS * PEAK_OPS_PER_INSTR[op])
    return case


def time_once(case: Case, min_time: float = 0.05, max_iters: int = 1000) -> float:
    """Seconds per run(): one warm-up call, then as many calls as fit in ``min_time`` (at least 1)."""
    return time_both(case, time.perf_counter, min_time, max_iters)[0]


def time_both(case: Case, cpu_clock, min_time: float = 0.05, max_iters: int = 1000) -> tuple[float, float]:
    """(wall, cpu_clock) seconds per run() over the same calls, as ``time_once`` makes them."""
    case.run()
    n, t0, c0 = 0, time.perf_counter(), cpu_clock()
    while True:
        case.run()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= max_iters:
            return dt / n, (cpu_clock() - c0) / n
