"""What the KV cache stores, per layer: the K and V types, the scale group, the rotation.

``--kv-dtype int8`` (keys and values; ``int8`` and ``int4`` alone store the keys per channel,
int8c / int4c, which halves int8's KLD and takes int4's down sixfold — ``k=int4,v=int4`` names
the per-position keys), ``--kv-dtype k=int4,v=int8`` (each its own), and a
per-layer policy over it: ``--kv-policy "layers 0,1,-1: bf16; layers 5: k=int8,v=int4"``
(negative indices count from the last layer). The rotation (a randomized Walsh–Hadamard
transform, kernels_c/kvq.h) is ``auto`` by default: the queries and keys of the layers whose keys
are int8/fp8/int4, and the values of the layers whose values are (the attention output rotated
back), when head_dim is a power of two, and nothing otherwise (telemetry says which); ``on``
refuses a head_dim that is not a power of two, ``keys`` rotates keys only (values as stored),
``off`` never rotates. The signs come from ``seed``, a setting of the run, not of the model file.
"""
from __future__ import annotations

from dataclasses import dataclass

from infeng.errors import InfengError
from infeng.model.config import ModelConfig
from infeng.quant.kvcache import CHANNEL, KV_TYPES, SCALED

ROTATE_MODES = ("auto", "on", "keys", "off")
QUANT = SCALED + CHANNEL  # the key types the rotation helps (values: SCALED)


@dataclass(frozen=True)
class KVSpec:
    k: tuple[str, ...]              # per layer
    v: tuple[str, ...]
    rotate: tuple[bool, ...]        # queries and keys, per layer
    group: int
    seed: int = 0
    rotate_v: tuple[bool, ...] = ()  # values (and the attention output back), per layer

    @property
    def all_f32(self) -> bool:
        return all(t == "f32" for t in self.k + self.v)

    @property
    def rotated(self) -> bool:
        return any(self.rotate) or any(self.rotate_v)

    def describe(self) -> str:
        """One short label: "int8", "k=int4,v=int8", or per-layer runs when hybrid."""
        pairs = [_label(k, v) for k, v in zip(self.k, self.v)]
        if len(set(pairs)) == 1:
            return pairs[0]
        return "; ".join(f"{i}:{p}" for i, p in enumerate(pairs))


def _label(k: str, v: str) -> str:
    """The --kv-dtype text that gives (k, v): "int8" is per-channel keys, so per-position int8
    keys are spelled out."""
    if SHORTHAND_KEYS.get(v) == k:
        return v
    return k if k == v and k not in SHORTHAND_KEYS else f"k={k},v={v}"


SHORTHAND_KEYS = {"int8": "int8c", "int4": "int4c"}   # the keys a lone integer type stores


def parse_dtype(text: str, where: str = "--kv-dtype") -> tuple[str, str]:
    """"bf16" → (bf16, bf16); "int8" → (int8c, int8); "k=int4,v=int8" → (int4, int8)."""
    text = text.strip()
    if "=" not in text:
        if text not in KV_TYPES:
            raise InfengError(f"{where} {text!r}: KV type must be one of {', '.join(KV_TYPES)}")
        if text in CHANNEL:
            raise InfengError(f"{where} {text!r}: a per-channel key type; give k={text},v=TYPE")
        return SHORTHAND_KEYS.get(text, text), text
    got: dict[str, str] = {}
    for item in text.split(","):
        name, _, t = item.partition("=")
        name, t = name.strip(), t.strip()
        if name not in ("k", "v") or name in got:
            raise InfengError(f"{where} {text!r}: expected k=TYPE,v=TYPE")
        if t not in KV_TYPES:
            raise InfengError(f"{where} {text!r}: KV type {t!r} must be one of {', '.join(KV_TYPES)}")
        got[name] = t
    if set(got) != {"k", "v"}:
        raise InfengError(f"{where} {text!r}: give both k= and v=")
    if got["v"] in CHANNEL:
        raise InfengError(f"{where} {text!r}: {got['v']} quantizes keys per channel; values cannot use it")
    return got["k"], got["v"]


def parse_policy(text: str, n_layers: int) -> dict[int, tuple[str, str]]:
    """ "layers 0,1,-1: bf16; layers 3: k=int8,v=int4" → {layer: (k, v)}."""
    out: dict[int, tuple[str, str]] = {}
    for clause in filter(None, (c.strip() for c in text.split(";"))):
        head, sep, dtype = clause.partition(":")
        words = head.split(None, 1)
        if not sep or len(words) != 2 or words[0] != "layers":
            raise InfengError(f"--kv-policy clause {clause!r}: expected 'layers I,J,...: TYPE'")
        kv = parse_dtype(dtype, f"--kv-policy clause {clause!r}:")
        for item in words[1].split(","):
            try:
                i = int(item)
            except ValueError:
                raise InfengError(f"--kv-policy clause {clause!r}: {item.strip()!r} is not a layer index") from None
            if not -n_layers <= i < n_layers:
                raise InfengError(f"--kv-policy clause {clause!r}: layer {i} is outside 0..{n_layers - 1} "
                                  f"(this model has {n_layers} layers)")
            out[i % n_layers] = kv
    return out


def default_group(head_dim: int) -> int:
    return 32 if head_dim % 32 == 0 else head_dim


def kv_spec(cfg: ModelConfig, dtype: str = "f32", policy: str | None = None, rotate: str = "auto",
            group: int | None = None, seed: int = 0) -> KVSpec:
    """The per-layer KV layout of a run, or one clear error naming the option."""
    k0, v0 = parse_dtype(dtype)
    k, v = [k0] * cfg.n_layers, [v0] * cfg.n_layers
    for i, (kt, vt) in (parse_policy(policy, cfg.n_layers) if policy else {}).items():
        k[i], v[i] = kt, vt
    hd = cfg.head_dim
    if rotate not in ROTATE_MODES:
        raise InfengError(f"--kv-rotate {rotate!r}: must be one of {', '.join(ROTATE_MODES)}")
    pow2 = hd > 0 and hd & (hd - 1) == 0
    if rotate == "on" and not pow2:
        raise InfengError(f"--kv-rotate on: the Hadamard rotation needs a power-of-two head_dim, "
                          f"this model's is {hd}")
    on = rotate == "on" or (rotate in ("auto", "keys") and pow2)
    rot = tuple(on and kt in QUANT for kt in k)
    rot_v = tuple(on and rotate != "keys" and vt in SCALED for vt in v)
    g = default_group(hd) if group is None else group
    if g <= 0 or hd % g or not (g == hd or g % 16 == 0):
        raise InfengError(f"--kv-group {g}: must divide head_dim {hd} and be head_dim or a multiple of 16")
    return KVSpec(tuple(k), tuple(v), rot, g, seed, rot_v)


def kv_options(dtype: str, policy: str | None, rotate: str) -> dict:
    """The Engine's kv_* keywords for the command-line options given (none: the f32 cache)."""
    given = {"kv_dtype": dtype if dtype != "f32" else None, "kv_policy": policy,
             "kv_rotate": rotate if rotate != "auto" else None}
    return {k: v for k, v in given.items() if v is not None}
