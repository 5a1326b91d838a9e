"""Record llama.cpp's view of the real model (SmolLM2-135M-Instruct Q4_1, `make model`) into
tests/fixtures/smollm2/llamacpp.json, so the default test run needs no llama.cpp:

- the token ids llama.cpp's tokenizer gives for a set of texts (special tokens parsed);
- ten prompts — chats rendered by llama-cpp-python's own Jinja formatter from the GGUF's template,
  and plain text — with their token ids and llama.cpp's first 32 greedy tokens (end-of-turn
  tokens do not stop it: 32 tokens each, so every position is compared).

    .venv/bin/python tools/record_smollm2_fixture.py [--reference-only] [GGUF]    # the `peers` extra

and, as the yardstick for infeng's agreement, how well llama.cpp itself agrees with those tokens
when it keeps K/V in f32 as infeng does (teacher-forced and free-running).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "smollm2" / "llamacpp.json"
N_GREEDY = 32

TEXTS = [
    "Hello world! 123", "  multiple   spaces", "The year 2024 had 366 days; pi is 3.14159.",
    "Café déjà vu — naïve façade, Ünïcödé ß", "e\u0301 (decomposed) vs \u00e9", "日本語のテキストと中文",
    "emoji 🙂🙃 and 👩‍💻", "def f(x):\n    return x ** 2  # square\n", "tabs\tand\r\nCRLF\n\n\nnewlines",
    "don't I'll we've THEY'RE it's", "1,000,000 and 0xFF and 1e-5", "   leading and trailing   ",
    "https://example.com/path?q=1&r=2", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b", "",
]


def self_reference(gguf: Path, prompts: list[dict]) -> dict:
    """How well llama.cpp agrees with its own recorded tokens when it keeps K/V in f32 (as infeng
    does; its default is f16): the noise floor infeng's agreement is judged against."""
    import llama_cpp

    from infeng.bench.llamacpp_agreement import agreement, llamacpp_greedy
    from infeng.bench.llamacpp_kld import LlamaCppScorer
    sc = LlamaCppScorer(gguf, 512, 1)
    exact, gaps = 0, []
    for p in prompts:
        n = len(p["prompt_ids"])
        for row, want in zip(sc.logits(p["prompt_ids"] + p["greedy"][:-1])[n - 1:], p["greedy"]):
            exact += int(row.argmax()) == want
            gaps.append(float(row.max() - row[want]))
    free = agreement(llamacpp_greedy(sc.llm, llama_cpp, [p["prompt_ids"] for p in prompts], N_GREEDY),
                     [p["greedy"] for p in prompts])
    sc.close()
    return {"teacher_forced_equal": exact, "max_gap": max(gaps), "free_running": free}


def main(argv: list[str]) -> int:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SMOLLM2

    from infeng.bench.llamacpp_agreement import CHATS, PLAIN, llamacpp_greedy
    gguf = Path(argv[-1]) if argv and argv[-1] != "--reference-only" else SMOLLM2
    if "--reference-only" in argv:      # recompute only the f32-K/V self-agreement of an existing fixture
        rec = json.loads(OUT.read_text())
        rec["llamacpp_f32_kv"] = self_reference(gguf, rec["prompts"])
        OUT.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n")
        print(rec["llamacpp_f32_kv"])
        return 0
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=1, logits_all=False,
                          verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=True, special=True) if text else []

    md = llm.metadata
    fmt = Jinja2ChatFormatter(md["tokenizer.chat_template"], eos_token=llm._model.token_get_text(llm.token_eos()),
                              bos_token=llm._model.token_get_text(llm.token_bos()), add_generation_prompt=True)
    prompts = [{"messages": m, "text": fmt(messages=m).prompt} for m in CHATS] + [{"text": t} for t in PLAIN]
    for p in prompts:
        p["prompt_ids"] = tokenize(p["text"])
        (p["greedy"],) = llamacpp_greedy(llm, llama_cpp, [p["prompt_ids"]], N_GREEDY)
        print(repr(p["text"][-40:]), "→", repr(llm.detokenize(p["greedy"]).decode(errors="replace")[:80]))
    llm.close()
    rec = {"llama_cpp_python": llama_cpp.__version__,
           "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "n_greedy": N_GREEDY,
           "tokenize": [{"text": t, "ids": tokenize(t)} for t in TEXTS], "prompts": prompts}
    rec["llamacpp_f32_kv"] = self_reference(gguf, prompts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
