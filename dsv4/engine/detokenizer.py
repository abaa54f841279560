"""Streaming text out of generated token ids.

`IncrementalDetokenizer` turns token ids into text one token at a time. DeepSeek's tokenizer is
byte-level BPE: a token may end inside a UTF-8 character, and then the decoded text ends in U+FFFD
until the rest of the character arrives. The detokenizer decodes only a small window of recent
tokens each call: `prefix_offset` is the first token of the window, a clean boundary (the text of
the tokens before it is final and already released), and `read_offset` is how many characters of the
window's text have been released. A decode that ends in U+FFFD may still change in that last
character (an unfinished UTF-8 sequence is one U+FFFD whatever its length), never before it, so
everything but that character is released at once; when a decode ends cleanly the window restarts
after it. At the end `flush()` releases the held character (a U+FFFD that never completed), after
which `text` equals `tokenizer.decode(output ids, skip_special_tokens)` exactly.

`StopStringMatcher` cuts the streamed text at stop strings, however the text is split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`add(token_id) -> newly completed text`; `flush() -> the held-back tail` at the end.

    The text is that of the output tokens alone (`tokenizer.decode(output ids)`); prompt_token_ids
    are accepted for the engine's convenience and kept, but a byte-level decoder needs no context
    from the prompt at a character boundary, so decoding starts at the first output token.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # first token of the decode window (a character boundary)
        self.read_offset = 0  # characters of the window's text already released
        self._parts: list[str] = []
        self._flushed = False

    @property
    def text(self) -> str:
        """All output text released so far (by add() and flush())."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it completes (possibly empty)."""
        if self._flushed:
            raise RuntimeError("IncrementalDetokenizer.add after flush()")
        self.token_ids.append(int(token_id))
        window = self._decode_window()
        if window.endswith(REPLACEMENT):
            stable = len(window) - 1  # the last character may still become another one
            new = window[self.read_offset:stable] if stable > self.read_offset else ""
            self.read_offset = max(self.read_offset, stable)
        else:
            new = window[self.read_offset:]
            self.prefix_offset, self.read_offset = len(self.token_ids), 0
        if new:
            self._parts.append(new)
        return new

    def _decode_window(self) -> str:
        return self.tokenizer.decode(self.token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)

    def flush(self) -> str:
        """Release what is still held back (an unfinished character, as U+FFFD). Call once at the end."""
        self._flushed = True
        window = self._decode_window()
        rest = window[self.read_offset:]
        self.prefix_offset, self.read_offset = len(self.token_ids), 0
        if rest:
            self._parts.append(rest)
        return rest


class StopStringMatcher:
    """Fed the growing output text in increments; `feed(new_text) -> (emit, stopped)`.

    `emit` is the text safe to stream now: everything except the longest tail that could still be
    the start of a stop string. When a stop string completes, `stopped` is that string and the total
    emitted text ends just before its first occurrence (or just after it, with include_in_output);
    nothing after it is ever emitted. Of several stop strings, the one whose occurrence ends first in
    the text wins (the one that would complete first when streaming; on a tie, the longer). `flush()`
    releases the held-back tail at the end when no stop string was met.
    """

    def __init__(self, stop: list[str], include_in_output: bool = False):
        stop = list(stop or [])
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.stop = stop
        self.include_in_output = include_in_output
        self.stopped: str | None = None
        self._held = ""

    def feed(self, new_text: str, check_stop: bool = True) -> tuple[str, str | None]:
        """With check_stop=False (before min_tokens is reached) stop strings are not acted on: text
        completing one passes through; a tail that could start one is still held back."""
        if self.stopped is not None:
            return "", None
        if not self.stop:
            return new_text, None
        buf = self._held + new_text
        if check_stop:
            hit = self._first_stop(buf)
            if hit is not None:
                start, s = hit
                self.stopped = s
                self._held = ""
                return buf[:start + len(s)] if self.include_in_output else buf[:start], s
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        """Release the held-back tail (no stop string was met); nothing once stopped."""
        rest, self._held = self._held, ""  # empty once stopped
        return rest

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        best = None  # (end, -len, start, s)
        for s in self.stop:
            i = buf.find(s)
            if i >= 0:
                key = (i + len(s), -len(s), i, s)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[2], best[3])

    def _partial_tail(self, buf: str) -> int:
        """The length of the longest tail of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest
