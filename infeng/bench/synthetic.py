"""Synthetic models: exact shapes of named architectures, random weights, deterministic.

Speed does not depend on the weights' values, so these stand in for checkpoints that cannot be
downloaded here. Files are cached (by architecture, dtype and seed) and reused; a bench suite
names one by architecture (``model: tinyllama-1.1b``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from infeng import format as native
from infeng.converters.peft import projection_shape
from infeng.format.config import ModelConfig
from infeng.format.schema import convert_dtype, expected_shapes, is_norm
from infeng.model.adapter import model_identity
from infeng.model.loader import load_model
from infeng.quant import policy as q

# name → config fields (shapes from the models' published config.json files)
ARCHS: dict[str, dict] = {
    "tinyllama-1.1b": dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                           vocab_size=32000, max_seq_len=2048, norm_eps=1e-5, rope_theta=10000.0,
                           tie_embeddings=False, bos_id=1, eos_ids=(2,)),
    # TinyLlama's shape with an 8k context, for decode at depth 4096 (KV-cache benchmarks)
    "tinyllama-1.1b-8k": dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                              vocab_size=32000, max_seq_len=8192, norm_eps=1e-5, rope_theta=10000.0,
                              tie_embeddings=False, bos_id=1, eos_ids=(2,)),
    "llama-3.2-1b": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         vocab_size=128256, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                         tie_embeddings=True, bos_id=128000, eos_ids=(128001,),
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm-135m": dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                        vocab_size=49152, max_seq_len=2048, norm_eps=1e-5, rope_theta=10000.0,
                        tie_embeddings=True, bos_id=1, eos_ids=(2,)),
    # small, with a real 32k vocabulary: for tests that need a Llama-2-sized logits row
    "test-32k": dict(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                     vocab_size=32000, max_seq_len=512, norm_eps=1e-5, rope_theta=10000.0,
                     tie_embeddings=False, bos_id=1, eos_ids=(2,)),
}

DEFAULT_TOKENIZER = Path(os.environ.get("INFENG_TEST_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")) \
    / "llama2-tokenizer" / "tokenizer.json"


def cache_dir() -> Path:
    return Path(os.environ.get("INFENG_CACHE", Path.home() / ".cache" / "infeng")) / "synthetic"


def gguf_cache_dir() -> Path:
    """Where models exported as GGUF for the llama.cpp peers are kept."""
    return cache_dir().parent / "gguf"


def make(arch: str, dtype: str = "bf16", path: Path | None = None, seed: int = 0,
         tokenizer_json: Path | None = None) -> Path:
    """Write (or reuse) the synthetic model file; returns its path."""
    cfg = ModelConfig(**ARCHS[arch])
    path = Path(path) if path else cache_dir() / f"{arch}-{dtype}-seed{seed}.infeng"
    if path.exists() and native.is_native(path):
        return path
    if dtype in QUANTIZED:
        return _quantized(make(arch, "bf16", None, seed, tokenizer_json), dtype, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = Path(tokenizer_json or DEFAULT_TOKENIZER).read_text()
    rng = np.random.default_rng(seed)
    tensors = []
    for name, shape in expected_shapes(cfg).items():
        if is_norm(name):
            data = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            tensors.append(native.Tensor(name, "f32", shape, data))
        else:
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(shape[-1]))
            tensors.append(native.Tensor(name, dtype, shape, convert_dtype(w, "f32", dtype)))
    manifest = {"kind": "model", "config": cfg.to_dict(),
                "tokenizer": {"json": tok, "add_bos": True, "chat_template": None},
                "generation": {}, "source": f"synthetic:{arch}:seed{seed}"}
    native.write(path, manifest, tensors)
    return path


QUANTIZED = ("q8_0", "q4_0", "q5_0", "q4_k", "fp8")


def _quantized(src: Path, dtype: str, path: Path) -> Path:
    """The bf16 synthetic model quantized to ``dtype`` with the default policy (what
    ``infeng quantize SRC --type DTYPE`` writes)."""
    model = load_model(src, verify=False)
    items = q.plan(model.tensors, dtype, q.Policy(), source=str(src))
    out = model.derived(q.quantize_tensors(model.tensors, items))
    path.parent.mkdir(parents=True, exist_ok=True)
    native.write(path, out.manifest(), out.native_tensors())
    return path


def make_adapter(base_path: Path, rank: int, targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"),
                 dtype: str = "bf16", seed: int = 0, path: Path | None = None, dora: bool = False) -> Path:
    """A random LoRA (or DoRA) adapter for a synthetic base, as a native adapter file (cached)."""
    base_path = Path(base_path)
    kind = "dora" if dora else "lora"
    path = Path(path) if path else cache_dir() / f"{base_path.stem}.{kind}-r{rank}-{'-'.join(targets)}-{dtype}-seed{seed}.infeng-lora"
    base = load_model(base_path, verify=False)
    # a cached adapter made for another base (rewritten since, or by other code) is made anew
    if path.exists() and native.is_native(path) and \
            native.NativeFile(path, verify=False).manifest.get("base", {}).get("identity") == model_identity(base):
        return path
    cfg = base.config
    rng = np.random.default_rng(seed)
    tensors, names = [], []
    for layer in range(cfg.n_layers):
        for proj in targets:
            n_out, n_in = projection_shape(cfg, proj)
            t = f"layers.{layer}.{proj}"
            a = rng.standard_normal((rank, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
            b = rng.standard_normal((n_out, rank), dtype=np.float32) * np.float32(0.02)
            tensors += [native.Tensor(f"{t}.lora_a", dtype, a.shape, convert_dtype(a, "f32", dtype)),
                        native.Tensor(f"{t}.lora_b", dtype, b.shape, convert_dtype(b, "f32", dtype))]
            if dora:
                m = (1.0 + 0.05 * rng.standard_normal(n_out, dtype=np.float32)).astype(np.float32)
                tensors.append(native.Tensor(f"{t}.dora_m", "f32", m.shape, m))
            names.append(t)
    meta = {"rank": rank, "alpha": float(rank), "scale": 1.0, "use_rslora": False, "use_dora": dora,
            "targets": names, "peft_version": None}
    manifest = {"kind": "adapter", "adapter": meta, "base": {"identity": model_identity(base), "source": str(base_path)},
                "source": f"synthetic:{kind}:r{rank}:seed{seed}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    native.write(path, manifest, tensors)
    return path
