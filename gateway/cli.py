"""`sovereign gateway`, `sovereign keys …` and `sovereign teams …`.

`keys` and `teams` work directly on the gateway's database (the one `--config`/SOVEREIGN_GATEWAY_DATABASE_URL
names), so they work with no gateway running; running gateways see the change within their refresh interval.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sovereign.console import table_console
from sovereign.errors import SovereignError

console = Console(stderr=True)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="Gateway config: a name under configs/gateway/ "
                                                  "or a YAML path.")]
DbOpt = Annotated[Optional[str], typer.Option("--database-url", help="Overrides the config's database_url.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(exc: SovereignError) -> None:
    console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    raise typer.Exit(2)


def _accounts(config: str | None, database_url: str | None):
    from gateway.accounts import Accounts
    from gateway.config import load_gateway_config
    from gateway.db import init_db, make_engine

    try:
        cfg = load_gateway_config(config or "default")
    except SovereignError as exc:
        _fail(exc)
    engine = make_engine(database_url or cfg.resolved_database_url())
    init_db(engine)
    from gateway.audit_admin import AdminTrail

    # Changes made here are audited like the admin API's, in the trail the gateway writes.
    return Accounts(engine, AdminTrail(cfg.audit_database_url or database_url or cfg.resolved_database_url()))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _limits(rpm, tpm, daily, monthly) -> dict:
    return {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm), ("daily_tokens", daily),
                              ("monthly_tokens", monthly)) if v is not None}


Rpm = Annotated[Optional[int], typer.Option("--rpm", help="Requests per minute.")]
AllowFrom = Annotated[Optional[str], typer.Option(
    "--allow-from", help="Only from these networks or addresses, comma-separated (10.1.0.0/16,192.0.2.7); behind a "
                         "proxy, list it in the gateway's trusted_proxies.")]
Tpm = Annotated[Optional[int], typer.Option("--tpm", help="Tokens per minute.")]
Daily = Annotated[Optional[int], typer.Option("--daily-tokens", help="Token budget per UTC day.")]
Monthly = Annotated[Optional[int], typer.Option("--monthly-tokens", help="Token budget per UTC month.")]

# gateway -------------------------------------------------------------------------------------------------------


def gateway(config: ConfigOpt = None,
            host: Annotated[Optional[str], typer.Option(help="Overrides the config's host.")] = None,
            port: Annotated[Optional[int], typer.Option(help="Overrides the config's port.")] = None,
            log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info") -> None:
    """Run the OpenAI-compatible gateway."""
    import logging

    from gateway.app import serve
    from gateway.config import load_gateway_config
    from sovereign.logs import setup_json_logging
    from sovereign.pii_rules import install as install_pii_rules

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    try:
        cfg = load_gateway_config(config or "default", **overrides)
        rules = install_pii_rules()  # the organisation's own kinds, for every team's pii=redact|block
    except SovereignError as exc:
        _fail(exc)
    setup_json_logging(getattr(logging, log_level.upper(), logging.INFO))
    if rules.kinds:
        logging.getLogger("gateway").info("PII rules loaded", extra={"file": rules.file, "kinds": rules.kinds,
                                                                     "sha256": rules.sha256})
    serve(cfg)


# keys ----------------------------------------------------------------------------------------------------------
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, rotate, revoke.")


@keys_app.command("create")
def keys_create(team: Annotated[str, typer.Option(help="The team that owns the key.")],
                name: Annotated[str, typer.Option(help="A label for people.")] = "",
                admin: Annotated[bool, typer.Option("--admin", help="May use the admin API.")] = False,
                rpm: Rpm = None, tpm: Tpm = None, daily_tokens: Daily = None, monthly_tokens: Monthly = None,
                expires: Annotated[Optional[str], typer.Option(
                    help="When the key stops working: a duration from now (90d, 12h, 30m) or an ISO 8601 time "
                         "(UTC unless it names a zone).")] = None,
                allow_from: AllowFrom = None,
                config: ConfigOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Create a key and print its secret once; only its hash is stored."""
    from gateway.accounts import KeySpec

    networks = {"allowed_networks": _split(allow_from)} if allow_from is not None else {}
    spec = _validated(KeySpec, dict(team=team, name=name, is_admin=admin, expires_at=_expiry(expires), **networks,
                                    **_limits(rpm, tpm, daily_tokens, monthly_tokens)))
    try:
        created = _accounts(config, database_url).create_key(spec)
    except SovereignError as exc:
        _fail(exc)
    _print_created(created, "Created", as_json)


def _print_created(created, what: str, as_json: bool) -> None:
    """A new key's secret on stdout (shown this once), what happened on stderr."""
    if as_json:
        print(created.model_dump_json())
        return
    until = f", valid until {created.expires_at:%Y-%m-%d %H:%M} UTC" if created.expires_at else ""
    console.print(f"{what} key [bold]{created.id}[/bold] for team {created.team}{until}. Store the secret now; it is "
                  f"not shown again:")
    print(created.secret)


