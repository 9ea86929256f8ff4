"""Keep one command running: restart it with backoff when it dies, stop with it on SIGTERM or SIGINT.

`sovereign up` runs the gateway under it, as the serving supervisor keeps vLLM running: on one machine nothing else
brings the only door back after a crash or the OOM killer (Kubernetes restarts the gateway's pod itself). A command
that exits within `FIRST_START_S` of its first start is not restarted: a bad config or a busy port will not heal, and
`up` reports the exit instead of waiting on a restart loop. One killed by a signal then (SIGKILL, the OOM killer) is
restarted like any later crash: it exited with no status of its own, so nothing says it would fail again.

With `--log FILE` the command's output goes to FILE, rotated (`sovereign.logs.rotating_log`: 64 MB, 4 older files kept,
FILE.1 the newest): the gateway's access log is a line per request, ~300 bytes, so a busy single-machine platform
would otherwise fill its disk (gigabytes a day at 100 requests/s). Kubernetes rotates pod logs itself.

    python -m sovereign.keepalive --log FILE -- python -m sovereign.cli gateway --config PATH
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
import time

from sovereign.logs import LOG_MAX_BYTES, copy_lines, log_line, rotating_log
from sovereign.parent_death import die_with_parent

FIRST_START_S = 5.0
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0
HEALTHY_S = 60.0  # a run this long resets the backoff


def run(argv: list[str], log_file: str | None = None, max_bytes: int = LOG_MAX_BYTES) -> int:
    stopping: list[int] = []
    child: subprocess.Popen | None = None
    # Where the keeper's own lines go, and with --log the command's too.
    log = rotating_log(log_file, max_bytes) if log_file else logging.StreamHandler(sys.stderr)
    copier: threading.Thread | None = None

    def say(msg: str, **extra) -> None:
        log.handle(log_line(json.dumps({"ts": round(time.time(), 3), "level": "warning",
                                        "logger": "sovereign.keepalive", "msg": msg, **extra})))

    def forward(sig: int, _frame) -> None:
        stopping.append(sig)
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff, first = BACKOFF_S, True
    while True:
        started = time.monotonic()
        piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if log_file else {}
        child = subprocess.Popen(argv, preexec_fn=die_with_parent, **piped)
        if log_file:
            copier = threading.Thread(target=copy_lines, args=(child.stdout, log), daemon=True)
            copier.start()
        if stopping:  # the signal came while it was being started: it never saw it
            child.send_signal(stopping[0])
        code = child.wait()
        ran = time.monotonic() - started
        if copier is not None:  # its last lines; a grandchild still holding the pipe does not hold us up
            copier.join(timeout=5)
        if stopping or (first and ran < FIRST_START_S and code >= 0):
            return code if code >= 0 else 128 - code
        first = False
        backoff = BACKOFF_S if ran >= HEALTHY_S else backoff
        say("process died; restarting", command=argv[-3:], exit_code=code, ran_s=round(ran, 1), backoff_s=backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return code if code >= 0 else 128 - code
        backoff = min(backoff * 2, BACKOFF_MAX_S)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sovereign.keepalive")
    parser.add_argument("--log", help="write the command's output here, rotated")
    parser.add_argument("--log-max-bytes", type=int, default=LOG_MAX_BYTES)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to keep running")
    sys.exit(run(command, args.log, args.log_max_bytes))


if __name__ == "__main__":
    main()
