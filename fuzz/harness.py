"""Fuzz targets, one per reader of untrusted input. Each takes the raw bytes of one file; the
only acceptable outcome besides success is the project's InfengError (a clear one-line error).
Any other exception, a crash or a hang is a bug.

Readers take paths (they mmap), so each input is written to a scratch file in /dev/shm first.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from infeng.errors import InfengError

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
if os.environ.get("INFENG_FUZZ_SCRATCH"):       # fuzz.run's parent makes and removes it (libFuzzer skips atexit)
    SCRATCH = Path(os.environ["INFENG_FUZZ_SCRATCH"])
else:
    SCRATCH = Path(tempfile.mkdtemp(prefix="infeng-fuzz-", dir=SHM))
    atexit.register(shutil.rmtree, SCRATCH, True)
PEFT_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "peft" / "lora_r4_qv"


def _file(data: bytes, name: str) -> Path:
    p = SCRATCH / name
    p.write_bytes(data)
    return p


def native(data: bytes) -> None:
    """The native .infeng reader and the model loader on top of it (manifest, config, shapes),
    plus what Engine.load derives from the manifest before any kernel runs (RoPE table, tokenizer)."""
    from infeng.model.loader import load_model
    from infeng.runtime.tokenizer import Tokenizer
    try:
        m = load_model(_file(data, "m.infeng"))
        m.config.inv_freq()
        Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    except InfengError:
        pass


def safetensors(data: bytes) -> None:
    from infeng.converters.safetensors_io import SafetensorsFile
    try:
        SafetensorsFile(_file(data, "m.safetensors"))
    except InfengError:
        pass


def gguf(data: bytes) -> None:
    """The GGUF container reader and the Llama model conversion (hyper-parameters, tokenizer)."""
    from infeng.converters import gguf_read
    try:
        gguf_read.read_llama(_file(data, "m.gguf"))
    except InfengError:
        pass


_BASE_CFG = None


def config_json(data: bytes) -> None:
    """The same bytes as an HF config.json (converters/hf_config.py from_hf), as a native manifest config
    (ModelConfig.from_dict), and as a PEFT adapter_config.json (converters/peft.py read_peft,
    with a real adapter's weights beside it)."""
    global _BASE_CFG
    from infeng.converters.hf import read_json
    from infeng.converters.peft import read_peft
    from infeng.converters.hf_config import from_hf
    from infeng.format.config import ModelConfig
    if _BASE_CFG is None:
        _BASE_CFG = from_hf(json.loads(CONFIG_SEED), "seed")
    p = _file(data, "config.json")
    try:
        from_hf(read_json(p), str(p))
    except InfengError:
        pass
    try:
        obj = read_json(p)
        if isinstance(obj, dict):
            ModelConfig.from_dict(obj, "manifest")
    except InfengError:
        pass
    adapter = SCRATCH / "adapter"
    if not adapter.is_dir():
        adapter.mkdir()
        shutil.copy(PEFT_FIXTURE / "adapter_model.safetensors", adapter)
    (adapter / "adapter_config.json").write_bytes(data)
    try:
        read_peft(adapter, _BASE_CFG)
    except InfengError:
        pass


CONFIG_SEED = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 172,
                          "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4,
                          "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                          "tie_word_embeddings": True})

TARGETS = {"native": native, "safetensors": safetensors, "gguf": gguf, "config": config_json}
