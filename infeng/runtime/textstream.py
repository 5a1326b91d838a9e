"""A sequence's completion text as its tokens arrive: decoded incrementally (the StreamDecoder
holds back bytes of an unfinished UTF-8 character), cut before the first stop string, and handed
out without a tail that could still grow into a stop string."""
from __future__ import annotations

from infeng.runtime.tokenizer import StreamDecoder


class TextStream:
    def __init__(self, decoder: StreamDecoder, stop: list[str] | tuple[str, ...] = ()):
        self.decoder, self.stop = decoder, tuple(stop)
        self.text = ""          # completion text so far (with a possible held-back tail)
        self.emitted = 0        # characters of text already handed out
        self.stop_hit = False   # ended on a stop string (text already cut before it)

    def push(self, tok: int) -> bool:
        """Add a token's text; True when that completes a stop string (the text is then cut
        before it)."""
        self.text += self.decoder.push(tok)
        if self.stop:
            window = self.text[max(0, self.emitted - max(map(len, self.stop))):]
            hits = [window.find(x) for x in self.stop if x in window]
            if hits:
                self.text = self.text[:len(self.text) - len(window) + min(hits)]
                self.stop_hit = True
                return True
        return False

    def flush(self) -> None:
        """The sequence ended: take what the decoder still holds (nothing after a stop string)."""
        if not self.stop_hit:
            self.text += self.decoder.flush()

    def delta(self, final: bool) -> str:
        """Text not yet handed out, keeping back a tail that could still become a stop string
        (unless ``final``)."""
        end = len(self.text)
        if not final:
            for x in self.stop:
                for k in range(min(len(x) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(x[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
