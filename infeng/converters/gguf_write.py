"""GGUF (v3) writer for the supported architectures (llama.cpp's names, gguf_arch.py):
``infeng convert X.infeng --to gguf`` and the bench's llama.cpp peer (``infeng bench --peer
llama.cpp``) run the same weights as infeng. What llama.cpp's architecture would compute
differently (a sliding window it does not apply, other NoPE layers) is refused.

Tensors keep their dtype: f32, f16, bf16, and q8_0 / q4_0 / q5_0 / q4_1 / q5_1 / q4_k / q5_k / q6_k whose blocks are byte-compatible
with GGML's (a copy). wq and wk rows are permuted from Hugging Face's rotate-half RoPE layout to
GGML's interleaved one for llama/smollm3 (as llama.cpp's own converter does; gguf_read.unpermute_rope
undoes it); Phi-3's wq/wk/wv and w_gate/w_up are written fused, as its attn_qkv / ffn_up.
The vocabulary is written as a SentencePiece-style ("llama") vocabulary from the model's
tokenizer.json: token text by id, score from the merge rank, types normal / unknown / control / byte; the
tokenizer.json itself goes along as ``tokenizer.huggingface.json`` (a GGUF standard key), so
reading the file back gives the identical tokenizer, normalizer included. Llama-3 RoPE scaling
goes out as llama.cpp's ``rope_freqs`` tensor (a divisor per frequency).
"""
from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from infeng import format as native
from infeng.converters import gguf_arch
from infeng.converters.gguf_file import GGUFFile
from infeng.converters.gguf_read import gguf_name
from infeng.converters.gguf_tokenizer import pre_name
from infeng.errors import InfengError
from infeng.format.schema import expected_shapes
from infeng.telemetry import atomic_path

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGN = 32
GGML_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13,
             "q6_k": 14, "bf16": 30}
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 15, "q5_k": 17,
             "q6_k": 18, "bf16": 32}   # llama_ftype MOSTLY_* (q4_k / q5_k: Q4_K_M / Q5_K_M, the usual mixes)
# metadata value types
U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10

NAMES = {native: gguf for gguf, native in gguf_arch.LAYER.items()}   # per-layer native → GGUF name (wq → attn_q.weight)


def _check_exportable(c) -> None:
    """What llama.cpp's architecture would compute differently is refused, not written."""
    arch = gguf_arch.TO_GGUF[c.arch]
    if c.swa_layers and not (arch == "phi3" and len(c.swa_layers) == c.n_layers):
        raise InfengError(f"GGUF export: {c.arch}'s sliding window on layers {list(c.swa_layers)} has no "
                          f"llama.cpp {arch!r} equivalent")
    every = gguf_arch.NOPE_EVERY.get(arch)
    want = tuple(i for i in range(c.n_layers) if every and (i + 1) % every == 0)
    if c.nope_layers != want:
        raise InfengError(f"GGUF export: RoPE skipped on layers {list(c.nope_layers)}, llama.cpp's {arch!r} "
                          f"skips it on {list(want)}")
    kind = c.rope_scaling["rope_type"] if c.rope_scaling else "default"
    if kind not in ("default", "linear", "llama3", "freq_factors", "yarn") and not (kind == "longrope" and arch == "phi3"):
        raise InfengError(f"GGUF export: rope_type {kind!r} is not exported for {arch!r}")


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == STR:
        return out + _str(value)
    if vtype == ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype == STR:
            return out + b"".join(_str(x) for x in items)
        fmt = {U32: "I", I32: "i", F32: "f"}[etype]
        return out + struct.pack(f"<{len(items)}{fmt}", *items)
    fmt = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[vtype]
    return out + struct.pack(fmt, value)


