"""`sovereign finetune run CONFIG` and `sovereign finetune run-job JOB_DIR`: the whole pipeline, with progress."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

_LEVEL_STYLE = {"info": "", "warn": "yellow", "error": "red"}


class _Printer:
    """Turns job events into console lines: stages and evaluation in full, training steps now and then."""

    def __init__(self) -> None:
        self._last_metrics = 0.0

    def __call__(self, level: str, type_: str, message: str, data: dict[str, Any]) -> None:
        if type_ == "metrics" and data.get("kind") == "metrics":
            now = time.monotonic()
            if now - self._last_metrics < 5 and sys.stderr.isatty():
                return  # the trainer's own progress bar shows every step on a terminal
            self._last_metrics = now
        style = _LEVEL_STYLE.get(level, "")
        stage = data.get("stage")
        prefix = f"[bold]{stage:>8}[/bold] " if stage else " " * 9
        text = f"[{style}]{message}[/{style}]" if style else message
        console.print(f"{prefix}{text}", highlight=False)


def _summary(record, runner) -> Table:
    table = Table(title=f"fine-tune job {record.id}: {record.status}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    r = runner.result
    table.add_row("status", record.status)
    if record.error:
        table.add_row("error", f"{record.error.get('code')}: {record.error.get('message')}")
    if r is not None:
        ev = r.evaluation
        table.add_row("fine_tuned_model", r.served_name)
        table.add_row("adapter", str(r.adapter_path))
        table.add_row("trained tokens", f"{r.trained_tokens:,}")
        table.add_row("best step", str(r.best_step))
        table.add_row("val loss base → adapter", f"{ev.base.loss:.4f} → {ev.adapter.loss:.4f}")
        table.add_row("val perplexity base → adapter", f"{ev.base.perplexity:.2f} → {ev.adapter.perplexity:.2f}")
        if ev.base_task and ev.adapter_task:
            table.add_row("token F1 base → adapter", f"{ev.base_task.token_f1:.3f} → {ev.adapter_task.token_f1:.3f}")
            table.add_row("ROUGE-L base → adapter", f"{ev.base_task.rouge_l:.3f} → {ev.adapter_task.rouge_l:.3f}")
            table.add_row("clean stops base → adapter",
                          f"{ev.base_task.clean_stop_rate:.0%} → {ev.adapter_task.clean_stop_rate:.0%}")
        leak = ev.leak
        table.add_row("leak probe", f"{'passed' if leak.passed else 'FAILED'}: {len(leak.leaked)} of {leak.trained} "
                      f"trained canaries leaked" if leak.probes else (leak.note or "not run"))
        if r.gate is not None:
            for check in r.gate.checks:
                table.add_row(f"gate: {check.name}", ("passed: " if check.passed else "FAILED: ") + check.message)
            if r.gate.tool_calls:
                table.add_row("tool calls base → adapter", f"{r.gate.tool_calls['base'].summary()} → "
                                                          f"{r.gate.tool_calls['adapter'].summary()}")
        else:
            table.add_row("gate", "skipped")
        table.add_row("stage seconds", ", ".join(f"{k} {v:.0f}" for k, v in r.timings.items()))
    return table


def _run_and_report(job_dir: Path, *, serving_url: Optional[str], skip_gate: bool) -> None:
    from finetune.jobs import JobRunner, RunnerSettings
    from sovereign.settings import HomeSettings

    overrides = {"serving_url": serving_url} if serving_url else {}
    runner = JobRunner(job_dir, settings=RunnerSettings.load(None, **overrides), home=HomeSettings(),
                       show_progress=sys.stderr.isatty(), skip_gate=skip_gate, on_event=_Printer())
    record = runner.run()
    console.print(_summary(record, runner))
    if record.status != "succeeded":
        raise typer.Exit(1)


def register_jobs(finetune_app: typer.Typer) -> None:
    @finetune_app.command("run")
    def run(
        config: Annotated[str, typer.Argument(help="configs/finetune/<name>.yaml, or a preset name such as ci-smoke")],
        serving_url: Annotated[Optional[str], typer.Option(
            help="The served vLLM the gate checks (env SOVEREIGN_FINETUNE_SERVING_URL; default "
                 "http://127.0.0.1:8000).")] = None,
        skip_gate: Annotated[bool, typer.Option(
            help="Publish without the training–serving consistency gate (no vLLM running).")] = False,
    ) -> None:
        """Prepare (if needed), train, evaluate, publish and gate one adapter; ends with a summary table."""
        from finetune.config import FinetuneConfig
        from finetune.jobs import create_local_job
        from sovereign.errors import SovereignError
        from sovereign.settings import HomeSettings, config_path

        try:
            path = config_path("finetune", config)
            cfg = FinetuneConfig.named(config)
            job_dir = create_local_job(cfg, path, HomeSettings())
        except SovereignError as exc:
            console.print(f"[red]error[/red] ({exc.code}): {exc}")
            raise typer.Exit(2) from None
        console.print(f"job folder: {job_dir}")
        _run_and_report(job_dir, serving_url=serving_url, skip_gate=skip_gate)

    @finetune_app.command("run-job")
    def run_job(
        job_dir: Annotated[Path, typer.Argument(help="SOVEREIGN_HOME/jobs/<job_id>, holding job.json")],
        serving_url: Annotated[Optional[str], typer.Option(help="The served vLLM the gate checks.")] = None,
    ) -> None:
        """Run a fine-tune job the gateway created; status, events and checkpoints go into JOB_DIR."""
        from sovereign.errors import SovereignError

        try:
            _run_and_report(job_dir, serving_url=serving_url, skip_gate=False)
        except SovereignError as exc:
            console.print(f"[red]error[/red] ({exc.code}): {exc}")
            raise typer.Exit(2) from None
