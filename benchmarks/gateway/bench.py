"""Gateway overhead, side by side in one run: direct to a fast local upstream, through our gateway (keys, policy,
quotas and audit on), and through LiteLLM's proxy; chat completions, streaming (SSE) and not.

    bash benchmarks/gateway/setup_litellm.sh          # once: LiteLLM's proxy into .venv-bench-litellm
    .venv/bin/python benchmarks/gateway/bench.py [--duration 10] [--connections 32] [--targets direct,sovereign,litellm]

For every target and mode:
  * latency: wrk with one connection (requests back to back), so p50/p99 minus direct's is what the proxy adds;
  * throughput: wrk with --connections, and the CPU seconds the proxy's processes burned meanwhile (from /proc), so
    requests/s per core = requests / proxy CPU seconds, which holds even on a shared, busy machine;
  * SSE events/s: `data:` events counted by wrk's response hook in the streaming throughput run.
The load generator is wrk (`apt-get install -y wrk`). Results: benchmarks/gateway/results/<time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from sovereign.offline import offline_env  # noqa: E402

MODEL = "bench-model"
PROMPT = [{"role": "user", "content": "Summarise our refund policy for a customer in two sentences."}]
LITELLM_VENV = REPO / ".venv-bench-litellm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    base_url: str  # ends with /v1
    api_key: str
    procs: list[subprocess.Popen] = field(default_factory=list)  # whose CPU counts as the target's
    note: str = ""
    audit_url: str | None = None  # ours: where its audit trail is, checked after the run

    def cpu_seconds(self) -> float:
        """User + system CPU of the target's processes and their children, from /proc (Linux)."""
        return sum(_tree_cpu(p.pid) for p in self.procs)


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _tree_cpu(int(child))
        return total
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return 0.0


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2, headers=headers)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# ------------------------------------------------------------------------------------------------------- targets


def start_upstream(work: Path, chunks: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start([sys.executable, str(HERE / "upstream.py"), "--port", str(port), "--chunks", str(chunks)],
                 work / "upstream.log", offline_env())
    wait_http(f"http://127.0.0.1:{port}/v1/models", 30, proc)
    return proc, f"http://127.0.0.1:{port}"


def code_tree(work: Path, ref: str) -> Path:
    """The project's files as of git ref `ref`, unpacked under work/ (for an A/B of two versions in one run)."""
    tree = work / f"tree-{ref.replace('/', '_')}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def start_sovereign(work: Path, upstream: str, audit_sync: str = "full", ref: str | None = None) -> Target:
    """Our gateway with everything on: a key of a team with a PII-redact policy, quotas, and the SQLite audit.

    audit_sync "full" (the default config): every audit commit is fsynced; "normal": commits reach the OS (a killed
    gateway loses nothing acknowledged) and are fsynced at checkpoints. ref: run the gateway's code as of that git
    commit instead of the working tree's (same venv, same settings).
    """
    port = free_port()
    name = ("sovereign" if audit_sync == "full" else f"sovereign-{audit_sync}") + (f"@{ref}" if ref else "")
    tree = code_tree(work, ref) if ref else REPO
    home = work / f"{name}-home"
    home.mkdir()
    admin_key = "sk-bench-admin-" + "x" * 32
    cfg = work / f"{name}.yaml"
    audit_url = None if audit_sync == "full" else f"sqlite:///{home / 'audit.db'}?synchronous={audit_sync}"
    cfg.write_text(json.dumps({"host": "127.0.0.1", "port": port, "models": {MODEL: [upstream]},
                               "audit_database_url": audit_url, "health_check_interval_s": 5,
                               "access_log": False}), encoding="utf-8")
    env = offline_env(SOVEREIGN_HOME=str(home), SOVEREIGN_GATEWAY_BOOTSTRAP_KEY=admin_key, PYTHONPATH=str(tree))
    proc = start([sys.executable, "-m", "sovereign.cli", "gateway", "--config", str(cfg), "--log-level", "warning"],
                 work / f"{name}.log", env, cwd=tree)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", 60, proc)
    admin = {"Authorization": f"Bearer {admin_key}"}
    # Limits high enough never to refuse, so every request runs the whole quota path (reserve + settle).
    limits = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10**10, "daily_tokens": 10**12,
              "monthly_tokens": 10**13}
    r = httpx.post(f"{base}/admin/teams", headers=admin, timeout=10,
                   json={"name": "bench", "allowed_models": ["*"], "pii": "redact", "injection": "flag",
                         "audit_content": "hash", "max_tokens": 4096, **limits})
    r.raise_for_status()
    r = httpx.post(f"{base}/admin/keys", headers=admin, timeout=10, json={"team": "bench", "name": "bench", **limits})
    r.raise_for_status()
    body = r.json()
    secret = body.get("key") or body.get("secret") or body.get("api_key")
    time.sleep(1.5)  # the directory refresher picks the new key up
    return Target(name, f"{base}/v1", secret, [proc],
                  audit_url=audit_url or f"sqlite:///{home / 'gateway.db'}",
                  note="key auth, team policy (pii=redact, injection=flag, audit_content=hash), quotas (in-process "
                       f"store, key+team limits), audit (SQLite WAL, synchronous={audit_sync.upper()}, group commit)")


