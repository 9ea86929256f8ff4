"""The request path's HTTP/1.1 client (gateway/upstream.py) and the router against raw asyncio servers that misbehave
the way real replicas do: answers past the stream buffer, idle connections closed together, misses at once."""

import asyncio

import aiohttp

from gateway.routing import Router
from gateway.upstream import Pool


async def _server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def test_an_answer_larger_than_the_stream_buffer_is_read_whole_and_its_connection_reused():
    # An embeddings batch or logprobs answer past 1 MiB used to pause reading for good: a 504 after the stall limit,
    # or a paused connection pooled for the next request to hang on.
    body = b"x" * (3 << 20)

    async def handler(reader, writer):
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        writer.close()

    async def go():
        server, url = await _server(handler)
        pool = Pool(url)
        try:
            for _ in range(3):  # the second and third requests ride the pooled connection
                resp = await pool.request("POST", "/v1/embeddings", b"{}")
                assert len(await asyncio.wait_for(resp.read(), 5)) == len(body)
                resp.release()
                assert len(pool._idle) == 1
        finally:
            pool.close()
            server.close()

    asyncio.run(go())


def test_a_stale_pooled_connection_is_retried_on_a_new_one_not_on_another_stale_one():
    # uvicorn closes idle keep-alive connections after 5 s, many at once; here each old connection is closed when a
    # request arrives on it (the race a reused connection loses), so a retry on another pooled one fails too.
    state = {"stale_below": None, "next": 0}

    async def handler(reader, writer):
        cid, state["next"] = state["next"], state["next"] + 1
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if state["stale_below"] is not None and cid < state["stale_below"]:
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def go():
        server, url = await _server(handler)
        pool = Pool(url)
        try:
            responses = await asyncio.gather(*(pool.request("POST", "/x", b"{}") for _ in range(3)))
            for resp in responses:
                await resp.read()
                resp.release()
            assert len(pool._idle) == 3
            state["stale_below"] = state["next"]
            resp = await pool.request("POST", "/x", b"{}")
            assert await resp.read() == b"ok"
        finally:
            pool.close()
            server.close()

    asyncio.run(go())


def test_misses_arriving_together_share_one_probe_round():
    probes = 0

    async def handler(reader, writer):
        nonlocal probes
        await reader.readuntil(b"\r\n\r\n")
        probes += 1
        await asyncio.sleep(0.2)
        body = b'{"object":"list","data":[{"id":"base","object":"model"}]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    async def go():
        server, url = await _server(handler)
        router = Router({"base": [url]}, health_interval_s=3600)
        async with aiohttp.ClientSession() as session:
            router._session = session
            await router.probe_all()
            before = probes
            router._last_probe = 0.0  # long ago
            await asyncio.gather(*(router.refresh_on_miss() for _ in range(20)))
            assert probes - before == 1
        server.close()

    asyncio.run(go())


def test_an_ipv6_replica_gets_a_bracketed_host_header():
    assert Pool("http://[::1]:8000")._host_header == b"[::1]:8000"
    assert Pool("http://10.0.0.7:8000/base")._host_header == b"10.0.0.7:8000"
