"""GGUF vocabulary (``tokenizer.ggml.*``) → a tokenizer.json the `tokenizers` library loads.

Two GGUF tokenizer models:

- ``llama``: SentencePiece BPE. Tokens with scores and types (1 normal, 2 unknown, 3 control,
  4 user-defined, 5 unused, 6 byte ``<0xNN>``). SentencePiece merges the adjacent pair whose
  joined piece has the highest score, so the BPE merge list is every split of a normal piece
  into two normal pieces, ranked by the joined piece's score. Byte fallback on; a ``▁`` is
  prepended when ``tokenizer.ggml.add_space_prefix`` (default true) and spaces become ``▁``.
- ``gpt2``: byte-level BPE with an explicit merge list ("a b" strings); the pre-tokenizer split
  follows ``tokenizer.ggml.pre``: GPT-2's regex, SmolLM's (GPT-2's with every digit on its own),
  Llama 3's, or Qwen2's (one digit per piece, text NFC-normalized first as Qwen's own tokenizer
  does). A ``pre`` not listed is refused by name: another split would give other tokens silently.
  BOS is added only when ``tokenizer.ggml.add_bos_token`` says so (llama.cpp's default: only the
  Llama 3 split adds it); generation stops at EOS and at the end-of-turn / end-of-message tokens.

A file that carries ``tokenizer.huggingface.json`` (infeng's own exports do) uses that verbatim,
after checking it loads and has the same vocabulary size.
"""
from __future__ import annotations

import json
from typing import Any

from infeng.errors import InfengError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → how text is split before BPE: "gpt2" (GPT-2's regex, inside the ByteLevel
# pre-tokenizer), "digits" (each digit alone, then GPT-2's), "llama3", "qwen2"
PRE_SPLITS = {"default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
              "smollm": "digits", "starcoder": "digits", "refact": "digits",
              "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
              "dbrx": "llama3",
              "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2"}
ADDS_BOS = {"llama3"}          # split kinds whose models add BOS unless the file says otherwise
END_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


MAX_PIECE = 1024    # characters; SentencePiece trains pieces of at most 16 by default


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int], where: str = "") -> list[list[str]]:
    """Merge list of a SentencePiece BPE vocabulary, best (highest joined-piece score) first.
    Every cut of every piece is tried (quadratic in a piece's length), so absurd pieces are refused."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    longest = max(normal, key=len, default="")
    if len(longest) > MAX_PIECE:
        raise InfengError(f"{where}: tokenizer.ggml.tokens[{normal[longest]}] is a {len(longest)}-character "
                          f"normal piece (at most {MAX_PIECE} for a SentencePiece vocabulary)")
    found = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                found.append((-scores[i], normal[left], normal[right], left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    return [[left, right] for _, _, _, left, right in found]


def _added(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    out = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (UNKNOWN, CONTROL, USER_DEFINED):
            out.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": ty != USER_DEFINED})
    return out


def _post(bos: str | None, bos_id: int | None) -> dict[str, Any] | None:
    if bos is None:
        return None
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def llama_tokenizer(tokens, scores, types, unk_id: int | None, add_space_prefix: bool, where: str = "") -> dict[str, Any]:
    norm = ([{"type": "Prepend", "prepend": "\u2581"}] if add_space_prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    dec = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
           {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_space_prefix:
        dec.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"normalizer": {"type": "Sequence", "normalizers": norm}, "pre_tokenizer": None,
            "decoder": {"type": "Sequence", "decoders": dec},
            "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": sentencepiece_merges(tokens, scores, types, where)}}


def _pre_tokenizer(kind: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(normalizer, pre-tokenizer) of a byte-level BPE split kind, as tokenizer.json writes them."""
    def byte_level(regex: bool):
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex}

    def split(pattern: str):
        return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    if kind == "gpt2":
        return None, byte_level(True)
    if kind == "digits":
        return None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                            byte_level(True)]}
    if kind == "llama3":
        return None, {"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(False)]}
    return {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(False)]}


def pre_name(pre_tok: Any) -> str:
    """The tokenizer.ggml.pre name of a tokenizer.json pre-tokenizer (for GGUF export): its split
    regex or a Digits step decides; anything else is GPT-2's ("default")."""
    steps = pre_tok.get("pretokenizers", [pre_tok]) if isinstance(pre_tok, dict) else []
    steps = [x for x in steps if isinstance(x, dict)]
    splits = [(x.get("pattern") or {}).get("Regex") for x in steps if x.get("type") == "Split"]
    if LLAMA3_SPLIT in splits:
        return "llama-bpe"
    if QWEN2_SPLIT in splits:
        return "qwen2"
    if any(x.get("type") == "Digits" and x.get("individual_digits") for x in steps):
        return "smollm"
    return "default"


