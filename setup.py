# The C kernel library is built three times (scalar, AVX2+FMA, AVX-512) as cffi extension
# modules; infeng.kernels picks one at import from the CPU's features.
from setuptools import setup

setup(cffi_modules=[
    "infeng/kernels/build.py:ffi_scalar",
    "infeng/kernels/build.py:ffi_avx2",
    "infeng/kernels/build.py:ffi_avx512",
])
