"""A loaded model: config, weights (views of a mapped file), tokenizer and generation defaults.

``load_model`` takes a native .infeng file or a Hugging Face folder; both give the same ``Model``
(an HF folder is converted in memory, without copying unless a dtype must change).
"""
from __future__ import annotations

import hashlib
import json
import mmap

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infeng import format as native
from infeng.converters import gguf_read, hf
from infeng.errors import InfengError
from infeng.format.config import ModelConfig
from infeng import kernels
from infeng.kernels import bf16_activations
# MATRICES: model/llama.py and runtime/adapters.py import it from here
from infeng.format.schema import MATRICES, STORE_DTYPES, convert_dtype, expected_shapes, is_norm  # noqa: F401
from infeng.quant import QTYPES, to_f32
from infeng.quant.gguf_recode import RECODE
from infeng.quant.interleave import INTERLEAVED, can_interleave, interleave, interleave_c
from infeng.model.stored import Tensors, check_layout, file_tensors


@dataclass
class Model:
    config: ModelConfig
    tensors: Tensors                            # native name → (dtype label, row-major storage array)
    tokenizer: dict[str, Any]                   # {"json": str, "add_bos": bool, "chat_template": str|None}
    generation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    lineage: tuple[str, ...] = ()               # identities of the models this one was derived from
    _identity: str | None = field(default=None, repr=False, compare=False)
    _kernel: dict = field(default_factory=dict, repr=False, compare=False)   # name → kernel_weight
    bf16_act: str | None = None                 # bf16 matrices' input: "f32" | "bf16" | None (INFENG_BF16_ACT)


    def __post_init__(self):
        self.tensors = Tensors.of(self.tensors)

    def weight(self, name: str) -> tuple[str, np.ndarray]:
        return self.tensors[name]

    def kernel_weight(self, name: str, kern=None, threads: int = 0) -> tuple[str, np.ndarray]:
        """The tensor in the layout the C kernels run fastest on: quantized matrices with a multiple
        of 16 rows row-interleaved (``q8_0x16``, ``q4_kx16``, ...). A file written by this build
        stores them so, and they are handed out as mapped; a row-major one (an older file, GGUF
        or HF source in memory) is repacked once per model, its mapped original read once and then
        dropped from memory. The repack runs in C given the kernel library ``kern``, else in numpy.
        bf16 matrices come as ``bf16_dp`` (the same bytes, x rounded to bf16) when ``bf16_act``
        says "bf16"."""
        mapped = self.tensors.kernel_view(name)
        if mapped is not None:
            return mapped
        dtype, arr = self.tensors[name]
        if dtype == "bf16" and bf16_activations(self.bf16_act) == "bf16":
            return "bf16_dp", arr
        if not can_interleave(dtype, arr.shape[0]):
            return dtype, arr
        if name not in self._kernel:
            packed = interleave_c(kern, arr, dtype, threads) if kern is not None else interleave(arr, dtype)
            self._kernel[name] = (INTERLEAVED[dtype], packed)
            release_pages(arr)
        return self._kernel[name]

    def f32(self, name: str) -> np.ndarray:
        dtype, arr = self.tensors[name]
        return to_f32(arr, dtype)

    @property
    def output_name(self) -> str:
        return "tok_embeddings" if self.config.tie_embeddings else "output"

    @property
    def weight_dtype(self) -> str:
        """The dtype of the layer matrices (for summaries)."""
        return self.tensors.dtype("layers.0.wq")

    def manifest(self) -> dict[str, Any]:
        return {"kind": "model", "config": self.config.to_dict(), "tokenizer": self.tokenizer,
                "generation": self.generation, "source": self.source, "lineage": list(self.lineage)}

    def identity(self) -> str:
        """sha256 of the config and of each tensor's name, dtype, shape and crc32 (cached)."""
        if self._identity is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            t = self.tensors
            for name in sorted(t):
                h.update(f"{name}|{t.dtype(name)}|{list(t.storage_shape(name))}|{t.crc32(name):08x}\n".encode())
            self._identity = h.hexdigest()
        return self._identity

    def derived(self, tensors: dict[str, tuple[str, np.ndarray]]) -> "Model":
        """The same model with other weights (e.g. quantized): its lineage records this one, so
        adapters made for this model apply to the derived one too."""
        return Model(self.config, tensors, self.tokenizer, self.generation, source=self.source,
                     lineage=self.lineage + (self.identity(),))

    def native_tensors(self) -> list[native.Tensor]:
        """What a native file of this model holds: matrices in the kernels' layout (model/stored.py)."""
        return file_tensors(self.tensors, kernels.active(), kernels.default_threads())


def release_pages(arr: np.ndarray) -> None:
    """Drop the whole pages of a view of a read-only file mapping from this process (they are
    read back from the file if touched again); no-op for arrays not backed by an mmap."""
    base = arr.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise"):
        return
    start = arr.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).__array_interface__["data"][0]
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def load_gguf(path: str | Path, k_quant_dtype: str | None = None) -> tuple[Model, dict[str, Any]]:
    """A Llama GGUF as a Model (see ``gguf_read.read_llama``) and the converter's summary."""
    cfg, tensors, tok, summary = gguf_read.read_llama(path, k_quant_dtype, RECODE)
    return Model(cfg, tensors, tok, {}, source=str(Path(path))), summary


def load_model(path: str | Path, verify: bool = True, dtype: str | None = None) -> Model:
    p = Path(path)
    if p.is_dir():
        cfg, tensors, tok, gen = hf.load_folder(p, dtype=dtype)
        return Model(cfg, tensors, tok, gen, source=str(p))
    if not p.exists():
        raise InfengError(f"{p}: no such file or directory")
    f = native.NativeFile(p, verify=verify)
    man = f.manifest
    if man.get("kind") != "model":
        raise InfengError(f"{p}: is an infeng {man.get('kind')!r} file, not a model")
    where = f"{p}: manifest"
    if not isinstance(man.get("config"), dict) or not isinstance(man.get("tokenizer"), dict):
        raise InfengError(f"{where} lacks config or tokenizer")
    cfg = ModelConfig.from_dict(man["config"], where)
    shapes = expected_shapes(cfg)
    tensors = Tensors()
    for name, shape in shapes.items():
        if name not in f.tensors:
            raise InfengError(f"{p}: missing tensor {name!r}")
        arr = f.tensors[name]
        if f.shapes[name] != shape:
            raise InfengError(f"{p}: tensor {name!r} has shape {list(f.shapes[name])}, config says {list(shape)}")
        d = f.dtypes[name]
        if is_norm(name) and d != "f32":
            raise InfengError(f"{p}: norm tensor {name!r} must be f32, is {d}")
        if d not in STORE_DTYPES and not (d in QTYPES and len(shape) == 2):
            raise InfengError(f"{p}: tensor {name!r} has dtype {d}, which the model cannot use")
        check_layout(f"{p}: tensor {name!r}", d, f.layouts[name])
        tensors.add(name, d, arr, f.layouts[name], shape, f.crcs[name])
    if dtype is not None:
        tensors = {n: ((dtype, convert_dtype(to_f32(a, d), "f32", dtype)) if not is_norm(n) else (d, a))
                   for n, (d, a) in tensors.items()}
    lineage = man.get("lineage") or []
    if not isinstance(lineage, list) or not all(isinstance(x, str) for x in lineage):
        raise InfengError(f"{p}: manifest lineage must be a list of identities")
    return Model(cfg, tensors, man["tokenizer"], man.get("generation") or {}, source=str(p), lineage=tuple(lineage))
