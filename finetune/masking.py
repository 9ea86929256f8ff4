"""Render a conversation with the model's own chat template and mark which tokens the loss sees.

Only assistant turns train: their content plus the end-of-turn token that follows it (so the model learns to stop).
Everything else (system prompt, user turns, the template's role headers, the newline after end-of-turn) gets the
label -100. The template is never hand-written: `tokenizer.apply_chat_template` from the model store folder renders
the text, the same template vLLM serves with.

How the assistant spans are found: render the conversation's prefixes incrementally (up to the generation prompt
before an assistant turn, then through that turn) and diff the strings. The text is then tokenized piece by piece
and the concatenation is checked against the token ids of the full render; where a tokenizer merges across a piece
boundary (SentencePiece's dummy prefix), the character offsets of the full render are used instead. Either way the
ids returned equal `apply_chat_template(messages, tokenize=True)` exactly, or an error says why not.

An assistant message with `"weight": 0` (OpenAI's multi-turn convention) is rendered but not trained.

Conversations that use tools (OpenAI's fine-tuning format: `tools` beside `messages`, assistant `tool_calls`, `tool`
results) are rendered as vLLM renders them for the served model: the tools as vLLM dumps them, each call's
`arguments` parsed into an object, a call's missing content as "". An assistant turn that calls a tool trains on
everything the model writes after the generation prompt (the call in the template's format, which the serving
profile's tool-call parser reads back) through its end-of-turn. A template that renders no tools is refused for such
conversations (`template_lacks_tools`): the served model would never see them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

IGNORE_INDEX = -100

Message = dict[str, Any]
# A conversation: its messages, or OpenAI's fine-tuning row {"messages": [...], "tools": [...]} when it uses tools.
Conversation = Sequence[Message] | Mapping[str, Any]


def conversation_parts(conversation: Conversation) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """(messages, tools or None)."""
    if isinstance(conversation, Mapping):
        return list(conversation.get("messages") or ()), list(conversation.get("tools") or ()) or None
    return list(conversation), None


def training_view(data: Mapping[str, Any]) -> Conversation:
    """What trains of a valid data row: its messages, with its tools when it has some."""
    if data.get("tools"):
        return {"messages": data["messages"], "tools": data["tools"]}
    return data["messages"]


def with_messages(conversation: Conversation, messages: Sequence[Message]) -> Conversation:
    """The same conversation (its tools, if any) with other messages: a prompt, a prefix."""
    if isinstance(conversation, Mapping):
        return {**conversation, "messages": list(messages)}
    return list(messages)


def uses_tools(messages: Sequence[Message], tools: Sequence[Any] | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered conversation and its labels (-100 where the loss does not look)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatEncoder:
    """Turns OpenAI-style message lists into (input_ids, labels) with the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise FinetuneError("the model's tokenizer has no chat template; import an instruct model whose folder "
                                "carries one (chat_template.jinja or tokenizer_config.json)",
                                code="template_render_error")
        self.tokenizer = tokenizer
        self._renders_tools: bool | None = None
        self._special = {tok for tok in tokenizer.all_special_tokens}
        self._special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                          if getattr(t, "special", False)}
        self.end_of_turn = self._detect_end_of_turn()
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self.pad_token_id = choose_pad_token_id(tokenizer, self.end_of_turn_id)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ChatEncoder":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True))

    # -- rendering ---------------------------------------------------------------------------------------------

    def render(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
        messages, tools = self._template_input(conversation)
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own types (TemplateError, TypeError on bad content)
            raise FinetuneError(f"the chat template could not render this conversation: {exc}",
                                code="template_render_error") from exc

    def render_ids(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> list[int]:
        """The template's own tokenization: what the served model sees for these messages."""
        messages, tools = self._template_input(conversation)
        out = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    @property
    def renders_tools(self) -> bool:
        """Whether the template shows the model its tools and its own earlier calls (probed once)."""
        if self._renders_tools is None:
            call = {"name": "sovereign_probe_call", "arguments": '{"sovereign_probe_argument": 1}'}
            probe = [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "c1", "type": "function", "function": call}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sovereign probe result"}]
            tools = [{"type": "function", "function": {"name": "sovereign_probe_tool", "parameters": {}}}]
            try:
                text = self.tokenizer.apply_chat_template(_template_view(probe), tools=_tools_view(tools),
                                                          tokenize=False)
            except Exception:  # a template that breaks on a call (content None) does not render tools
                text = ""
            self._renders_tools = all(w in text for w in ("sovereign_probe_tool", "sovereign_probe_call",
                                                          "sovereign_probe_argument", "sovereign probe result"))
        return self._renders_tools

    def _template_input(self, conversation: Conversation) -> tuple[list[Message], list[dict[str, Any]] | None]:
        """The messages and tools as the template sees them, once it is known to render what they hold."""
        messages, tools = conversation_parts(conversation)
        if uses_tools(messages, tools) and not self.renders_tools:
            raise FinetuneError("this conversation uses tools, but the model's chat template does not show a model "
                                "its tools and tool calls, so the served model would never see them; import the "
                                "model with a template that does (`sovereign models import ... --chat-template "
                                "configs/chat_templates/chatml-tools.jinja` for ChatML models such as SmolLM2)",
                                code="template_lacks_tools")
        return _template_view(messages), _tools_view(tools)

    def _detect_end_of_turn(self) -> str:
        """The special token the template writes right after an assistant message's content."""
        probe = "Sovereign end-of-turn probe"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        text = self.render(msgs)
        tail = text[text.rindex(probe) + len(probe):]
        for token in self.tokenizer.tokenize(tail):
            if token in self._special:
                return token
        eos = self.tokenizer.eos_token
        if eos and eos in tail:
            return eos
        raise FinetuneError("the chat template writes no special end-of-turn token after an assistant message; "
                            "the model could not learn to stop", code="template_render_error")

    # -- spans and labels --------------------------------------------------------------------------------------

    def trainable_spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The full render and the character spans [start, end) that train (assistant content + end-of-turn)."""
        messages = conversation_parts(conversation)[0]
        full = self.render(conversation)
        spans: list[tuple[int, int]] = []
        for i, msg in enumerate(messages):
            calls = bool(msg.get("tool_calls"))
            if msg.get("role") != "assistant" or msg.get("weight", 1) == 0 or not (
                    calls or _content_text(msg).strip()):
                continue  # an empty answer would only teach the model to stop at once
            before = self.render(with_messages(conversation, messages[:i]), add_generation_prompt=True) if i else ""
            through = self.render(with_messages(conversation, messages[: i + 1]))
            if not (through.startswith(before) and full.startswith(through)):
                raise FinetuneError(f"message {i}: the chat template renders this conversation's prefixes "
                                    "differently from the whole (it rewrites earlier turns), so assistant turns "
                                    "cannot be located; this template is not supported for training",
                                    code="template_render_error")
            turn = through[len(before):]
            # The turn ends with this message's end-of-turn; its content is the last occurrence right before it
            # (searching from the left could match the role header when the content is e.g. "assistant").
            eot_at = turn.rfind(self.end_of_turn)
            if eot_at < 0:
                raise FinetuneError(f"message {i}: no end-of-turn token {self.end_of_turn!r} after the assistant "
                                    "content", code="template_render_error")
            if calls:  # the whole turn is the model's: its text, if any, and the calls as the template writes them
                spans.append((len(before), len(before) + eot_at + len(self.end_of_turn)))
                continue
            content = _content_text(msg)
            at = turn.rfind(content, 0, eot_at)
            if at < 0 and content.strip():  # templates that trim the content (Llama 3, Gemma)
                at = turn.rfind(content.strip(), 0, eot_at)
            if at < 0:
                raise FinetuneError(f"message {i}: the assistant content does not appear verbatim in the template's "
                                    "render (the template alters it)", code="template_render_error")
            end_at = eot_at
            spans.append((len(before) + at, len(before) + end_at + len(self.end_of_turn)))
        return full, spans

    def encode(self, conversation: Conversation, *, max_len: int | None = None) -> Encoded:
        """input_ids as the template renders them, labels = ids on assistant turns and -100 elsewhere.

        Raises FinetuneError `no_trainable_tokens` when no token trains, `too_long` past `max_len`.
        """
        full, spans = self.trainable_spans(conversation)
        expected = self.render_ids(conversation)
        ids, labels = self._by_pieces(full, spans)
        if ids != expected:
            ids, labels = self._by_offsets(full, spans)
        if ids != expected:
            raise FinetuneError("tokenizing the rendered conversation does not reproduce the template's own token "
                                "ids", code="template_render_error")
        if max_len is not None and len(ids) > max_len:
            raise FinetuneError(f"the conversation is {len(ids)} tokens long, over max_seq_len = {max_len}",
                                code="too_long")
        if all(x == IGNORE_INDEX for x in labels):
            raise FinetuneError("no token of this conversation would train: it has no assistant message with "
                                "content (or every assistant message has weight 0)", code="no_trainable_tokens")
        return Encoded(ids, labels)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _by_pieces(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for start, end in spans:
            piece = self._tokenize(full[pos:start])
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            piece = self._tokenize(full[start:end])
            ids += piece
            labels += piece
            pos = end
        piece = self._tokenize(full[pos:])
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
        return ids, labels

    def _by_offsets(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tok, (a, b) in zip(ids, enc["offset_mapping"]):
            inside = any(a < end and b > start for start, end in spans)
            labels.append(tok if inside else IGNORE_INDEX)
        return ids, labels


def choose_pad_token_id(tokenizer: Any, end_of_turn_id: int) -> int:
    """A pad id distinct from end-of-turn and eos, from the tokenizer's existing vocabulary.

    SmolLM2 ships pad = eos = <|im_end|>: a collator that masks pad ids would then mask every end-of-turn and the
    model would never learn to stop. Labels here never come from pad ids, and pads never enter attention or loss,
    so any other existing token serves; none is added (a new token would need the embeddings trained, which vLLM's
    LoRA does not serve).
    """
    taken = {end_of_turn_id, tokenizer.eos_token_id}
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id):
        if candidate is not None and candidate not in taken:
            return int(candidate)
    for token in tokenizer.all_special_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid not in taken:
            return int(tid)
    return 0 if 0 not in taken else 1


def _content_text(msg: Message) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: the text parts, joined with "\n" as vLLM joins them
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _template_view(messages: Sequence[Message]) -> list[Message]:
    """Messages as the template should see them, as vLLM hands them to it: our training-only keys (weight)
    removed, text parts joined, a call's missing content "", each call's `arguments` parsed into an object."""
    out = []
    for m in messages:
        view = {k: v for k, v in m.items() if k != "weight"}
        if isinstance(view.get("content"), list):
            view["content"] = _content_text(view)
        if view.get("tool_calls"):
            if view.get("content") is None:
                view["content"] = ""
            view["tool_calls"] = [_call_view(c) for c in view["tool_calls"]]
        out.append(view)
    return out


def _call_view(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    function["arguments"] = arguments if isinstance(arguments, dict) else {}
    return {**call, "function": function}


def _tools_view(tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools as vLLM dumps them for the template: type and function only; the function's name, description and
    parameters (None when absent), and `strict` only when given."""
    if not tools:
        return None
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        view = {"name": fn.get("name"), "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            view["strict"] = fn["strict"]
        out.append({"type": tool.get("type", "function"), "function": view})
    return out
