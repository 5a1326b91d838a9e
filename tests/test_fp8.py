"""fp8 (E4M3 with a bf16 scale per 32-block): the code table, round-to-nearest-even with
saturation, the block layout, the kernels of every ISA variant against numpy (x stays f32, so
the only difference from the float64 product of the dequantized weights is f32 rounding of the
sums: |y - ref| <= 1e-5 * sum_k |x_k w_k| + 1e-6), thread determinism, stories260K recorded.
"""
import json

import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.quant import fp8

FP8 = 8
TS = (1, 3, 17, 50)
NK = [(37, 256), (80, 768), (37, 5632), (5, 96)]


def test_code_table():
    v = fp8.e4m3_values()
    assert v[0x38] == 1.0 and v[0xB8] == -1.0 and v[0x7E] == 448.0 and v[0xFE] == -448.0
    assert v[0x08] == 2.0 ** -6 and v[0x01] == 2.0 ** -9 and v[0x07] == 7 * 2.0 ** -9   # subnormals
    assert v[0x3C] == 1.5 and v[0x41] == 2.25 and np.isnan(v[0x7F]) and np.isnan(v[0xFF])
    finite = np.isfinite(v)
    assert np.array_equal(fp8.encode_e4m3(v[finite]), np.arange(256)[finite].astype(np.uint8) & np.where(v[finite] == 0, 0, 0xFF))


def test_rounding_ties_to_even_and_saturation():
    cases = {1.0625: 0x38,            # halfway 1.0 (0x38) / 1.125 (0x39): the even code
             1.1875: 0x3A,            # halfway 1.125 / 1.25: 0x3A
             1.07: 0x39, -1.07: 0xB9,
             1.5 * 2.0 ** -9: 0x02,   # subnormal halfway 1 / 2 (x 2^-9): even
             0.5 * 2.0 ** -9: 0x00,   # halfway 0 / the smallest subnormal: 0
             464.0: 0x7E, 1e6: 0x7E, -1e6: 0xFE, 0.0: 0x00}
    for x, code in cases.items():
        assert fp8.encode_e4m3(np.array([x]))[0] == code, x


def test_encoder_is_the_nearest_value():
    """Against a brute-force search over the 127 non-negative codes (ties: the even code)."""
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.standard_normal(20000) * np.exp2(rng.uniform(-12, 10, 20000)),
                        (fp8.e4m3_values()[:0x7E] + fp8.e4m3_values()[1:0x7F]) / 2])   # all midpoints
    v = v.astype(np.float32)
    pos = fp8.e4m3_values()[:0x7F]
    a = np.minimum(np.abs(v.astype(np.float64)), 448.0)
    dist = np.abs(a[:, None] - pos[None])
    best = dist.min(1, keepdims=True)
    cand = np.where(dist == best, np.arange(0x7F)[None], 999)
    even = np.where(cand % 2 == 0, cand, 999).min(1)
    want = np.where(even < 999, even, cand.min(1))
    want = want | np.where((v < 0) & (want != 0), 0x80, 0)
    np.testing.assert_array_equal(fp8.encode_e4m3(v), want.astype(np.uint8))


def test_known_block_bytes():
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 2], x[0, 31] = 448.0, -1.0, 2.0 ** -9, 3.0
    raw = quant.quantize_fp8(x)
    assert raw.shape == (1, 34)
    assert raw[0, :2].tobytes() == b"\x80\x3f"         # bf16 1.0 (= 448 / 448), little-endian
    # 3 = 1.5 * 2^1: exponent 8 (bias 7), mantissa 4 → 0 1000 100
    assert raw[0, 2] == 0x7E and raw[0, 3] == 0xB8 and raw[0, 4] == 0x01 and raw[0, 33] == 0x44
    assert np.all(raw[0, 5:33] == 0)
    np.testing.assert_array_equal(quant.dequantize(raw, "fp8"), x)


