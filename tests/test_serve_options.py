"""`infeng serve` and `infeng chat` with the engine options they share with `generate`:
speculative decoding (--speculate, --draft) and the KV cache's types (--kv-dtype, --kv-policy,
--kv-rotate). Greedy output through the server with speculation is the output without it; a
quantized KV cache serves exactly what the engine with that cache computes, and says so in
/v1/models and /metrics."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_serve import ServerProc, model_file  # noqa: E402,F401  (the module fixture)

from infeng.cli.main import main  # noqa: E402
from infeng.model.loader import load_model  # noqa: E402
from infeng.runtime.engine import Engine, Request  # noqa: E402
from infeng.runtime.sampler import SamplingParams  # noqa: E402

# prompts whose greedy continuations repeat themselves (stories260K loops), so lookup drafts land
PROMPTS = ["Once upon a time", "Lily and Ben went to the park. Lily and Ben", "The little dog"]


def greedy(srv: ServerProc, prompt: str, n: int = 48, stream: bool = False) -> str:
    c = srv.client(key="unused-key")
    if not stream:
        return c.completions.create(model="story", prompt=prompt, max_tokens=n, temperature=0).choices[0].text
    return "".join(ch.choices[0].text for ch in c.completions.create(model="story", prompt=prompt, max_tokens=n,
                                                                       temperature=0, stream=True) if ch.choices)


def test_speculation_serves_the_same_greedy_text(model_file):
    model, _ = model_file
    plain = ServerProc([str(model), "--threads", "1", "--max-batch", "4"])
    try:
        want = [greedy(plain, p) for p in PROMPTS]
        assert plain.get("/v1/models", key=None).json()["data"][0]["speculate"] == "off"
    finally:
        assert plain.stop() == 0
    spec = ServerProc([str(model), "--threads", "1", "--max-batch", "4", "--speculate", "lookup"])
    try:
        assert [greedy(spec, p) for p in PROMPTS] == want
        assert [greedy(spec, p, stream=True) for p in PROMPTS] == want
        assert spec.get("/v1/models").json()["data"][0]["speculate"] == "lookup:adaptive"
        drafted, accepted = spec.metric("infeng_spec_drafted_tokens"), spec.metric("infeng_spec_accepted_tokens")
        assert drafted > 0 and 0 < accepted <= drafted     # speculation ran, and paid off sometimes
        assert 'speculate="lookup:adaptive"' in spec.get("/metrics").text
    finally:
        assert spec.stop() == 0


def test_quantized_kv_serves_what_the_engine_computes(model_file):
    model, _ = model_file
    eng = Engine(load_model(model), threads=1, max_batch=1, kv_dtype="int8", kv_policy="layers -1: bf16")
    want = [next(eng.generate([Request(id="x", prompt=p, params=SamplingParams(max_tokens=32, temperature=0))])).text
            for p in PROMPTS]
    s = ServerProc([str(model), "--threads", "1", "--kv-dtype", "int8", "--kv-policy", "layers -1: bf16",
                    "--speculate", "2"])
    try:
        assert [greedy(s, p, 32) for p in PROMPTS] == want
        base = s.get("/v1/models").json()["data"][0]
        label = eng.kv.spec.describe()
        assert base["kv_cache_dtype"] == label and "int8" in label and "bf16" in label
        assert base["kv_cache_rotated"] is True and base["speculate"] == "lookup:2"
        info = [x for x in s.get("/metrics").text.splitlines() if x.startswith("infeng_engine_info{")]
        assert info == [f'infeng_engine_info{{kv_dtype="{label}",kv_rotated="true",speculate="lookup:2"}} 1.0']
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("args, msg", [
    (["--kv-dtype", "int5"], "--kv-dtype 'int5': KV type must be one of"),
    (["--kv-rotate", "maybe"], "--kv-rotate 'maybe': must be one of auto, on, keys, off"),
    (["--draft", "x.infeng"], "--draft goes with --speculate"),
    (["--speculate", "often"], "--speculate 'often': give lookup, auto or a draft length"),
    (["--speculate", "lookup", "--draft", "{model}"], "--speculate lookup drafts without a model"),
    (["--speculate", "2", "--draft", "missing.infeng"], "missing.infeng: no such file or directory (--draft)"),
])
@pytest.mark.parametrize("cmd", ["serve", "chat"])
def test_bad_engine_options_are_one_line(cmd, args, msg, model_file, capsys):
    model, _ = model_file
    assert main([cmd, str(model)] + [a.format(model=model) for a in args]) == 1
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_serve_kv_policy_outside_the_model_fails_to_start(model_file):
    model, _ = model_file
    p = subprocess.run([sys.executable, "-m", "infeng.cli.main", "serve", str(model), "--port", "0",
                        "--kv-policy", "layers 40: bf16"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "layer 40 is outside 0..4" in p.stderr.splitlines()[-1]


def test_chat_with_speculation_and_int8_kv_replies_as_without(model_file):
    """The chat command through a pipe: greedy replies with lookup speculation and an int8 cache
    are those of the engine with the int8 cache alone (the first turn's reply, compared)."""
    model, _ = model_file
    lines = "Once upon a time\nThe cat\n/quit\n"

    def run(*extra):
        p = subprocess.run([sys.executable, "-m", "infeng.cli.main", "chat", str(model), "-t", "0", "-n", "24",
                            "--threads", "1", "--kv-dtype", "int8", *extra], input=lines, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout
    out = run()
    assert out.strip() and run("--speculate", "lookup") == out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_loading_thread_takes_its_openmp_team_along(data_dir):
    """The server loads on a thread that ends, so no OpenMP team but the engine thread's outlives
    loading (a kept team means more OpenMP threads than CPUs: libgomp then barely spins at
    barriers and decode slows). Control: asyncio's pooled executor thread keeps its team."""
    import asyncio
    from infeng.serve.loop import on_own_thread
    model = load_model(data_dir / "stories260K")

    def load():
        e = Engine(model, threads=2, max_batch=1)
        next(e.generate([Request(id="x", prompt="Once", params=SamplingParams(max_tokens=2, temperature=0))]))
        return e

    def tasks():
        return len(list(Path("/proc/self/task").iterdir()))

    async def settled(before: int) -> int:      # OpenMP workers of an ended team exit a moment later
        for _ in range(100):
            if tasks() <= before:
                break
            await asyncio.sleep(0.05)
        return tasks()

    async def main():
        before = tasks()
        assert isinstance(await on_own_thread(load), Engine)
        mine = await settled(before)
        await asyncio.to_thread(load)
        return before, mine, await settled(before)
    before, mine, pooled = asyncio.run(main())
    assert mine == before and pooled >= before + 2      # the executor's thread and its OpenMP worker


def test_a_failed_load_on_its_own_thread_raises_here():
    import asyncio
    from infeng.errors import InfengError
    from infeng.serve.loop import on_own_thread

    def load():
        raise InfengError("no such model")
    with pytest.raises(InfengError, match="no such model"):
        asyncio.run(on_own_thread(load))
