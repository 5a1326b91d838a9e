"""Load benchmark of `infeng serve`: N concurrent streaming clients over a Zipf mix of adapters.

    infeng bench --suite bench/serve/load.yaml [--model M --threads N] [--json out.json]   (kind: serve_load)

The config names the model (a synthetic architecture or a model path), its adapters (random
rank-r ones for a synthetic base, or a directory of .infeng-lora files), the server's settings and
a seeded trace: per request an adapter drawn by Zipf(α) over the adapters (rank 1 most popular),
prompt and output lengths drawn uniformly from their ranges (prompts are random token ids; output
lengths are exact, with ignore_eos). ``time_limit_s`` bounds each level: requests not yet sent
when it passes are left out (reported as ``unsent``). The server is started on 127.0.0.1 on a free port; for each
concurrency level, that many closed-loop clients work through the trace. Reported per level:
aggregate generated tokens/s, TTFT and inter-token latency p50/p99, 429s and their latency p99,
errors, and whether every accepted request got exactly one complete response (one finish per
choice, one [DONE], the usage's token count equal to the length asked for). Then the server's
overhead: one client's tokens/s through HTTP streaming over the engine's own, in turns.
Inter-token gaps are measured at the client, per chunk received (chunks that arrive together
count as 0).
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infeng.bench import synthetic
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer
from infeng.telemetry import percentile

DEFAULTS = {"model": "tinyllama-1.1b", "dtype": "q8_0", "threads": 2, "max_batch": 32, "max_queue": 64,
            "adapters": 8, "rank": 16, "adapters_dir": "", "zipf_alpha": 1.0, "concurrency": [1, 8, 32],
            "requests": 64, "prompt_tokens": [32, 128], "output_tokens": [16, 64], "seed": 0, "ctx": 512,
            "overload": 0.0, "overhead_repeats": 5, "overhead_tokens": 256, "time_limit_s": 0.0}
INFENG_EXTRA = {"ignore_eos": True, "stream_options": {"include_usage": True}}


@dataclass
class Outcome:
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list = field(default_factory=list)
    tokens: int = 0
    complete: bool = False
    error: str | None = None
    cut: bool = False           # still running when the level's time limit passed: closed there


def trace(cfg: dict, names: list[str], vocab: int) -> list[dict]:
    """The seeded request list: adapter by Zipf rank, prompt ids, output length."""
    rng = np.random.default_rng(cfg["seed"])
    w = 1.0 / np.arange(1, len(names) + 1) ** cfg["zipf_alpha"]
    picks = rng.choice(len(names), cfg["requests"], p=w / w.sum())
    (p0, p1), (o0, o1) = cfg["prompt_tokens"], cfg["output_tokens"]
    return [{"model": names[k], "prompt": rng.integers(3, vocab, rng.integers(p0, p1 + 1)).tolist(),
             "max_tokens": int(rng.integers(o0, o1 + 1))} for k in picks]


def one(port: int, req: dict, extra: dict | None = None, stop_at: float | None = None) -> Outcome:
    """One streaming completion, timed; checks it is one complete response. ``extra``: body
    fields of the server's own (infeng: ignore_eos and usage in the stream; a peer that has
    neither: an EOS logit bias, and a 'length' finish vouches for the token count). Past
    ``stop_at`` (perf_counter) the request is closed and marked ``cut``, not failed."""
    out = Outcome()
    body = dict(req, stream=True, temperature=0, **(INFENG_EXTRA if extra is None else extra))
    t0 = time.perf_counter()

    def left() -> float:
        return 600.0 if stop_at is None else max(0.05, stop_at - time.perf_counter())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=left())
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        sock = conn.sock            # the response may take it over (conn.sock is then None)
        r = conn.getresponse()
        out.status = r.status
        if r.status != 200:
            out.error = f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}"
            return out
        last, finishes, done, usage, reason, chunks = None, 0, 0, None, None, 0
        for raw in r:
            if stop_at is not None:
                if time.perf_counter() > stop_at:
                    out.cut = True
                    break
                sock.settimeout(left())
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                out.error = ev["error"].get("message")
                continue
            now = time.perf_counter()
            for ch in ev.get("choices") or []:
                if ch.get("text"):
                    chunks += 1
                    out.tokens = chunks         # so far (a cut request keeps its count)
                    if out.ttft_s is None:
                        out.ttft_s = now - t0
                    elif last is not None:
                        out.itl_s.append(now - last)
                    last = now
                if ch.get("finish_reason"):
                    finishes += 1
                    reason = ch["finish_reason"]
            usage = ev.get("usage") or usage
        if usage:
            out.tokens = usage["completion_tokens"]
        else:
            out.tokens = req["max_tokens"] if reason == "length" else chunks
        out.complete = finishes == 1 and done == 1 and out.tokens == req["max_tokens"] and out.error is None
    except (OSError, http.client.HTTPException, ValueError) as e:
        if stop_at is not None and time.perf_counter() >= stop_at:
            out.cut = True
        else:
            out.error = str(e)
    finally:
        out.latency_s = time.perf_counter() - t0
        conn.close()
    return out


def run_level(port: int, reqs: list[dict], concurrency: int, extra: dict | None = None,
              time_limit_s: float = 0.0) -> dict[str, Any]:
    """``concurrency`` closed-loop clients through ``reqs``. With a time limit, requests not sent
    when it passes are left out (``unsent``) and those still running are closed (``cut``: their
    tokens so far count; one with no token yet counts its wait as its TTFT, a lower bound)."""
    t0 = time.perf_counter()
    stop_at = t0 + time_limit_s if time_limit_s > 0 else None

    def send(r: dict) -> Outcome | None:
        return None if stop_at is not None and time.perf_counter() > stop_at else one(port, r, extra, stop_at)
    with ThreadPoolExecutor(concurrency) as ex:
        sent = list(ex.map(send, reqs))
    outs = [o for o in sent if o is not None]
    wall = time.perf_counter() - t0
    ok = [o for o in outs if o.status == 200 or (o.cut and o.status in (0, 200))]
    cut = [o for o in ok if o.cut]
    limited = [o for o in outs if o.status == 429]
    ttft = [(o.ttft_s if o.ttft_s is not None else o.latency_s) * 1e3 for o in ok if o.ttft_s is not None or o.cut]
    itl = [x * 1e3 for o in ok for x in o.itl_s]
    failed = [o for o in outs if not o.cut and o.status != 429 and (o.status != 200 or o.error)]   # a 429 is an answer
    errors = len(failed)
    return {"concurrency": concurrency, "requests": len(outs), "unsent": len(sent) - len(outs), "cut": len(cut),
            "accepted": len(ok), "rejected_429": len(limited),
            "errors": errors, "all_complete": errors == 0 and all(o.complete or o.cut for o in ok), "wall_s": wall,
            "tok_s": sum(o.tokens for o in ok) / wall,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
            "429_ms_p99": percentile([o.latency_s * 1e3 for o in limited], 99),
            "first_error": next((o.error or f"HTTP {o.status}" for o in failed), None)}


def overload(srv: "ServerProcess", reqs: list[dict], capacity: int, factor: float) -> dict[str, Any]:
    """``factor`` × ``capacity`` closed-loop clients (no back-off: a refused client sends its next
    request at once) over the trace repeated to 3 × that many requests. Every request must end
    as one complete response or one 429; reported: the 429s' latency, a /health probe's latency
    meanwhile (the event loop's own responsiveness, every 20 ms), the server's peak RSS."""
    clients = max(1, round(factor * capacity))
    todo = [reqs[i % len(reqs)] for i in range(3 * clients)]
    stop = threading.Event()
    health, rss = [], [_rss_kb(srv.p.pid)]

    def probe():  # probes first, then every 20 ms: a level over within 20 ms still gets one
        while True:
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            try:
                conn.request("GET", "/health")
                conn.getresponse().read()
                health.append((time.perf_counter() - t0) * 1e3)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            rss.append(_rss_kb(srv.p.pid))
            if stop.wait(0.02):
                return
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    try:
        row = run_level(srv.port, todo, clients)
    finally:
        stop.set()
        th.join(30)
    answered = row["accepted"] + row["rejected_429"]
    row.update(concurrency=f"overload {factor:g}x ({clients} clients, capacity {capacity})",
               lost=len(todo) - answered, health_ms_p50=percentile(health, 50), health_ms_p99=percentile(health, 99),
               rss_mb_start=rss[0] / 1024, rss_mb_peak=max(rss) / 1024)
    row["all_complete"] = row["all_complete"] and row["lost"] == 0
    return row


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def overhead(port: int, model: Path, name: str, cfg: dict, repeats: int = 5, n_out: int = 256) -> dict[str, float]:
    """Single-client tokens/s (a short prompt, ``n_out`` tokens: mostly decode; request sent to
    last token received) through HTTP streaming over the engine's driven in this process (what
    `infeng generate` does), same prompt, alternating A B A B; medians."""
    eng = Engine(load_model(model, verify=False), threads=cfg["threads"], max_batch=cfg["max_batch"], max_seq_len=cfg["ctx"])
    prompt = list(range(3, 35))
    direct, http = [], []
    for _ in range(repeats):
        r = next(eng.generate([Request(id="x", prompt_ids=prompt, params=SamplingParams(
            max_tokens=n_out, temperature=0, ignore_eos=True))]))
        direct.append(len(r.token_ids) / (r.t_done - r.t_submit))
        o = one(port, {"model": name, "prompt": prompt, "max_tokens": n_out})
        http.append(o.tokens / o.latency_s if o.complete else float("nan"))
    d, h = float(np.median(direct)), float(np.median(http))
    return {"engine_tok_s": d, "http_stream_tok_s": h, "ratio": h / d}


def prepare(cfg: dict) -> tuple[Path, Path | None, list[str]]:
    """The model file, an adapters directory and the served names (base first)."""
    m = Path(cfg["model"])
    if m.exists():
        model = m
    elif cfg["model"] in synthetic.ARCHS:
        model = synthetic.make(cfg["model"], cfg["dtype"])
    else:
        raise InfengError(f"model {cfg['model']!r} is neither a file nor a synthetic architecture ({', '.join(sorted(synthetic.ARCHS))})")
    if cfg["adapters_dir"]:
        d = Path(cfg["adapters_dir"])
        if not d.is_dir():
            raise InfengError(f"{d}: no such directory (adapters_dir)")
    else:
        d = synthetic.cache_dir() / f"{model.stem}.serve-r{cfg['rank']}-x{cfg['adapters']}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(cfg["adapters"]):
            f = d / f"tenant-{i}.infeng-lora"
            src = synthetic.make_adapter(model, cfg["rank"], seed=100 + i)     # remade when stale
            if not f.is_symlink():
                f.symlink_to(src)
    names = sorted(p.name[:-len(".infeng-lora")] for p in d.glob("*.infeng-lora"))
    return model, d, names


class ServerProcess:
    """A server as a child process on 127.0.0.1, ready when ``ready(line)`` returns its port (a
    stderr line) or, with ``port`` given, when GET ``probe`` answers 200; stopped (SIGTERM, then
    SIGKILL) on exit. Every wait is bounded."""

    def __init__(self, cmd: list[str], what: str, port: int | None = None, probe: str = "/v1/models",
                 timeout_s: float = 300.0):
        self.cmd, self.what, self.port, self.probe, self.timeout_s = cmd, what, port, probe, timeout_s
        self.p: subprocess.Popen | None = None
        self.tail: list[str] = []

    def __enter__(self) -> "ServerProcess":
        self.p = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        found = threading.Event()

        def pump():                      # keeps reading stderr so the child never blocks on it
            for line in self.p.stderr:
                self.tail = (self.tail + [line])[-20:]
                if self.port is None and "listening on http://127.0.0.1:" in line:
                    self.port = int(line.split("127.0.0.1:")[1].split()[0])
                    found.set()
            found.set()
        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        try:
            if self.port is None:
                found.wait(self.timeout_s)
            while self.port is not None and time.monotonic() < deadline and self.p.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.25)
            code = self.p.poll()
            why = f"exited with {code}" if code is not None else f"did not start within {self.timeout_s:.0f} s"
            raise InfengError(f"{self.what} {why}: " + " | ".join(x.strip() for x in self.tail[-3:]))
        except BaseException:
            self.__exit__()
            raise

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", self.probe)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def __exit__(self, *exc) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def infeng_server(model: Path, adir: Path | None, cfg: dict) -> ServerProcess:
    cmd = [sys.executable, "-m", "infeng.cli.main", "serve", str(model), "--port", "0", "--threads", str(cfg["threads"]),
           "--max-batch", str(cfg["max_batch"]), "--max-queue", str(cfg["max_queue"]), "--ctx", str(cfg["ctx"]),
           "--log-level", "warning", "--served-model-name", model.stem, "--no-verify"]
    if adir is not None:
        cmd += ["--adapters-dir", str(adir)]
    return ServerProcess(cmd, "infeng serve")


def run(cfg: dict, log=print) -> tuple[list[dict], list[str]]:
    """One record per concurrency level, then the overhead record; a note for each level whose
    requests were not all complete and error-free."""
    model, adir, names = prepare(cfg)
    m = load_model(model, verify=False)
    vocab = min(m.config.vocab_size, Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids).vocab_size)
    reqs = trace(cfg, names or [model.stem], vocab)
    with infeng_server(model, adir, cfg) as srv:
        rows = [run_level(srv.port, reqs, c, time_limit_s=cfg["time_limit_s"]) for c in cfg["concurrency"]]
        if cfg["overload"] > 0:
            rows.append(overload(srv, reqs, cfg["max_batch"] + cfg["max_queue"], cfg["overload"]))
            r = rows[-1]
            log(f"{r['concurrency']}: {r['accepted']} accepted, {r['rejected_429']} refused (429 p99 "
                f"{r['429_ms_p99']:.1f} ms; /health p99 {r['health_ms_p99']:.1f} ms), {r['lost']} lost, "
                f"RSS {r['rss_mb_start']:.0f} → peak {r['rss_mb_peak']:.0f} MB")
        over = overhead(srv.port, model, model.stem, cfg, cfg["overhead_repeats"], cfg["overhead_tokens"]) \
            if cfg["overhead_repeats"] else None
    log(f"model {model.name}, {len(names)} adapters, Zipf α={cfg['zipf_alpha']}, {cfg['requests']} requests per level")
    if over is None:
        return rows, incomplete_notes(rows)
    log(f"single client, {cfg['overhead_tokens']} tokens: engine in-process {over['engine_tok_s']:.1f} tok/s, through HTTP "
        f"streaming {over['http_stream_tok_s']:.1f} tok/s ({over['ratio']:.1%})")
    return rows + [{"concurrency": "overhead", **over}], incomplete_notes(rows)


def incomplete_notes(rows: list[dict]) -> list[str]:
    return [f"concurrency {r['concurrency']}: not every request complete and error-free"
            + (f" (first error: {r['first_error']})" if r["first_error"] else "")
            for r in rows if not (r["all_complete"] and not r["errors"])]
