"""Sovereign's shared core: settings, on-disk formats and the `sovereign` command.

This is the one package the three rooms (`serving`, `finetune`, `gateway`) may all import. It owns:

- `settings`: where the platform keeps its state (`SOVEREIGN_HOME`) and how YAML configs become pydantic models;
- `formats`: the model manifest, adapter manifest and job record, written by one room and read by another;
- `errors`: the base error type with a stable `code`;
- `offline`: the environment every process we start gets, so nothing reaches the internet;
- `pii`: the Chinese/English PII detector shared by the gateway and the fine-tune pipeline;
- `cli`: the `sovereign` typer app, to which each room adds its subcommands.

It imports no torch, transformers or vllm.
"""
