"""Incremental detokenisation of generated ids into reasoning / answer / tool-call text.

`ChatStream(tok)` is fed the new token of each step (as `generate`'s callback delivers them) and
returns the text that token completes, tagged with the part of the reply it belongs to: "reasoning"
inside `[THINK]...[/THINK]`, "tool" for `[TOOL_CALLS]name[ARGS]{json}`, else "answer". It follows the
same state machine as `chat.parse_output`, so the concatenated deltas of each kind equal the parsed
output. Each part is decoded as a whole and only the new suffix is returned, so multi-byte characters
split across tokens come out whole (a trailing U+FFFD is held back until its bytes are complete).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class ChatStream:
    """Feeds ids one at a time; `push(id)` returns a list of (kind, text) deltas (often empty)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.mode = "answer"  # answer | think | name | args (name and args print as "tool")
        self.ids: list[int] = []  # ids of the current part
        self.shown = ""  # text of the current part already returned
        self.finished = False

    @property
    def kind(self) -> str:
        return {"answer": "answer", "think": "reasoning"}.get(self.mode, "tool")

    def _switch(self, mode: str, marker: str = "") -> list[tuple[str, str]]:
        out = self._flush(final=True)
        self.mode, self.ids, self.shown = mode, [], ""
        if marker:
            out.append((self.kind, marker))
        return out

    def _flush(self, final: bool = False) -> list[tuple[str, str]]:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence: wait for its other bytes
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return []
        delta, self.shown = text[len(self.shown):], text
        return [(self.kind, delta)]

    def push(self, token: int | None) -> list[tuple[str, str]]:
        """The text deltas `token` completes. None (a stopped row) and tokens after `</s>` give nothing."""
        tok = self.tok
        if token is None or self.finished:
            return []
        t = int(token)
        if t == tok.eos:
            self.finished = True
            return self._flush(final=True)
        if t == tok.think and self.mode == "answer":
            return self._switch("think")
        if t == tok.think_end and self.mode == "think":
            return self._switch("answer")
        if t == tok.tool_calls and self.mode != "think":
            return self._switch("name", "[tool call] ")
        if t == tok.args and self.mode == "name":
            return self._switch("args", " ")
        self.ids.append(t)
        return self._flush()

    def close(self) -> list[tuple[str, str]]:
        """Whatever the last part still holds back (call once generation is over)."""
        return self._flush(final=True)
