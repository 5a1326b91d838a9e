"""bf16 models with their activations rounded to bf16 (INFENG_BF16_ACT=bf16, Model.bf16_act):
the C forward pass against the reference doing the same rounding, in every ISA variant; the
exact default untouched; a bad setting refused by name."""
import dataclasses

import numpy as np
import pytest

from infeng import kernels
from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.kv import KVCache

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338]


def _logits(kern, model, threads):
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=threads)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=64, block_size=4)
    assert kv.ensure(0, 64)
    T = len(TOKENS)
    net.tokens[:T], net.pos[:T], net.seq[:T] = TOKENS, range(T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    return net.logits[:T].copy()


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_activations_against_the_rounding_reference(kern, data_dir, threads):
    """The kernels themselves are checked to f32 rounding against the rounded x
    (test_kernels_matmul, bf16_dp). Through a whole model, an input that C and numpy compute an
    ulp apart can round to the neighbouring bf16 (every ISA computes the other ops in its own
    order), and in a prefill that moves the later rows too, through the K/V cache: a few of
    those flips move logits by ~1e-3 of their scale, as much as the rounding itself does. So
    here: C with bf16 activations within the flip bound (1e-2, as for int8 activations) of
    the rounding reference, the rounding really applied, the exact path as exact as before."""
    base = load_model(data_dir / "stories260K")                  # bf16 matrices, tied output head
    bf, ex = dataclasses.replace(base, bf16_act="bf16"), dataclasses.replace(base, bf16_act="f32")
    want, exact = ReferenceModel(bf).forward(TOKENS), ReferenceModel(ex).forward(TOKENS)
    scale = np.abs(want).max()
    got, got_exact = _logits(kern, bf, threads), _logits(kern, ex, threads)
    assert np.all(np.abs(got - want).max(-1) < 1e-2 * scale)
    assert np.abs(got - got_exact).max() > 1e-4 * scale          # the rounding is applied
    np.testing.assert_allclose(got_exact, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_setting_picks_the_kernel_form(data_dir, monkeypatch):
    monkeypatch.delenv("INFENG_BF16_ACT", raising=False)
    m = load_model(data_dir / "stories260K")
    assert m.kernel_weight("layers.0.wq")[0] == "bf16"          # the default is exact
    monkeypatch.setenv("INFENG_BF16_ACT", "bf16")
    assert m.kernel_weight("layers.0.wq")[0] == "bf16_dp"
    assert dataclasses.replace(m, bf16_act="f32").kernel_weight("layers.0.wq")[0] == "bf16"  # the model's own wins
    f32 = load_model(data_dir / "stories260K-f32")
    assert f32.kernel_weight("layers.0.wq")[0] == "f32"          # only bf16 matrices change form


def test_bad_setting_is_refused_by_name(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFENG_BF16_ACT", "fp8")
    with pytest.raises(InfengError, match="INFENG_BF16_ACT='fp8' is not one of f32, bf16"):
        kernels.bf16_activations()
    p = tmp_path / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(p)]) == 0
    capsys.readouterr()
    assert main(["generate", str(p), "-p", "Once", "-n", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INFENG_BF16_ACT='fp8' is not one of f32, bf16" in err[0] and "Traceback" not in err[0]
