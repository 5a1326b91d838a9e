"""The decode GEMVs' prefetch level (ifg_set_prefetch_level, INFENG_PREFETCH): a per-CPU default,
an override that takes, and products bitwise the same at either level for every 16-row
interleaved type, every ISA variant (the hint only says which cache the weights wait in)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import P
from infeng import kernels
from infeng.kernels.abi import DTYPE
from infeng.quant import quantize
from infeng.quant.interleave import INTERLEAVED, interleave


@pytest.mark.parametrize("qtype", list(INTERLEAVED))
def test_levels_give_the_same_products(kern, qtype):
    N, K = 80, 2304 if qtype.endswith("_k") else 2336               # 5 groups: the tile of 4 and a tail
    rng = np.random.default_rng(len(qtype))
    packed = interleave(quantize(rng.standard_normal((N, K)).astype(np.float32), qtype), qtype)
    x = rng.standard_normal((1, K)).astype(np.float32)
    before = kernels.prefetch_level(kern)
    out = {}
    try:
        for level in ("l1", "l2"):
            assert kernels.prefetch_level(kern, level) == level
            for nth in (1, 2):
                y = np.zeros((1, N), np.float32)
                kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, packed, "void *"),
                                    DTYPE[INTERLEAVED[qtype]], 1, N, K, 0, nth)
                out[level, nth] = y
    finally:
        kern.lib.ifg_set_prefetch_level(0)                          # back to the CPU's choice
    assert kernels.prefetch_level(kern) == before
    assert np.abs(out["l1", 1]).max() > 0
    for key, y in out.items():
        np.testing.assert_array_equal(y, out["l1", 1], err_msg=str(key))


def test_default_follows_the_cpu():
    """L2 on AMD family 19h (Zen 3/4), L1 elsewhere."""
    info = open("/proc/cpuinfo").read().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    amd19 = fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
    assert kernels.prefetch_level(kernels.load("scalar")) == ("l2" if amd19 else "l1")


def test_env_override_and_bad_value():
    code = "from infeng import kernels; print(kernels.prefetch_level(kernels.active()))"
    for want in ("l1", "l2"):
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, INFENG_PREFETCH=want),
                           capture_output=True, text=True, check=True)
        assert r.stdout.strip() == want
    r = subprocess.run([sys.executable, "-c", "from infeng import kernels; kernels.active()"],
                       env=dict(os.environ, INFENG_PREFETCH="l3"), capture_output=True, text=True)
    assert r.returncode != 0 and "INFENG_PREFETCH='l3' is not one of l1, l2" in r.stderr