@keys_app.command("list")
def keys_list(team: Annotated[Optional[str], typer.Option(help="Only this team's keys.")] = None,
              all_: Annotated[bool, typer.Option("--all", help="Include revoked and expired keys.")] = False,
              config: ConfigOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (ids and prefixes, never secrets)."""
    try:
        keys = _accounts(config, database_url).list_keys(team, include_revoked=all_)
    except SovereignError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([k.model_dump(mode="json") for k in keys]))
        return
    table = Table("id", "team", "name", "prefix", "admin", "from", "created", "expires", "revoked")
    minute = "%Y-%m-%d %H:%M"
    for k in keys:
        where = ", ".join(k.allowed_networks) if k.allowed_networks is not None else ""
        table.add_row(k.id, k.team, k.name, k.prefix + "…", "yes" if k.is_admin else "", where,
                      k.created_at.strftime(minute), k.expires_at.strftime(minute) if k.expires_at else "",
                      k.revoked_at.strftime(minute) if k.revoked_at else "")
    table_console().print(table)


@keys_app.command("update")
def keys_update(key_id: Annotated[str, typer.Argument(help="The key's id (from `keys list`).")],
                allow_from: AllowFrom = None,
                anywhere: Annotated[bool, typer.Option("--allow-from-anywhere",
                                                       help="Lift the key's network binding.")] = False,
                config: ConfigOpt = None, database_url: DbOpt = None) -> None:
    """Change where a key may be used from, keeping its secret; gateways apply it within their refresh interval."""
    from gateway.accounts import KeyUpdate

    if (allow_from is None) == (not anywhere):
        console.print("[red]error[/red] (invalid_argument): give --allow-from NETWORKS or --allow-from-anywhere")
        raise typer.Exit(2)
    changes = _validated(KeyUpdate, {"allowed_networks": None if anywhere else _split(allow_from)})
    try:
        out = _accounts(config, database_url).update_key(key_id, changes)
    except SovereignError as exc:
        _fail(exc)
    where = ", ".join(out.allowed_networks) if out.allowed_networks is not None else "anywhere"
    console.print(f"Key {out.id} (team {out.team}) may be used from: {where or 'nowhere'}.")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (from `keys list`).")],
                config: ConfigOpt = None, database_url: DbOpt = None) -> None:
    """Revoke a key; every gateway stops accepting it within its refresh interval."""
    try:
        out = _accounts(config, database_url).revoke_key(key_id)
    except SovereignError as exc:
        _fail(exc)
    console.print(f"Revoked {out.id} (team {out.team}).")


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[str, typer.Argument(help="The key's id (from `keys list`).")],
                grace: Annotated[str, typer.Option(help="How long the old secret keeps working: 24h, 7d, 0m.")] = "24h",
                expires: Annotated[Optional[str], typer.Option(
                    help="When the new key stops working (as for `keys create`); default: as long as the old key "
                         "was meant to live, from now.")] = None,
                config: ConfigOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A new secret for a key (same team, name and limits); the old one keeps working for --grace, then expires."""
    from datetime import timedelta

    from gateway.accounts import KeyRotation

    span = _duration(grace, "--grace")
    rotation = _validated(KeyRotation, dict(grace_seconds=int(span.total_seconds()), expires_at=_expiry(expires)))
    try:
        created = _accounts(config, database_url).rotate_key(key_id, grace=timedelta(seconds=rotation.grace_seconds),
                                                              expires_at=rotation.expires_at)
    except SovereignError as exc:
        _fail(exc)
    _print_created(created, f"Rotated {key_id}: it stops working in {grace}. New", as_json)


@keys_app.command("generate")
def keys_generate() -> None:
    """Print a fresh random secret (e.g. for SOVEREIGN_GATEWAY_BOOTSTRAP_KEY); stores nothing."""
    from gateway.accounts import generate_secret

    print(generate_secret())


# teams ---------------------------------------------------------------------------------------------------------
teams_app = typer.Typer(no_args_is_help=True, help="Teams and their policy: models, max_tokens, PII, quotas.")

Models = Annotated[Optional[str], typer.Option("--models", help="Comma-separated glob patterns of allowed models "
                                               "and adapters, e.g. 'SmolLM2-135M-Instruct,support@*'.")]
MaxTok = Annotated[Optional[int], typer.Option("--max-tokens", help="Cap on max_tokens per request.")]
Pii = Annotated[Optional[str], typer.Option("--pii", help="off | redact | block")]
Inj = Annotated[Optional[str], typer.Option("--injection", help="Prompt-injection heuristic: off | flag | block")]
Aud = Annotated[Optional[str], typer.Option("--audit-content", help="What the audit keeps of prompt and completion: "
                                            "none | hash | redacted")]


def _policy(models, max_tokens, pii, injection, audit_content) -> dict:
    out = {}
    if models is not None:
        out["allowed_models"] = [m.strip() for m in models.split(",") if m.strip()]
    for k, v in (("max_tokens", max_tokens), ("pii", pii), ("injection", injection),
                 ("audit_content", audit_content)):
        if v is not None:
            out[k] = v
    return out


def parse_duration(text: str):
    """A span like 90d / 12h / 30m as a timedelta; None when it is not one."""
    import re
    from datetime import timedelta

    if m := re.fullmatch(r"\s*(\d{1,6})\s*([dhm])\s*", text):
        return timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]: int(m.group(1))})
    return None


