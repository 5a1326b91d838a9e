"""Seed corpora for the fuzz targets: real files from the shared data and the test fixtures,
plus tiny valid files made here (small inputs let the fuzzer mutate the headers, where the
parsing is, rather than megabytes of weights)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _tiny_model():
    """A valid 1-layer Llama of width 32 with an 8-token vocabulary (random weights)."""
    from infeng.format.config import ModelConfig
    from infeng.model.loader import Model
    from infeng.format.schema import expected_shapes, is_norm
    cfg = ModelConfig(dim=32, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=8,
                      max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(0)
    tensors = {n: ("f32", rng.standard_normal(s).astype(np.float32) if not is_norm(n) else np.ones(s, np.float32))
               for n, s in expected_shapes(cfg).items()}
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"])}
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None,
           "decoder": None, "model": {"type": "BPE", "vocab": vocab, "merges": [["\u2581", "a"], ["a", "b"]],
                                      "unk_token": "<unk>", "byte_fallback": False}}
    return Model(cfg, tensors, {"json": json.dumps(tok), "add_bos": True, "chat_template": None})


def _tiny_safetensors(path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}, "__metadata__": {"format": "pt"}}
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(range(22)))


def make(target: str, out: Path, data: Path) -> Path:
    """Fill ``out`` with the seeds of one target; returns it."""
    from infeng import format as native
    from infeng.converters.gguf_write import write_gguf
    from infeng.quant import quantize_q8_0
    out.mkdir(parents=True, exist_ok=True)
    tiny = _tiny_model()
    if target == "native":
        native.write(out / "tiny.infeng", tiny.manifest(), tiny.native_tensors())
        q = tiny.derived({n: (("q8_0", quantize_q8_0(a)) if a.ndim == 2 else (d, a)) for n, (d, a) in tiny.tensors.items()})
        native.write(out / "tiny-q8.infeng", q.manifest(), q.native_tensors())
    elif target == "gguf":
        write_gguf(tiny, out / "tiny.gguf")
        shutil.copy(ROOT / "tests" / "fixtures" / "gguf" / "stories260K-q8_0.gguf", out)
    elif target == "safetensors":
        _tiny_safetensors(out / "tiny.safetensors")
        for d in sorted((ROOT / "tests" / "fixtures" / "peft").iterdir()):
            shutil.copy(d / "adapter_model.safetensors", out / f"{d.name}.safetensors")
    elif target == "config":
        from fuzz.harness import CONFIG_SEED
        (out / "tiny-config.json").write_text(CONFIG_SEED)
        for name in ("stories260K", "stories260K-f32"):
            for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
                shutil.copy(data / name / f, out / f"{name}-{f}")
        for d in sorted((ROOT / "tests" / "fixtures" / "peft").iterdir()):
            shutil.copy(d / "adapter_config.json", out / f"{d.name}-adapter_config.json")
        (out / "manifest-config.json").write_text(json.dumps(tiny.config.to_dict()))
    else:
        raise SystemExit(f"unknown target {target!r}")
    return out
