"""Re-record tests/fixtures/gguf/: stories260K-f32 converted to GGUF (q8_0) by llama.cpp's
own convert_hf_to_gguf.py, so the tests check that infeng reads what llama.cpp writes.

llama.cpp's converter (and the gguf-py it imports) come from the llama-cpp-python source package;
it needs torch, so it runs in a separate reference venv, never in infeng's:

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/gguf/sdist
    tar xzf /tmp/gguf/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/gguf/sdist
    python -m venv /tmp/gguf/ref
    /tmp/gguf/ref/bin/pip install torch==2.13.0 numpy sentencepiece transformers safetensors pyyaml
    /tmp/gguf/ref/bin/pip install -e /tmp/gguf/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
    python tools/record_gguf_fixtures.py --llama-cpp /tmp/gguf/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --python /tmp/gguf/ref/bin/python --data ../shared/data

It also converts every tiny architecture checkpoint of tests/fixtures/arch/ (written by
tools/record_arch_fixtures.py) to q8_0: tests/fixtures/gguf/arch/<name>-q8_0.gguf. (infeng's venv
with the `ref` extra can serve as the reference python, with PYTHONPATH=<llama.cpp>/gguf-py.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gguf"
ARCH = OUT.parent / "arch"
TYPES = ("q8_0",)   # an f32 GGUF would be a plain copy of the shared weights: not committed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    ap.add_argument("--python", default=sys.executable, help="python with torch + gguf-py (the reference venv)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    args = ap.parse_args()
    script = args.llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"error: {script}: no such file")
    src = args.data / "stories260K-f32"
    OUT.mkdir(parents=True, exist_ok=True)
    package = args.llama_cpp.resolve().parents[1].name          # e.g. llama_cpp_python-0.3.36
    record = {"converter": f"{package}/vendor/llama.cpp/convert_hf_to_gguf.py", "source": "stories260K-f32", "files": {}}
    for t in TYPES:
        out = OUT / f"stories260K-{t}.gguf"
        subprocess.run([args.python, str(script), str(src), "--outtype", t, "--outfile", str(out)], check=True)
        record["files"][out.name] = {"outtype": t, "bytes": out.stat().st_size,
                                     "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    arch_out = OUT / "arch"
    arch_out.mkdir(exist_ok=True)
    for src in sorted(p for p in ARCH.iterdir() if (p / "config.json").is_file()):
        out = arch_out / f"{src.name}-q8_0.gguf"
        subprocess.run([args.python, str(script), str(src), "--outtype", "q8_0", "--outfile", str(out)], check=True)
        record["files"][f"arch/{out.name}"] = {"outtype": "q8_0", "source": f"tests/fixtures/arch/{src.name}",
                                               "bytes": out.stat().st_size,
                                               "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    (OUT / "SOURCES.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
