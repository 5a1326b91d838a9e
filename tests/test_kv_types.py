"""KV cache types end to end: the C forward pass with a compressed cache against the numpy
reference that rounds K/V (and rotates q/k) the same way; bytes and budgets; the options'
errors; `infeng generate --kv-dtype`."""
import numpy as np
import pytest

from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.model.config import ModelConfig
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.engine import Engine
from infeng.runtime.kv import KVCache
from infeng.runtime.kvspec import kv_spec

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
          311, 265, 345, 317, 344, 261, 376, 298, 315, 421, 395, 317, 426, 338, 311, 265, 345]


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(data_dir / "stories260K-f32")


def _logits(kern, model, spec, tokens, decode):
    net = LlamaC(kern, model, max_tokens=64, max_out=64, threads=2)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=96, block_size=16, spec=spec)
    assert kv.ensure(0, 96)
    T = len(tokens)
    net.tokens[:T], net.pos[:T], net.seq[:T] = tokens, range(T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    rows = [net.logits[:T].copy()]
    for i, t in enumerate(decode):
        net.tokens[0], net.pos[0], net.seq[0], net.out_rows[0] = t, T + i, 0, 0
        net.step(kv, 1, 1)
        rows.append(net.logits[:1].copy())
    return np.concatenate(rows)


@pytest.mark.parametrize("dtype,policy,rotate", [
    ("bf16", None, "auto"), ("int8", None, "auto"), ("int8", None, "off"), ("int4", None, "auto"),
    ("int4", None, "off"), ("k=int4,v=int8", None, "auto"), ("k=f32,v=int4", None, "auto"),
    ("int4", "layers 0,-1: bf16; layers 2: k=int8,v=f32", "auto"), ("f16", None, "auto"), ("fp8", None, "auto"),
    ("k=int4,v=f16", None, "auto"), ("k=fp8,v=int8", None, "off"), ("k=int4c,v=int4", None, "auto"),
    ("k=int8c,v=int8", None, "off"), ("int4", "layers 1: k=int4c,v=f32", "auto"), ("int4", None, "keys"),
    ("k=int8,v=int4", None, "on"), ("k=bf16,v=int4", "layers 0: int8", "auto")])
def test_forward_matches_reference_with_the_same_rounding(kern, model, dtype, policy, rotate):
    """The C cache and the reference's rounded K/V agree far more closely than either agrees with
    the f32 cache: the reference models the compression (layout, scales, rotation, the bf16
    rounding of int4c's q·scale and int4 values' weight·scale) exactly; what is left are values
    one rounding step apart where f32 sums of the projections differ. A bf16 step is 2^16 f32
    steps, so where those roundings are taken the rare flips weigh more: 5e-3 there."""
    spec = kv_spec(model.config, dtype, policy, rotate)
    decode = [311, 265, 345, 317]
    got = _logits(kern, model, spec, TOKENS, decode)
    ref = ReferenceModel(model, kv=spec)
    want = np.concatenate([ref.forward(TOKENS)] + [ref.forward([t]) for t in decode])
    f32 = ReferenceModel(model)
    plain = np.concatenate([f32.forward(TOKENS)] + [f32.forward([t]) for t in decode])
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    bf16_steps = "int4c" in spec.k or "int4" in spec.v
    assert err < (5e-3 if bf16_steps else 1e-3), err
    if not set(spec.k + spec.v) <= {"bf16", "f16"}:
        assert np.abs(plain - want).max() / scale > 5 * err        # compression is visible and modelled
    if dtype == "int8":
        assert np.abs(plain - want).max() / scale < 0.1           # and small where it should be


def test_rotation_changes_stored_keys_not_f32_attention(kern, model):
    """Rotating q and k leaves q·k unchanged: with f32 keys (k=f32 stored compressed-layout, v
    f16) the rotated and unrotated runs agree to f32 rounding. (Values of a coarser type would not
    show it: a one-ulp change upstream can move an int8 value a whole step.)"""
    a = _logits(kern, model, kv_spec(model.config, "k=f32,v=f16", rotate="off"), TOKENS, [])
    spec = kv_spec(model.config, "k=f32,v=f16", rotate="off")
    rot = type(spec)(spec.k, spec.v, (True,) * len(spec.k), spec.group, 7)
    b = _logits(kern, model, rot, TOKENS, [])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_value_rotation_is_undone_on_the_attention_output(kern, model):
    """Values stored rotated give an attention output rotated the same way, which the kernels
    rotate back: with f32 keys and values the rotated and unrotated runs agree to f32 rounding
    (a coarser key type would not show it: a one-ulp change upstream can move a key a step)."""
    spec = kv_spec(model.config, "f32", rotate="off")
    a = _logits(kern, model, spec, TOKENS, [311, 265])
    rot = type(spec)(spec.k, spec.v, spec.rotate, spec.group, 7, (True,) * len(spec.v))
    b = _logits(kern, model, rot, TOKENS, [311, 265])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert not np.array_equal(a, b)         # the values did go through the rotation


def test_rotate_modes_pick_keys_and_values(model):
    n = model.config.n_layers
    auto = kv_spec(model.config, "int4", "layers 0: bf16; layers 1: k=f16,v=int8")
    assert auto.rotate == (False, False) + (True,) * (n - 2)             # keys int4c; bf16 and f16 not
    assert auto.rotate_v == (False, True) + (True,) * (n - 2)            # values int8 / int4
    keys = kv_spec(model.config, "int4", rotate="keys")
    assert keys.rotate == (True,) * n and keys.rotate_v == (False,) * n
    assert kv_spec(model.config, "fp8", rotate="on").rotate_v == (True,) * n
    off = kv_spec(model.config, "int4", rotate="off")
    assert not off.rotated and not any(off.rotate_v)
    assert not kv_spec(model.config, "bf16").rotated


def _tinyllama_config():
    return ModelConfig(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                       vocab_size=32000, max_seq_len=2048, norm_eps=1e-5, rope_theta=1e4, tie_embeddings=False)


def test_budget_counts_real_bytes_and_int4_holds_six_times_f32(kern):
    cfg = _tinyllama_config()
    fits = {}
    # 8 sequences of up to 32768 positions (more than the budget holds in any type); the per-channel
    # keys' stage (f32 rows of each sequence's group being filled, 5.5 MiB here) is paid from it too
    for dtype in ("f32", "bf16", "int8", "int4"):
        kv = KVCache(kern, cfg, n_slots=8, max_seq_len=32768, block_size=16, budget_mb=1024,
                     spec=kv_spec(cfg, dtype))
        stage = kv.stage.nbytes if kv.stage is not None else 0
        assert kv.k.nbytes + kv.v.nbytes == kv.n_blocks * kv.block_bytes
        assert kv.bytes == kv.k.nbytes + kv.v.nbytes + stage <= 1024 * 2**20
        assert (stage > 0) == (dtype in ("int8", "int4"))
        fits[dtype] = kv.n_blocks * kv.block_size
    # f32: 22 layers x 2 x 256 values x 4 B = 44 KiB a token; int4: keys per channel 4 bits + f16
    # scale and min per 16 positions (2 bits), values 4 bits + an f16 scale per 32 (0.5 bits)
    assert KVCache(kern, cfg, 1, 16, spec=kv_spec(cfg, "f32")).bytes_per_token == 22 * 2 * 256 * 4
    assert KVCache(kern, cfg, 1, 16, spec=kv_spec(cfg, "int4")).bytes_per_token == 22 * 256 * (6 + 4.5) / 8
    assert KVCache(kern, cfg, 1, 16, spec=kv_spec(cfg, "k=int4,v=int4")).bytes_per_token == 22 * 256 * 9 / 8
    assert fits["int4"] >= 6 * fits["f32"]
    assert fits["int8"] >= 3.4 * fits["f32"] and fits["bf16"] == 2 * fits["f32"]


@pytest.mark.parametrize("kw,msg", [
    (dict(dtype="int3"), "must be one of f32, bf16, f16, int8, fp8, int4"),
    (dict(dtype="k=int8"), "give both k= and v="),
    (dict(dtype="k=int8,q=int4"), "expected k=TYPE,v=TYPE"),
    (dict(policy="layers 0,7: bf16"), "layer 7 is outside 0..4"),
    (dict(policy="layer 0: bf16"), "expected 'layers I,J,...: TYPE'"),
    (dict(policy="layers x: bf16"), "'x' is not a layer index"),
    (dict(rotate="maybe"), "must be one of auto, on, keys, off"),
    (dict(group=12), "--kv-group 12"),
])
def test_spec_errors_name_the_option(model, kw, msg):
    with pytest.raises(InfengError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        kv_spec(model.config, **kw)


def test_non_power_of_two_head_dim_refuses_rotation_by_name():
    cfg = ModelConfig(dim=96, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24,
                      vocab_size=10, max_seq_len=64, norm_eps=1e-5, rope_theta=1e4, tie_embeddings=True)
    with pytest.raises(InfengError, match="power-of-two head_dim, this model's is 24"):
        kv_spec(cfg, "int4", rotate="on")
    assert kv_spec(cfg, "int4").rotate == (False, False)       # auto: no rotation, telemetry says 0
    assert kv_spec(cfg, "int4").rotate_v == (False, False)


def test_block_size_the_layout_cannot_hold_is_refused(kern, model):
    with pytest.raises(InfengError, match="block size that is a multiple of 16"):
        Engine(model, threads=1, max_batch=1, block_size=4, kv_dtype="int8")


def test_generate_cli_with_kv_dtype(data_dir, tmp_path, capsys):
    src = data_dir / "stories260K-f32"
    tel = tmp_path / "run.json"
    assert main(["generate", str(src), "-p", "Once upon a time", "-n", "20", "-t", "0", "--kv-dtype", "int8",
                 "--kv-policy", "layers 0: bf16", "--telemetry", str(tel)]) == 0
    text = tel.read_text()
    assert "kv_bytes_per_token" in text and "0:bf16; 1:int8" in text
    capsys.readouterr()
    assert main(["generate", str(src), "-p", "x", "--kv-dtype", "int5"]) != 0
    err = capsys.readouterr().err
    assert "--kv-dtype 'int5'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_kld_with_kv_dtype_against_the_f32_cache(data_dir, tmp_path):
    """`infeng eval M --kld M --kv-dtype ...`: the same weights, only the cache differs: int8 KV
    costs a little KL-divergence, int4 more; the baseline run keeps the f32 cache (self-KLD 0)."""
    import json
    src = (data_dir / "text" / "tinystories_sample.txt").read_text()
    text = tmp_path / "two.txt"
    text.write_text("<|endoftext|>".join(src.split("<|endoftext|>")[:2]))
    f32 = str(data_dir / "stories260K-f32")
    kld = {}
    for dtype in ("f32", "int8", "int4"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", f32, "--kld", f32, "--text", str(text), "--kv-dtype", dtype, "--threads", "1",
                     "--json", str(out), "--no-progress"]) == 0
        rep = json.loads(out.read_text())
        assert rep["meta"]["kv_dtype"] == dtype
        kld[dtype] = rep["metrics"]["kld.kld_mean"]
    assert abs(kld["f32"]) < 1e-6
    assert 1e-7 < kld["int8"] < kld["int4"] < 1.0
