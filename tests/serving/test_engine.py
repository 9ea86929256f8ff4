"""EngineProcess.failure_reason: why a vLLM start failed, from that start's own output (real vLLM lines)."""

import asyncio
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


def _engine(tmp_path: Path, before: str) -> EngineProcess:
    log = tmp_path / "vllm.log"
    log.write_text(before)
    engine = EngineProcess(ServingProfile.named("cpu"), tmp_path, "m", log)
    engine.command = lambda: ["/bin/true"]  # type: ignore[method-assign]  # only the log offset matters here

    async def run() -> None:
        await engine.start()
        await engine.proc.wait()

    asyncio.run(run())
    return engine


def test_the_root_cause_is_named_first_and_an_earlier_starts_error_is_not_this_ones(tmp_path):
    engine = _engine(tmp_path, EARLIER)
    with open(engine.log_path, "a") as fh:
        fh.write(ROOT_CAUSE)
    reason = engine.failure_reason()
    assert reason.startswith("ValueError: The model's max seq len (8192) is larger")
    assert reason.endswith("(then: RuntimeError: Engine core initialization failed. See root cause above. "
                           "Failed core proc(s): {})")
    assert "Address already in use" not in reason


def test_argparse_refusals_and_clean_logs(tmp_path):
    engine = _engine(tmp_path, EARLIER)
    assert engine.failure_reason() is None  # this start wrote nothing that says why
    with open(engine.log_path, "a") as fh:
        fh.write(ARGPARSE)
    assert engine.failure_reason() == "api_server.py: error: unrecognized arguments: --bogus-flag"
