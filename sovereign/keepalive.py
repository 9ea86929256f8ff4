"""Keep one command running: restart it with backoff when it dies, stop with it on SIGTERM or SIGINT.

`sovereign up` runs the gateway under it, as the serving supervisor keeps vLLM running: on one machine nothing else
brings the only door back after a crash or the OOM killer (Kubernetes restarts the gateway's pod itself). A command
that dies within `FIRST_START_S` of its first start is not restarted: a bad config or a busy port will not heal, and
`up` reports the exit instead of waiting on a restart loop.

    python -m sovereign.keepalive -- python -m sovereign.cli gateway --config PATH
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

FIRST_START_S = 5.0
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0
HEALTHY_S = 60.0  # a run this long resets the backoff


def _say(msg: str, **extra) -> None:
    print(json.dumps({"ts": round(time.time(), 3), "level": "warning", "logger": "sovereign.keepalive", "msg": msg,
                      **extra}), file=sys.stderr, flush=True)


def run(argv: list[str]) -> int:
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def forward(sig: int, _frame) -> None:
        stopping.append(sig)
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff, first = BACKOFF_S, True
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv)
        if stopping:  # the signal came while it was being started: it never saw it
            child.send_signal(stopping[0])
        code = child.wait()
        ran = time.monotonic() - started
        if stopping or (first and ran < FIRST_START_S):
            return code if code >= 0 else 128 - code
        first = False
        backoff = BACKOFF_S if ran >= HEALTHY_S else backoff
        _say("process died; restarting", command=argv[-3:], exit_code=code, ran_s=round(ran, 1), backoff_s=backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return code if code >= 0 else 128 - code
        backoff = min(backoff * 2, BACKOFF_MAX_S)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m sovereign.keepalive -- COMMAND [ARGS...]")
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
