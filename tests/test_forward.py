"""The C forward pass against the numpy reference, in every ISA variant; ragged batches; no
allocation in the decode loop; a C library that cannot allocate."""
import subprocess
import tracemalloc

import numpy as np
import pytest

from infeng import kernels
from infeng.bench import synthetic
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import SamplingParams

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338]


def _run(net, kv, toks, poss, seqs, out_rows):
    T = len(toks)
    net.tokens[:T], net.pos[:T], net.seq[:T] = toks, poss, seqs
    net.out_rows[:len(out_rows)] = out_rows
    net.step(kv, T, len(out_rows))
    return net.logits[:len(out_rows)].copy()


@pytest.mark.parametrize("folder,dtype", [("stories260K-f32", None), ("stories260K", None),
                                          ("stories260K-f32", "f16")])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_and_decode_match_reference(kern, data_dir, folder, dtype, threads):
    model = load_model(data_dir / folder, dtype=dtype)
    ref = ReferenceModel(model)
    want = ref.forward(TOKENS)
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=threads)
    kv = KVCache(kern, model.config, n_slots=2, max_seq_len=64, block_size=4)
    assert kv.ensure(0, 64)
    T = len(TOKENS)
    got = _run(net, kv, TOKENS, range(T), [0] * T, range(T))          # every row's logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # decode: one token at a time continues the same cache
    for t in (311, 265, 345):
        w = ref.forward([t])[-1]
        g = _run(net, kv, [t], [ref.pos - 1], [0], [0])[0]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_untied_32k_vocab_model_matches_reference(kern, model_32k):
    """Untied output head, bf16 weights, a Llama-2-sized vocabulary."""
    ref = ReferenceModel(model_32k)
    want = ref.forward(TOKENS)[-3:]
    net = LlamaC(kern, model_32k, max_tokens=32, max_out=4, threads=2)
    kv = KVCache(kern, model_32k.config, 1, 64)
    kv.ensure(0, 64)
    T = len(TOKENS)
    got = _run(net, kv, TOKENS, range(T), [0] * T, [T - 3, T - 2, T - 1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ragged_batch_equals_separate_sequences(kern, data_dir):
    model = load_model(data_dir / "stories260K-f32")
    net = LlamaC(kern, model, max_tokens=64, max_out=8, threads=2)
    a, b = TOKENS[:9], TOKENS[3:17]
    # separately
    kv = KVCache(kern, model.config, 2, 64, block_size=3)
    kv.ensure(0, 64)
    la = _run(net, kv, a, range(len(a)), [0] * len(a), [len(a) - 1])[0]
    kv.ensure(1, 64)
    lb = _run(net, kv, b, range(len(b)), [1] * len(b), [len(b) - 1])[0]
    # together: b's prompt and a's prompt in one call (a's rows after b's)
    kv2 = KVCache(kern, model.config, 2, 64, block_size=3)
    kv2.ensure(1, 64)          # slot 1 first: its blocks are not slot 0's in order
    kv2.ensure(0, 64)
    toks = b + a
    both = _run(net, kv2, toks, list(range(len(b))) + list(range(len(a))), [1] * len(b) + [0] * len(a),
                [len(b) + len(a) - 1, len(b) - 1])
    np.testing.assert_allclose(both[0], la, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], lb, rtol=1e-5, atol=1e-5)
    # then one decode step for both in one call, against each alone
    d = _run(net, kv2, [300, 301], [len(a), len(b)], [0, 1], [0, 1])
    sa = _run(net, kv, [300], [len(a)], [0], [0])[0]
    sb = _run(net, kv, [301], [len(b)], [1], [0])[0]
    np.testing.assert_allclose(d[0], sa, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d[1], sb, rtol=1e-5, atol=1e-5)


def test_same_thread_count_is_bitwise_deterministic(kern, data_dir):
    model = load_model(data_dir / "stories260K")
    outs = []
    for _ in range(2):
        net = LlamaC(kern, model, 32, 32, threads=2)
        kv = KVCache(kern, model.config, 1, 64)
        kv.ensure(0, 64)
        outs.append(_run(net, kv, TOKENS, range(len(TOKENS)), [0] * len(TOKENS), range(len(TOKENS))))
    assert np.array_equal(outs[0], outs[1])


@pytest.fixture(scope="module")
def model_32k(tmp_path_factory):
    return load_model(synthetic.make("test-32k", "bf16", tmp_path_factory.mktemp("syn") / "t.infeng"))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_decode_loop_allocates_no_arrays(model_32k, temperature):
    """A decode step must not allocate: a 32k-vocab logits row is 128 KB, so any per-step array
    (a logits copy, a softmax buffer, a new token buffer) shows up in the traced peak."""
    eng = Engine(model_32k, threads=1, max_batch=2)
    samples = np.zeros((200, 2), np.int64)    # preallocated: the probe must not allocate either
    n = np.zeros(1, np.int64)

    def probe():
        samples[n[0]] = tracemalloc.get_traced_memory()
        n[0] += 1
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        reqs = [Request(id=str(i), prompt="Once upon a time", params=SamplingParams(
            max_tokens=80, temperature=temperature, seed=i, ignore_eos=True)) for i in range(2)]
        results = []
        for ev in eng.stream(reqs):
            if isinstance(ev, FinishEvent):
                results.append(ev.result)
            else:
                probe()
    finally:
        tracemalloc.stop()
    assert all(len(r.token_ids) == 80 for r in results)
    steady = samples[20:n[0]]
    per_step_peak = int((steady[:, 1] - steady[:, 0]).max())
    growth = int(steady[-1, 0] - steady[0, 0])
    assert per_step_peak < 16 * 1024, per_step_peak
    # only the per-request token lists grow: an id and a timestamp per token (< 128 B with list slack)
    assert growth < 128 * len(steady), growth


def test_c_library_never_allocates_and_releases_the_gil():
    for isa in kernels.supported_isas():
        path = kernels.load(isa).__file__
        syms = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
        names = {line.split()[-1].split("@")[0] for line in syms.splitlines() if line.strip()}
        assert not names & {"malloc", "calloc", "realloc", "free", "posix_memalign", "aligned_alloc", "mmap"}, names
        assert "PyEval_SaveThread" in names    # cffi drops the GIL around every call


def test_engine_returns_every_kv_block(data_dir):
    model = load_model(data_dir / "stories260K")
    eng = Engine(model, threads=1, max_batch=3)
    reqs = [Request(id=str(i), prompt="Once upon a time" * (i % 3), params=SamplingParams(max_tokens=i % 4 * 5, temperature=0))
            for i in range(10)]
    results = list(eng.generate(reqs))
    assert sorted(r.id for r in results) == [str(i) for i in range(10)]
    assert eng.kv.blocks_used() == 0
