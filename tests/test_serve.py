"""`infeng serve` end to end: the server runs as its own process on 127.0.0.1 (an ephemeral port),
driven with the official OpenAI client and plain HTTP; every wait is bounded."""
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from infeng.cli.main import main  # noqa: E402
from infeng.model.adapter import convert_peft  # noqa: E402
from infeng.model.loader import load_model  # noqa: E402
from infeng.runtime.engine import Engine, Request  # noqa: E402
from infeng.runtime.sampler import SamplingParams  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "peft"
ADAPTERS = sorted(p.name for p in FIX.iterdir())
KEY = "test-key-0123456789"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


class Reply:
    def __init__(self, status, headers, body):
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        return json.loads(self.content)

    @property
    def text(self):
        return self.content.decode()


def call_http(port, method, path, body=None, key=KEY, headers=None, raw=None, timeout=30) -> Reply:
    """One plain HTTP request (http.client: no client library between the test and the server)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class ServerProc:
    """`infeng serve ...` as a child process; its stderr is collected on a thread."""

    def __init__(self, args, timeout=90):
        self.p = subprocess.Popen([sys.executable, "-m", "infeng.cli.main", "serve", *args, "--port", "0",
                                   "--host", "127.0.0.1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.port = None
        ready = threading.Event()

        def pump():
            for line in self.p.stderr:
                self.lines.append(line)
                if "listening on http://127.0.0.1:" in line:
                    self.port = int(line.split("127.0.0.1:")[1].split()[0])
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:       # the model loads while the socket listens: wait for /ready
            try:
                if self.get("/ready").status_code == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)

    def get(self, path, **kw) -> Reply:
        return call_http(self.port, "GET", path, **kw)

    def post(self, path, body=None, **kw) -> Reply:
        return call_http(self.port, "POST", path, body, **kw)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self, timeout=30) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        return self.p.returncode

    def metric(self, name: str) -> float:
        text = self.get("/metrics").text
        vals = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{")]
        return sum(vals)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, data_dir):
    """stories260K (f32) with a chat template, converted; and its adapters in a directory."""
    d = tmp_path_factory.mktemp("serve")
    src = d / "src"
    shutil.copytree(data_dir / "stories260K-f32", src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["chat_template"] = TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    out = d / "story.infeng"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    base = load_model(out)
    ad = d / "adapters"
    ad.mkdir()
    for n in ADAPTERS:
        convert_peft(FIX / n, ad / f"{n}.infeng-lora", base, dtype="f32")
    return out, ad


@pytest.fixture(scope="module")
def server(model_file):
    model, ad = model_file
    s = ServerProc([str(model), "--adapters-dir", str(ad), "--api-key", KEY, "--threads", "1", "--max-batch", "6"])
    yield s
    assert s.stop() == 0


def greedy_alone(model, ad, prompt, adapter, n):
    """The engine in this process, one request alone."""
    e = Engine(load_model(model), threads=1, max_batch=1)
    if adapter:
        e.load_adapter(ad / f"{adapter}.infeng-lora", adapter)
    r = next(e.generate([Request(id="x", prompt=prompt, params=SamplingParams(max_tokens=n, temperature=0), adapter=adapter)]))
    return r.text, len(r.token_ids), len(r.prompt_ids)


def test_models_list_base_and_adapters(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"story", *ADAPTERS}
    assert models["story"].model_extra["parent"] is None
    assert all(models[a].model_extra["parent"] == "story" for a in ADAPTERS)


def test_completion_equals_the_engine(server, model_file):
    c = server.client()
    r = c.completions.create(model="story", prompt="Once upon a time", max_tokens=24, temperature=0)
    text, n, n_prompt = greedy_alone(*model_file, "Once upon a time", None, 24)
    assert r.choices[0].text == text and r.usage.completion_tokens == n and r.usage.prompt_tokens == n_prompt
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")


def test_mixed_adapters_concurrent_equal_alone(server, model_file):
    c = server.client()
    jobs = [(a, p) for a, p in zip(["story", *ADAPTERS, "story", ADAPTERS[1]],
                                   ["Lily", "Once upon a time", "The dog", "Tom and", "A big", "Sue", "The sun"])]

    def one(job):
        a, p = job
        return c.completions.create(model=a, prompt=p, max_tokens=20, temperature=0).choices[0].text
    alone = [one(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(one, jobs))
    assert together == alone
    assert alone[1] != c.completions.create(model="story", prompt="Once upon a time", max_tokens=20,
                                            temperature=0).choices[0].text   # the adapter changed something
    want = greedy_alone(*model_file, "The dog", ADAPTERS[1], 20)[0]
    assert alone[2] == want


def test_chat_stream_equals_whole_and_reports_usage(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Tell me a story"}]
    whole = c.chat.completions.create(model=ADAPTERS[0], messages=msgs, max_tokens=30, temperature=0)
    chunks = list(c.chat.completions.create(model=ADAPTERS[0], messages=msgs, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_completion_stream(server):
    c = server.client()
    whole = c.completions.create(model="story", prompt="Lily had", max_tokens=25, temperature=0)
    parts = list(c.completions.create(model="story", prompt="Lily had", max_tokens=25, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_errors_have_openai_shape(server, model_file):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key-123456").models.list()
    r = server.post("/v1/completions", {"model": "story", "prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.get("/health", key=None).status_code == 200          # no key needed
    assert server.get("/metrics", key=None).status_code == 401
    assert server.get("/v1/models", key="wrong-key-123456").status_code == 401
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        c.completions.create(model="story", prompt="x", max_tokens=2, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="'mirostat'"):
        c.completions.create(model="story", prompt="x", max_tokens=2, extra_body={"mirostat": 2})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="story", prompt="x", max_tokens=10**6)
    long = "Once upon a time " * 200
    with pytest.raises(openai.BadRequestError, match=r"prompt has \d+ tokens; the context is 512"):
        c.completions.create(model="story", prompt=long, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="story", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="story", messages=[], max_tokens=2)
    r = server.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert server.get("/v1/completions").status_code == 405
    r = server.post("/v1/completions", raw=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = server.post("/v1/completions", raw=b"x" * (2 << 20))
    assert r.status_code == 413


def test_request_id_header_and_access_log(server):
    r = server.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert server.get("/health", key=None).headers["x-request-id"]
    deadline = time.time() + 5
    while time.time() < deadline:
        logs = [json.loads(x) for x in server.lines if x.startswith("{")]
        if any(x["request_id"] == "abc-123" for x in logs):
            break
        time.sleep(0.1)
    line = next(x for x in logs if x["request_id"] == "abc-123")
    assert line["path"] == "/v1/models" and line["status"] == 200 and line["ms"] >= 0


def test_logprobs_n_seed_stop(server):
    c = server.client()
    r = c.completions.create(model="story", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens == 8
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and v <= 0 and max(top.values()) == pytest.approx(v)   # greedy: the best one
    ch = c.chat.completions.create(model="story", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    a = c.completions.create(model="story", prompt="Lily", max_tokens=12, temperature=1.0, n=3, seed=7)
    b = c.completions.create(model="story", prompt="Lily", max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1
    assert a.usage.prompt_tokens == c.completions.create(model="story", prompt="Lily", max_tokens=1).usage.prompt_tokens
    full = c.completions.create(model="story", prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text
    word = full.split()[3]
    cut = c.completions.create(model="story", prompt="Once upon a time", max_tokens=40, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and full.startswith(cut.choices[0].text) and word not in cut.choices[0].text
    e = c.completions.create(model="story", prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
    five = c.completions.create(model="story", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert e.choices[0].text == "Once upon a time" + five.choices[0].text


def test_disconnect_cancels_and_frees_kv(server):
    body = {"model": "story", "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = [r.readline() for _ in range(6)]
    assert any(x.startswith(b"data: ") for x in got)
    assert server.metric("infeng_kv_blocks_used") > 0
    conn.sock.shutdown(2)       # the client goes away mid-stream
    conn.close()
    deadline = time.time() + 10
    while time.time() < deadline and (server.metric("infeng_kv_blocks_used") or server.metric("infeng_running_sequences")):
        time.sleep(0.05)
    assert server.metric("infeng_kv_blocks_used") == 0 and server.metric("infeng_running_sequences") == 0
    assert server.metric("infeng_cancelled_total") >= 1
    # a client waiting for a whole (non-streamed) answer that goes away is cancelled too
    before = server.metric("infeng_cancelled_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": False, "n": 4}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.time() + 10
    while time.time() < deadline and server.metric("infeng_running_sequences") == 0:
        time.sleep(0.005)
    conn.sock.shutdown(2)
    conn.close()
    while time.time() < deadline and server.metric("infeng_cancelled_total") < before + 4:
        time.sleep(0.02)
    assert server.metric("infeng_cancelled_total") == before + 4


def test_load_and_unload_adapter(server, model_file):
    _, ad = model_file
    shutil.copy(ad / f"{ADAPTERS[0]}.infeng-lora", ad / "extra.bin")
    r = server.post("/v1/load_lora_adapter", {"lora_name": "tenant-9", "lora_path": "extra.bin"})
    assert r.status_code == 200, r.text
    c = server.client()
    assert "tenant-9" in {m.id for m in c.models.list().data}
    got = c.completions.create(model="tenant-9", prompt="Tom", max_tokens=10, temperature=0).choices[0].text
    assert got == c.completions.create(model=ADAPTERS[0], prompt="Tom", max_tokens=10, temperature=0).choices[0].text
    for bad_path in ("../story.infeng", "/etc/passwd", "sub/../../x"):
        r = server.post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": bad_path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing.bin"}).status_code == 404
    # unload while a stream uses the adapter: new requests get 404 at once, the stream finishes in
    # full, and only then does the unload answer
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": "tenant-9", "prompt": "Tom", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")
    unloaded = {}
    t = threading.Thread(target=lambda: unloaded.update(r=server.post("/v1/unload_lora_adapter", {"lora_name": "tenant-9"}),
                                                        t=time.perf_counter()))
    t.start()
    deadline = time.time() + 10
    while time.time() < deadline:
        if server.post("/v1/completions", {"model": "tenant-9", "prompt": "x", "max_tokens": 1}).status_code == 404:
            break
        time.sleep(0.01)
    rest = [x for x in stream.read().decode().splitlines() if x.startswith("data: ")]
    t_stream_end = time.perf_counter()
    conn.close()
    t.join(30)
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 400
    assert unloaded["r"].status_code == 200 and unloaded["t"] >= t_stream_end - 0.1   # not before the stream ended
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="tenant-9", prompt="Tom", max_tokens=2)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "tenant-9"}).status_code == 404


def test_metrics(server):
    server.client().completions.create(model="story", prompt="Lily", max_tokens=3, temperature=0)
    text = server.get("/metrics").text
    for name in ("infeng_requests_total", "infeng_prompt_tokens_total", "infeng_generation_tokens_total",
                 "infeng_time_to_first_token_seconds_bucket", "infeng_inter_token_latency_seconds_bucket",
                 "infeng_e2e_request_latency_seconds_bucket", "infeng_queue_depth", "infeng_running_sequences",
                 "infeng_kv_blocks_used", "infeng_prefix_cache_hit_rate", "infeng_adapter_evictions"):
        assert name in text, name
    assert 'infeng_requests_total{endpoint="/v1/completions",model="story",status="200"}' in text


def test_overload_429_then_sigterm_drains(model_file):
    """One running sequence and one queued: the rest get 429 at once with Retry-After; every
    accepted request completes in full; SIGTERM lets the stream in flight finish, then exit 0."""
    model, _ = model_file
    s = ServerProc([str(model), "--threads", "1", "--max-batch", "1", "--max-queue", "1", "--grace", "30"])
    try:
        c = s.client(key="unused-key")
        body = dict(model="story", prompt="Once upon a time", max_tokens=500, temperature=0,
                    extra_body={"ignore_eos": True})

        def one(_):
            t = time.perf_counter()
            try:
                return 200, c.completions.create(**body).usage.completion_tokens, None, time.perf_counter() - t
            except openai.RateLimitError as e:
                return 429, 0, e.response.headers.get("retry-after"), time.perf_counter() - t
        with ThreadPoolExecutor(8) as ex:
            res = list(ex.map(one, range(8)))
        ok = [r for r in res if r[0] == 200]
        limited = [r for r in res if r[0] == 429]
        assert len(ok) >= 2 and limited and len(ok) + len(limited) == 8
        assert all(r[1] == 500 for r in ok)                          # nothing lost for the accepted
        assert all(r[2] == "1" for r in limited)
        assert min(r[3] for r in limited) < min(r[3] for r in ok)   # refused without waiting
        assert s.metric("infeng_rejected_total") == len(limited)
        # SIGTERM while a stream is in flight: it still completes in full, then the server exits 0
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
            {**{k: v for k, v in body.items() if k != "extra_body"}, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}}))
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        s.p.send_signal(signal.SIGTERM)
        # draining: still listening, so probes see it: not ready, alive, new work refused
        deadline = time.time() + 10
        while s.get("/ready").status_code == 200 and time.time() < deadline:
            time.sleep(0.02)
        ready = s.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert s.get("/health", key=None).status_code == 200
        refused = s.post("/v1/completions", {"model": "story", "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        rest = [x for x in r.read().decode().splitlines() if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 500
        assert s.p.wait(60) == 0
    finally:
        s.stop()


def test_serve_bad_options(tmp_path, model_file, capsys):
    model, _ = model_file
    assert main(["serve", str(model), "--adapters-dir", str(tmp_path / "none")]) == 1
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "keys").write_text("# nothing\n")
    assert main(["serve", str(model), "--api-key-file", str(tmp_path / "keys")]) == 1
    assert "no keys" in capsys.readouterr().err
    assert main(["serve", str(model), "--port", "70000"]) == 1


def test_echo_logprobs_score_the_prompt(server, model_file):
    """echo + logprobs (lm-evaluation-harness's loglikelihood request): the prompt's own log-probs,
    equal to those the same tokens got when they were generated."""
    c = server.client()
    gen = c.completions.create(model=ADAPTERS[2], prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    e = Engine(load_model(model_file[0]), threads=1, max_batch=1)
    e.load_adapter(model_file[1] / f"{ADAPTERS[2]}.infeng-lora", ADAPTERS[2])
    r = next(e.generate([Request(id="x", prompt="Once upon a time", params=SamplingParams(max_tokens=6, temperature=0),
                                 adapter=ADAPTERS[2])]))
    ids = r.prompt_ids + r.token_ids
    sc = c.completions.create(model=ADAPTERS[2], prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = sc.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[-6:] == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert sc.usage.completion_tokens == 0 and sc.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(model="story", prompt="x", max_tokens=1, echo=True, logprobs=1, stream=True)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["happy", "sad", "sleepy"]},
    "friends": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
    "required": ["name", "age", "mood", "friends"], "additionalProperties": False}


def test_structured_output_validates(server):
    """JSON schema, regex and json_object outputs, sampled and greedy, with an adapter, mixed in
    one batch with unconstrained requests: every constrained output parses and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    c = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def person(seed):
        r = c.chat.completions.create(model=ADAPTERS[seed % len(ADAPTERS)], max_tokens=120, temperature=1.0, seed=seed,
                                      messages=[{"role": "user", "content": "Who is Lily?"}], response_format=rf)
        return r.choices[0]

    def free(seed):
        return c.completions.create(model="story", prompt="Lily", max_tokens=40, temperature=1.0, seed=seed).choices[0]
    with ThreadPoolExecutor(6) as ex:
        people = list(ex.map(person, range(6)))
        others = list(ex.map(free, range(3)))
    for ch in people:
        assert ch.finish_reason == "stop", ch
        jsonschema.validate(json.loads(ch.message.content), PERSON)
    assert len({ch.message.content for ch in people}) > 1
    assert all(o.text for o in others)
    r = c.completions.create(model="story", prompt="Tom is", max_tokens=30, temperature=0.8, seed=3,
                             extra_body={"guided_regex": r" [0-9]{1,2} years old\."})
    assert re.fullmatch(r" [0-9]{1,2} years old\.", r.choices[0].text), r.choices[0].text
    obj = c.chat.completions.create(model="story", max_tokens=200, temperature=0, response_format={"type": "json_object"},
                                    messages=[{"role": "user", "content": "A story as JSON"}]).choices[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    else:   # cut by max_tokens: still a prefix of a JSON object
        assert obj.message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="story", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="guided_regex"):
        c.completions.create(model="story", prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})


