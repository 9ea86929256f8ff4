"""Fine-tune: internal customer-service and sales conversations in, a served LoRA adapter out.

Validation with line numbers and stable codes, PII scrubbing and dedup, training with the served model's own chat
template and assistant-only loss, evaluation, lineage, and a gate proving the adapter behaves the same once vLLM
serves it.
"""
