"""The finetune room's error type: every refusal carries a stable code and says what to fix.

Codes used across the room (data validation adds OpenAI's own classes such as `missing_messages_list`):
`no_trainable_tokens`, `template_render_error`, `too_long`, `model_not_found`, `invalid_config`, `no_training_data`.
"""

from __future__ import annotations

from sovereign.errors import SovereignError


class FinetuneError(SovereignError):
    code = "finetune_error"
