"""Chat and text completions on the request path: their stream's events, and what the audit keeps of an answer's
text (each choice apart, tool calls and a reasoning model's reasoning included). The Responses API's counterpart is
responses_api.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway import errors as E
from gateway.audit import add_tool_call
from gateway.upstream import event_json

if TYPE_CHECKING:
    from gateway.proxy import Exchange

DONE = b"data: [DONE]\n\n"


class ChatEvents:
    """A chat or text completion stream: `data: {...}` chunks, the usage-only chunk the gateway asked for, `[DONE]`."""

    __slots__ = ("ex", "parts", "wants_usage", "done", "failed", "chunks", "tail", "unread")

    def __init__(self, ex: Exchange, wants_usage: bool) -> None:
        self.ex = ex
        self.parts = ex.completion_parts
        self.wants_usage = wants_usage
        self.done = self.failed = False
        self.chunks = 0
        self.tail: list[bytes] = []  # held back until the audit record is durable: the usage chunk
        # Chunks whose text the audit needs, parsed together: one JSON parse per batch costs less than one per chunk.
        self.unread: list[bytes] = []

    def take(self, event: bytes) -> bool:
        if event.startswith(b"data: [DONE]"):
            self.done = True
            return False
        if b'"usage":{' in event:
            obj = event_json(event)
            if obj is not None and isinstance(obj.get("usage"), dict):
                ex = self.ex
                ex.prompt_tokens = int(obj["usage"].get("prompt_tokens") or ex.prompt_tokens)
                ex.completion_tokens = int(obj["usage"].get("completion_tokens") or 0)
                if not obj.get("choices"):
                    if self.wants_usage:
                        self.tail.append(event)
                    return False
        self.chunks += 1
        if self.parts is not None:
            self.unread.append(event)
            if len(self.unread) >= 64:  # a long answer's chunks are not all kept until its end
                self.flush()
        return True

    def flush(self) -> None:
        """Add the text of the chunks taken so far to the audit's parts."""
        if self.unread:
            _collect_texts(self.unread, self.ex)
            self.unread = []

    def end(self) -> bytes:
        return b"".join(self.tail) + DONE

    @staticmethod
    def error(err: E.GatewayError) -> bytes:
        return b"data: " + err.body() + b"\n\n"


def _collect_texts(events: list[bytes], ex: Exchange) -> None:
    """Append the text of chunk events to the audit's parts of their choices, in order."""
    objs = None
    joined = b"".join(events)
    if joined.startswith(b"data: "):
        # An event ends at its only blank line (a newline inside JSON text is escaped), so when every event is one
        # `data: ` line the whole batch is one JSON array away.
        try:
            objs = orjson.loads(b"[" + joined[6:].rstrip(b"\n").replace(b"\n\ndata: ", b",") + b"]")
        except orjson.JSONDecodeError:
            pass
    if objs is None or len(objs) != len(events):  # another shape (comments, several lines): one event at a time
        objs = [event_json(event) for event in events]
    for obj in objs:
        if isinstance(obj, dict):
            choices_texts(obj, ex, "delta")


def choices_texts(obj: dict, ex: Exchange, key: str) -> None:
    """Add what each choice of a whole answer (`key` "message") or of a stream chunk ("delta") says, or its `text`
    (text completions), to the audit's parts of that choice."""
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        answer = choice.get(key)
        if isinstance(answer, dict):
            _answer_texts(answer, _choice_parts(ex, choice))
            thought = answer.get("reasoning") or answer.get("reasoning_content")  # vLLM's field, and its old name
            if isinstance(thought, str) and thought:
                ex.reasoning(choice.get("index")).append(thought)
        elif isinstance(choice.get("text"), str):
            _choice_parts(ex, choice).append(choice["text"])


def _choice_parts(ex: Exchange, choice: dict) -> list[str]:
    """Where a choice's text goes: a stream of several choices interleaves their pieces, which joined together
    would read as neither answer (and could split a phone number past the audit's redaction)."""
    index = choice.get("index")
    if not index or type(index) is not int:
        return ex.completion_parts
    if ex.other_choices is None:
        ex.other_choices = {}
    return ex.other_choices.setdefault(index, [])


def _answer_texts(message: dict, parts: list[str]) -> None:
    """Append what a chat answer (a message) or a piece of one (a streamed delta) says, for the audit: its content,
    then each tool call as `[tool_call NAME] ARGUMENTS`. A stream names a call in its first piece and sends the
    arguments in later ones, so the pieces add up to the whole answer's text."""
    text = message.get("content")
    if isinstance(text, str):
        parts.append(text)
    calls = message.get("tool_calls")
    if calls is None and message.get("function_call") is None:
        return
    fns = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    fns.append(message.get("function_call"))  # the legacy `functions` API's single call
    for fn in fns:
        if isinstance(fn, dict):
            add_tool_call(fn, parts)
