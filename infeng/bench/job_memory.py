"""Peak memory of a batch job against its input's length.

    infeng bench --suite bench/job_memory.yaml --model MODEL     (kind: job_memory)

Writes N short requests (a few prompt tokens, ``--max-tokens`` each), runs
``infeng generate --batch`` on them in a fresh process per size (so each peak RSS is its own)
and prints wall time, tokens/s and peak RSS per size, and the largest size's RSS over the
smallest's. ``whole_file: true`` runs the same requests through the pre-job path (the file read into
memory, every result kept to the end: infeng.runtime.batch.run_batch) beside it, for contrast.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infeng.errors import InfengError

PROMPTS = ["Once upon a time", "Lily", "The little dog", "Tom and Sue", "One day", "The sun was"]


def write_requests(path: Path, n: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                "temperature": 0}) + "\n")


def run_job(model: str, req: Path, out: Path, tel: Path, max_batch: int) -> dict:
    cmd = [sys.executable, "-m", "infeng.cli.main", "generate", model, "--batch", str(req), "-o", str(out),
           "--max-batch", str(max_batch), "--threads", "1", "--seed", "1", "--telemetry", str(tel)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise InfengError(f"job_memory: {' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(tel.read_text())["metrics"]


WHOLE_FILE = """
import json, sys, time
from infeng.model.loader import load_model
from infeng.runtime.batch import read_requests, run_batch
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer
from infeng.telemetry import peak_rss_mb
from pathlib import Path
model, req, out, mb = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
m = load_model(model)
tok = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
t0 = time.perf_counter()
items = read_requests(req, SamplingParams(seed=1).validated(), tok)
e = Engine(m, threads=1, max_batch=mb, tokenizer=tok, detokenize=False, max_queue=len(items) + 1)
records, results = run_batch(e, items, "m")
out.write_text("".join(json.dumps(r) + "\\n" for r in records))
wall = time.perf_counter() - t0
gen = sum(len(r.token_ids) for r in results)
print(json.dumps({"wall_s": wall, "aggregate_tok_s": gen / wall, "peak_rss_mb": peak_rss_mb()}))
"""


def run_whole_file(model: str, req: Path, out: Path, max_batch: int) -> dict:
    r = subprocess.run([sys.executable, "-c", WHOLE_FILE, model, str(req), str(out), str(max_batch)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise InfengError(f"job_memory: whole-file run failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(model: str, sizes: list[int], max_tokens: int, max_batch: int, whole_file: bool,
        log=print) -> list[dict]:
    """One record per size (and per path with ``whole_file``), then each path's RSS ratio."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            req = Path(d) / f"r{n}.jsonl"
            write_requests(req, n, max_tokens)
            t0 = time.perf_counter()
            m = run_job(model, req, Path(d) / "o.jsonl", Path(d) / "t.json", max_batch)
            rows.append({"path": "job", "requests": n, "wall_s": time.perf_counter() - t0,
                         "aggregate_tok_s": m["aggregate_tok_s"], "peak_rss_mb": m["peak_rss_mb"]})
            log(_fmt(rows[-1]))
            if whole_file:
                m = run_whole_file(model, req, Path(d) / "o.jsonl", max_batch)
                rows.append({"path": "whole-file", "requests": n, **m})
                log(_fmt(rows[-1]))
            req.unlink()
    for path in ("job", "whole-file"):
        rs = [r for r in rows if r["path"] == path]
        if len(rs) > 1:
            rows.append({"path": path, "rss_ratio": rs[-1]["peak_rss_mb"] / rs[0]["peak_rss_mb"],
                         "requests": rs[-1]["requests"], "over_requests": rs[0]["requests"]})
            log(f"{path}: peak RSS at {rs[-1]['requests']} requests / at {rs[0]['requests']}: {rows[-1]['rss_ratio']:.3f}")
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['path']:>10}  {r['requests']:>8} requests  {r['wall_s']:8.1f} s  {r['aggregate_tok_s']:8.0f} tok/s  "
            f"peak RSS {r['peak_rss_mb']:7.1f} MB")
