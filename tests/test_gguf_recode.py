"""GGUF types without a native dtype (Q2_K, Q3_K, IQ4_NL, IQ4_XS), recoded at load into native
ones (infeng.quant.gguf_recode), on files written by llama.cpp's own quantizer: each tensor in its
own type (Q3_K_M's Q3_K + Q4_K + Q5_K + Q6_K mix), the exact recodings bit for bit the values of
gguf-py's dequantizer (llama.cpp's Python reader, an independent reference), the others within
their stated bound, and the convert summary saying what became what. Skipped without the peers."""
import numpy as np
import pytest

from infeng.cli.main import main
from infeng.converters import gguf_read
from infeng.converters.gguf_file import GGUFFile
from infeng.quant import to_f32
from test_quant_gguf_types import _small_model

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

# llama.cpp file type → {GGML type of a tensor: the native dtype it must load as}
WANT = {"Q3_K_M": {"Q3_K": "q6_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"},
        "Q2_K": {"Q2_K": "q8_0", "Q3_K": "q6_k", "Q4_K": "q4_k", "Q6_K": "q6_k"},
        "IQ4_NL": {"IQ4_NL": "q8_0", "Q6_K": "q6_k", "Q5_0": "q5_0", "Q8_0": "q8_0"},
        "IQ4_XS": {"IQ4_XS": "q8_0", "Q6_K": "q6_k", "Q5_0": "q5_0", "Q8_0": "q8_0"}}


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir):
    from infeng.converters import gguf_write
    from infeng.model.loader import load_model
    d = tmp_path_factory.mktemp("recode")
    _small_model(d / "f32.infeng", data_dir, 256)
    return gguf_write.write_gguf(load_model(d / "f32.infeng"), d / "f32.gguf")


def _reference(g, name, cfg):
    """gguf-py's f32 values of a GGUF tensor, rows in the native (unpermuted) order."""
    t = g.tensors[name]
    ref = gguf.quants.dequantize(np.asarray(g.raw(name)).reshape(t.shape[0], -1),
                                 gguf.GGMLQuantizationType(t.type_id)).astype(np.float32)
    if name.endswith("attn_q.weight"):
        ref = gguf_read.unpermute_rope(ref, cfg.n_heads)
    elif name.endswith("attn_k.weight"):
        ref = gguf_read.unpermute_rope(ref, cfg.n_kv_heads)
    return ref


@pytest.mark.parametrize("ftype", list(WANT))
def test_recoded_types_load(tmp_path, source, ftype, capsys):
    from infeng.bench.llamacpp_kld import quantize_gguf
    from infeng.model.loader import load_gguf
    path = quantize_gguf(source, ftype, 1)
    g = GGUFFile(path)
    model, info = load_gguf(path)
    seen = set()
    for name, t in g.tensors.items():
        nn = gguf_read.native_name(name)
        if len(t.shape) != 2 or nn is None or nn not in model.tensors:
            continue
        dt, arr = model.tensors[nn]
        assert dt == WANT[ftype][t.type_name], (name, t.type_name, dt)
        seen.add(t.type_name)
        got, ref = to_f32(arr, dt), _reference(g, name, model.config)
        if t.type_name in ("Q3_K", "IQ4_NL") or dt != "q8_0" or t.type_name == "Q8_0":
            np.testing.assert_array_equal(got, ref, err_msg=name)         # copies and exact recodings
        elif t.type_name == "IQ4_XS":                                     # the block scale rounded to fp16
            assert np.all(np.abs(got - ref) <= 2.0 ** -11 * np.abs(ref) + 1e-30), name
        else:                                                             # Q2_K re-quantized to q8_0
            amax = np.abs(ref.reshape(ref.shape[0], -1, 32)).max(-1, keepdims=True)
            err = np.abs(got - ref).reshape(amax.shape[0], -1, 32)
            assert np.all(err <= amax / 254 + amax * 2.0 ** -11 + 1e-30), name   # half a step + d's fp16 rounding
            # against Q2_K's own step (d * sc per 16 weights: at least a third of its range)
            assert np.sqrt((err ** 2).mean()) < 0.02 * np.sqrt((ref ** 2).mean()), name
    recoded = {k.split(" ")[0] for k in info["recoded"]}
    assert recoded == {t for t in seen if t in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")} and recoded
    assert ftype != "Q3_K_M" or seen >= {"Q3_K", "Q4_K", "Q5_K"}, seen   # the mix, each in its own type
    assert main(["convert", str(path), "-o", str(tmp_path / "m.infeng")]) == 0
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())                           # rich wraps long lines
    for what, r in info["recoded"].items():
        assert f"{r['tensors']} tensors {what}" in text, text
