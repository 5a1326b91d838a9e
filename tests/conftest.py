import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from infeng import kernels

ISAS = kernels.supported_isas()


@pytest.fixture(params=ISAS)
def kern(request):
    """The cffi module (.ffi, .lib) of each kernel variant this CPU can run."""
    return kernels.load(request.param)


def P(kern, arr, ctype="float *"):
    """Pointer to a numpy array for a kernel call (the array must be C-contiguous)."""
    assert arr.flags.c_contiguous
    return kernels.ptr(kern, arr, ctype)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """f32 → bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


# absolute, so that suites and files written under tmp_path that name it still find it
DATA = Path(os.environ.get("INFENG_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


# the real model `make model` (and `make test`) fetch: tools/fetch_model.py
MODELS = Path(os.environ.get("INFENG_MODELS", Path.home() / ".cache" / "infeng" / "models")).expanduser()
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not SMOLLM2.is_file():
        pytest.skip(f"the real model {SMOLLM2} is absent (`make model` fetches it; `make test` does too)")
    return SMOLLM2


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"test data not found at {DATA}: set INFENG_TEST_DATA")
    return DATA


def patch_manifest(src: Path, dst: Path, mutate) -> None:
    """Copy a native file to dst with its manifest edited in place: same length (space padded),
    room made by dropping the free-text "note"/"source" fields, so offsets stay valid."""
    raw = bytearray(Path(src).read_bytes())
    (mlen,) = struct.unpack_from("<Q", raw, 16)
    man = json.loads(raw[24:24 + mlen])
    mutate(man)
    for room in ("note", "source"):
        man.pop(room, None)
    blob = json.dumps(man, separators=(",", ":")).encode()
    assert len(blob) <= mlen
    raw[24:24 + mlen] = blob.ljust(mlen)
    Path(dst).write_bytes(bytes(raw))


def check_c_forward_vs_int8_reference(kern, model, tokens=(1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298)):
    """The C forward pass of a quantized model against ReferenceModel(int8_activations=True): a
    prefill of ``tokens``, then two decode steps (GEMV). An int8 rounding flip (C vs numpy f32
    rounding at a .5) moves a row by up to ~1e-2 of the logit scale; most rows agree to f32
    rounding."""
    from infeng.model.llama import LlamaC
    from infeng.model.reference import ReferenceModel
    from infeng.runtime.kv import KVCache
    ref = ReferenceModel(model, int8_activations=True)
    tokens = list(tokens)
    want = ref.forward(tokens)
    net = LlamaC(kern, model, max_tokens=16, max_out=16, threads=2)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
    assert kv.ensure(0, 32)
    T = len(tokens)
    net.tokens[:T], net.pos[:T], net.seq[:T] = tokens, range(T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    scale = np.abs(want).max()
    err = np.abs(net.logits[:T] - want).max(-1) / scale
    assert np.all(err < 1e-2) and np.sum(err < 1e-4) >= T - 2, err
    for t in (311, 265):                                         # decode steps (GEMV)
        w = ref.forward([t])
        net.tokens[0], net.pos[0], net.seq[0], net.out_rows[0] = t, ref.pos - 1, 0, 0
        net.step(kv, 1, 1)
        assert np.abs(net.logits[0] - w[0]).max() / scale < 1e-2
