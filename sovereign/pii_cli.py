"""`sovereign pii kinds|check`: what counts as personal data here, and what a text would become, before the gateways
or a fine-tune job rely on a new rules file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sovereign.errors import SovereignError

pii_app = typer.Typer(no_args_is_help=True, help="Personal data: the kinds found (built-in and your rules file), "
                                                 "and what a text would become.")
RulesOpt = Annotated[Optional[Path], typer.Option(
    "--rules", help="A rules file to try instead of SOVEREIGN_PII_RULES or $SOVEREIGN_HOME/pii-rules.yaml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _install(rules: Path | None):
    from sovereign.pii_rules import install

    try:
        return install(rules)
    except SovereignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


@pii_app.command("kinds")
def kinds(rules: RulesOpt = None, as_json: JsonOpt = False) -> None:
    """Every kind the gateway's pii=redact|block and fine-tune scrubbing find, with its placeholder."""
    from sovereign import pii

    loaded = _install(rules)
    names = pii.placeholders()
    rows = [{"kind": k, "placeholder": names[k], "from": loaded.file if k in loaded.kinds else "built-in"}
            for k in pii.kinds()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from sovereign.console import table_console

    table = Table("kind", "placeholder", "from")
    for row in rows:
        table.add_row(row["kind"], row["placeholder"], row["from"])
    table_console().print(table)


@pii_app.command("check")
def check(text: Annotated[str, typer.Argument(help="The text to scan; - reads standard input.")],
          rules: RulesOpt = None, as_json: JsonOpt = False) -> None:
    """What in TEXT is personal data, and the text as pii=redact would pass it on."""
    from sovereign import pii

    _install(rules)
    if text == "-":
        text = sys.stdin.read()
    try:
        matches = pii.find_pii(text)
        redacted = pii.redact(text)[0]
    except pii.PiiRuleTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"matches": [{"kind": m.kind, "start": m.start, "end": m.end, "text": m.text}
                                      for m in matches], "redacted": redacted}, ensure_ascii=False, indent=2))
        return
    for m in matches:
        print(f"{m.kind:<16} {m.start:>6}-{m.end:<6} {m.text}")
    if not matches:
        print("no personal data found")
    print(f"redacted: {redacted}")


def register(app: typer.Typer) -> None:
    app.add_typer(pii_app, name="pii")
