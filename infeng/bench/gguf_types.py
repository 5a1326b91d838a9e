"""GGUF files as users download them, on infeng and on llama.cpp: a synthetic model of a named
architecture exported to GGUF (infeng.converters.gguf_write) and quantized by llama.cpp's own
quantizer (``llama_model_quantize``, llamacpp_kld.quantize_gguf) to each file type, then
converted by infeng (``infeng convert``'s path, cached beside the GGUF). Per type: both files'
sizes, infeng's resident memory after loading it (a fresh process: RSS growth from load to a
ready forward pass, against the file size plus the KV cache), and prefill / decode speed of both
engines side by side in one run (the scenario suite, A B A B).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from infeng import format as native
from infeng.bench import synthetic
from infeng.bench.llamacpp_kld import FTYPES, quantize_gguf
from infeng.bench.peers import PeerSkip
from infeng.bench import suite as scenario_suite   # a module import: suite imports comparisons, which imports this
from infeng.converters import gguf_write
from infeng.converters.gguf_file import GGUFFile
from infeng.errors import InfengError
from infeng.model.loader import load_gguf, load_model

# A fresh interpreter loads the model, builds the C view and a KV cache of argv[2] positions and
# runs one decode step (every weight read once); it prints its RSS (kB) after the imports and
# after the step, and the KV cache's bytes.
_RSS_PROBE = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
from infeng import kernels
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.runtime.kv import KVCache
kern = kernels.active()
r0 = rss()
m = load_model(sys.argv[1], verify=False)
c = LlamaC(kern, m, 1, 1, int(sys.argv[3]))
kv = KVCache(kern, m.config, 1, int(sys.argv[2]))
kv.ensure(0, 1)
c.tokens[0], c.pos[0], c.seq[0], c.out_rows[0] = 1, 0, 0, 0
c.step(kv, 1, 1)
print(json.dumps({"before_kb": r0, "after_kb": rss(), "kv_bytes": int(kv.bytes)}))
"""


def convert(gguf: Path) -> Path:
    """The GGUF converted to an infeng file (cached next to it while newer than it and in layouts
    this build reads: a build with another kernel layout converts again)."""
    out = gguf.with_suffix(".infeng")
    if out.exists() and out.stat().st_mtime >= gguf.stat().st_mtime:
        try:
            load_model(out, verify=False)
            return out
        except InfengError:
            pass
    model, _ = load_gguf(gguf)
    native.write(out, model.manifest(), model.native_tensors())
    return out


def resident(path: Path, ctx: int, threads: int) -> dict[str, float]:
    """RSS growth of a fresh process from loading ``path`` to a ready forward pass with a KV
    cache of ``ctx`` positions, against the file's size plus the KV cache's bytes."""
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(ctx), str(threads)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise InfengError(f"{path}: the memory probe failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (d["after_kb"] - d["before_kb"]) * 1024
    size = path.stat().st_size
    return {"rss_load_mb": grown / 2**20, "kv_mb": d["kv_bytes"] / 2**20,
            "rss_vs_file_kv": grown / (size + d["kv_bytes"])}


def _types(g: GGUFFile) -> str:
    from collections import Counter
    return ", ".join(f"{t} {n}" for t, n in Counter(t.type_name for t in g.tensors.values()).most_common())


def run(arch: str, types: list[str], threads: int, repeats: int, prefill: int, decode: int,
        log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], list[str]]:
    bad = [t for t in types if t not in FTYPES]
    if bad:
        raise InfengError(f"types: unknown llama.cpp type {bad[0]!r} (known: {', '.join(FTYPES)})")
    if arch not in synthetic.ARCHS:
        raise InfengError(f"model: {arch!r} is not a synthetic architecture ({', '.join(sorted(synthetic.ARCHS))})")
    base_path = synthetic.make(arch, "bf16")
    try:
        src = gguf_write.export_cached(load_model(base_path, verify=False), synthetic.gguf_cache_dir(), base_path)
    except InfengError as e:
        return [], [f"the GGUF export failed: {e}"]
    records, notes = [], []
    for ft in types:
        try:
            gguf = quantize_gguf(src, ft, threads)
        except PeerSkip as e:
            notes.append(f"{ft} skipped: {e}")
            continue
        path = convert(gguf)
        g = GGUFFile(gguf)
        rec: dict[str, Any] = {"type": ft, "gguf_mb": gguf.stat().st_size / 2**20,
                               "infeng_mb": path.stat().st_size / 2**20, "gguf_tensors": _types(g),
                               "infeng_tensors": _count_native(path)}
        rec["size_ratio"] = rec["infeng_mb"] / rec["gguf_mb"]
        rec.update(resident(path, prefill + decode, threads))
        suite = scenario_suite.Suite(model=str(path), threads=threads, repeats=repeats, peers=["llama.cpp"], gguf=str(gguf),
                      scenarios=[scenario_suite.Scenario("prefill", {"tokens": prefill}),
                                               scenario_suite.Scenario("decode", {"tokens": decode, "depth": 0})])
        results, meta = scenario_suite.run_suite(suite, notes=notes)
        for kind in ("prefill", "decode"):
            by = {r.runner: r.median for r in results if r.scenario.kind == kind and r.values}
            rec[f"{kind}_tok_s"] = by.get("infeng")
            rec[f"{kind}_llamacpp_tok_s"] = by.get("llama.cpp")
            rec[f"{kind}_ratio"] = by["infeng"] / by["llama.cpp"] if "infeng" in by and "llama.cpp" in by else None
        # decode's bytes a step ÷ its time, as % of the run's read bandwidth: 100 ÷ llama.cpp's figure
        # is the lead of an engine decoding at the probe's rate
        rec["bandwidth_gb_s"] = meta.get("bandwidth_gb_s")
        roof = {r.runner: r.extra.get("roofline_pct") for r in results if r.scenario.kind == "decode" and r.values}
        rec["decode_pct_of_bw"], rec["decode_llamacpp_pct_of_bw"] = roof.get("infeng"), roof.get("llama.cpp")
        log(f"{ft:7s} GGUF {rec['gguf_mb']:7.1f} MiB, infeng {rec['infeng_mb']:7.1f} MiB ({rec['size_ratio']:.3f}x); "
            f"RSS after load {rec['rss_load_mb']:.0f} MiB = {rec['rss_vs_file_kv']:.3f}x file + KV; "
            f"pp{prefill} {_x(rec['prefill_ratio'])}, decode {_x(rec['decode_ratio'])} llama.cpp")
        records.append(rec)
    return records, notes


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _count_native(path: Path) -> str:
    from collections import Counter
    f = native.NativeFile(path, verify=False)
    return ", ".join(f"{t} {n}" for t, n in Counter(f.dtypes.values()).most_common())