def start_litellm(work: Path, upstream: str) -> Target:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        raise RuntimeError(f"{exe} missing: run `bash benchmarks/gateway/setup_litellm.sh` first")
    port = free_port()
    master = "sk-bench-master-" + "y" * 24
    cfg = work / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}",
                                                                "api_base": f"{upstream}/v1", "api_key": "sk-up"}}],
        "general_settings": {"master_key": master},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }), encoding="utf-8")
    env = offline_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
                      DISABLE_ADMIN_UI="True")
    env.pop("PYTHONPATH", None)
    proc = start([str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                 work / "litellm.log", env)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health/liveliness", 180, proc)
    wait_http(f"{base}/v1/models", 60, proc, headers={"Authorization": f"Bearer {master}"})
    return Target("litellm", f"{base}/v1", master, [proc],
                  note="LiteLLM proxy, master key only (no database: no virtual keys, budgets or spend logs), "
                       "1 worker")


# ---------------------------------------------------------------------------------------------------- measuring


def check_target(t: Target) -> dict:
    """One request of each kind through the real `openai` SDK: the figures only count if the answers are right."""
    from openai import OpenAI

    client = OpenAI(base_url=t.base_url, api_key=t.api_key, max_retries=0, timeout=30)
    out = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=64)
    assert out.choices[0].message.content and out.usage.completion_tokens > 0, out
    events = 0
    usage = None
    for chunk in client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=64, stream=True,
                                                stream_options={"include_usage": True}):
        events += 1
        usage = chunk.usage or usage
    assert events > 1 and usage is not None, (events, usage)
    return {"content_events": events, "completion_tokens": usage.completion_tokens}


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) events = 0; bad = 0 end
%(response)s
function done(summary, latency, requests)
  local ev, b = 0, 0
  for _, t in ipairs(threads) do ev = ev + (t:get("events") or 0); b = b + (t:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"mean_us":%%.1f,"max_us":%%d,"err_connect":%%d,"err_read":%%d,"err_write":%%d,"err_status":%%d,' ..
    '"err_timeout":%%d,"events":%%d,"bad":%%d}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write,
    e.status, e.timeout, ev, b))
end
"""
COUNT_EVENTS = r"""
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
  local _, n = string.gsub(body, "data:", "")
  events = events + n
