"""Write a model's weights dequantized to f32 (the same trained values, no block rounding left in
the forward pass): a KV-cache quality baseline whose logits do not jump with every one-ulp
change of an activation, as a Q4_1 model's (its products round each activation to int8) do.

    python tools/dequantize_model.py out/smollm2.infeng -o out/smollm2-f32.infeng
"""
from __future__ import annotations

import argparse
from pathlib import Path

from infeng import format as native
from infeng.model.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args()
    model = load_model(a.src)
    out = model.derived({name: ("f32", model.f32(name)) for name in model.tensors})
    native.write(a.output, out.manifest(), out.native_tensors())
    print(f"wrote {a.output} ({a.output.stat().st_size / 2**20:.0f} MiB, f32 from {model.weight_dtype})")


if __name__ == "__main__":
    main()
