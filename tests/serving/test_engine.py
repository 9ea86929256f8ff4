"""EngineProcess.failure_reason: why a vLLM start failed, from that start's own output (real vLLM lines)."""

import asyncio
import sys
from pathlib import Path

from serving.engine import EngineProcess
from serving.profile import ServingProfile

EARLIER = "(APIServer pid=10) OSError: [Errno 98] Address already in use\n"
ROOT_CAUSE = """(APIServer pid=11) INFO 12-04 11:40:02 [api_server.py:100] vLLM API server version 0.32.0
(EngineCore pid=12) Traceback (most recent call last):
(EngineCore pid=12)   File "/x/vllm/v1/engine/core.py", line 90, in run_engine_core
(EngineCore pid=12) ValueError: The model's max seq len (8192) is larger than the maximum number of tokens that can be stored in KV cache
(APIServer pid=11) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
ARGPARSE = """usage: api_server.py [-h] [--model MODEL]
api_server.py: error: unrecognized arguments: --bogus-flag
"""


def _engine(tmp_path: Path, before: str, output: str, times: int = 1) -> EngineProcess:
    """A start whose process prints `output` `times` times, into a log that already holds an earlier start's
    `before`."""
    log = tmp_path / "vllm.log"
    log.write_text(before)
    engine = EngineProcess(ServingProfile.named("cpu"), tmp_path, "m", log)
    printer = f"import sys\nfor line in ({output!r} * {times}).splitlines(True):\n    sys.stdout.write(line)"
    engine.command = lambda: [sys.executable, "-c", printer]  # type: ignore[method-assign]

    async def run() -> None:
        await engine.start()
        await engine.proc.wait()
        await engine.drained()

    asyncio.run(run())
    return engine


def test_the_root_cause_is_named_first_and_an_earlier_starts_error_is_not_this_ones(tmp_path):
    engine = _engine(tmp_path, EARLIER, ROOT_CAUSE)
    reason = engine.failure_reason()
    assert reason.startswith("ValueError: The model's max seq len (8192) is larger")
    assert reason.endswith("(then: RuntimeError: Engine core initialization failed. See root cause above. "
                           "Failed core proc(s): {})")
    assert "Address already in use" not in reason
    assert engine.log_path.read_text() == EARLIER + ROOT_CAUSE  # appended to the log, whole


def test_argparse_refusals_and_clean_logs(tmp_path):
    assert _engine(tmp_path, EARLIER, "INFO all good\n").failure_reason() is None  # this start said nothing of why
    engine = _engine(tmp_path, EARLIER, ARGPARSE)
    assert engine.failure_reason() == "api_server.py: error: unrecognized arguments: --bogus-flag"


def test_vllms_log_is_rotated_in_whole_lines(tmp_path, monkeypatch):
    """vLLM logs while it serves, for as long as it serves: its log is rotated like the gateway's."""
    from serving import engine as engine_module
    from sovereign.logs import LOG_BACKUPS, rotating_log

    monkeypatch.setattr(engine_module, "rotating_log", lambda path: rotating_log(path, max_bytes=20_000))
    line = "(APIServer pid=1) INFO Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 9.9 tokens/s\n"
    engine = _engine(tmp_path, "", line, 2000)  # ~200 KB, in 8 KB writes
    files = sorted(tmp_path.glob("vllm.log*"))
    assert [f.name for f in files] == ["vllm.log", *(f"vllm.log.{i}" for i in range(1, LOG_BACKUPS + 1))]
    assert all(f.stat().st_size <= 20_000 for f in files)
    assert all(text.count("\n") and text == line * text.count("\n") for text in (f.read_text() for f in files))
    assert engine.failure_reason() is None


def test_the_engine_process_dies_with_its_supervisor_even_when_that_is_sigkilled(tmp_path):
    """A SIGKILLed supervisor cannot stop vLLM itself: the kernel tells the engine instead (parent-death signal)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import asyncio, sys
from sovereign.parent_death import die_with_parent
async def main():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(600)",
                                                start_new_session=True, preexec_fn=die_with_parent)
    open({str(pid_file)!r}, "w").write(str(proc.pid))
    await proc.wait()
asyncio.run(main())
"""])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child = psutil.Process(int(pid_file.read_text()))
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        child.wait(10)  # gone on its own, though in a session of its own; psutil.TimeoutExpired if not
        assert not child.is_running()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_taken_port_is_seen_before_vllm_starts():
    import socket

    from serving.engine import port_taken

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_taken("127.0.0.1", port) and port_taken("0.0.0.0", port)
    assert not port_taken("127.0.0.1", port)
