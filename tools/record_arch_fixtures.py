"""Record one tiny random checkpoint per supported architecture with transformers, and its greedy
tokens and logits, as test fixtures (tests/test_architectures.py checks infeng against them).

Needs the reference extra (`pip install -e '.[ref]'`: torch==2.13.0, transformers); the engine and
its tests never import these. Output per fixture: tests/fixtures/arch/<name>/{config.json,
generation_config.json, model.safetensors (f32), tokenizer.json (word-level: tests compare token
ids), tokenizer.model (SentencePiece, for llama.cpp's converter), tokenizer_config.json,
reference.json (prompt, greedy tokens, the top-1 margin along the path), reference.safetensors
(logits of every position of prompt + greedy tokens)}.

The weights are drawn wider than an initializer's (unit embeddings, O(1) activations, norm
weights and biases away from 1 and 0) and the seed is advanced until every greedy step's top-1
leads the runner-up by MIN_MARGIN (the path is far from ties) and the path has MIN_DISTINCT
different tokens.

    python tools/record_arch_fixtures.py            # all fixtures
    python tools/record_arch_fixtures.py qwen3      # some of them
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "arch"
VOCAB, PROMPT_LEN, NEW = 128, 6, 10
MIN_MARGIN = 0.1
MIN_DISTINCT = 5       # a greedy path that repeats one token proves little
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=None)


def rope(kind: str = "default", theta: float = 10000.0, **kw) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": theta, **kw}}


# name → (config class, overrides): the listed architectures and each RoPE type one of them ships
SPECS = {
    "llama2": ("LlamaConfig", dict(tie_word_embeddings=False, **rope())),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, num_hidden_layers=3, **rope(
        "llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear": ("LlamaConfig", dict(tie_word_embeddings=False, **rope("linear", 10000.0, factor=2.0))),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=2,
                                    hidden_size=48, **rope(theta=100000.0))),
    "mistral": ("MistralConfig", dict(sliding_window=5, num_hidden_layers=3, **rope(theta=1000000.0))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, **rope(theta=1000000.0))),
    "qwen2_yarn": ("Qwen2Config", dict(tie_word_embeddings=False, **rope(
        "yarn", 1000000.0, factor=4.0, original_max_position_embeddings=16))),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=16, **rope(theta=1000000.0))),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True, **rope(theta=2000000.0))),
    "phi3": ("Phi3Config", dict(sliding_window=7, num_key_value_heads=2, pad_token_id=None, **rope())),
    "phi3_longrope": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=None, max_position_embeddings=64,
                                         original_max_position_embeddings=16, **rope(
        "longrope", 10000.0, short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.0, 2.0, 4.0, 8.0]))),
    # past the original length (16): 12 prompt tokens + 12 greedy ones, decoded with the KV cache
    # as transformers generates (a call's frequencies follow its highest position)
    "phi3_longrope_past": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=None, max_position_embeddings=64,
                                              original_max_position_embeddings=16, **rope(
        "longrope", 10000.0, short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.0, 2.0, 4.0, 8.0]))),
    "llama_dynamic": ("LlamaConfig", dict(tie_word_embeddings=False, max_position_embeddings=16,
                                          **rope("dynamic", 10000.0, factor=4.0))),
}
PAST = {"phi3_longrope_past": 12, "llama_dynamic": 12}     # name → prompt length (and tokens generated)


# fixtures that also get a PEFT LoRA (lora/ beside the weights): Qwen2's biased projections,
# Phi-3's fused ones (qkv_proj / gate_up_proj, split per part by infeng)
LORA = {"qwen2": ["q_proj", "k_proj", "v_proj", "down_proj"], "phi3": ["qkv_proj", "gate_up_proj", "o_proj"],
        "qwen3": ["q_proj", "k_proj", "o_proj", "up_proj"]}


def greedy(model, prompt: list[int], new: int = NEW, cached: bool = False) -> tuple[list[int], float, np.ndarray]:
    """(greedy tokens, smallest top-1 lead, logits of every position of prompt + tokens in one
    call). ``cached``: decode with the KV cache, one token per call, as generate() does (RoPE
    that depends on the length then rotates each token by its own call's length)."""
    ids, margins, past = list(prompt), [], None
    with torch.no_grad():
        for _ in range(new):
            if cached:
                out = model(torch.tensor([ids[-1:] if past is not None else ids]), past_key_values=past,
                            use_cache=True)
                past, last = out.past_key_values, out.logits[0, -1]
            else:
                last = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(last.argmax()))
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return ids[len(prompt):], min(margins), logits


