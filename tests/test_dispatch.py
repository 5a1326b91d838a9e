import os
import subprocess
import sys

from infeng import kernels


def test_each_supported_variant_reports_its_isa():
    for isa in kernels.supported_isas():
        m = kernels.load(isa)
        assert m.ffi.string(m.lib.ifg_isa()).decode() == isa


def test_scalar_always_supported():
    assert kernels.supported_isas()[0] == "scalar"


def test_forced_unknown_isa_fails_clearly():
    env = dict(os.environ, INFENG_ISA="sse9")
    r = subprocess.run([sys.executable, "-c", "from infeng import kernels; kernels.active()"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "INFENG_ISA='sse9' is not one of scalar, avx2, avx512" in r.stderr


def test_forced_isa_is_used():
    for isa in kernels.supported_isas():
        env = dict(os.environ, INFENG_ISA=isa)
        r = subprocess.run([sys.executable, "-c",
                            "from infeng import kernels; m = kernels.active(); print(m.ffi.string(m.lib.ifg_isa()).decode())"],
                           env=env, capture_output=True, text=True, check=True)
        assert r.stdout.strip() == isa


def test_forced_isa_the_cpu_lacks_fails_clearly(monkeypatch):
    feats = dict(kernels.cpu_features(), avx512f=False, avx512bf16=False)
    monkeypatch.setattr(kernels, "cpu_features", lambda: feats)
    import pytest
    from infeng.errors import InfengError
    with pytest.raises(InfengError, match="INFENG_ISA=avx512 needs CPU features this machine lacks: avx512f, avx512bf16"):
        kernels.load("avx512")
    assert "avx512" not in kernels.supported_isas()
