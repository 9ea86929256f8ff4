"""Where the CLI's tables go."""

from __future__ import annotations

from rich.console import Console


def table_console() -> Console:
    """stdout, as wide as the terminal; piped or redirected, wide enough that no cell is cut ("SmolLM2-…" would not
    match a grep for the name), since rich otherwise assumes 80 columns there."""
    console = Console()
    return console if console.is_terminal else Console(width=1000)
