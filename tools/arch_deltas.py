"""Print, per architecture fixture (tests/fixtures/arch), infeng's max |Δlogit| against the
transformers logits recorded there (absolute, and relative to the largest |logit|) for the numpy
reference and the C pass on each ISA, and whether greedy decoding gives transformers' tokens.

    python tools/arch_deltas.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from infeng import kernels
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.kv import KVCache

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "arch"


def c_logits(kern, model, toks, start, net, kv):
    T = len(toks)
    net.tokens[:T], net.pos[:T], net.seq[:T] = toks, range(start, start + T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    return net.logits[:T].copy()


def c_run(kern, model, prompt, n, seq):
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=2)
    kv = KVCache(kern, model.config, n_slots=2, max_seq_len=32, block_size=4)
    kv.ensure(0, 32)
    logits = c_logits(kern, model, seq, 0, net, kv)
    kv2 = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
    kv2.ensure(0, 32)
    last, out = c_logits(kern, model, prompt, 0, net, kv2)[-1], []
    for _ in range(n):
        out.append(int(np.argmax(last)))
        last = c_logits(kern, model, [out[-1]], len(prompt) + len(out) - 1, net, kv2)[0]
    return logits, out


def main() -> None:
    isas = kernels.supported_isas()
    print(f"{'fixture':14} {'arch':8} {'variant':9} {'max|Δ|':>9} {'rel':>9}  greedy")
    for d in sorted(p for p in FIXTURES.iterdir() if (p / "reference.json").is_file()):
        ref = json.loads((d / "reference.json").read_text())
        want = load_file(str(d / "reference.safetensors"))["logits"]
        model = load_model(d)
        seq, n = ref["prompt"] + ref["greedy"], len(ref["greedy"])
        rm = ReferenceModel(model)
        rows = [("numpy", rm.forward(seq), rm.greedy(ref["prompt"], n))]
        for isa in isas:
            rows.append((isa, *c_run(kernels.load(isa), model, ref["prompt"], n, seq)))
        for variant, got, greedy in rows:
            delta = float(np.abs(got - want).max())
            print(f"{d.name:14} {model.config.arch:8} {variant:9} {delta:9.2e} {delta / np.abs(want).max():9.2e}  "
                  f"{'equal' if greedy == ref['greedy'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
