"""LoRA / DoRA adapters as native files: made from PEFT folders, tied to the base they were made for.

An adapter file is a native infeng file of kind "adapter": its manifest holds the rank, scale,
DoRA flag, target projections and the *identity* of the base model (a sha256 over the base's
config and every tensor's name, dtype, shape and crc32), so an adapter is never applied to a model
it was not made for. Tensors: ``layers.{i}.{proj}.lora_a`` [r, in] and ``.lora_b`` [out, r]
(bf16 or f32), ``.dora_m`` [out] (f32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infeng import format as native
from infeng.converters.hf import convert_dtype, to_f32
from infeng.converters.peft import projection_shape, read_peft
from infeng.errors import InfengError
from infeng.model.loader import Model

ADAPTER_DTYPES = ("f32", "bf16")


def model_identity(model: Model) -> str:
    return model.identity()


@dataclass
class Adapter:
    name: str
    rank: int
    scale: float
    use_dora: bool
    targets: list[str]                             # "layers.{i}.{proj}"
    tensors: dict[str, tuple[str, np.ndarray]]     # native name → (dtype, array)
    path: str = ""

    def f32(self, name: str) -> np.ndarray:
        d, a = self.tensors[name]
        return to_f32(a, d)

    def delta(self, target: str) -> np.ndarray:
        """scale · B @ A in f32 [out, in] (reference math)."""
        return np.float32(self.scale) * (self.f32(f"{target}.lora_b") @ self.f32(f"{target}.lora_a"))


def convert_peft(src: str | Path, out: str | Path, base: Model, dtype: str = "bf16") -> Path:
    if dtype not in ADAPTER_DTYPES:
        raise InfengError(f"--dtype {dtype!r}: adapters are stored as {' or '.join(ADAPTER_DTYPES)}")
    meta, tensors = read_peft(src, base.config)
    stored = []
    for name, arr in sorted(tensors.items()):
        d = "f32" if name.endswith(".dora_m") else dtype
        stored.append(native.Tensor(name, d, tuple(arr.shape), convert_dtype(arr, "f32", d)))
    manifest = {"kind": "adapter", "adapter": meta,
                "base": {"identity": model_identity(base), "source": base.source},
                "source": str(src)}
    return native.write(out, manifest, stored)


def load_adapter(path: str | Path, base: Model, name: str | None = None, verify: bool = True) -> Adapter:
    """Map an adapter file and check it belongs to ``base`` and fits its shapes."""
    p = Path(path)
    f = native.NativeFile(p, verify=verify)
    man = f.manifest
    if man.get("kind") != "adapter":
        raise InfengError(f"{p}: is an infeng {man.get('kind')!r} file, not an adapter")
    meta, b = man.get("adapter"), man.get("base")
    if not isinstance(meta, dict) or not isinstance(b, dict):
        raise InfengError(f"{p}: adapter manifest lacks its metadata")
    if b.get("identity") != model_identity(base) and b.get("identity") not in base.lineage:
        raise InfengError(f"{p}: made for base model {b.get('source')!r} (identity {str(b.get('identity'))[:12]}…), "
                          f"not for {base.source!r}")
    try:
        rank, scale, dora, targets = int(meta["rank"]), float(meta["scale"]), bool(meta["use_dora"]), list(meta["targets"])
    except (KeyError, TypeError, ValueError):
        raise InfengError(f"{p}: adapter metadata is malformed") from None
    tensors = {}
    for t in targets:
        try:
            _, layer, proj = t.split(".")
            n_out, n_in = projection_shape(base.config, proj)
        except (ValueError, KeyError):
            raise InfengError(f"{p}: unknown target {t!r}") from None
        want = {"lora_a": (rank, n_in), "lora_b": (n_out, rank)}
        if dora:
            want["dora_m"] = (n_out,)
        for part, shape in want.items():
            key = f"{t}.{part}"
            if key not in f.tensors:
                raise InfengError(f"{p}: missing tensor {key!r}")
            if tuple(f.tensors[key].shape) != shape:
                raise InfengError(f"{p}: tensor {key!r} has shape {list(f.tensors[key].shape)}, the base needs {list(shape)}")
            tensors[key] = (f.dtypes[key], f.tensors[key])
    return Adapter(name or p.name.split(".")[0], rank, scale, dora, targets, tensors, str(p))


def effective_weight(base: Model, adapter: Adapter | None, layer: int, proj: str) -> np.ndarray:
    """The f32 weight a projection computes with under ``adapter`` (reference math):
    W + s·BA for LoRA, m ⊙ (W + s·BA) / ‖W + s·BA‖_row for DoRA."""
    w = base.f32(f"layers.{layer}.{proj}")
    t = f"layers.{layer}.{proj}"
    if adapter is None or t not in adapter.targets:
        return w
    merged = w + adapter.delta(t)
    if adapter.use_dora:
        norm = np.linalg.norm(merged, axis=1, keepdims=True)
        merged = adapter.f32(f"{t}.dora_m")[:, None] * merged / norm
    return merged.astype(np.float32)


def manifest_summary(a: Adapter) -> dict[str, Any]:
    return {"name": a.name, "rank": a.rank, "scale": a.scale, "use_dora": a.use_dora, "targets": len(a.targets)}


def reference_with_adapter(base: Model, adapter: Adapter | None):
    """The numpy reference model computing with ``adapter``'s effective weights."""
    from infeng.model.reference import ReferenceModel
    ref = ReferenceModel(base)
    if adapter is not None:
        for t in adapter.targets:
            _, layer, proj = t.split(".")
            ref.w[t] = effective_weight(base, adapter, int(layer), proj)
    return ref
