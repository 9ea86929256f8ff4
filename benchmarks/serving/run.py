"""vLLM (our supervisor, `cpu` profile) against llama.cpp's server on the embedded default model, side by side.

    python -m benchmarks.serving.run                       # both servers, c=1,4,16, 2 interleaved rounds
    python -m benchmarks.serving.run --servers vllm --set MAX_NUM_SEQS=64 --label seqs64   # a tuning experiment
    python -m benchmarks.serving.run --variant "2threads:CPU_RESERVED_CPUS=0;CPU_THREADS_BIND=0-1" \
        --servers vllm,vllm:2threads,llamacpp            # several vLLM settings, interleaved in the same run

Each round starts one server, warms it up, measures every concurrency level, stops it, then does the same for the
next server (A,B,A,B...). Figures are medians over rounds; the load average is recorded with each measurement
because the machine is shared. Results go to benchmarks/serving/results/<time>-<label>.json.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.serving.loadgen import run_level, warm_up
from benchmarks.serving.servers import REPO, LlamaCppServer, Server, VllmServer, ensure_default_model
from serving.store import DEFAULT_MODEL_NAME
from sovereign.formats import write_json_atomic

console = Console(width=160)  # the table stays whole when the output goes to a file
app = typer.Typer(add_completion=False)
PEER = "llamacpp"
_EMPTY = {"tokens_per_s": None, "ttft_p50_ms": None, "ttft_p99_ms": None, "load_avg": None}


def _token_counter(model_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids) if text else 0


def _make(kind: str, home: Path, profile: str, overrides: dict[str, str], llama_threads: Optional[int],
          logs: Path, rnd: int) -> Server:
    if not _is_peer(kind):
        return VllmServer(kind, DEFAULT_MODEL_NAME, logs / f"{kind.replace(':', '-')}-supervisor-{rnd}.log", home=home,
                          profile=profile, overrides=overrides)
    server = LlamaCppServer(kind, DEFAULT_MODEL_NAME, logs / f"{kind.replace(':', '-')}-{rnd}.log")
    threads = kind.partition(":")[2]
    if threads or llama_threads:
        server.n_threads = int(threads) if threads else llama_threads
    return server


def _is_peer(kind: str) -> bool:
    """llamacpp (its default threads or --llama-threads) or llamacpp:N (N threads)."""
    name, _, threads = kind.partition(":")
    return name == PEER and (not threads or threads.isdigit())


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


@app.command()
def main(
    servers: Annotated[str, typer.Option(help="Comma list, measured in this order each round: vllm, vllm:VARIANT, "
                                   "llamacpp, llamacpp:THREADS.")] = "vllm,llamacpp",
    concurrency: Annotated[str, typer.Option(help="Comma list of concurrency levels.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Requests per level: max(this, 2*concurrency).")] = 8,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request (greedy).")] = 128,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; figures are medians.")] = 2,
    home: Annotated[Path, typer.Option(help="SOVEREIGN_HOME for the bench (model imported when missing).")] =
        REPO / "var" / "bench-home",
    profile: Annotated[str, typer.Option(help="vLLM serving profile: cpu or a YAML path.")] = "cpu",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Profile override KEY=VALUE "
                    "(SOVEREIGN_SERVING_KEY) for every vLLM server, repeatable.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="NAME:KEY=VALUE;KEY=VALUE: a further vLLM setting, "
                       "measured as server vllm:NAME (on top of --set), repeatable.")] = None,
    llama_threads: Annotated[Optional[int], typer.Option(help="llama.cpp threads (default: the library's, half the cores).")] = None,
    label: Annotated[str, typer.Option(help="Name of this run in the results file.")] = "compare",
    out: Annotated[Path, typer.Option(help="Results folder.")] = REPO / "benchmarks" / "serving" / "results",
) -> None:
    # SIGTERM unwinds like Ctrl-C, so the server being measured is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [s.strip() for s in servers.split(",") if s.strip()]
    overrides = _pairs(set_ or [], "--set")
    variants = {"vllm": overrides}
    for v in variant or []:
        name, _, pairs = v.partition(":")
        variants[f"vllm:{name}"] = {**overrides, **_pairs(pairs.split(";"), "--variant")}
    if bad := [k for k in kinds if k not in variants and not _is_peer(k)]:
        raise typer.BadParameter(f"unknown server {bad}; choose from {[*variants, PEER, PEER + ':N']}",
                                 param_hint="--servers")
    levels = [int(c) for c in concurrency.split(",")]
    model_dir = ensure_default_model(home)
    count = _token_counter(model_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    logs = out / f"{stamp}-{label}-logs"
    runs: list[dict] = []
    load_start = os.getloadavg()[0]
    path = out / f"{stamp}-{label}.json"

    for rnd in range(rounds):
        for kind in kinds:
            server = _make(kind, home, profile, variants.get(kind, {}), llama_threads, logs, rnd)
            with server:
                startup = server.start()
                console.print(f"[bold]round {rnd + 1}/{rounds} {kind}[/bold] ready in {startup:.0f}s "
                              f"(load {os.getloadavg()[0]:.2f})")
                asyncio.run(warm_up(server.url, DEFAULT_MODEL_NAME, count, max_tokens))
                for c in levels:
                    n = max(requests, 2 * c)
                    load_before = os.getloadavg()[0]
                    res = asyncio.run(run_level(server.url, DEFAULT_MODEL_NAME, c, n, max_tokens, count))
                    row = {"round": rnd, "server": kind, "startup_s": startup, "load_before": load_before,
                           "load_after": os.getloadavg()[0], **res.summary(),
                           "per_request": [r.__dict__ for r in res.per_request]}
                    runs.append(row)
                    console.print(f"  c={c:<3} {res.tokens_per_s:7.1f} tok/s  TTFT p50 {_fmt(res.ttft_p50_ms, 0)} ms"
                                  f"  p99 {_fmt(res.ttft_p99_ms, 0)} ms  ({res.output_tokens} tokens, "
                                  f"{res.errors} errors, load {load_before:.2f})")
                if isinstance(server, VllmServer) and rnd == 0:
                    _keep_engine_log(server, logs / f"{kind.replace(':', '-')}-engine-0.log")
            # Written after every server, so an interrupted run still leaves what it measured.
            summary = _summarise(runs, list(dict.fromkeys(kinds)), levels)
            write_json_atomic(path, {
                "label": label, "started_at": stamp, "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
                "servers": kinds, "profile": profile, "overrides": {k: v for k, v in variants.items() if k in kinds},
                "load_avg_start_end": [load_start, os.getloadavg()[0]], "max_tokens": max_tokens,
                "requests_min": requests, "rounds": rounds, "rounds_done": rnd + (kind == kinds[-1]),
                "summary": summary, "runs": runs})

    _print(summary, list(dict.fromkeys(kinds)), levels, label)
    console.print(f"results: {path}")


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{kv!r} is not KEY=VALUE", param_hint=option)
        out[key.strip().upper()] = value.strip()
    return out


def _keep_engine_log(server: VllmServer, dest: Path) -> None:
    """vLLM's own log (thread binding, KV cache size) of the first round, beside the results."""
    src = server.engine_log()
    if src.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())


