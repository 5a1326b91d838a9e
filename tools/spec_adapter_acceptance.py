"""A draft model without the adapter, verifying for a target with it: how much acceptance drops.

The target is the model file itself (with and without a random rank-R LoRA adapter on every
projection); the draft is its q4_0 copy, which never sees the adapter. Greedy, so output must equal
the non-speculative run's either way; acceptance is a count, not a timing.
    python tools/spec_adapter_acceptance.py out/smollm2.infeng [--rank 16] [-n 64] [-k 4]
"""
from __future__ import annotations

import argparse

from infeng.bench import synthetic
from infeng.bench.spec_bench import _greedy, _one, load_prompts, prompt_ids, requantized
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.speculate import SpecConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", default="bench/spec_prompts.jsonl")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    a = ap.parse_args()
    target = load_model(a.model, verify=False)
    adapter = synthetic.make_adapter(a.model, a.rank)
    plain = Engine(target, threads=2, max_batch=1, detokenize=False)
    spec = Engine(target, threads=2, max_batch=1, detokenize=False,
                  speculate=SpecConfig("draft", k=a.k, draft_model=requantized(target, "q4_0")))
    for e in (plain, spec):
        e.load_adapter(adapter, "a")
    for name in (None, "a"):
        d0, a0, same = spec.spec.stats.drafted, spec.spec.stats.accepted, True
        for p in load_prompts(a.prompts):
            ids = prompt_ids(plain.tokenizer, p)
            runs = [_one(e, Request("r", prompt_ids=ids, params=_greedy(a.n), adapter=name)) for e in (plain, spec)]
            same &= runs[0].token_ids == runs[1].token_ids
        d, acc = spec.spec.stats.drafted - d0, spec.spec.stats.accepted - a0
        print(f"adapter={name or 'none'} rank={a.rank if name else 0}: drafted {d}, accepted {acc}, "
              f"acceptance {acc / max(d, 1):.3f}, tokens equal to non-speculative: {same}")


if __name__ == "__main__":
    main()
