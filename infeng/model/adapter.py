"""LoRA / DoRA adapters as native files: made from PEFT folders, tied to the base they were made for.

An adapter file is a native infeng file of kind "adapter": its manifest holds the rank, scale,
DoRA flag, target projections and the *identity* of the base model (a sha256 over the base's
config and every tensor's name, dtype, shape and crc32), so an adapter is never applied to a model
it was not made for. The manifest's ``adapter.storage`` says how the low-rank pairs are stored:

- ``float`` (storage_version 1; also what files without the key are): ``layers.{i}.{proj}.lora_a``
  [r, in] and ``.lora_b`` [out, r], both bf16 or f32.
- ``int8`` (storage_version 1): ``.lora_a`` i8 [r, in] with ``.lora_a_scale`` f32 [r] (one scale
  per row of A), and ``.lora_bt`` i8 [r, out] = Bᵀ with ``.lora_bt_scale`` f32 [r] (one scale per
  column of B). Both scales then act on the rank-space activations h = x·Aᵀ, so the kernels fold
  them (and the LoRA scale) into one [r] vector and read the int8 values directly; Bᵀ is what the
  expand kernel streams. Symmetric rounding to nearest, |q| <= 127. A per-column scale for B was
  chosen over per-row (one scale per output) because it costs r floats instead of `out`, and on the
  PEFT fixtures it adds no more logit error (see tests/test_adapters.py and the session report).

DoRA magnitudes ``.dora_m`` [out] are f32 in both.

The C kernels multiply an int8 Bᵀ in integers, so there the rank-space activations h = x·Aᵀ (times
the folded scales) are rounded to int8 too, per token over its ranks, as x is for a q8_0 base
(``infeng.model.reference.int8_lora_product`` is that arithmetic in numpy). A bf16 pair goes
through bf16 dot products when the base's bf16_act rounds bf16 matrices' input: x and h rounded
to bf16 (``bf16_lora_product``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infeng import format as native
from infeng.converters.peft import projection_shape, read_peft
from infeng.errors import InfengError
from infeng.format.schema import convert_dtype, to_f32
from infeng.kernels import bf16_activations
from infeng.model.loader import Model
from infeng.model.reference import ReferenceModel, bf16_lora_product, int8_lora_product

ADAPTER_DTYPES = ("f32", "bf16", "int8")
STORAGE = {"float": 1, "int8": 1}      # storage kind → the version this code reads


def quantize_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (q int8, scale f32) with q * scale[:, None] ≈ m (round to nearest)."""
    m = np.asarray(m, np.float32)
    s = np.abs(m).max(axis=1) / np.float32(127)
    s[s == 0] = 1.0
    q = np.clip(np.rint(m / s[:, None]), -127, 127).astype(np.int8)
    return q, s.astype(np.float32)


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

    @property
    def storage(self) -> str:
        return "int8" if any(n.endswith(".lora_bt") for n in self.tensors) else "float"

    def f32(self, name: str) -> np.ndarray:
        """A stored tensor as f32; for int8 storage ``.lora_a`` / ``.lora_b`` are dequantized
        (``.lora_b`` [out, r] from the stored Bᵀ)."""
        if self.storage == "int8" and name.endswith((".lora_a", ".lora_b")):
            key = name if name.endswith(".lora_a") else name[:-len("lora_b")] + "lora_bt"
            q, s = self.tensors[key][1], self.tensors[key + "_scale"][1]
            m = q.astype(np.float32) * s[:, None]
            return m if name.endswith(".lora_a") else np.ascontiguousarray(m.T)
        d, a = self.tensors[name]
        return to_f32(a, d)

    def delta(self, target: str) -> np.ndarray:
        """scale · B @ A in f32 [out, in] (reference math)."""
        return np.float32(self.scale) * (self.f32(f"{target}.lora_b") @ self.f32(f"{target}.lora_a"))


def convert_peft(src: str | Path, out: str | Path, base: Model, dtype: str = "bf16") -> Path:
    if dtype not in ADAPTER_DTYPES:
        raise InfengError(f"--dtype {dtype!r}: adapters are stored as {' or '.join(ADAPTER_DTYPES)}")
    meta, tensors = read_peft(src, base.config)
    meta = dict(meta, storage="int8" if dtype == "int8" else "float", storage_version=1)
    return native.write(out, adapter_manifest(meta, base, str(src)), stored_tensors(tensors, dtype))


def stored_tensors(tensors: dict[str, np.ndarray], dtype: str) -> list:
    """f32 native adapter tensors (lora_a [r, in], lora_b [out, r], dora_m) → the stored tensors."""
    stored = []
    for name, arr in sorted(tensors.items()):
        if name.endswith(".dora_m") or dtype != "int8":
            d = "f32" if name.endswith(".dora_m") else dtype
            stored.append(native.Tensor(name, d, tuple(arr.shape), convert_dtype(arr, "f32", d)))
            continue
        key, m = (name, arr) if name.endswith(".lora_a") else (name[:-len("lora_b")] + "lora_bt", arr.T)
        q, s = quantize_rows(m)
        stored += [native.Tensor(key, "i8", tuple(q.shape), q), native.Tensor(key + "_scale", "f32", tuple(s.shape), s)]
    return stored


def adapter_manifest(meta: dict, base: Model, source: str) -> dict:
    return {"kind": "adapter", "adapter": meta,
            "base": {"identity": model_identity(base), "source": base.source}, "source": source}


