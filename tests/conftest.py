"""Session fixtures that start the real things once: the model store with the default model, and vLLM's CPU server
under our supervisor (`sovereign serve`). Tests share them; fast unit tests need none of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sovereign.offline import apply_offline_env, offline_env

apply_offline_env()  # before any test module imports huggingface_hub, which reads it once

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sovereign_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sovereign.cli", *args]


def run_sovereign(home: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `sovereign` CLI in a subprocess with SOVEREIGN_HOME=home."""
    env = offline_env(SOVEREIGN_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run(sovereign_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"sovereign {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def sovereign_home(tmp_path_factory) -> Path:
    """A SOVEREIGN_HOME with the default model imported (through the real CLI)."""
    home = tmp_path_factory.mktemp("sovereign-home")
    run_sovereign(home, "models", "import-default")
    return home


@dataclass
class ServerHandle:
    base_url: str
    health_url: str
    model: str
    home: Path
    proc: subprocess.Popen
    log_path: Path

    def status(self) -> dict:
        return httpx.get(f"{self.health_url}/status", timeout=5).json()

    def wait_ready(self, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.health_url}/readyz", timeout=5)
                last = r.json()
                if r.status_code == 200:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"vLLM not ready after {timeout}s: {last}\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        texts = []
        for p in (self.log_path, *sorted(self.home.glob("run/serve-*/vllm.log"))):
            if p.exists():
                texts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(texts)


def start_supervisor(home: Path, *extra: str, log_name: str = "supervisor.log",
                     model: str = DEFAULT_MODEL) -> ServerHandle:
    port, health = free_port(), free_port()
    log_path = home / log_name
    env = offline_env(SOVEREIGN_HOME=str(home), PYTHONPATH=str(REPO), SOVEREIGN_SERVING_ADAPTER_POLL_S="0.5")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(sovereign_cmd("serve", "--profile", "cpu", "--model", model, "--port",
                                              str(port), "--health-port", str(health), *extra),
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    return ServerHandle(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}", model, home, proc, log_path)


def stop_supervisor(handle: ServerHandle) -> None:
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
        try:
            handle.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(handle.proc.pid, signal.SIGKILL)
            handle.proc.wait()


@pytest.fixture(scope="session")
def vllm_server(sovereign_home: Path):
    """The real vLLM CPU server on the default model, under `sovereign serve`, shared by the whole session."""
    handle = start_supervisor(sovereign_home)
    try:
        handle.wait_ready()
        yield handle
    finally:
        stop_supervisor(handle)


@pytest.fixture()
def live_server(vllm_server: ServerHandle) -> ServerHandle:
    """`vllm_server`, waited on until ready (a test before may have killed the engine)."""
    vllm_server.wait_ready()
    return vllm_server


@pytest.fixture(scope="session")
def make_lora(sovereign_home: Path, tmp_path_factory):
    """Build real peft LoRA adapters for the default model: `make_lora(rank=8, seed=0, **lora_kwargs) -> folder`.

    Weights are random (init_lora_weights=False) so the adapter visibly changes greedy output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = sovereign_home / "models" / DEFAULT_MODEL
    root = tmp_path_factory.mktemp("loras")
    made = 0

    def make(rank: int = 8, seed: int = 0, scale: float = 20.0, **kwargs) -> Path:
        nonlocal made
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=kwargs.pop("target_modules",
                            ["q_proj", "k_proj", "v_proj", "o_proj"]), init_lora_weights=False, **kwargs)
        peft_model = get_peft_model(model, config)
        # nn.Linear's default init leaves B@A small enough that greedy text may not move; scale B so it does.
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(scale)
        made += 1
        out = root / f"lora-{made}"
        peft_model.save_pretrained(out)
        return out

    return make