def _duration(text: str, option: str):
    """A span like 90d / 12h / 30m; refused with what it expects."""
    span = parse_duration(text)
    if span is None:
        console.print(f"[red]error[/red] (invalid_argument): {option} {text!r}: expected a duration: 90d, 12h, 30m")
        raise typer.Exit(2)
    return span


def _expiry(text: str | None):
    """`--expires`: 90d / 12h / 30m from now, or an ISO 8601 time; refused with what it expects."""
    from datetime import UTC, datetime

    if text is None:
        return None
    if (span := parse_duration(text)) is not None:
        return datetime.now(UTC) + span
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        console.print(f"[red]error[/red] (invalid_argument): --expires {text!r}: expected a duration from now (90d, "
                      f"12h, 30m) or an ISO 8601 time (2027-03-31T18:00:00Z)")
        raise typer.Exit(2) from None


def _validated(model_cls, data: dict):
    from pydantic import ValidationError

    from sovereign.settings import describe_validation_error

    try:
        return model_cls(**data)
    except ValidationError as exc:
        console.print(f"[red]error[/red] (invalid_argument): {describe_validation_error(exc)}")
        raise typer.Exit(2) from None


def _print_teams(teams, as_json: bool) -> None:
    if as_json:
        print(json.dumps([t.model_dump(mode="json") for t in teams]))
        return
    table = Table("team", "models", "max_tokens", "pii", "injection", "audit", "rpm", "tpm", "daily", "monthly",
                  "keys")
    for t in teams:
        table.add_row(t.name, ",".join(t.allowed_models), str(t.max_tokens or ""), t.pii, t.injection,
                      t.audit_content, *(str(getattr(t, f) or "") for f in ("requests_per_minute",
                      "tokens_per_minute", "daily_tokens", "monthly_tokens")), str(t.active_keys))
    table_console().print(table)


@teams_app.command("create")
def teams_create(name: str, models: Models = None, max_tokens: MaxTok = None, pii: Pii = None,
                 injection: Inj = None, audit_content: Aud = None, rpm: Rpm = None, tpm: Tpm = None,
                 daily_tokens: Daily = None, monthly_tokens: Monthly = None, config: ConfigOpt = None,
                 database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Create a team with its policy."""
    from gateway.accounts import TeamSpec

    spec = _validated(TeamSpec, {"name": name, **_policy(models, max_tokens, pii, injection, audit_content),
                                 **_limits(rpm, tpm, daily_tokens, monthly_tokens)})
    try:
        out = _accounts(config, database_url).create_team(spec)
    except SovereignError as exc:
        _fail(exc)
    _print_teams([out], as_json)


@teams_app.command("list")
def teams_list(config: ConfigOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List teams and their policies."""
    try:
        teams = _accounts(config, database_url).list_teams()
    except SovereignError as exc:
        _fail(exc)
    _print_teams(teams, as_json)


@teams_app.command("update")
def teams_update(name: str, models: Models = None, max_tokens: MaxTok = None, pii: Pii = None,
                 injection: Inj = None, audit_content: Aud = None, rpm: Rpm = None, tpm: Tpm = None,
                 daily_tokens: Daily = None, monthly_tokens: Monthly = None,
                 clear: Annotated[Optional[str], typer.Option(help="Comma-separated limits to remove: "
                                  "max_tokens,requests_per_minute,tokens_per_minute,daily_tokens,monthly_tokens")]
                 = None, config: ConfigOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Change a team's policy; options left out keep their value."""
    from gateway.accounts import TeamUpdate

    data = {**_policy(models, max_tokens, pii, injection, audit_content),
            **_limits(rpm, tpm, daily_tokens, monthly_tokens)}
    for field in (clear or "").split(","):
        if field.strip():
            data[field.strip()] = None
    changes = _validated(TeamUpdate, data)
    try:
        out = _accounts(config, database_url).update_team(name, changes)
    except SovereignError as exc:
        _fail(exc)
    _print_teams([out], as_json)


@teams_app.command("delete")
def teams_delete(name: str,
                 force: Annotated[bool, typer.Option("--force", help="Also when some of its keys still work.")] = False,
                 config: ConfigOpt = None, database_url: DbOpt = None) -> None:
    """Delete a team and its keys (refused while one still works, unless --force)."""
    try:
        n = _accounts(config, database_url).delete_team(name, force=force)
    except SovereignError as exc:
        _fail(exc)
    console.print(f"Deleted team {name}" + (f" and its {n} key(s)." if n else "."))


def register(app: typer.Typer) -> None:
    """Add this room's commands to the root app."""
    app.command("gateway")(gateway)
    app.add_typer(keys_app, name="keys")
    app.add_typer(teams_app, name="teams")
    from gateway.audit_cli import register_audit

    register_audit(app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.main.get_command(keys_app)())
