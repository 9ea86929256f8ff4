"""`sovereign finetune …`: one typer group; each concern adds its commands with a `register_*(finetune_app)`."""

from __future__ import annotations

import typer

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune: conversations in, a served LoRA adapter out.")


def register(app: typer.Typer) -> None:
    """Add this room's commands to the root app."""
    from finetune.cli_data import register_data
    from finetune.cli_jobs import register_jobs

    register_data(finetune_app)
    register_jobs(finetune_app)
    app.add_typer(finetune_app, name="finetune")
