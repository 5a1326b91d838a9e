"""Tokenizer (through the `tokenizers` library) and streaming detokenization.

``StreamDecoder`` turns a growing list of token ids into text pieces as they arrive. It decodes a
short window (from ``prefix`` to the end) and emits only what the newest tokens added, so a
SentencePiece leading-space rule or a byte-fallback character split over several tokens comes out
right; while the window ends in an incomplete UTF-8 sequence (decoded as U+FFFD) it holds the text
back, and ``flush`` releases whatever is left at the end.
"""
from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from infeng.errors import InfengError


class Tokenizer:
    def __init__(self, spec: dict[str, Any], bos_id: int | None, eos_ids: tuple[int, ...]):
        try:
            self.tk = HFTokenizer.from_str(spec["json"])
        except Exception as e:  # the tokenizers library raises its own exception types
            raise InfengError(f"tokenizer.json cannot be loaded ({e})") from None
        self.add_bos = bool(spec.get("add_bos", True))
        self.chat_template = spec.get("chat_template")
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)
        self._compiled = None       # the chat template, compiled on first use
        self._eot: tuple[int, ...] | None = None
        self.special = {name: self.tk.id_to_token(i) or "" for name, i in
                        (("bos", bos_id), ("eos", tuple(eos_ids)[0] if eos_ids else None)) if i is not None}

    def encode(self, text: str) -> list[int]:
        """Prompt → ids, BOS first when the model wants one (an empty prompt is BOS alone).
        ``add_bos`` alone decides (the loaders read it from the model's files), not the
        tokenizer.json post-processor: transformers too drops that BOS when add_bos_token is false."""
        ids = self.encode_plain(text) if text else []
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added (for text that already has them)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict[str, Any]], where: str = "", add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to ``messages`` (with the assistant's generation
        prompt unless told otherwise), in a sandboxed Jinja environment (templates come from
        model files: never trusted code)."""
        pre = f"{where}: " if where else ""
        if not self.chat_template:
            raise InfengError(f"{pre}this model has no chat template, so chat requests cannot run (use a completion prompt)")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InfengError(f"{pre}messages must be a non-empty list of {{role, content}} objects with string values")
        from jinja2 import TemplateError
        try:
            return self._template().render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.special.get("bos", ""), eos_token=self.special.get("eos", ""))
        except TemplateError as e:
            raise InfengError(f"{pre}chat template failed: {e}") from None

    def _template(self):
        if self._compiled is None:
            import time

            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TemplateError(msg)
            # the environment transformers renders templates in: what templates may call
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except TemplateError as e:
                raise InfengError(f"chat template does not parse: {e}") from None
        return self._compiled

    def chat_ids(self, messages: list[dict[str, Any]], where: str = "") -> list[int]:
        """Prompt ids for a chat: the rendered template, tokenized as is (it carries its own BOS)."""
        return self.encode_plain(self.render_chat(messages, where))

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The special token the chat template writes right after an assistant message (ChatML's
        ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``): a chat reply stops there
        even when the model's EOS is another token. Found by rendering a probe conversation; ()
        when the model has no template or the template ends a turn with plain text."""
        if self._eot is None:
            self._eot = ()
            if self.chat_template:
                probe = "infeng-probe-4d1c"
                try:
                    text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                            "chat template", add_generation_prompt=False)
                except InfengError:     # a template that wants other turns: EOS alone ends replies
                    text = ""
                if probe in text:
                    after = self.encode_plain(text[text.rindex(probe) + len(probe):])
                    if after and after[0] in self.special_ids:
                        self._eot = (after[0],)
        return self._eot

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a chat reply: EOS and the template's end of turn."""
        return tuple(sorted(self.eos_ids | set(self.end_of_turn_ids)))

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=not keep_special)

    def completion_text(self, context: list[int], ids: list[int], keep_special: bool = False) -> str:
        """The text ``ids`` add after ``context`` (keeps the leading space a lone decode drops):
        two decodes, the same text the stream decoder hands out piece by piece."""
        ctx = context[-StreamDecoder.CONTEXT:]
        before = self.decode(ctx, keep_special)
        full = self.decode(ctx + list(ids), keep_special)
        if full.startswith(before):
            return full[len(before):]
        n = 0
        while n < min(len(full), len(before)) and full[n] == before[n]:
            n += 1
        return full[n:]

    def stream(self, prompt_ids: list[int]) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)


class StreamDecoder:
    """Text deltas for ids appended after ``context`` (whose own text is not emitted).

    The window start moves only every CONTEXT tokens, so the text of the already-emitted part
    is remembered from the previous call and each new token costs one decode, not two."""

    CONTEXT = 6  # tokens of left context kept in the decode window

    def __init__(self, tok: Tokenizer, context: list[int]):
        self.tok = tok
        self.ids = list(context)
        self.prefix = max(0, len(self.ids) - self.CONTEXT)   # window start
        self.read = len(self.ids)                            # ids before this are emitted
        self.before = None                                   # text of ids[prefix:read], if known

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read >= len(self.ids):
            return ""
        if self.before is None:
            self.before = self.tok.decode(self.ids[self.prefix:self.read])
        before = self.before
        now = self.tok.decode(self.ids[self.prefix:])
        if not final and (len(now) <= len(before) or now.endswith("\ufffd")):
            return ""   # nothing new, or an incomplete UTF-8 sequence: wait for more bytes
        if now.startswith(before):
            delta = now[len(before):]
        else:
            # The window's text changed shape (a tokenizer that rewrites earlier text):
            # emit only what is past the common prefix.
            n = 0
            while n < min(len(now), len(before)) and now[n] == before[n]:
                n += 1
            delta = now[n:]
        self.read = len(self.ids)
        if self.read - self.prefix > 2 * self.CONTEXT:   # slide the window: re-decode next time
            self.prefix = self.read - self.CONTEXT
            self.before = None
        else:
            self.before = now
        return delta