def record_lora(name: str, model, prompt: list[int], d: Path) -> None:
    from peft import LoraConfig, get_peft_model
    for seed in range(100):
        torch.manual_seed(5000 + seed)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                              target_modules=LORA[name]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.3)
        toks, margin, logits = greedy(pm, prompt)
        if margin >= MIN_MARGIN and len(set(toks)) >= MIN_DISTINCT:
            break
        model = pm.unload()
    else:
        raise SystemExit(f"{name}: no LoRA seed gave a greedy path clear of ties")
    pm.save_pretrained(d / "lora")
    (d / "lora" / "README.md").unlink(missing_ok=True)
    save_file({"logits": np.ascontiguousarray(logits)}, str(d / "lora" / "reference.safetensors"))
    (d / "lora" / "reference.json").write_text(json.dumps({"greedy": toks, "min_margin": round(margin, 4),
                                                           "seed": seed}, indent=1) + "\n")
    print(f"{name}/lora: greedy {toks}, min margin {margin:.3f}")


def widen(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Redraw every parameter so activations and logits are O(1) and distinct."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[1])))


def sentencepiece_model(text: Path) -> bytes:
    """A 128-piece SentencePiece model trained on ``text``, for llama.cpp's converter, which
    reads tokenizer.model (tools/record_gguf_fixtures.py turns these folders into GGUFs)."""
    import tempfile

    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=f"{tmp}/m", vocab_size=VOCAB, model_type="bpe",
                                       character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       normalization_rule_name="identity", minloglevel=2)   # no 240 KB charsmap
        return Path(f"{tmp}/m.model").read_bytes()


def tokenizer_json() -> str:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def record(name: str, spm_model: bytes) -> None:
    cls_name, overrides = SPECS[name]
    cfg = getattr(transformers, cls_name)(**{**BASE, **overrides})
    for seed in range(300):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(1000 + seed)
        widen(model, gen)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        n = PAST.get(name, PROMPT_LEN)
        prompt = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        toks, margin, logits = greedy(model, prompt, PAST.get(name, NEW), cached=name in PAST)
        if margin >= MIN_MARGIN and len(set(toks)) >= MIN_DISTINCT:
            break
    else:
        raise SystemExit(f"{name}: no seed gave a greedy path of {MIN_DISTINCT} distinct tokens {MIN_MARGIN} clear of ties")
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    (d / "README.md").unlink(missing_ok=True)
    (d / "tokenizer.json").write_text(tokenizer_json())
    (d / "tokenizer.model").write_bytes(spm_model)
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "tokenizer_class": "LlamaTokenizer"}))
    save_file({"logits": np.ascontiguousarray(logits)}, str(d / "reference.safetensors"))
    (d / "reference.json").write_text(json.dumps({
        "architecture": cls_name.replace("Config", "ForCausalLM"), "prompt": prompt, "greedy": toks,
        "min_margin": round(margin, 4), "seed": seed, "transformers": transformers.__version__,
        "torch": torch.__version__}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    print(f"{name}: seed {seed}, greedy {toks}, min margin {margin:.3f}, {size // 1024} KiB")
    if name in LORA:
        record_lora(name, model, prompt, d)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"fixtures to record (default all: {', '.join(SPECS)})")
    ap.add_argument("--text", type=Path, default=Path("../shared/data/text/tinystories_sample.txt"),
                    help="text the fixtures' SentencePiece tokenizer.model is trained on")
    args = ap.parse_args(argv)
    for name in args.names:
        if name not in SPECS:
            raise SystemExit(f"unknown fixture {name!r} (known: {', '.join(SPECS)})")
    model = sentencepiece_model(args.text)
    for name in args.names or SPECS:
        record(name, model)


if __name__ == "__main__":
    main(sys.argv[1:])