def test_priority_and_timeout(model_file):
    """One sequence at a time: a higher-priority request overtakes one queued before it; a
    request that cannot finish within --request-timeout gets a 408."""
    model, _ = model_file
    s = ServerProc([str(model), "--threads", "1", "--max-batch", "1", "--request-timeout", "3", "--max-n", "64"])
    try:
        c = s.client(key="unused-key")
        done = []

        def run(name, prio, n):
            c.completions.create(model="story", prompt="Once upon a time", max_tokens=n, temperature=0,
                                 extra_body={"ignore_eos": True, "priority": prio})
            done.append(name)
        first = threading.Thread(target=run, args=("a", 0, 500))
        first.start()
        deadline = time.time() + 10
        while time.time() < deadline and s.metric("infeng_running_sequences") == 0:
            time.sleep(0.005)
        low = threading.Thread(target=run, args=("low", 0, 40))
        low.start()
        while time.time() < deadline and s.metric("infeng_queue_depth") == 0:
            time.sleep(0.005)
        run("high", 5, 40)
        for t in (first, low):
            t.join(30)
        assert done.index("high") < done.index("low"), done
        with pytest.raises(openai.APIStatusError, match="timeout") as e:
            c.completions.create(model="story", prompt="Once upon a time", max_tokens=500, n=64, temperature=0,
                                 extra_body={"ignore_eos": True})      # 32000 tokens: far more than 3 s
        assert e.value.status_code == 408
        assert s.metric("infeng_running_sequences") == 0 and s.metric("infeng_kv_blocks_used") == 0
    finally:
        assert s.stop() == 0