def requantize(src: str | Path, out: str | Path, base: Model, dtype: str) -> Path:
    """Another native adapter file with the same adapter stored as ``dtype`` (f32 / bf16 / int8)."""
    if dtype not in ADAPTER_DTYPES:
        raise InfengError(f"--dtype {dtype!r}: adapters are stored as {' or '.join(ADAPTER_DTYPES)}")
    a = load_adapter(src, base)
    tensors = {}
    for t in a.targets:
        tensors[f"{t}.lora_a"], tensors[f"{t}.lora_b"] = a.f32(f"{t}.lora_a"), a.f32(f"{t}.lora_b")
        if a.use_dora:
            tensors[f"{t}.dora_m"] = a.f32(f"{t}.dora_m")
    meta = dict(native.NativeFile(Path(src), verify=False).manifest["adapter"],
                storage="int8" if dtype == "int8" else "float", storage_version=1)
    return native.write(out, adapter_manifest(meta, base, str(src)), stored_tensors(tensors, dtype))


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
    storage, version = meta.get("storage", "float"), meta.get("storage_version", 1)
    if storage not in STORAGE or version != STORAGE[storage]:
        raise InfengError(f"{p}: adapter storage {storage!r} version {version!r} is not one this infeng reads "
                          f"({', '.join(f'{k} v{v}' for k, v in STORAGE.items())})")
    tensors = {}
    for t in targets:
        try:
            _, layer, proj = t.split(".")
            n_out, n_in = projection_shape(base.config, proj)
        except (ValueError, KeyError):
            raise InfengError(f"{p}: unknown target {t!r}") from None
        if storage == "int8":
            want = {"lora_a": (rank, n_in), "lora_a_scale": (rank,), "lora_bt": (rank, n_out), "lora_bt_scale": (rank,)}
            kinds = {"lora_a": ("i8",), "lora_a_scale": ("f32",), "lora_bt": ("i8",), "lora_bt_scale": ("f32",)}
        else:
            want = {"lora_a": (rank, n_in), "lora_b": (n_out, rank)}
            kinds = {"lora_a": ("f32", "bf16"), "lora_b": ("f32", "bf16")}
        kinds["dora_m"] = ("f32",)
        if dora:
            want["dora_m"] = (n_out,)
        for part, shape in want.items():
            key = f"{t}.{part}"
            if key not in f.tensors:
                raise InfengError(f"{p}: missing tensor {key!r}")
            if tuple(f.tensors[key].shape) != shape:
                raise InfengError(f"{p}: tensor {key!r} has shape {list(f.tensors[key].shape)}, the base needs {list(shape)}")
            if f.dtypes[key] not in kinds[part]:
                raise InfengError(f"{p}: tensor {key!r} is {f.dtypes[key]}, {storage} storage needs {' or '.join(kinds[part])}")
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


def takes_bf16_dp(base: Model, a_dtype: str, b_dtype: str) -> bool:
    """Whether a float adapter's product runs on bf16 dot products (x and h rounded to bf16): A and
    B both bf16 and the base rounding its bf16 matrices' input (its bf16_act)."""
    return a_dtype == b_dtype == "bf16" and bf16_activations(base.bf16_act) == "bf16"


def reference_with_adapter(base: Model, adapter: Adapter | None, kernel_rounding: bool = False):
    """The numpy reference model computing with ``adapter``'s effective weights. With
    ``kernel_rounding``, an int8 adapter's low-rank term is computed as the C kernels do
    (``int8_lora_product``: h rounded to int8) beside the base projection instead, and so is a bf16
    one's when the kernels round its activations (the base's bf16_act: ``bf16_lora_product``, x
    and h rounded to bf16; A and B both bf16)."""
    ref = ReferenceModel(base)
    if adapter is None:
        return ref
    for t in adapter.targets:
        _, layer, proj = t.split(".")
        int8 = adapter.storage == "int8"
        bf16 = not int8 and takes_bf16_dp(base, adapter.tensors[f"{t}.lora_a"][0], adapter.tensors[f"{t}.lora_b"][0])
        if not (kernel_rounding and (int8 or bf16)):
            ref.w[t] = effective_weight(base, adapter, int(layer), proj)
            continue
        dora = None
        if adapter.use_dora:
            merged = base.f32(t) + adapter.delta(t)
            dora = adapter.f32(f"{t}.dora_m") / np.linalg.norm(merged, axis=1)
        if int8:
            hs = (adapter.tensors[f"{t}.lora_a_scale"][1] * adapter.tensors[f"{t}.lora_bt_scale"][1]
                  * np.float32(adapter.scale)).astype(np.float32)
            qa, qbt = adapter.tensors[f"{t}.lora_a"][1], adapter.tensors[f"{t}.lora_bt"][1]
            ref.low_rank[t] = (lambda x, qa=qa, qbt=qbt, hs=hs: int8_lora_product(x, qa, qbt, hs), dora)
        else:
            a, bt = adapter.f32(f"{t}.lora_a"), adapter.f32(f"{t}.lora_b").T
            hs = np.full(a.shape[0], adapter.scale, np.float32)
            ref.low_rank[t] = (lambda x, a=a, bt=bt, hs=hs: bf16_lora_product(x, a, bt, hs), dora)
    return ref
