"""Service logs: one JSON object per line, and no line per poll of a healthy dependency."""

from __future__ import annotations

import json
import logging

import httpx

from sovereign.logs import setup_json_logging


def test_a_service_log_holds_json_lines_and_no_line_per_http_request(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("httpx").level
    try:
        setup_json_logging()
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text="ok"))
        with httpx.Client(transport=transport) as client:
            for _ in range(3):  # the supervisor polls vLLM's /health like this every second
                assert client.get("http://127.0.0.1:8000/health").status_code == 200
        logging.getLogger("sovereign.serving.supervisor").info("engine up", extra={"port": 8000})
        logging.getLogger("httpx").warning("an httpx warning still shows")
    finally:
        root.handlers[:], level, httpx_level = saved
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["logger"], r["msg"]) for r in lines] == [("sovereign.serving.supervisor", "engine up"),
                                                       ("httpx", "an httpx warning still shows")]
    assert lines[0]["port"] == 8000 and lines[0]["level"] == "info"


def test_a_failing_copy_still_drains_the_pipe_so_the_child_never_blocks():
    """vLLM and the gateway write to a pipe their parent reads: a copier that stopped reading would hang them."""
    import os
    import threading
    import time

    import pytest

    from sovereign.logs import copy_lines

    class Broken(logging.Handler):
        def handle(self, record):
            raise OSError("disk full")

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    with open(read_fd, "rb") as pipe:
        copier = threading.Thread(target=lambda: pytest.raises(OSError, copy_lines, pipe, Broken()))
        copier.start()
        deadline, written = time.monotonic() + 30, 0
        while written < 4 << 20:  # far past a pipe's buffer: only a reader lets it through
            try:
                written += os.write(write_fd, b"x" * 4095 + b"\n")
            except BlockingIOError:
                assert time.monotonic() < deadline, f"the pipe stopped draining after {written} bytes"
                time.sleep(0.001)
        os.close(write_fd)
        copier.join(10)
        assert not copier.is_alive()
