"""Native files hold quantized matrices in the kernels' layout (16 rows interleaved): loading maps
them and copies nothing; everything that reads row-major blocks (reference, export, checksums,
adapters' base identity) sees exactly what a row-major file of the same weights gives."""
import numpy as np
import pytest

from infeng import format as native
from infeng.quant import policy as q
from infeng.bench import synthetic
from infeng.cli.main import main
from infeng.converters.gguf_file import GGUFFile
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.model.stored import ROW_MAJOR
from infeng.quant.interleave import INTERLEAVED, interleave, layout_id
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams

# one layer, every matrix a whole number of 256-blocks and of 16 rows (the K-quants need both)
KQ = dict(dim=256, hidden_dim=512, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=272,
          max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False, bos_id=1, eos_ids=(2,))


def row_major_copy(model, path):
    """``model`` written the way files were before: every tensor row-major."""
    native.write(path, model.manifest(),
                 [native.Tensor(n, d, model.tensors.shape(n), a) for n, (d, a) in model.tensors.items()])
    return path


def quantized(src, qtype):
    m = load_model(src)
    return m.derived(q.quantize_tensors(m.tensors, q.plan(m.tensors, qtype, q.Policy())))


@pytest.fixture(scope="module")
def kq_source(tmp_path_factory):
    synthetic.ARCHS["test-kq"] = KQ
    try:
        yield synthetic.make("test-kq", "bf16", tmp_path_factory.mktemp("kq") / "bf16.infeng")
    finally:
        del synthetic.ARCHS["test-kq"]


@pytest.mark.parametrize("qtype", sorted(INTERLEAVED))
def test_file_holds_the_kernel_layout(kq_source, tmp_path, qtype):
    m = quantized(kq_source, qtype)
    x16 = tmp_path / "x16.infeng"
    native.write(x16, m.manifest(), m.native_tensors())
    rm = row_major_copy(m, tmp_path / "rm.infeng")
    f = native.NativeFile(x16)
    assert f.layouts["layers.0.wq"] == layout_id(qtype) and f.layouts["tok_embeddings"] == ROW_MAJOR
    a, b = load_model(rm), load_model(x16)
    assert a.identity() == b.identity() == m.identity()        # adapters made for either apply to both
    for name in ("layers.0.wq", "layers.0.w_down", "output"):
        if a.tensors.dtype(name) != qtype:
            continue
        kind, mapped = b.kernel_weight(name)
        assert kind == INTERLEAVED[qtype]
        assert np.shares_memory(mapped, b.tensors.stored(name)[1])          # the file's bytes, no copy
        assert np.array_equal(mapped, a.kernel_weight(name)[1])             # = the load-time repack
    # writing a loaded file again keeps its bytes as they are (nothing de-interleaved on the way)
    again = tmp_path / "again.infeng"
    native.write(again, b.manifest(), b.native_tensors())
    assert b.tensors.deinterleaved_count() == 0
    g = native.NativeFile(again)
    assert g.layouts == f.layouts and all(np.array_equal(g.tensors[n], f.tensors[n]) for n in f.tensors)
    for name in a.tensors:
        assert np.array_equal(a.tensors[name][1], b.tensors[name][1]), name    # row-major view, bit for bit


def test_same_tokens_and_no_row_major_copy(data_dir, tmp_path):
    src = synthetic.make("test-32k", "q4_0", tmp_path / "q4.infeng")
    rm = load_model(row_major_copy(load_model(src), tmp_path / "rm.infeng"))
    m = load_model(src)
    assert m.tensors.stored("layers.0.wq")[2] == layout_id("q4_0")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = []
    for model in (m, rm):
        eng = Engine(model, threads=2, max_batch=2, detokenize=False)
        runs.append([r.token_ids for r in eng.generate([Request(str(i), prompt_ids=[1, 5 + i, 9], params=params)
                                                         for i in range(2)])])
    assert runs[0] == runs[1]
    assert m.tensors.deinterleaved_count() == 0      # the engine ran on the mapped bytes alone


def test_gguf_export_is_the_same(data_dir, tmp_path):
    src = synthetic.make("test-32k", "q8_0", tmp_path / "q8.infeng")
    rm = row_major_copy(load_model(src), tmp_path / "rm.infeng")
    for p in (src, rm):
        assert main(["convert", str(p), "--to", "gguf", "-o", str(p.with_suffix(".gguf"))]) == 0
    a, b = GGUFFile(src.with_suffix(".gguf")), GGUFFile(rm.with_suffix(".gguf"))
    assert a.tensors.keys() == b.tensors.keys() and a.metadata.keys() == b.metadata.keys()
    assert all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)


def test_a_layout_this_build_does_not_read_is_refused(kq_source, tmp_path):
    m = quantized(kq_source, "q4_0")
    ts = [native.Tensor(t.name, t.dtype, t.shape, t.data, "q4_0x16.00000000", t.logical_crc32)
          if t.dtype == "q4_0" and t.layout != ROW_MAJOR else t for t in m.native_tensors()]
    bad = native.write(tmp_path / "old.infeng", m.manifest(), ts)
    with pytest.raises(InfengError, match=r"stored in layout 'q4_0x16.00000000', which this build cannot read; "
                                          r"this build's q4_0 layout is 'q4_0x16\.[0-9a-f]{8}'"):
        load_model(bad)
    assert main(["generate", str(bad), "-p", "hi", "-n", "2"]) != 0


def test_layout_fingerprint_follows_the_byte_order():
    raw = np.random.default_rng(0).integers(0, 256, (16, 2 * 18 * 8), dtype=np.uint8)
    assert layout_id("q4_0").startswith("q4_0x16.")
    assert len({layout_id(t) for t in INTERLEAVED}) == len(INTERLEAVED)
    assert not np.array_equal(interleave(raw, "q4_0"), raw.reshape(1, -1))   # a real reordering