def _permute_rope(arr: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of wq/wk from HF rotate-half order to GGML's interleaved pairs (per head)."""
    rows = arr.shape[0]
    return np.ascontiguousarray(arr.reshape(n_heads, 2, rows // n_heads // 2, *arr.shape[1:])
                                .swapaxes(1, 2).reshape(arr.shape))


def _vocab(model) -> list[bytes]:
    """The tokenizer.ggml.* metadata: a SentencePiece-style "llama" vocabulary, or a byte-level
    "gpt2" one (tokens + merges) when the tokenizer.json is byte-level BPE (Llama 3, SmolLM)."""
    tok = json.loads(model.tokenizer["json"])
    m = tok.get("model", {})
    if m.get("type") != "BPE" or not isinstance(m.get("vocab"), dict):
        raise InfengError("GGUF export: only BPE tokenizers (SentencePiece-style or byte-level) are supported")
    by_id: dict[int, str] = {i: t for t, i in m["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    byte_level = "ByteLevel" in json.dumps([tok.get("pre_tokenizer"), tok.get("decoder")])
    n = model.config.vocab_size
    # SentencePiece (and llama.cpp's SPM tokenizer) merge the pair whose joined piece scores
    # highest: a piece's score is minus the rank of the first merge that makes it, so the GGUF
    # vocabulary merges in the tokenizer.json's order (-id scores got e.g. Llama 2's "▁▁" wrong).
    rank: dict[str, int] = {}
    for r, mg in enumerate(m.get("merges", [])):
        rank.setdefault("".join(mg.split(" ", 1) if isinstance(mg, str) else mg), r)
    tokens, scores, types = [], [], []
    for i in range(n):
        t = by_id.get(i, f"<unused{i}>")
        tokens.append(t)
        scores.append(-float(rank.get(t, len(rank) + i)))
        if i in added:
            types.append(3 if added[i].get("special") else 4)
        elif i not in by_id:
            types.append(5)
        elif not byte_level and t == m.get("unk_token", "<unk>"):
            types.append(2)
        elif not byte_level and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    if not byte_level:
        return [_kv("tokenizer.ggml.model", STR, "llama"), _kv("tokenizer.ggml.tokens", ARR, (STR, tokens)),
                _kv("tokenizer.ggml.scores", ARR, (F32, scores)), _kv("tokenizer.ggml.token_type", ARR, (I32, types))]
    merges = [x if isinstance(x, str) else " ".join(x) for x in m.get("merges", [])]
    pre = pre_name(tok.get("pre_tokenizer"))
    return [_kv("tokenizer.ggml.model", STR, "gpt2"), _kv("tokenizer.ggml.pre", STR, pre),
            _kv("tokenizer.ggml.tokens", ARR, (STR, tokens)), _kv("tokenizer.ggml.token_type", ARR, (I32, types)),
            _kv("tokenizer.ggml.merges", ARR, (STR, merges))]


def write_gguf(model, path: str | Path, name: str = "infeng-export") -> Path:
    """Write ``model`` (an infeng Model) as a GGUF file (temporary name, then rename)."""
    c = model.config
    dtype = model.weight_dtype
    if dtype not in FILE_TYPE:
        raise InfengError(f"GGUF export: weight dtype {dtype} has no GGUF equivalent")
    _check_exportable(c)
    a = gguf_arch.TO_GGUF[c.arch]
    kvs = [
        _kv("general.architecture", STR, a),
        _kv("general.name", STR, name),
        _kv("general.alignment", U32, ALIGN),
        _kv("general.file_type", U32, FILE_TYPE[dtype]),
        _kv(f"{a}.context_length", U32, c.max_seq_len),
        _kv(f"{a}.embedding_length", U32, c.dim),
        _kv(f"{a}.block_count", U32, c.n_layers),
        _kv(f"{a}.feed_forward_length", U32, c.hidden_dim),
        _kv(f"{a}.rope.dimension_count", U32, c.head_dim),
        _kv(f"{a}.attention.head_count", U32, c.n_heads),
        _kv(f"{a}.attention.head_count_kv", U32, c.n_kv_heads),
        _kv(f"{a}.attention.key_length", U32, c.head_dim),
        _kv(f"{a}.attention.value_length", U32, c.head_dim),
        _kv(f"{a}.attention.layer_norm_rms_epsilon", F32, float(c.norm_eps)),
        _kv(f"{a}.rope.freq_base", F32, float(c.rope_theta)),
        _kv(f"{a}.vocab_size", U32, c.vocab_size),
        *_vocab(model),
        _kv("tokenizer.ggml.add_bos_token", BOOL, bool(model.tokenizer.get("add_bos", True))),
        _kv("tokenizer.huggingface.json", STR, model.tokenizer["json"]),
    ]
    if model.tokenizer.get("chat_template"):
        kvs.append(_kv("tokenizer.chat_template", STR, model.tokenizer["chat_template"]))
    rs = c.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        kvs += [_kv(f"{a}.rope.scaling.type", STR, "linear"), _kv(f"{a}.rope.scaling.factor", F32, float(rs["factor"]))]
    elif rs.get("rope_type") == "yarn":
        kvs += [_kv(f"{a}.rope.scaling.type", STR, "yarn"), _kv(f"{a}.rope.scaling.factor", F32, float(rs["factor"])),
                _kv(f"{a}.rope.scaling.original_context_length", U32, int(rs["original_max_position_embeddings"]))]
    elif rs.get("rope_type") == "longrope":
        kvs += [_kv(f"{a}.rope.scaling.original_context_length", U32, int(rs["original_max_position_embeddings"])),
                _kv(f"{a}.rope.scaling.attn_factor", F32, float(c.attn_factor()))]
    if c.swa_layers:
        kvs.append(_kv(f"{a}.attention.sliding_window", U32, c.sliding_window))
    if c.bos_id is not None:
        kvs.append(_kv("tokenizer.ggml.bos_token_id", U32, int(c.bos_id)))
    if c.eos_ids:
        kvs.append(_kv("tokenizer.ggml.eos_token_id", U32, int(c.eos_ids[0])))

    entries: dict[str, list[tuple[str, np.ndarray]]] = {}    # GGUF name → (dtype, rows) parts, in order
    for n in expected_shapes(c):
        dt, arr = model.tensors[n]
        if dt not in GGML_TYPE:
            raise InfengError(f"GGUF export: tensor {n} has dtype {dt} with no GGUF equivalent")
        if a in gguf_arch.PERMUTED and n.endswith(".wq"):
            arr = _permute_rope(arr, c.n_heads)
        elif a in gguf_arch.PERMUTED and n.endswith(".wk"):
            arr = _permute_rope(arr, c.n_kv_heads)
        entries.setdefault(gguf_name(n, c.arch), []).append((dt, arr))
    if rs.get("rope_type") in ("llama3", "freq_factors"):      # llama.cpp divides each frequency by these
        if rs["rope_type"] == "freq_factors":
            factors = np.asarray(rs["factors"], np.float32)
        else:
            factors = (replace(c, rope_scaling=None).inv_freq().astype(np.float64) / c.inv_freq()).astype(np.float32)
        entries["rope_freqs.weight"] = [("f32", factors)]
    if rs.get("rope_type") == "longrope":
        for which in ("short", "long"):
            entries[f"rope_factors_{which}.weight"] = [("f32", np.asarray(rs[f"{which}_factor"], np.float32))]
    infos, datas, off = [], [], 0
    for gname, parts in entries.items():
        dts = {dt for dt, _ in parts}
        if len(dts) > 1:
            raise InfengError(f"GGUF export: the parts of fused {gname} have different dtypes {sorted(dts)}")
        dt = parts[0][0]
        arr = parts[0][1] if len(parts) == 1 else np.concatenate([p for _, p in parts])
        shape = native.logical_shape(dt, arr.shape)
        dims = list(reversed(shape))                     # GGML: ne[0] is the innermost (row) length
        infos.append(_str(gname) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", GGML_TYPE[dt], off))
        datas.append(arr)
        off += -(-arr.nbytes // ALIGN) * ALIGN
    return write_file(path, kvs, infos, datas)


def write_file(path: str | Path, kvs: list[bytes], infos: list[bytes], datas: list[np.ndarray]) -> Path:
    """A GGUF file from its encoded metadata and tensor infos and the tensors' data, each padded
    to ALIGN (temporary name, then rename)."""
    header = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(datas), len(kvs)) + b"".join(kvs) + b"".join(infos)
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(header)
            f.write(b"\0" * (-len(header) % ALIGN))
            for arr in datas:
                mv = memoryview(np.ascontiguousarray(arr)).cast("B")
                f.write(mv)
                f.write(b"\0" * (-len(mv) % ALIGN))
    except OSError as e:
        raise InfengError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def read_gguf_header(path: str | Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file, through the validating reader: tensors map name →
    (ggml type, dims, absolute offset). Enough to check what ``write_gguf`` wrote."""
    g = GGUFFile(path)
    meta = dict(g.metadata, version=g.version)
    return meta, {n: (t.type_id, list(t.dims), t.offset) for n, t in g.tensors.items()}


def export_cached(model, cache: Path, source: str | Path | None = None) -> Path:
    """The model as GGUF in the folder ``cache`` (written once, reused while the source file is
    older than it)."""
    src = Path(source or model.source or "model")
    stem = src.name.replace(".infeng", "") or "model"
    out = Path(cache) / f"{stem}-{model.weight_dtype}.gguf"
    if out.exists() and (not src.exists() or out.stat().st_mtime >= src.stat().st_mtime):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(model, out, name=stem)
