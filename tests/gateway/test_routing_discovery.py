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
