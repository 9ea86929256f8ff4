"""Data problems: one record per problem, with the source line and a stable code a program can match on.

The codes follow OpenAI's fine-tuning data checks where they exist (`data_type`, `missing_messages_list`,
`message_missing_key`, `message_unrecognized_key`, `unrecognized_role`, `missing_content`,
`example_missing_assistant_message`) and add what a template- and tokenizer-aware check finds. Messages never quote
the row's text: reports outlive the scrubber and must not carry personal data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from finetune.errors import FinetuneError

CODES: dict[str, str] = {
    "invalid_encoding": "the line is not valid UTF-8",
    "invalid_json": "the line (or record) is not valid JSON",
    "data_type": "the record is not a JSON object",
    "missing_messages_list": "no non-empty `messages` list (ShareGPT: `conversations`)",
    "message_missing_key": "a message has no `role`",
    "message_unrecognized_key": "a message has a key other than role, content, name, weight, tool_calls, "
                                "tool_call_id",
    "unrecognized_role": "a role other than system, user, assistant, tool",
    "missing_content": "a message's content is missing, empty or not a string",
    "invalid_weight": "an assistant message's weight is not 0 or 1",
    "example_missing_assistant_message": "the conversation has no assistant message",
    "legacy_function_call": "a message uses the deprecated function_call/function format instead of tool_calls",
    "invalid_tools": "the row's `tools` are not a list of function definitions",
    "invalid_tool_call": "a tool call is not {id, type: function, function: {name, arguments: JSON object string}}",
    "unknown_tool": "a tool call names a function the row's `tools` do not define",
    "tool_result_without_call": "a tool message's tool_call_id answers no earlier call",
    "template_lacks_tools": "the conversation uses tools but the model's chat template does not render them",
    "invalid_csv": "the CSV file cannot be parsed from this line on",
    "csv_missing_columns": "the CSV header lacks a mapped column",
    "empty_file": "the file holds no records",
    "template_render_error": "the model's chat template cannot render the conversation",
    "too_long": "the rendered conversation has more tokens than max_seq_len",
    "no_trainable_tokens": "no token would train (no assistant content, or every assistant weight is 0)",
    "train_val_overlap": "the conversation is also in the other split (exact or near duplicate)",
}


class Problem(BaseModel):
    model_config = ConfigDict(frozen=True)

    line: int  # 1-based line of the record in its source file (0: the file as a whole)
    code: str
    message: str
    file: str | None = None  # set when a run reads more than one file (training and validation)


class DataInvalid(FinetuneError):
    """The data failed validation and the policy says the whole file is refused."""

    code = "invalid_training_data"

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


def count_by_code(problems: Iterable[Problem]) -> dict[str, int]:
    return dict(sorted(Counter(p.code for p in problems).items()))


def summarize(problems: list[Problem], limit: int = 10) -> str:
    """`line 3: invalid_json; line 7: unrecognized_role; ...` for error messages."""
    parts = [f"{p.file + ':' if p.file else ''}line {p.line}: {p.code}" for p in problems[:limit]]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(parts) + more
