"""Loss masks from the model's own chat template: only assistant turns train, end-of-turn included."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.masking import IGNORE_INDEX, ChatEncoder
from serving.store import DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def encoder(sovereign_home: Path) -> ChatEncoder:
    return ChatEncoder.from_model_dir(sovereign_home / "models" / DEFAULT_MODEL_NAME)


def trained_text(encoder: ChatEncoder, enc) -> str:
    return encoder.tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def trained_runs(enc) -> list[list[int]]:
    """Contiguous runs of trainable token ids."""
    runs, cur = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


CONVERSATION = [
    {"role": "system", "content": "You are the support agent of Acme. Be brief."},
    {"role": "user", "content": "Where is my order 10023?"},
    {"role": "assistant", "content": "It left our warehouse today and arrives Thursday."},
    {"role": "user", "content": "我想退货，怎么办？"},
    {"role": "assistant", "content": "好的，请在订单页面点击“申请退货”，我们会在24小时内处理。"},
]


def test_only_assistant_content_and_end_of_turn_train(encoder):
    enc = encoder.encode(CONVERSATION)
    runs = trained_runs(enc)
    assert len(runs) == 2
    dec = encoder.tokenizer.decode
    assert dec(runs[0]) == CONVERSATION[2]["content"] + "<|im_end|>"
    assert dec(runs[1]) == CONVERSATION[4]["content"] + "<|im_end|>"
    # the system prompt, user turns and role headers never train
    text = trained_text(encoder, enc)
    assert "Acme" not in text and "order 10023" not in text and "我想退货" not in text and "<|im_start|>" not in text


def test_end_of_turn_token_is_trained_and_differs_from_pad(encoder):
    enc = encoder.encode(CONVERSATION)
    eot = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoder.end_of_turn_id == eot
    trained_eots = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == eot]
    assert len(trained_eots) == 2  # one per assistant turn
    # SmolLM2 ships pad == eos == <|im_end|>; ours must differ so nothing ever masks the stop token away
    assert encoder.tokenizer.pad_token_id == eot
    assert encoder.pad_token_id != eot and encoder.pad_token_id != encoder.tokenizer.eos_token_id


def test_labels_equal_input_ids_where_trained(encoder):
    enc = encoder.encode(CONVERSATION)
    assert len(enc.labels) == len(enc.input_ids)
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(enc.input_ids, enc.labels))


@pytest.mark.parametrize("messages", [
    CONVERSATION,
    CONVERSATION[1:],  # no system prompt: the template inserts its default one, which must not train
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "assistant"}],  # content = role name
    [{"role": "user", "content": " lead space"}, {"role": "assistant", "content": "  two spaces\nand a line "}],
    [{"role": "user", "content": "emoji 🙂"}, {"role": "assistant", "content": "混合 text 🙂 ok"}],
])
def test_ids_equal_the_templates_own_tokenization(encoder, messages):
    enc = encoder.encode(messages)
    expected = encoder.tokenizer.apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert enc.input_ids == list(expected)
    last = messages[-1]["content"]
    assert trained_text(encoder, enc).endswith(last + "<|im_end|>")


def test_default_system_prompt_does_not_train(encoder):
    enc = encoder.encode(CONVERSATION[1:3])
    full = encoder.tokenizer.decode(enc.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in full  # the template's default system prompt
    assert trained_text(encoder, enc) == CONVERSATION[2]["content"] + "<|im_end|>"


def test_weight_zero_assistant_turn_is_rendered_but_not_trained(encoder):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    enc = encoder.encode(messages)
    assert CONVERSATION[2]["content"] in encoder.tokenizer.decode(enc.input_ids)
    assert len(trained_runs(enc)) == 1
    assert CONVERSATION[2]["content"] not in trained_text(encoder, enc)


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
])
def test_empty_mask_is_refused_with_a_stable_code(encoder, messages):
    with pytest.raises(FinetuneError) as err:
        encoder.encode(messages)
    assert err.value.code == "no_trainable_tokens"


def test_too_long_conversation_is_refused(encoder):
    with pytest.raises(FinetuneError) as err:
        encoder.encode(CONVERSATION, max_len=20)
    assert err.value.code == "too_long"
    assert "max_seq_len = 20" in str(err.value)


TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order by its number",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
TOOL_CONVERSATION = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Where is order 4417?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "lookup_order", "arguments": '{"order_id": "4417"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "eta": "Thursday"}'},
    {"role": "assistant", "content": "Order 4417 has shipped and arrives Thursday."}]}


@pytest.fixture(scope="module")
def tools_encoder(sovereign_home: Path) -> ChatEncoder:
    """The default model's tokenizer with the shipped tools template (what `--chat-template` imports)."""
    from transformers import AutoTokenizer

    from tests.conftest import REPO

    tokenizer = AutoTokenizer.from_pretrained(str(sovereign_home / "models" / DEFAULT_MODEL_NAME),
                                              local_files_only=True)
    tokenizer.chat_template = (REPO / "configs" / "chat_templates" / "chatml-tools.jinja").read_text()
    return ChatEncoder(tokenizer)


def test_a_tool_call_turn_trains_the_call_as_the_parser_reads_it_and_the_result_does_not(tools_encoder):
    enc = tools_encoder.encode(TOOL_CONVERSATION)
    runs = [tools_encoder.tokenizer.decode(r) for r in trained_runs(enc)]
    assert runs == ['<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "4417"}}\n</tool_call><|im_end|>',
                    "Order 4417 has shipped and arrives Thursday.<|im_end|>"]
    full = tools_encoder.render(TOOL_CONVERSATION)
    assert '"name": "lookup_order", "description": "Find an order by its number"' in full  # the model sees its tools
    assert "<tool_response>\n{\"status\": \"shipped\"" in full and "shipped" not in "".join(runs[:1])
    assert enc.input_ids == tools_encoder.render_ids(TOOL_CONVERSATION)


def test_a_call_with_text_before_it_trains_both_and_weight_zero_trains_neither(tools_encoder):
    conv = {"tools": TOOLS, "messages": [dict(m) for m in TOOL_CONVERSATION["messages"]]}
    conv["messages"][1]["content"] = "Let me look that up."
    runs = [tools_encoder.tokenizer.decode(r) for r in trained_runs(tools_encoder.encode(conv))]
    assert runs[0].startswith("Let me look that up.\n<tool_call>\n")
    conv["messages"][1]["weight"] = 0
    runs = [tools_encoder.tokenizer.decode(r) for r in trained_runs(tools_encoder.encode(conv))]
    assert runs == ["Order 4417 has shipped and arrives Thursday.<|im_end|>"]


def test_a_template_without_tools_refuses_tool_conversations_with_a_stable_code(encoder, tools_encoder):
    assert tools_encoder.renders_tools and not encoder.renders_tools
    for conversation in (TOOL_CONVERSATION, TOOL_CONVERSATION["messages"]):
        with pytest.raises(FinetuneError) as err:
            encoder.encode(conversation)
        assert err.value.code == "template_lacks_tools" and "--chat-template" in str(err.value)
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tools_encoder.encode(plain).input_ids == encoder.encode(plain).input_ids  # unchanged without tools


def test_text_parts_are_joined_as_vllm_joins_them(encoder):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is"}, {"type": "text", "text": "my order?"}]},
             {"role": "assistant", "content": "On its way."}]
    joined = [{"role": "user", "content": "Where is\nmy order?"}, {"role": "assistant", "content": "On its way."}]
    assert encoder.encode(parts).input_ids == encoder.encode(joined).input_ids
