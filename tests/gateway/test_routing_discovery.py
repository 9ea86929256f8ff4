"""Router.discover: a just-published adapter is waited for (it is hot-loaded asynchronously), within a bound."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp

from gateway.routing import Router


def test_discover_waits_until_a_replica_lists_the_adapter(upstream):
    router = Router({"fake-model": [upstream.url]}, health_interval_s=60)

    async def main() -> tuple[bool, float]:
        async with aiohttp.ClientSession() as session:
            router._session = session
            await router.probe_all()
            assert router.resolve("support@2") is None
            # the replica loads the adapter a little later, as the supervisor does after a publish
            threading.Timer(1.5, lambda: upstream.adapters.append("support@2")).start()
            t0 = time.monotonic()
            found = await router.discover("support@2", within_s=20, every_s=0.2)
            return found, time.monotonic() - t0

    found, waited = asyncio.run(main())
    assert found and 1.0 <= waited < 20
    base, adapter, replicas = router.resolve("support@2")
    assert (base, adapter, [r.url for r in replicas]) == ("fake-model", "support@2", [upstream.url])


def test_discover_gives_up_after_its_bound(upstream):
    router = Router({"fake-model": [upstream.url]}, health_interval_s=60)

    async def main() -> tuple[bool, float]:
        async with aiohttp.ClientSession() as session:
            router._session = session
            t0 = time.monotonic()
            found = await router.discover("never@1", within_s=0.6, every_s=0.2)
            return found, time.monotonic() - t0

    found, waited = asyncio.run(main())
    assert not found and waited < 10


def test_one_late_health_probe_does_not_take_a_replica_out_but_two_do():
    # A replica busy with a burst may answer one probe late; marking it down at once turned a lone replica's
    # traffic into 503s (and its gateway unready) until the next round.
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        router = Router({"fake-model": [url]}, health_interval_s=60, probe_timeout_s=0.2)

        async def probe_twice() -> list[tuple[bool, str | None]]:
            seen = []
            async with aiohttp.ClientSession() as session:
                router._session = session
                router.replicas[url].last_seen = time.time()  # it answered before: one late probe is forgiven
                for _ in range(2):
                    await router.probe_all()
                    r = router.replicas[url]
                    seen.append((r.healthy, r.last_error))
            return seen

        (first_ok, first_error), (second_ok, second_error) = asyncio.run(probe_twice())
    assert first_ok and "Timeout" in first_error
    assert not second_ok and "Timeout" in second_error and router.healthy_count() == 0


def test_a_refused_connection_takes_a_replica_out_at_the_first_probe(upstream):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        router = Router({"fake-model": [url, upstream.url]}, health_interval_s=60)

        async def probe() -> None:
            async with aiohttp.ClientSession() as session:
                router._session = session
                await router.probe_all()

        asyncio.run(probe())
    assert not router.replicas[url].healthy and "cannot connect" in router.replicas[url].last_error.lower()
    assert router.replicas[upstream.url].healthy


def test_a_replica_that_never_answered_is_out_at_its_first_failed_probe():
    import socket

    with socket.socket() as silent:  # accepts connections, never answers: not started yet, or not this service
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        router = Router({"fake-model": [url]}, health_interval_s=60, probe_timeout_s=0.2)

        async def probe() -> None:
            async with aiohttp.ClientSession() as session:
                router._session = session
                await router.probe_all()

        asyncio.run(probe())
    assert not router.replicas[url].healthy and router.healthy_count() == 0
