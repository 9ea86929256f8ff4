"""The two servers under test, each started as a child process with the offline environment and stopped (its whole
process group) before the other one starts.

- vLLM: through our supervisor (`sovereign serve --profile cpu`), exactly as the platform runs it.
- llama.cpp: llama-cpp-python's OpenAI server on the very GGUF file the default model was imported from.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving.store import DEFAULT_MODEL_NAME, ModelStore, default_gguf_path
from sovereign.offline import offline_env

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    model: str
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return offline_env()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 900) -> float:
        """Start and wait until it serves; returns the seconds it took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log_path}")
            if self.ready():
                return time.monotonic() - t0
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self, grace: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # vLLM's engine/worker processes live in the same group; make sure none outlives its parent.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class VllmServer(Server):
    """vLLM's CPU build under our supervisor. `profile` is `cpu` or a YAML path; `overrides` are
    SOVEREIGN_SERVING_* settings (e.g. {"MAX_NUM_SEQS": "64"}) layered on it, as an operator would."""

    home: Path = Path("var/bench-home")
    profile: str = "cpu"
    overrides: dict[str, str] = field(default_factory=dict)
    health_port: int = field(default_factory=free_port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sovereign.cli", "serve", "--profile", self.profile, "--model", self.model,
                "--port", str(self.port), "--health-port", str(self.health_port)]

    def environment(self) -> dict[str, str]:
        extra = {f"SOVEREIGN_SERVING_{k.upper()}": v for k, v in self.overrides.items()}
        return offline_env(SOVEREIGN_HOME=str(self.home.resolve()), PYTHONPATH=str(REPO), **extra)

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=5,
                             trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def engine_log(self) -> Path:
        return self.home / "run" / f"serve-{self.port}" / "vllm.log"


@dataclass
class LlamaCppServer(Server):
    """llama-cpp-python's server. It runs one request at a time, and by default a new request interrupts the one
    in progress (its stream just ends): `--interrupt_requests False` makes requests queue instead, so every
    request is answered in full. n_threads: None keeps the library's default
    (half the cores: 1 of 2 here, as vLLM's one model thread); n_ctx matches the vLLM profile's max_model_len."""

    gguf: Path = field(default_factory=default_gguf_path)
    n_threads: int | None = None
    n_ctx: int = 4096
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        threads = [] if self.n_threads is None else ["--n_threads", str(self.n_threads), "--n_threads_batch",
                                                     str(self.n_threads)]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--interrupt_requests", "False", *threads,
                *self.extra_args]


def ensure_default_model(home: Path) -> Path:
    """Import the embedded default into the bench store when missing; returns the model folder."""
    store = ModelStore(home / "models")
    if not store.exists(DEFAULT_MODEL_NAME):
        subprocess.run([sys.executable, "-m", "sovereign.cli", "models", "import-default"], check=True, cwd=REPO,
                       env=offline_env(SOVEREIGN_HOME=str(home.resolve()), PYTHONPATH=str(REPO)))
    return store.path(DEFAULT_MODEL_NAME)