def _summarise(runs: list[dict], kinds: list[str], levels: list[int]) -> dict:
    out: dict = {}
    for kind in kinds:
        for c in levels:
            rows = [r for r in runs if r["server"] == kind and r["concurrency"] == c]
            if not rows:
                continue
            out[f"{kind}@{c}"] = {
                "tokens_per_s": _median([r["tokens_per_s"] for r in rows]),
                "ttft_p50_ms": _median([r["ttft_p50_ms"] for r in rows]),
                "ttft_p99_ms": _median([r["ttft_p99_ms"] for r in rows]),
                "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in rows],
                "load_avg": _median([r["load_before"] for r in rows]),
                "errors": sum(r["errors"] for r in rows),
            }
    return out


def _print(summary: dict, kinds: list[str], levels: list[int], label: str) -> None:
    """One row per server and concurrency; ratios against the first llama.cpp listed, at the same concurrency."""
    peer_kind = next((k for k in kinds if _is_peer(k)), PEER)
    table = Table(title=f"serving benchmark: {label} (medians over rounds)")
    for col in ("server", "c", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "tok/s vs llama.cpp", "TTFT p50 vs llama.cpp",
                "errors", "load avg"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for kind in kinds:
        for c in levels:
            s = summary.get(f"{kind}@{c}", _EMPTY)
            peer = summary.get(f"{peer_kind}@{c}", _EMPTY)
            mine = not _is_peer(kind)
            table.add_row(kind, str(c), _fmt(s["tokens_per_s"]), _fmt(s["ttft_p50_ms"], 0), _fmt(s["ttft_p99_ms"], 0),
                          _ratio(s["tokens_per_s"], peer["tokens_per_s"]) if mine else "",
                          _ratio(s["ttft_p50_ms"], peer["ttft_p50_ms"]) if mine else "", str(s.get("errors", "-")),
                          _fmt(s["load_avg"], 1))
        table.add_section()
    console.print(table)


if __name__ == "__main__":
    app()