def gpt2_tokenizer(tokens, merges: list[str], pre: str, where: str) -> dict[str, Any]:
    if pre not in PRE_SPLITS:
        raise InfengError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(PRE_SPLITS)})")
    kind = PRE_SPLITS[pre]
    normalizer, pre_tok = _pre_tokenizer(kind)
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise InfengError(f"{where}: tokenizer.ggml.merges[{i}] {m[:40]!r} is not two tokens separated by a space")
        pairs.append(parts)
    return {"normalizer": normalizer, "pre_tokenizer": pre_tok,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": kind == "llama3",
                      "vocab": {t: i for i, t in enumerate(tokens)}, "merges": pairs}}


def build(g, where: str) -> tuple[dict[str, Any], int | None, tuple[int, ...]]:
    """(tokenizer spec {"json", "add_bos", "chat_template"}, bos id, eos ids) from a GGUFFile."""
    tokens = g.get("tokenizer.ggml.tokens", "list", required=True)
    n = len(tokens)
    if n == 0 or not all(isinstance(t, str) for t in tokens):
        raise InfengError(f"{where}: tokenizer.ggml.tokens must be a non-empty list of strings")
    if len(set(tokens)) != n:
        raise InfengError(f"{where}: tokenizer.ggml.tokens has duplicate tokens")

    def token_id(key):
        v = g.get(key, "int")
        if v is not None and not 0 <= v < n:
            raise InfengError(f"{where}: {key} {v} is outside the vocabulary (0..{n - 1})")
        return v
    bos_id = token_id("tokenizer.ggml.bos_token_id")
    unk_id = token_id("tokenizer.ggml.unknown_token_id")
    kind = g.get("tokenizer.ggml.model", "str", required=True)
    pre = g.get("tokenizer.ggml.pre", "str", "default")
    default_bos = bos_id is not None and (kind != "gpt2" or PRE_SPLITS.get(pre) in ADDS_BOS)
    add_bos = g.get("tokenizer.ggml.add_bos_token", "bool", default_bos)
    template = g.get("tokenizer.chat_template", "str")
    eos = tuple(dict.fromkeys(i for i in map(token_id, END_KEYS) if i is not None))
    hf = g.get("tokenizer.huggingface.json", "str")
    if hf is not None:
        return {"json": _checked(hf, n, where), "add_bos": add_bos, "chat_template": template}, bos_id, eos

    types = g.get("tokenizer.ggml.token_type", "list", [NORMAL] * n)
    if len(types) != n or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise InfengError(f"{where}: tokenizer.ggml.token_type must list {n} integers")
    if kind == "llama":
        scores = g.get("tokenizer.ggml.scores", "list", required=True)
        if len(scores) != n or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise InfengError(f"{where}: tokenizer.ggml.scores must list {n} numbers")
        if unk_id is None and UNKNOWN in types:
            unk_id = types.index(UNKNOWN)
        spec = llama_tokenizer(tokens, scores, types, unk_id, g.get("tokenizer.ggml.add_space_prefix", "bool", True), where)
    elif kind == "gpt2":
        merges = g.get("tokenizer.ggml.merges", "list", required=True)
        if not all(isinstance(m, str) for m in merges):
            raise InfengError(f"{where}: tokenizer.ggml.merges must be a list of strings")
        spec = gpt2_tokenizer(tokens, merges, pre, where)
    else:
        raise InfengError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")
    full = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tokens, types),
            **spec, "post_processor": _post(tokens[bos_id] if add_bos and bos_id is not None else None, bos_id)}
    text = json.dumps(full, ensure_ascii=False)
    return {"json": _checked(text, n, where), "add_bos": add_bos, "chat_template": template}, bos_id, eos


def _checked(text: str, n: int, where: str) -> str:
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(text)
    except BaseException as e:   # the tokenizers library raises its own types, and a Rust panic is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise InfengError(f"{where}: the vocabulary does not make a usable tokenizer ({str(e)[:200]})") from None
    if tok.get_vocab_size(with_added_tokens=True) != n:
        raise InfengError(f"{where}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
                          f"tokenizer.ggml.tokens {n}")
    return text
