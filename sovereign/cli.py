"""The `sovereign` command. Each room adds its subcommands through its own `cli.register(app)`.

Room CLIs import heavy libraries (torch, transformers, vllm) inside commands only, so `sovereign gateway` starts fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sovereign: self-hosted LLM platform.")


def build_app() -> typer.Typer:
    from finetune.cli import register as register_finetune
    from gateway.cli import register as register_gateway
    from serving.cli import register as register_serving
    from sovereign.pii_cli import register as register_pii
    from sovereign.up import register as register_up

    for register in (register_serving, register_gateway, register_finetune, register_pii, register_up):
        register(app)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
