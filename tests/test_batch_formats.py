"""`generate --batch` with OpenAI Batch API lines (completions and chat) and infeng's own extras."""
import json
import shutil

import pytest

from infeng.cli.main import main

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, data_dir):
    """stories260K with a chat template added to its tokenizer_config.json."""
    d = tmp_path_factory.mktemp("chat")
    src = d / "src"
    shutil.copytree(data_dir / "stories260K", src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["chat_template"] = TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    out = d / "chat.infeng"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    return out


def _batch(model, tmp_path, lines):
    req, out = tmp_path / "r.jsonl", tmp_path / "o.jsonl"
    req.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["generate", str(model), "--batch", str(req), "--output", str(out)]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_openai_completion_and_chat_lines(chat_model, tmp_path, capsys):
    rows = _batch(chat_model, tmp_path, [
        {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "stories", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}},
        {"custom_id": "chat1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "stories", "messages": [{"role": "user", "content": "Tell me a story"}],
                  "max_completion_tokens": 12, "temperature": 0}},
        {"id": "native", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0},
        {"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "n2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 2}},
    ])
    c1, chat1, native, bad, n2 = rows
    assert c1["custom_id"] == "c1" and c1["error"] is None
    body = c1["response"]["body"]
    assert c1["response"]["status_code"] == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == native["text"]             # same request, two formats
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 20
    assert body["model"] == "stories"
    cb = chat1["response"]["body"]
    assert cb["object"] == "chat.completion" and cb["choices"][0]["message"]["role"] == "assistant"
    assert cb["usage"]["completion_tokens"] == 12
    assert bad["response"] is None and "url '/v1/embeddings' is not supported" in bad["error"]["message"]
    assert "n=2 is not supported" in n2["error"]["message"]


def test_chat_uses_the_template(chat_model, tmp_path, capsys):
    """A chat request equals a completion request whose prompt is the rendered template."""
    rows = _batch(chat_model, tmp_path, [
        {"custom_id": "chat", "url": "/v1/chat/completions", "method": "POST",
         "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 15, "temperature": 0}},
        {"id": "plain", "prompt": "user: Hi\nassistant:", "max_tokens": 15, "temperature": 0},
    ])
    assert rows[0]["response"]["body"]["choices"][0]["message"]["content"] == rows[1]["text"]


def test_chat_without_template_is_a_clear_error(data_dir, tmp_path, capsys):
    rows = _batch(data_dir / "stories260K", tmp_path, [
        {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}]}}])
    assert "this model has no chat template" in rows[0]["error"]["message"]


def test_stop_strings_and_priority_in_native_lines(data_dir, tmp_path, capsys):
    rows = _batch(data_dir / "stories260K", tmp_path, [
        {"id": "s", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stop": [" girl"], "priority": 3},
        {"custom_id": "o", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stop": " girl"}},
    ])
    assert rows[0]["text"] == ", there was a little" and rows[0]["finish_reason"] == "stop"
    assert rows[1]["response"]["body"]["choices"][0] == {"index": 0, "text": ", there was a little",
                                                         "logprobs": None, "finish_reason": "stop"}
