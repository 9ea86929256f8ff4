"""`sovereign finetune sample-data` and `sovereign finetune prepare`.

Heavy imports (transformers, datasketch) happen inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sovereign.errors import SovereignError
from sovereign.settings import HomeSettings

console = Console(stderr=True)
MAX_PROBLEM_ROWS = 40


def register_data(finetune_app: typer.Typer) -> None:
    finetune_app.command("sample-data")(sample_data)
    finetune_app.command("prepare")(prepare)


def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the sample set into.")],
    conversations: Annotated[int, typer.Option(min=60, help="Rows in the main file, duplicates included.")] = 3000,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
) -> None:
    """Generate customer-service and sales conversations (zh/en) with planted PII, duplicates and broken rows."""
    from finetune.sample_data import MANIFEST_FILE, generate

    manifest = generate(out_dir, conversations=conversations, seed=seed)
    table = Table(title=f"sample data in {out_dir}")
    for col in ("file", "bytes", "sha256"):
        table.add_column(col)
    for name, info in manifest["files"].items():
        table.add_row(name, f"{info['bytes']:,}", info["sha256"][:16])
    console.print(table)
    console.print(f"{manifest['conversations']} conversations, {len(manifest['pii'])} planted PII values, "
                  f"{len(manifest['duplicates']['exact'])} exact + {len(manifest['duplicates']['near'])} near "
                  f"duplicates, {len(manifest['canaries'])} canaries, {len(manifest['broken']['problems'])} broken "
                  f"rows in {manifest['broken']['file']}; details in {MANIFEST_FILE}")


class _RichHooks:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def stage(self, name: str, total: int | None = None):
        task = self.progress.add_task(name, total=total)
        return lambda: self.progress.advance(task)


def _parse_columns(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"{item!r}: write OURS=THEIRS, e.g. user=question", param_hint="--column")
        out[key.strip()] = value.strip()
    return out


def prepare(
    source: Annotated[Path, typer.Argument(help="Data file (OpenAI chat JSONL, ShareGPT, Alpaca, CSV), or a "
                                                "fine-tune config YAML whose `data:` names it.")],
    model: Annotated[Optional[str], typer.Option(help="Model in the store whose tokenizer and chat template "
                                                     "judge the data.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (train.jsonl, val.jsonl, "
                                                    "prepare_report.json).")] = None,
    format: Annotated[Optional[str], typer.Option(help="auto, openai, sharegpt, alpaca or csv.")] = None,
    validation_file: Annotated[Optional[Path], typer.Option(help="Held-out file; otherwise split off.")] = None,
    on_invalid: Annotated[Optional[str], typer.Option(help="fail (refuse the file) or drop (leave bad rows "
                                                          "out).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="Token limit per conversation.")] = None,
    column: Annotated[Optional[list[str]], typer.Option(help="CSV column mapping OURS=THEIRS, repeatable.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Validate, scrub PII, deduplicate and split a data file for training."""
    from pydantic import ValidationError

    from finetune.prepare import PrepareOptions, prepare as run_prepare
    from finetune.problems import DataInvalid
    from sovereign.settings import describe_validation_error

    overrides = {k: v for k, v in {"format": format, "on_invalid": on_invalid, "max_seq_len": max_seq_len}.items()
                 if v is not None}
    if column:
        overrides["columns"] = _parse_columns(column)
    try:
        if source.suffix in (".yaml", ".yml"):
            from finetune.config import FinetuneConfig

            cfg = FinetuneConfig.load(source)
            if cfg.data.train_file is None:
                raise SovereignError(f"{source}: data.train_file is not set", code="invalid_config")
            data_path, val_path = cfg.data.train_file, validation_file or cfg.data.validation_file
            model = model or cfg.model
            out = out or cfg.data.prepared_dir
            options = PrepareOptions.from_config(cfg, **overrides)
        else:
            from finetune.config import DEFAULT_MODEL

            data_path, val_path, model = source, validation_file, model or DEFAULT_MODEL
            options = PrepareOptions(**overrides)
        if out is None:
            raise typer.BadParameter("name the output folder with --out (or data.prepared_dir in the config)",
                                     param_hint="--out")
        for p in (data_path, val_path):
            if p is not None and not p.is_file():
                raise SovereignError(f"{p}: no such file", code="file_not_found")
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            report = run_prepare(data_path, out, model=model, models_dir=HomeSettings().models_dir, options=options,
                                 validation_path=val_path, hooks=_RichHooks(progress))
    except DataInvalid as exc:
        _print_problems(exc.problems)
        console.print(f"[red]refused[/red] ({exc.code}): {exc}")
        if out is not None:
            console.print(f"report: {out / 'prepare_report.json'} (no training data written)")
        raise typer.Exit(2) from None
    except SovereignError as exc:
        console.print(f"[red]error[/red] ({exc.code}): {exc}")
        raise typer.Exit(2) from None
    except ValidationError as exc:  # a bad --format / --on-invalid / --max-seq-len
        console.print(f"[red]error[/red] (invalid_option): {describe_validation_error(exc)}")
        raise typer.Exit(2) from None
    _print_report(report, out)
    if json_out:
        print(json.dumps(report.model_dump(mode="json"), ensure_ascii=False, indent=2))


def _print_problems(problems) -> None:
    if not problems:
        return
    table = Table(title=f"{len(problems)} problem(s)")
    table.add_column("file")
    table.add_column("line", justify="right", no_wrap=True)
    table.add_column("code", no_wrap=True)  # codes are what scripts and people search for: never cut
    table.add_column("message", overflow="fold")
    for p in problems[:MAX_PROBLEM_ROWS]:
        table.add_row(p.file or "", str(p.line), p.code, p.message)
    if len(problems) > MAX_PROBLEM_ROWS:
        table.add_row("", "…", "", f"{len(problems) - MAX_PROBLEM_ROWS} more in prepare_report.json")
    console.print(table)


def _print_report(report, out: Path) -> None:
    _print_problems(report.problems)
    stages = Table(title="rows after each stage")
    stages.add_column("stage")
    stages.add_column("rows", justify="right")
    for name, n in report.stages.items():
        stages.add_row(name, f"{n:,}")
    console.print(stages)
    if report.scrub and report.scrub.enabled:
        counts = ", ".join(f"{k} {v}" for k, v in report.scrub.counts.items())
        console.print(f"PII replaced: {counts} (in {report.scrub.rows_changed} rows)")
    if report.dedup:
        console.print(f"duplicates removed: {report.dedup.exact_removed} exact, {report.dedup.near_removed} near "
                      f"(Jaccard >= {report.dedup.threshold})")
    for name, o in report.outputs.items():
        console.print(f"[green]{name}[/green]: {o.rows} rows, {o.tokens:,} tokens ({o.trainable_tokens:,} trained), "
                      f"sha256 {o.sha256[:16]}")
    console.print(f"written to {out}")
