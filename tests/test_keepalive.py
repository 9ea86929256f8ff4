"""sovereign.keepalive: what `sovereign up` runs the gateway under."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sovereign.keepalive import FIRST_START_S

SLEEPER = "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(600)"


def _keepalive(*command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sovereign.keepalive", "--", *command], stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _pids(path: Path, at_least: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for p in path.read_text().split()] if path.exists() else []
        if len(pids) >= at_least:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} starts in {timeout}s")


def test_a_command_that_dies_is_restarted_and_sigterm_stops_both(tmp_path):
    starts = tmp_path / "starts"
    keeper = _keepalive(sys.executable, "-c", SLEEPER, str(starts))
    try:
        first = _pids(starts, 1)[0]
        time.sleep(FIRST_START_S + 0.5)  # past the first-start window: a later death is a crash, not a bad config
        os.kill(first, signal.SIGKILL)
        second = _pids(starts, 2)[1]
        assert second != first and psutil.pid_exists(second)
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(20) == 128 + signal.SIGTERM  # the child's own end, passed on
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        assert "process died; restarting" in keeper.stderr.read()
    finally:
        if keeper.poll() is None:
            os.killpg(keeper.pid, signal.SIGKILL)


def test_a_command_that_fails_at_its_first_start_is_not_restarted(tmp_path):
    starts = tmp_path / "starts"
    keeper = _keepalive(sys.executable, "-c", f"open({str(starts)!r}, 'a').write('1\\n'); raise SystemExit(2)")
    assert keeper.wait(20) == 2
    assert starts.read_text() == "1\n"


def test_a_command_killed_by_a_signal_at_its_first_start_is_restarted(tmp_path):
    """A config error exits with a status; SIGKILL or the OOM killer right after start is a crash, and heals."""
    starts = tmp_path / "starts"
    keeper = _keepalive(sys.executable, "-c", SLEEPER, str(starts))
    try:
        first = _pids(starts, 1)[0]
        os.kill(first, signal.SIGKILL)  # well inside the first-start window
        second = _pids(starts, 2)[1]
        assert second != first and psutil.pid_exists(second)
        assert keeper.poll() is None
    finally:
        os.killpg(keeper.pid, signal.SIGKILL)


def test_the_log_is_rotated_in_whole_lines_and_keeps_the_newest(tmp_path):
    """`up` runs each part with --log: a busy gateway's access log must not grow without bound."""
    log = tmp_path / "gateway.log"
    lines = 3000
    printer = ("import sys\nfor i in range(%d):\n    print(f'{{\"n\": {i}, \"pad\": \"{\"x\" * 80}\"}}')\n"
               "sys.stdout.flush(); raise SystemExit(3)" % lines)
    keeper = subprocess.Popen([sys.executable, "-m", "sovereign.keepalive", "--log", str(log), "--log-max-bytes",
                               "20000", "--", sys.executable, "-c", printer], start_new_session=True)
    assert keeper.wait(30) == 3  # died at its first start: passed on, not restarted
    files = sorted(tmp_path.glob("gateway.log*"))
    assert [f.name for f in files] == ["gateway.log", *(f"gateway.log.{i}" for i in range(1, 5))]
    assert all(f.stat().st_size <= 20000 for f in files)
    numbers = []
    for f in reversed(files):  # oldest first
        numbers += [json.loads(line)["n"] for line in f.read_text().splitlines()]  # every line whole
    assert numbers == list(range(lines - len(numbers), lines)) and numbers[-1] == lines - 1


def test_a_sigkilled_keeper_takes_its_command_with_it(tmp_path):
    """Else the gateway served on unkept, where `sovereign down` no longer found it and the next `up` could not bind."""
    starts = tmp_path / "starts"
    keeper = _keepalive(sys.executable, "-c", SLEEPER, str(starts))
    child = psutil.Process(_pids(starts, 1)[0])
    keeper.kill()
    keeper.wait(10)
    child.wait(10)  # psutil.TimeoutExpired if it outlived its keeper
