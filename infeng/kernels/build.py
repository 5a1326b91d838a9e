"""cffi build of the C kernel library, once per ISA level.

Every ``kernels_c/*.c`` file is compiled into each variant as one translation unit (a unity
build), with the ISA's ``-m`` flags; the C code selects its SIMD paths with ``#if`` on the
compiler's feature macros, so the same sources give a scalar, an AVX2+FMA and an AVX-512
library. The public declarations are the lines between ``// cdef-begin`` and ``// cdef-end``
in each ``kernels_c/*.h``.
"""
from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels_c"

ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx512bf16", "-mavx512vnni"],
}
BASE_FLAGS = ["-O3", "-std=c11", "-fopenmp", "-fno-math-errno", "-Wall",
              "-Wno-unknown-pragmas"]


def cdef_text() -> str:
    """Public declarations of every kernel family, in file-name order."""
    out = []
    for h in sorted(CSRC.glob("*.h")):
        inside = False
        for line in h.read_text().splitlines():
            if line.strip() == "// cdef-begin":
                inside = True
            elif line.strip() == "// cdef-end":
                inside = False
            elif inside and not line.lstrip().startswith("#"):
                out.append(line)
    return "\n".join(out)


def unity_source() -> str:
    return "\n".join(f'#include "{c.name}"' for c in sorted(CSRC.glob("*.c")))


def make_ffi(isa: str) -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        f"infeng.kernels._infeng_{isa}",
        f"#define IFG_BUILD_ISA \"{isa}\"\n" + unity_source(),
        include_dirs=[str(CSRC)],
        extra_compile_args=BASE_FLAGS + ISA_FLAGS[isa] + os.environ.get("INFENG_CFLAGS", "").split(),
        extra_link_args=["-fopenmp"],
        depends=[str(p) for p in sorted(CSRC.glob("*.[ch]"))],
    )
    return ffi


ffi_scalar = make_ffi("scalar")
ffi_avx2 = make_ffi("avx2")
ffi_avx512 = make_ffi("avx512")

if __name__ == "__main__":  # `python infeng/kernels/build.py`: rebuild in place after editing C
    import tempfile
    for isa, ffi in (("scalar", ffi_scalar), ("avx2", ffi_avx2), ("avx512", ffi_avx512)):
        with tempfile.TemporaryDirectory() as tmp:
            lib = ffi.compile(tmpdir=tmp, verbose=False)
            target = Path(__file__).parent / Path(lib).name
            for stale in target.parent.glob(f"_infeng_{isa}.*.so"):   # e.g. pip's .abi3.so,
                if stale != target:                                   # which would be shadowed
                    stale.unlink()
            os.replace(lib, target)
            print(f"built {target.name}")
