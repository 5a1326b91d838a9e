"""The KV pool is mapped in small pages: numpy would ask for transparent huge pages, and a first
prompt then faulted in 2 MiB per layer for K and V (most of a second on SmolLM2 when the kernel
had to compact memory for them)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from infeng import kernels
from infeng.model.loader import load_model
from infeng.runtime.kv import KVCache, lazy_zeros


def vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise flags are read from /proc (Linux)")
def test_kv_pool_is_not_huge_paged():
    model = load_model(Path(__file__).parent / "fixtures" / "arch" / "llama2")
    kv = KVCache(kernels.active(), model.config, n_slots=4, max_seq_len=2**16)
    for a in (kv.k, kv.v):
        assert a.flags.writeable and not a.any()
        start = a.__array_interface__["data"][0]
        for at in (start, start + a.nbytes // 2, start + a.nbytes - 1):   # (a madvise splits mappings)
            assert "nh" in vm_flags(at)
    assert kv.k.nbytes >= 2**22             # big enough that np.zeros would ask for huge pages
    z = lazy_zeros((3, 5), np.int32)
    assert z.shape == (3, 5) and z.dtype == np.int32 and not z.any()
    z[1, 2] = 7
    assert z.sum() == 7
