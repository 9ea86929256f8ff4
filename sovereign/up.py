"""`sovereign up` / `down` / `status`: the embedded default on one machine, started in the background.

`up` imports the default model if it is missing, starts the serving supervisor (CPU profile unless a GPU is found)
and the gateway as detached processes, waits until a real chat answer comes back through the gateway, prints where
to send requests, and returns. `down` stops them. Logs and pid files live under SOVEREIGN_HOME/run/platform/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from sovereign.offline import offline_env
from sovereign.settings import HomeSettings

console = Console(stderr=True, soft_wrap=True)  # messages carry paths and URLs to copy: never cut them


@dataclass(frozen=True)
class Platform:
    home: HomeSettings

    @property
    def dir(self) -> Path:
        return self.home.run_dir / "platform"

    def pid_file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def running(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        try:  # a child of this very process that died is a zombie until reaped: kill(pid, 0) still succeeds
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return None
        except ChildProcessError:
            pass  # not our child (started by an earlier `up`): kill(pid, 0) said enough
        return pid

    def spawn(self, name: str, args: list[str], *, keep_alive: bool = False, **env: str) -> int:
        """Start `sovereign ARGS` detached; `keep_alive`: under sovereign.keepalive, restarted if it dies."""
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "sovereign.cli", *args]
        if keep_alive:  # the keeper writes the log, rotated
            command = [sys.executable, "-m", "sovereign.keepalive", "--log", str(self.log_file(name)), "--", *command]
        with open(self.log_file(name), "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env=offline_env(SOVEREIGN_HOME=str(self.home.home), **env),
                                    start_new_session=True)
        self.pid_file(name).write_text(str(proc.pid))
        return proc.pid

    @property
    def info_file(self) -> Path:
        return self.dir / "platform.json"

    def info(self) -> dict:
        """Where the last `up` put things (ports, URLs); {} before the first."""
        try:
            return json.loads(self.info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @property
    def admin_key_file(self) -> Path:
        return self.dir / "admin-key"

    def admin_key(self) -> str:
        """The bootstrap admin key of this machine's gateway: made once, kept owner-readable only."""
        if self.admin_key_file.is_file():
            return self.admin_key_file.read_text().strip()
        import secrets

        self.dir.mkdir(parents=True, exist_ok=True)
        key = "sk-sov-" + secrets.token_urlsafe(32)
        fd = os.open(self.admin_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key

    def write_gateway_config(self, model: str, vllm_url: str, port: int) -> Path:
        """The default gateway config with this machine's vLLM replica and port filled in."""
        import yaml

        from sovereign.settings import config_path

        config = yaml.safe_load(config_path("gateway", "default").read_text(encoding="utf-8"))
        config.update(host="127.0.0.1", port=port, models={model: [vllm_url]})
        path = self.dir / "gateway.yaml"
        self.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def stop(self, name: str, grace: float = 60) -> bool:
        pid = self.running(name)
        if pid is None:
            self.pid_file(name).unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.running(name):
            time.sleep(0.2)
        if self.running(name):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file(name).unlink(missing_ok=True)
        return True


# The serving supervisor retries a failed engine start for ever (a replica should heal); `up` has a person waiting,
# and a start that failed this many times in a row for the same reason will not heal by itself.
_FAILED_STARTS = 2


def _wait(url: str, what: str, timeout: float, pid_check) -> dict:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with console.status(f"waiting for {what}…") as status:
        while time.monotonic() < deadline:
            if not pid_check():
                raise RuntimeError(f"{what} exited during start-up")
            try:
                r = httpx.get(url, timeout=3, trust_env=False)
                if r.status_code == 200:
                    return r.json()
                last = r.text[:200]
                state = r.json()
                if isinstance(state, dict) and "engine" in state:
                    if (state.get("failed_starts") or 0) >= _FAILED_STARTS and state.get("error"):
                        raise RuntimeError(f"{what} failed to start {state['failed_starts']} times: {state['error']}")
                    status.update(f"waiting for {what}: {state.get('engine')}…")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s (last answer: {last})")


def up(
    profile: Annotated[str, typer.Option(help="Serving profile; default: cpu, or gpu when a GPU is found.")] = "",
    port: Annotated[int, typer.Option(help="The gateway's port (where apps send requests).")] = 8080,
    vllm_port: Annotated[int, typer.Option(help="vLLM's port (loopback only).")] = 8000,
    health_port: Annotated[int, typer.Option(help="The serving supervisor's health port.")] = 8001,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the engine.")] = 900,
) -> None:
    """Bring the platform up on the embedded default model and check that it answers."""
    from serving.profile import detect_device
    from serving.store import DEFAULT_MODEL_NAME, ModelStore

    home = HomeSettings()
    plat = Platform(home)
    store = ModelStore(home.models_dir)
    if not store.exists(DEFAULT_MODEL_NAME):
        from serving.cli import models_import_default

        models_import_default()
    profile = profile or detect_device()
    from sovereign.formats import write_json_atomic

    write_json_atomic(plat.info_file, {"model": DEFAULT_MODEL_NAME, "profile": profile,
                                       "base_url": f"http://127.0.0.1:{port}/v1",
                                       "gateway_url": f"http://127.0.0.1:{port}",
                                       "health_url": f"http://127.0.0.1:{health_port}",
                                       "vllm_url": f"http://127.0.0.1:{vllm_port}"})
    spawned = not plat.running("serve")
    if spawned:
        plat.spawn("serve", ["serve", "--profile", profile, "--model", DEFAULT_MODEL_NAME, "--port", str(vllm_port),
                             "--health-port", str(health_port)], keep_alive=True)
    try:
        _wait(f"http://127.0.0.1:{health_port}/readyz", f"vLLM ({profile} profile)", timeout,
              lambda: plat.running("serve"))
    except RuntimeError as exc:
        if spawned:  # not left behind retrying in a loop
            plat.stop("serve")
        console.print(f"[red]error[/red]: {exc}; see {plat.log_file('serve')} and {home.run_dir}/serve-{vllm_port}/vllm.log")
        raise typer.Exit(1) from None
    api_key = os.environ.get("SOVEREIGN_GATEWAY_BOOTSTRAP_KEY") or plat.admin_key()
    if not plat.running("gateway"):
        config = plat.write_gateway_config(DEFAULT_MODEL_NAME, f"http://127.0.0.1:{vllm_port}", port)
        plat.spawn("gateway", ["gateway", "--config", str(config)], keep_alive=True,
                   SOVEREIGN_GATEWAY_BOOTSTRAP_KEY=api_key)
    try:
        _wait(f"http://127.0.0.1:{port}/readyz", "the gateway", 120, lambda: plat.running("gateway"))
    except RuntimeError as exc:
        console.print(f"[red]error[/red]: {exc}; see {plat.log_file('gateway')}")
        raise typer.Exit(1) from None
    base_url = f"http://127.0.0.1:{port}/v1"
    answer = _smoke(base_url, api_key, DEFAULT_MODEL_NAME)
    console.print(f"[green]Sovereign is up.[/green] Asked 'What is the capital of France?', {DEFAULT_MODEL_NAME} said: "
                  f"{answer!r}")
    print(json.dumps({"base_url": base_url, "api_key": api_key, "model": DEFAULT_MODEL_NAME,
                      "admin_key_file": str(plat.admin_key_file)}))
    console.print(f"Send requests to {base_url} with the admin key above (kept in {plat.admin_key_file}); make "
                  f"per-team keys with `sovereign teams create` and `sovereign keys create`. Logs: {plat.dir}. "
                  f"Stop with `sovereign down`.")


def _smoke(base_url: str, api_key: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=300)
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    return r.choices[0].message.content or ""


def down() -> None:
    """Stop what `sovereign up` started."""
    plat = Platform(HomeSettings())
    for name in ("gateway", "serve"):
        console.print(f"{name}: {'stopped' if plat.stop(name) else 'not running'}")


def _ask(url: str) -> dict | None:
    try:
        return httpx.get(url, timeout=3, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return None


def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of lines.")] = False) -> None:
    """Say whether what `sovereign up` started is running and answering; exit 1 if a part is not."""
    plat = Platform(HomeSettings())
    info = plat.info()
    serve_pid, gateway_pid = plat.running("serve"), plat.running("gateway")
    engine = (_ask(f"{info['health_url']}/status") if serve_pid and info else None) or {}
    door = (_ask(f"{info['gateway_url']}/readyz") if gateway_pid and info else None) or {}
    pii = door.get("pii_rules") or {}
    report = {
        "serve": {"pid": serve_pid, "engine": engine.get("engine"), "model": engine.get("model"),
                  "profile": info.get("profile"), "adapters_loaded": engine.get("adapters_loaded"),
                  "restarts": engine.get("restarts"), "error": engine.get("error"),
                  "log": str(plat.log_file("serve"))},
        "gateway": {"pid": gateway_pid, "ready": door.get("ready"), "base_url": info.get("base_url"),
                    "healthy_replicas": sum(r.get("healthy", False) for r in door.get("replicas", [])),
                    "models": door.get("models"), "pii_kinds": pii.get("kinds"),
                    "pii_rules_refused": (pii.get("refused") or {}).get("error"), "log": str(plat.log_file("gateway"))},
    }
    ok = engine.get("engine") == "ready" and door.get("ready") is True
    if as_json:
        print(json.dumps({"ok": ok, **report}, indent=2))
    else:
        for name, part in report.items():
            if part["pid"] is None:
                console.print(f"{name}: [red]not running[/red] (log: {part['log']})")
                continue
            state = part.get("engine") if name == "serve" else ("ready" if part["ready"] else "not ready")
            detail = {k: v for k, v in part.items()
                      if k not in ("pid", "engine", "ready", "log") and v not in (None, [])}
            colour = "green" if state == "ready" else "yellow"
            console.print(f"{name}: [{colour}]{state or 'not answering'}[/{colour}], pid {part['pid']}; "
                          + ", ".join(f"{k} {v}" for k, v in detail.items()))
        if not info:
            console.print(f"No record of a `sovereign up` in {plat.dir} (SOVEREIGN_HOME={plat.home.home}).")
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