end
"""


def wrk(t: Target, stream: bool, connections: int, threads: int, duration: float, work: Path) -> dict:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 64}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    script = work / f"wrk-{t.name}-{int(stream)}-{connections}.lua"
    script.write_text(WRK_LUA % {"body": json.dumps(json.dumps(body)), "key": t.api_key,
                                 "response": COUNT_EVENTS if stream else ""}, encoding="utf-8")
    url = t.base_url + "/chat/completions"
    cpu0 = t.cpu_seconds()
    proc = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--timeout", "10s",
                           "-s", str(script), url], capture_output=True, text=True, timeout=duration + 60)
    cpu = t.cpu_seconds() - cpu0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed for {t.name}: {proc.stdout}\n{proc.stderr}")
    res = json.loads(line[len("WRKJSON "):])
    secs = res["duration_us"] / 1e6
    res["rps"] = res["requests"] / secs
    res["cpu_s"] = cpu
    res["rps_per_core"] = res["requests"] / cpu if cpu > 0 else None
    res["events_per_s"] = res["events"] / secs if stream else None
    res["errors"] = sum(res[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return res


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def measure_all(targets: list[Target], args, work: Path) -> dict:
    """Latency in interleaved rounds (A B C A B C ...) so a burst of load from the rest of a shared machine hits all
    targets alike; figures are medians over rounds. Then the throughput runs, interleaved the same way when there
    are several (the run with the median requests/s per core stands for the target)."""
    out: dict = {t.name: {"note": t.note, "check": check_target(t)} for t in targets}
    modes = [m for m in ("json", "sse") if m in args.modes.split(",")]
    for t in targets:
        for mode in modes:
            wrk(t, mode == "sse", 4, 1, 1, work)  # warm-up: connections, lazy paths
    for mode in modes:
        stream = mode == "sse"
        rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
        for _ in range(args.rounds):
            for t in targets:
                rounds[t.name].append(wrk(t, stream, 1, 1, args.duration / args.rounds, work))
        runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        for _ in range(args.throughput_rounds):
            for t in targets:
                runs[t.name].append(wrk(t, stream, args.connections, 2, args.duration, work))
        for t in targets:
            rs = rounds[t.name]
            lat = {"p50_us": _median([r["p50_us"] for r in rs]), "p99_us": _median([r["p99_us"] for r in rs]),
                   "p50_us_min": min(r["p50_us"] for r in rs), "requests": sum(r["requests"] for r in rs),
                   "errors": sum(r["errors"] for r in rs), "rounds": rs}
            ordered = sorted(runs[t.name], key=lambda r: r["rps_per_core"] or 0)
            thr = dict(ordered[(len(ordered) - 1) // 2])
            if len(ordered) > 1:
                thr["rps_per_core_rounds"] = [r["rps_per_core"] for r in runs[t.name]]
            out[t.name][mode] = {"latency": lat, "throughput": thr}
            cpu_us = thr["cpu_s"] / thr["requests"] * 1e6 if thr["requests"] else 0
            print(f"  {t.name:9s} {mode:4s} c=1 p50 {lat['p50_us'] / 1000:7.3f} ms p99 {lat['p99_us'] / 1000:7.3f} ms"
                  f" | c={args.connections} {thr['rps']:8.0f} req/s, {thr['cpu_s']:.1f} cpu-s -> "
                  f"{thr['rps_per_core'] or 0:8.0f} req/s/core ({cpu_us:.0f} µs CPU per request)"
                  + (f", {thr['events_per_s']:9.0f} SSE events/s" if stream else "")
                  + (f"  ERRORS {lat['errors'] + thr['errors']}" if lat["errors"] + thr["errors"] else ""),
                  flush=True)
    return out


def summarise(results: dict, args) -> str:
    lines = [f"# Gateway overhead ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average at start "
             f"{results['meta']['loadavg_start']}; wrk, {args.duration:.0f} s per run, "
             f"{args.connections} connections for throughput; upstream: {args.chunks} content events per stream.", "",
             "| target | mode | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | req/s per core | "
             "SSE events/s | events/s per core |", "|---|---|---|---|---|---|---|---|---|---|"]
    direct = results["targets"].get("direct")
    for name, r in results["targets"].items():
        if "error" in r:
            lines.append(f"| {name} | - | failed: {r['error'][:120]} |||||||")
            continue
        for mode in ("json", "sse"):
            if mode not in r:
                continue
            lat, thr = r[mode]["latency"], r[mode]["throughput"]
            added = ("", "")
            if direct and "error" not in direct and name != "direct":
                d = direct[mode]["latency"]
                added = (f"{(lat['p50_us'] - d['p50_us']) / 1000:.3f}", f"{(lat['p99_us'] - d['p99_us']) / 1000:.3f}")
            ev = f"{thr['events_per_s']:.0f}" if thr["events_per_s"] else ""
            evc = f"{thr['events'] / thr['cpu_s']:.0f}" if thr["events_per_s"] and thr["cpu_s"] else ""
            lines.append(f"| {name} | {mode} | {lat['p50_us'] / 1000:.3f} | {lat['p99_us'] / 1000:.3f} | {added[0]} | "
                         f"{added[1]} | {thr['rps']:.0f} | {thr['rps_per_core'] or 0:.0f} | {ev} | {evc} |")
    lite = results["targets"].get("litellm")
    for name, sov in results["targets"].items():
        if not name.startswith("sovereign") or "error" in sov or not lite or "error" in lite:
            continue
        lines += ["", f"{name} vs LiteLLM:"]
        for mode in ("json", "sse"):
            if mode not in sov or mode not in lite:
                continue
            s, li = sov[mode], lite[mode]
            ratio = (s["throughput"]["rps_per_core"] or 0) / (li["throughput"]["rps_per_core"] or float("inf"))
            d = direct[mode]["latency"] if direct and "error" not in direct else {"p50_us": 0, "p99_us": 0}
            sa = max(1.0, s["latency"]["p50_us"] - d["p50_us"])
            la = li["latency"]["p50_us"] - d["p50_us"]
            lines.append(f"- {mode}: {ratio:.1f}x the requests/s per core; added p50 latency {la / sa:.1f}x lower "
                         f"({sa / 1000:.3f} ms vs {la / 1000:.3f} ms)")
    for name, old in results["targets"].items():
        new = results["targets"].get(name.partition("@")[0])
        if "@" not in name or not new or "error" in old or "error" in new:
            continue
        lines += ["", f"A/B, {name} -> working tree:"]
        for mode in ("json", "sse"):
            if mode in old and mode in new:
                o, n = old[mode], new[mode]
                cpu = [r["throughput"]["cpu_s"] / max(1, r["throughput"]["requests"]) * 1e6 for r in (o, n)]
                lines.append(f"- {mode}: c=1 p50 {o['latency']['p50_us']:.0f} -> {n['latency']['p50_us']:.0f} µs; "
                             f"CPU per request at {args.connections} connections {cpu[0]:.0f} -> {cpu[1]:.0f} µs "
                             f"({(cpu[1] / cpu[0] - 1) * 100:+.1f} %)")
    lines += ["", "Targets:"] + [f"- {n}: {r.get('note', '')}" + (f"; audit trail after the run: {r['audit']['records']} "
                                                                  f"records, verify {r['audit']['verify_ok']}"
                                                                  if "audit" in r else "")
                                 for n, r in results["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="Gateway overhead: direct vs our gateway vs LiteLLM's proxy.")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="connections for the throughput runs")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (each duration/rounds s)")
    ap.add_argument("--chunks", type=int, default=16, help="content events per streamed response")
    ap.add_argument("--targets", default="direct,sovereign,sovereign-normal,litellm",
                    help="direct, sovereign (audit fsync per commit), sovereign-normal (audit synchronous=NORMAL), "
                         "litellm; sovereign@REF or sovereign-normal@REF runs our gateway as of git commit REF "
                         "beside the working tree's, for an A/B of two versions in one run")
    ap.add_argument("--modes", default="json,sse", help="json, sse or both")
    ap.add_argument("--throughput-rounds", type=int, default=1,
                    help="interleaved throughput runs per target and mode (median requests/s per core); more than "
                         "one for an A/B, where CPU per request is the figure to compare")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="gwbench-"))
    results: dict = {"meta": {"started": time.time(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                              "cores": os.cpu_count(), "duration_s": args.duration,
                              "connections": args.connections, "chunks": args.chunks}, "targets": {}}
    upstream, up_url = start_upstream(work, args.chunks)
    print(f"upstream {up_url}; work dir {work}", flush=True)
    targets: list[Target] = []
    try:
        for name in wanted:
            try:
                if name == "direct":
                    targets.append(Target("direct", f"{up_url}/v1", "none", [upstream],
                                          note="the upstream fixture itself"))
                elif name.startswith("sovereign"):
                    base, _, ref = name.partition("@")
                    sync = base.split("-", 1)[1] if "-" in base else "full"
                    targets.append(start_sovereign(work, up_url, audit_sync=sync, ref=ref or None))
                elif name == "litellm":
                    targets.append(start_litellm(work, up_url))
                else:
                    raise RuntimeError(f"unknown target {name!r}")
            except Exception as exc:  # one broken peer should not hide the others' figures
                print(f"  {name}: FAILED to start: {exc!r} (logs in {work})", flush=True)
                results["targets"][name] = {"error": repr(exc)}
        results["targets"] = {**measure_all(targets, args, work), **results["targets"]}
        for t in targets:
            if t.audit_url:  # proof that the audit was on: one record per request, and the chain verifies
                from gateway.audit_read import verify

                v = verify(t.audit_url)
                results["targets"][t.name]["audit"] = {"records": v.count, "verify_ok": v.ok, "reason": v.reason}
                print(f"  {t.name}: audit trail {v.count} records, verify {'OK' if v.ok else 'FAILED: ' + v.reason}")
    finally:
        for t in targets:
            if t.name != "direct":
                for p in t.procs:
                    stop(p)
        stop(upstream)
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    md = summarise(results, args)
    (out / f"{stamp}.md").write_text(md, encoding="utf-8")
    print("\n" + md)
    print(f"results: {out / stamp}.json / .md")


if __name__ == "__main__":
    main()
