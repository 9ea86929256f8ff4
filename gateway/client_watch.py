"""Noticing that a client hung up while its non-streamed answer is still being generated.

A non-streamed request sends nothing to the client until the model has finished, so nothing tells the gateway that
the client left (an SDK timeout, a closed tab): the replica would go on generating up to `max_tokens` for nobody, and
a client that retries on timeout piles up abandoned work on the GPUs. vLLM aborts a request whose connection closes,
so the gateway only has to hang up on the replica when the client hangs up on it.

Watching costs a task per request, so it starts only once an answer has taken `after` seconds: the fast answers that
make up most traffic never pay for it, and a long generation is noticed within `after` seconds of the client leaving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

WATCH_AFTER_S = 0.25


class ClientWatch:
    """Cancels the current task when the client disconnects, while `waiting()` says the answer is still awaited.

    `gone` tells the task, on its CancelledError, that the cancel was this watch's (and not a shutdown's).
    """

    __slots__ = ("_receive", "_task", "_waiting", "_timer", "_watcher", "_stopped", "gone")

    def __init__(self, receive, waiting: Callable[[], bool], after: float = WATCH_AFTER_S) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._waiting = waiting
        self._watcher: asyncio.Future | None = None
        self._stopped = False
        self.gone = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(after, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._stopped:
            return
        self._watcher = asyncio.ensure_future(self._receive())
        self._watcher.add_done_callback(self._heard)

    def _heard(self, fut: asyncio.Future) -> None:
        if self._stopped or fut.cancelled() or fut.exception() is not None:
            return
        # The body was read whole before the request went upstream, so the only message left is the disconnect.
        if fut.result().get("type") == "http.disconnect" and self._waiting():
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