def test_round_trip_error_bound():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-20, 10, (64, 1)))).astype(np.float32)
    raw = quant.quantize(w, "fp8")
    d = (raw.reshape(64, -1, 34)[..., :2].copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    e = np.abs(quant.dequantize(raw, "fp8") - w).reshape(64, -1, 32)
    # half a unit in the last place: 2^-4 relative for normals, 2^-10 * d below 2^-6 * d
    bound = np.maximum(np.abs(w).reshape(64, -1, 32) * 2.0 ** -4, d * 2.0 ** -10) * 1.0001
    assert np.all(e <= bound)


def test_bad_shape_refused():
    with pytest.raises(InfengError, match="multiple of 32"):
        quant.quantize_fp8(np.zeros((2, 172), np.float32))


def test_c_dequant_row_is_bitwise_numpy(kern):
    rng = np.random.default_rng(2)
    raw = quant.quantize(rng.standard_normal((2, 96)).astype(np.float32) * 1e-3, "fp8")
    want = quant.dequantize(raw, "fp8")
    for r in range(2):
        o = np.zeros(96, np.float32)
        kern.lib.ifg_qk_dequant_row(P(kern, o), P(kern, np.ascontiguousarray(raw[r]), "uint8_t *"), FP8, 96)
        np.testing.assert_array_equal(o, want[r])


@pytest.mark.parametrize("N,K", NK)
def test_fp8_matmul_matches_numpy(kern, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1)))).astype(np.float32)
    raw = quant.quantize(w, "fp8")
    buf = np.full(raw.size + 64, 0xFF, np.uint8)                 # junk after W: never read
    buf[:raw.size] = raw.ravel()
    wdq = quant.dequantize(raw, "fp8").astype(np.float64)
    for T in TS:
        for nth in (1, 2):
            x = rng.standard_normal((T, K + 3)).astype(np.float32)  # ldx > K
            ldy = N + 2
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), FP8, T, N, K, acc, nth)
            xs = np.ascontiguousarray(x[:, :K]).astype(np.float64)
            want = xs @ wdq.T - (7.0 if acc else 0.0)
            mag = np.abs(xs) @ np.abs(wdq).T
            got = y[:, :N].astype(np.float64)
            assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-6), (T, nth, np.abs(got - want).max())
            assert np.all(y[:, N:] == -7.0)


def test_fp8_matmul_deterministic_across_threads(kern):
    rng = np.random.default_rng(5)
    N, K, T = 131, 4160, 19
    raw = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), "fp8")
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, raw, "void *"), FP8, T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    y1 = np.zeros((1, N), np.float32)
    kern.lib.ifg_matmul(P(kern, y1), N, P(kern, x), K, P(kern, raw, "void *"), FP8, 1, N, K, 0, 2)
    np.testing.assert_array_equal(y1[0], outs[0][0])


# Greedy 60 tokens of fp8 stories260K (w_down, rows of 172, stays bf16): the f32 model's
# continuation for 16 tokens ("...Lily. She loved to play outside"), then its own.
GREEDY = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 335, 311, 267,
          422, 419, 269, 311, 374, 419, 426, 385, 328, 432, 317, 439, 419, 357, 343, 267, 341, 311, 351,
          358, 286, 298, 414, 299, 267, 265, 282, 295, 433, 267, 337, 335, 311, 374, 419, 426, 317, 286,
          399, 344, 444]


def test_stories260k_fp8_greedy_recorded(tmp_path, data_dir):
    from infeng import format as native
    from infeng.model.loader import load_model
    from infeng.model.reference import ReferenceModel
    out = tmp_path / "s.infeng"
    assert main(["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "fp8"]) == 0
    f = native.NativeFile(out)
    assert f.dtypes["layers.0.wq"] == "fp8" and f.dtypes["layers.0.w_down"] == "bf16"
    assert ReferenceModel(load_model(out)).greedy([1, 403, 407, 261, 378], 60) == GREEDY
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"id": "a", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}) + "\n")
    res = tmp_path / "o.jsonl"
    assert main(["generate", str(out), "--batch", str(reqs), "--output", str(res)]) == 0
    assert json.loads(res.read_text().splitlines()[0])["token_ids"] == GREEDY   # C (f32 x) = reference
