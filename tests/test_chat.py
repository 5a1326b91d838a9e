"""`infeng chat` and the ChatSession behind it: the model's template, multi-turn, /reset,
/system, adapters, and the conversation's K/V reused through the prefix cache (a turn's reply is
exactly what a fresh engine computes from the same ids)."""
import io
import json
import shutil
import subprocess
import sys

import pytest

from infeng.cli.main import main
from infeng.model.loader import load_model
from infeng.runtime.chat import ChatSession, run_chat
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams

# stories260K has no chat template: give it one (its only specials are <s> and </s>)
TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("chatmodel") / "stories-chat"
    shutil.copytree(data_dir / "stories260K-f32", d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


@pytest.fixture(scope="module")
def model(chat_folder):
    return load_model(chat_folder)


def engine(model, **kw):
    return Engine(model, threads=2, max_batch=1, max_seq_len=256, **kw)


def reply(session, text):
    return "".join(session.send(text))


def test_turns_reuse_the_kv_and_match_a_fresh_engine(model):
    s = ChatSession(engine(model), GREEDY)
    first = reply(s, "Once upon a time")
    ids1, out1 = list(s.ids), s.turns[-1]
    second = reply(s, "The cat sat")
    t2 = s.turns[-1]
    assert first and second and out1.cached_tokens == 0
    # the second prompt extends the first prompt and the model's own reply tokens, unchanged
    ids2 = s.ids[:t2.prompt_tokens]
    assert ids2[:len(ids1)] == ids1
    assert t2.cached_tokens >= 16 * ((len(ids1) - 1) // 16) > 0        # every full block of turn 1 reused
    # the same ids through a fresh engine without a prefix cache give the same reply tokens
    fresh = engine(model, prefix_cache=False)
    (res,) = fresh.generate([Request(id="x", prompt_ids=ids2, params=s.params)])
    assert res.token_ids == s.ids[t2.prompt_tokens:]
    assert res.text == second
    assert s.messages == [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "The cat sat"}, {"role": "assistant", "content": second}]


def test_reset_and_system(model):
    s = ChatSession(engine(model), GREEDY)
    a = reply(s, "Once upon a time")
    reply(s, "Then")
    s.reset()
    assert s.messages == [] and s.ids == []
    again = reply(s, "Once upon a time")
    assert again == a and s.turns[-1].cached_tokens > 0       # same prompt: served from the cache
    s.set_system("Tell a story")
    assert s.messages == [{"role": "system", "content": "Tell a story"}]
    reply(s, "Once upon a time")
    assert s.ids[:s.turns[-1].prompt_tokens] == s.tok.encode_plain(
        "<s>system: Tell a story</s><s>user: Once upon a time</s><s>assistant:")


def test_ctrl_c_ends_the_reply_and_keeps_the_conversation(model):
    s = ChatSession(engine(model), SamplingParams(max_tokens=200, temperature=0.0))
    gen = s.send("Once upon a time")
    next(gen)
    with pytest.raises(StopIteration):
        gen.throw(KeyboardInterrupt)
    assert s.turns[-1].finish_reason == "cancelled" and not s.engine.busy
    assert reply(s, "And then") is not None and s.turns[-1].finish_reason in ("stop", "length")


def test_context_full_is_one_clear_error(model):
    s = ChatSession(Engine(model, threads=2, max_batch=1, max_seq_len=64), SamplingParams(max_tokens=40, temperature=0.0))
    out, err = io.StringIO(), io.StringIO()
    run_chat(s, io.StringIO("Once upon a time\nand then\nand then\n"), out, err, interactive=False)
    assert "the conversation is" in err.getvalue() and "/reset to start over" in err.getvalue()


def test_adapter_turns_differ_and_do_not_share_cache(model, tmp_path):
    from pathlib import Path

    from infeng.model.adapter import convert_peft
    path = convert_peft(Path(__file__).parent / "fixtures" / "peft" / "lora_r16_mlp", tmp_path / "a.infeng-lora",
                        model, dtype="f32")
    e = engine(model)
    name = e.load_adapter(path).name
    base = ChatSession(e, GREEDY)
    tuned = ChatSession(e, GREEDY, adapter=name)
    assert reply(base, "Once upon a time") != reply(tuned, "Once upon a time")
    assert tuned.turns[-1].cached_tokens == 0          # the base's blocks are not the adapter's


def test_cli_chat_through_stdin(chat_folder):
    """The real command, driven through a pipe: two turns, /reset, /system, an unknown command."""
    lines = "Once upon a time\nThe cat\n/reset\n/system Be brief\nOnce upon a time\n/bogus\n/quit\nnever read\n"
    p = subprocess.run([sys.executable, "-m", "infeng.cli.main", "chat", str(chat_folder), "-t", "0", "-n", "16",
                        "--threads", "2"], input=lines, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    replies = p.stdout.splitlines()
    assert len(replies) == 3 and all(r.strip() for r in replies)
    figures = [x for x in p.stderr.splitlines() if x.startswith("[")]
    assert len(figures) == 3 and "0 from cache" in figures[0] and "0 from cache" not in figures[1]
    assert "(conversation cleared)" in p.stderr and "(system prompt set; conversation cleared)" in p.stderr
    assert "unknown command /bogus" in p.stderr and "never read" not in p.stdout


def test_cli_chat_refuses_a_model_without_template(capsys, data_dir):
    assert main(["chat", str(data_dir / "stories260K"), "-t", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no chat template" in err and "stories260K" in err


def test_cli_chat_bad_adapter_path(capsys, chat_folder, tmp_path):
    assert main(["chat", str(chat_folder), "--adapter", str(tmp_path / "missing.infeng-lora")]) == 1
    assert "missing.infeng-lora: no such file (--adapter)" in capsys.readouterr().err
