"""Multi-turn chat over one Engine, in the model's chat template, reusing the conversation's K/V.

A ``ChatSession`` keeps the conversation twice: as messages (what the template renders) and as
the exact token ids the model has seen (each prompt, and each reply as sampled, its end-of-turn
token included). For a new turn the template renders the whole conversation; when that text
starts with the text of those ids (templates append), only the new part is tokenized and
appended, so earlier turns keep exactly the ids whose K/V the engine's prefix cache holds and
a turn prefills only its new tokens (plus the last partial block). A template that rewrites
history falls back to tokenizing the whole rendering; the cache still reuses what matches.

``run_chat`` is the terminal loop behind `infeng chat`: lines in, streamed replies out, and
the commands /reset, /system TEXT, /help, /quit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Iterator, TextIO

from infeng.errors import InfengError
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.sampler import SamplingParams


@dataclass
class Turn:
    prompt_tokens: int          # the whole conversation fed for this turn
    cached_tokens: int          # of which the prefix cache already held
    completion_tokens: int
    finish_reason: str
    seconds: float
    reply: str = ""


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None,
                 adapter: str | None = None):
        self.engine, self.tok = engine, engine.tokenizer
        if not self.tok.chat_template:
            raise InfengError("this model has no chat template, so it cannot chat (use `infeng generate`)")
        stop = tuple(sorted(set(params.stop_token_ids) | set(self.tok.chat_stop_ids)))
        self.params = replace(params.validated(), stop_token_ids=stop)
        self.adapter = adapter
        self.system = system or None
        self.turns: list[Turn] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []        # every token the model has seen in this conversation
        self.seen_text = ""             # their text, special tokens written out

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or "" removes it); the conversation starts over."""
        self.system = text or None
        self.reset()

    def prompt_ids(self, user_text: str) -> tuple[list[int], str]:
        """The ids to feed for a new user message, and the rendered text they stand for."""
        rendered = self.tok.render_chat(self.messages + [{"role": "user", "content": user_text}])
        if self.ids and rendered.startswith(self.seen_text):
            return self.ids + self.tok.encode_plain(rendered[len(self.seen_text):]), rendered
        return self.tok.encode_plain(rendered), rendered

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to ``user_text`` as text pieces; the turn's figures land in
        ``self.turns[-1]`` when the reply is complete."""
        ids, rendered = self.prompt_ids(user_text)
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise InfengError(f"the conversation is {len(ids)} tokens and the context {limit}: /reset to start over")
        n = len(self.turns)
        params = replace(self.params, seed=(self.params.seed + n) % 2**32)   # a fresh draw each turn
        req = Request(id=f"turn-{n + 1}", prompt_ids=ids, params=params, adapter=self.adapter)
        t0 = time.perf_counter()
        result = None
        try:
            for ev in self.engine.stream([req]):
                if isinstance(ev, FinishEvent):
                    result = ev.result
                elif ev.text:
                    yield ev.text
        except KeyboardInterrupt:       # Ctrl-C: this reply ends here, the conversation keeps it
            result = self._cancel(req.id)
        except BaseException:           # the caller gave up on the reply: leave the engine idle
            self._cancel(req.id)
            raise
        if result.finish_reason == "rejected":
            raise InfengError(result.error)
        out = result.token_ids
        self.messages = self.messages + [{"role": "user", "content": user_text},
                                         {"role": "assistant", "content": result.text}]
        self.ids = ids + out
        self.seen_text = rendered + self.tok.completion_text(ids, out, keep_special=True)
        self.turns.append(Turn(len(ids), result.cached_tokens, len(out), result.finish_reason,
                               time.perf_counter() - t0, result.text))

    def _cancel(self, request_id: str):
        self.engine.cancel(request_id)
        result = None
        for ev in self.engine.stream():
            if isinstance(ev, FinishEvent):
                result = ev.result
        return result


HELP = "/reset starts over · /system TEXT sets the system prompt and starts over · /quit ends (or Ctrl-D)"


def _summary(t: Turn) -> str:
    rate = f" · {t.completion_tokens / t.seconds:.1f} tok/s" if t.seconds > 0 else ""
    end = "" if t.finish_reason == "stop" else f" · ended: {t.finish_reason}"
    return (f"[{t.prompt_tokens} prompt tokens, {t.cached_tokens} from cache · "
            f"{t.completion_tokens} reply tokens{rate}{end}]")


def run_chat(session: ChatSession, inp: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None, interactive: bool | None = None) -> int:
    """Read user lines from ``inp`` until EOF or /quit, streaming each reply to ``out``; notes
    and per-turn figures go to ``err`` (a prompt too, on a terminal). Ctrl-C during a reply
    ends that reply; at the prompt it ends the chat."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    if interactive is None:
        interactive = inp.isatty()
    if interactive:
        err.write(f"infeng chat — {HELP}\n")
    while True:
        if interactive:
            err.write(">>> ")
            err.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit", "/bye"):
                break
            if cmd == "/reset":
                session.reset()
                err.write("(conversation cleared)\n")
            elif cmd == "/system":
                session.set_system(arg.strip())
                err.write("(system prompt set; conversation cleared)\n" if arg.strip()
                          else "(system prompt removed; conversation cleared)\n")
            elif cmd == "/help":
                err.write(HELP + "\n")
            else:
                err.write(f"unknown command {cmd} — {HELP}\n")
            err.flush()
            continue
        if text.startswith("//"):
            text = text[1:]
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except InfengError as e:
            err.write(f"infeng: {e}\n")
            err.flush()
            continue
        out.write("\n")
        out.flush()
        if session.turns:
            err.write(_summary(session.turns[-1]) + "\n")
            err.flush()
    return 0