def test_missing_extra_is_named(model_file, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def fake(mod, *a, **k):
        if mod == "uvicorn" or mod.startswith("uvicorn."):
            raise ImportError("No module named 'uvicorn'")
        return real(mod, *a, **k)
    monkeypatch.delitem(sys.modules, "uvicorn", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)
    assert main(["serve", str(model_file[0])]) == 1
    assert "pip install 'infeng[serve]'" in capsys.readouterr().err


def test_ready_is_503_while_the_model_loads(model_file):
    """The server listens before the model has loaded: /health 200 "loading", /ready 503, other
    paths 503; a load that fails stops the server and its error comes out of serve()."""
    from infeng.errors import InfengError
    from infeng.serve.app import ServeConfig
    from infeng.serve.server import serve
    import socket
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    release, failed = threading.Event(), []

    def load():
        release.wait(60)
        raise InfengError("story.infeng: truncated tensor (a test's failing load)")

    def run():
        try:
            serve(load, ServeConfig("story"), "127.0.0.1", port, 5.0, "warning")
        except InfengError as e:
            failed.append(str(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ready = call_http(port, "GET", "/ready", key=None)
            break
        except OSError:
            time.sleep(0.05)
    assert ready.status_code == 503 and ready.json() == {"status": "loading"}
    health = call_http(port, "GET", "/health", key=None)
    assert health.status_code == 200 and health.json() == {"status": "loading"}
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/tokenize")):
        r = call_http(port, method, path, {"model": "story", "prompt": "x"}, key=None)
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"], path
    release.set()
    t.join(30)
    assert not t.is_alive() and failed == ["story.infeng: truncated tensor (a test's failing load)"]


def test_a_model_that_fails_to_load_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.infeng"
    bad.write_bytes(b"not an infeng file at all" * 10)
    assert main(["serve", str(bad), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "bad.infeng" in err and "Traceback" not in err


def test_tokenizer_endpoints(server, model_file):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, with the engine's own tokenizer."""
    m = load_model(model_file[0])
    from infeng.runtime.tokenizer import Tokenizer
    tok = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    r = server.post("/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode_plain("Once upon a time") and r["count"] == len(r["tokens"])
    assert server.post("/tokenize", {"prompt": "Once upon a time"}).json()["tokens"] == tok.encode("Once upon a time")
    chat = server.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    assert chat == tok.encode_plain(tok.render_chat([{"role": "user", "content": "hi"}]))
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Once upon a time"}
    info = server.get("/tokenizer_info").json()
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and info["model_max_length"] == 512
    assert server.post("/tokenize", {"prompt": "<s>", "add_special_tokens": False}).json()["tokens"] == [m.config.bos_id]
    for body, field in (({"prompt": 3}, "prompt"), ({"prompt": "a", "messages": []}, "prompt"),
                        ({"prompt": "a", "bogus": 1}, "bogus"), ({"prompt": "a", "model": "nope"}, "model")):
        e = server.post("/tokenize", body)
        assert e.status_code in (400, 404) and e.json()["error"]["param"] == field, body
    assert server.post("/detokenize", {"tokens": [10**6]}).status_code == 400
    assert server.post("/tokenize", {"prompt": "a"}, key="wrong-key-12345").status_code == 401
