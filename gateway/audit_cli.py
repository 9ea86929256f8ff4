"""`sovereign audit verify|export|prune|changes|usage`: check the hash chain, ship the trail as JSON lines, move old
records into an archive, list who changed teams and keys, sum what teams used."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

_DB_HELP = ("The gateway database: sqlite:///path/gateway.db or postgresql://user@host/db "
            "(default: $SOVEREIGN_GATEWAY_DATABASE_URL, else <SOVEREIGN_HOME>/gateway.db)")


def _db_url(database_url: str | None) -> str:
    if database_url:
        return database_url
    from sovereign.settings import HomeSettings

    return f"sqlite:///{HomeSettings().home / 'gateway.db'}"


def register_audit(app: typer.Typer) -> None:
    """Add `audit verify` and `audit export` to the root app."""
    audit = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail of gateway requests.")

    @audit.command("verify")
    def verify_cmd(
        database_url: str = typer.Option(None, "--database-url", envvar="SOVEREIGN_GATEWAY_DATABASE_URL",
                                         help=_DB_HELP),
        file: Path = typer.Option(None, "--file", "-f", exists=True, dir_okay=False,
                                  help="Check an `audit export` file instead of the database"),
        anchor: str = typer.Option(None, "--anchor", help="With --file from `export --since`: the hash of the record "
                                                          "before its first, from an earlier export"),
    ) -> None:
        """Walk the hash chain; exit 1 naming the first edited, missing or reordered record."""
        from gateway.audit import AuditError
        from gateway.audit_read import verify, verify_jsonl

        if anchor is not None and file is None:
            raise typer.BadParameter("--anchor checks an export file: give --file too", param_hint="--anchor")
        try:
            result = verify_jsonl(file, anchor) if file is not None else verify(_db_url(database_url))
        except AuditError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from None
        if result.ok:
            typer.echo(f"OK: {result.reason}")
            return
        where = f" (record {result.first_bad_id})" if result.first_bad_id is not None else ""
        typer.echo(f"FAILED{where}: {result.reason}; {result.count} records verified before it", err=True)
        raise typer.Exit(1)

    @audit.command("export")
    def export_cmd(
        out: Path = typer.Option(None, "--out", "-o", help="Write JSONL here (atomically); default: stdout"),
        since: str = typer.Option(None, "--since", help="Only records from this time: ISO 8601 or unix seconds"),
        database_url: str = typer.Option(None, "--database-url", envvar="SOVEREIGN_GATEWAY_DATABASE_URL",
                                         help=_DB_HELP),
    ) -> None:
        """Export records as JSON lines, with id, prev_hash and hash so the chain can be checked elsewhere."""
        from gateway.audit import AuditError
        from gateway.audit_read import export

        try:
            n = export(_db_url(database_url), out if out is not None else sys.stdout, since=since)
        except AuditError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from None
        if out is not None:
            typer.echo(f"exported {n} records to {out}", err=True)

    @audit.command("prune")
    def prune_cmd(
        before: str = typer.Option(None, "--before", help="Prune records of requests that arrived before this time: "
                                                          "ISO 8601 or unix seconds (UTC)"),
        older_than: str = typer.Option(None, "--older-than", help="...or that arrived longer ago than this: 400d, "
                                                                  "12h (for a schedule)"),
        archive: Path = typer.Option(None, "--archive", dir_okay=False,
                                     help="Write the pruned records here first, as an export file (never overwritten)"),
        archive_dir: Path = typer.Option(None, "--archive-dir", file_okay=False,
                                         help="...or into this folder, as audit-FIRST-LAST.jsonl (for a schedule)"),
        no_archive: bool = typer.Option(False, "--no-archive", help="Delete without keeping them anywhere (data that "
                                                                    "must not be kept); the chain still records it"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be pruned, change nothing"),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation"),
        database_url: str = typer.Option(None, "--database-url", envvar="SOVEREIGN_GATEWAY_DATABASE_URL",
                                         help=_DB_HELP),
    ) -> None:
        """Move records older than a date out of the database into an archive file; the chain keeps a record of it,
        so `audit verify` still passes and the archive verifies on its own."""
        from gateway.audit import AuditError
        from gateway.audit_prune import plan, prune

        if (before is None) == (older_than is None):
            raise typer.BadParameter("give either --before TIME or --older-than SPAN", param_hint="--before")
        if sum((archive is not None, archive_dir is not None, no_archive)) != 1 and not dry_run:
            raise typer.BadParameter("give one of --archive FILE, --archive-dir DIR or --no-archive (delete without "
                                     "keeping the records)", param_hint="--archive")
        if older_than is not None:
            from gateway.cli import parse_duration

            if (span := parse_duration(older_than)) is None:
                raise typer.BadParameter(f"{older_than!r}: expected a span like 400d, 12h or 30m",
                                         param_hint="--older-than")
            before = str(time.time() - span.total_seconds())
        url = _db_url(database_url)
        try:
            p = plan(url, before)
            if p.count <= 0:
                typer.echo(f"nothing to prune: no record before {_when(float(before)) if older_than else before} "
                           f"(the chain starts at record {p.first_id})")
                return
            what = (f"records {p.first_id:,}..{p.through:,} ({p.count:,}, arrived {_when(p.first_ts)} .. "
                    f"{_when(p.last_ts)})")
            if dry_run:
                typer.echo(f"would prune {what}")
                return
            if archive_dir is not None:
                archive = archive_dir / f"audit-{p.first_id}-{p.through}.jsonl"
            if not yes:
                typer.confirm(f"Prune {what}" + (f" into {archive}?" if archive else ", keeping no copy?"), abort=True)
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as bar:
                task = bar.add_task("deleting", total=p.count)
                result = prune(url, before, archive, lambda done, total: bar.update(task, completed=done), planned=p)
        except AuditError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from None
        kept = f"archived to {archive} (sha256 {result.archive_sha256}), then " if archive else ""
        typer.echo(f"pruned {what}: {kept}deleted from the database. Record {result.declared_in:,} declares the prune "
                   f"(last hash pruned {result.last_hash}).")
        if archive:
            anchor = "" if p.first_id == 1 else f" --anchor {p.prev_hash}"
            typer.echo(f"Check the archive with `sovereign audit verify --file {archive}{anchor}`.")

    @audit.command("changes")
    def changes_cmd(
        team: str = typer.Option(None, "--team", help="Only changes to this team and its keys"),
        since: str = typer.Option(None, "--since", help="From this time: ISO 8601 or unix seconds (UTC)"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
        database_url: str = typer.Option(None, "--database-url", envvar="SOVEREIGN_GATEWAY_DATABASE_URL",
                                         help=_DB_HELP),
    ) -> None:
        """Who changed which team or key, and how (and when the trail was pruned), from the audit trail."""
        import json

        from gateway.audit import AuditError
        from gateway.audit_read import changes, parse_time

        try:
            rows = changes(_db_url(database_url), team, parse_time(since, "--since"))
        except AuditError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(rows))
            return
        from rich.table import Table

        from sovereign.console import table_console

        table = Table("record", "time (UTC)", "action", "team", "by", "what")
        for r in rows:
            what = json.dumps(r["details"], ensure_ascii=False, separators=(", ", ": "))
            table.add_row(str(r["id"]), r["time"][:19].replace("T", " "), r["action"], r["team"] or "", r["by"] or "",
                          what)
        table_console().print(table)

    @audit.command("usage")
    def usage_cmd(
        by: str = typer.Option("team", "--by", help="Comma-separated: team, key, model, adapter, status, day, month"),
        since: str = typer.Option(None, "--since", help="From this time: ISO 8601 or unix seconds (UTC)"),
        until: str = typer.Option(None, "--until", help="Before this time: ISO 8601 or unix seconds (UTC)"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
        database_url: str = typer.Option(None, "--database-url", envvar="SOVEREIGN_GATEWAY_DATABASE_URL",
                                         help=_DB_HELP),
    ) -> None:
        """Requests, errors and tokens per team (or key, model, adapter, status, day, month), from the audit trail:
        what each team was charged."""
        import json

        from gateway.audit import AuditError
        from gateway.audit_read import parse_time
        from gateway.audit_usage import total, usage

        groups = [g.strip() for g in by.split(",") if g.strip()]
        try:
            rows = usage(_db_url(database_url), groups, parse_time(since, "--since"), parse_time(until, "--until"))
        except AuditError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps([r.as_dict() for r in rows]))
            return
        from rich.table import Table

        from sovereign.console import table_console

        table = Table(*groups)
        for name in ("requests", "errors", "prompt tokens", "completion tokens", "total tokens"):
            table.add_column(name, justify="right")
        table.add_column("last request (UTC)")
        for r in rows:
            table.add_row(*("" if v is None else str(v) for v in r.group.values()), *_counts(r))
        if len(rows) > 1:
            table.add_row(*(["total"] + [""] * (len(groups) - 1)), *_counts(total(rows)), style="bold")
        table_console().print(table)

    app.add_typer(audit, name="audit")


def _counts(u) -> list[str]:
    last = _when(u.last_request_at) if u.last_request_at else ""
    return [f"{n:,}" for n in (u.requests, u.errors, u.prompt_tokens, u.completion_tokens, u.total_tokens)] + [last]


def _when(ts: float | None) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts is not None else "?"
