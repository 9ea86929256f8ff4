"""Child processes for the cross-process quota and audit tests (each plays one gateway replica).

    python gw_workers.py quota-load '<json spec>'      -> one JSON line with what this replica admitted and used
    python gw_workers.py audit-append DB_URL TAG N C   -> "ACK <request_id> <chain id>" per acknowledged record
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.audit import AuditRecord, open_audit_log  # noqa: E402
from gateway.quotas import QuotaExceeded, QuotaLimits, RedisQuotaStore  # noqa: E402


async def quota_load(spec: dict) -> dict:
    """`concurrency` tasks reserve/settle against shared subjects until `duration` s have passed after `start_at`."""
    store = RedisQuotaStore(spec["redis_url"], prefix=spec["prefix"])
    subjects = [(s, QuotaLimits(**lim)) for s, lim in spec["subjects"]]
    out = {"admitted": 0, "used": 0, "reserved": 0, "rate_refusals": 0, "budget_refusals": 0, "max_over": 0}
    rng = random.Random(spec.get("seed", 0))
    await store.reserve([], 0)  # connect
    await store._redis.ping()
    # Start barrier: the parent says GO once every replica is up, so none starts late on a busy machine.
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.time() + spec["duration"]

    async def client() -> None:
        while time.time() < deadline:
            tokens = spec["tokens"]
            try:
                r = await store.reserve(subjects, tokens)
            except QuotaExceeded as exc:
                out["budget_refusals" if exc.insufficient_quota else "rate_refusals"] += 1
                await asyncio.sleep(spec.get("backoff", 0.005))
                continue
            out["admitted"] += 1
            out["reserved"] += tokens
            await asyncio.sleep(rng.uniform(0, spec.get("work", 0.01)))  # the upstream call
            used = rng.randint(spec["used_min"], spec["used_max"])
            out["max_over"] = max(out["max_over"], used - tokens)
            await store.settle(r, used)
            out["used"] += used

    await asyncio.gather(*(client() for _ in range(spec["concurrency"])))
    await store.close()
    return out


async def audit_append(db_url: str, tag: str, n: int, concurrency: int) -> None:
    log = open_audit_log(db_url)
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            rec = AuditRecord(ts=time.time(), request_id=f"{tag}-{i}", key_id="key-1", team="sales", model="m",
                              adapter=None, status=200, prompt_tokens=12, completion_tokens=34, latency_ms=5.25,
                              ttft_ms=1.5, policy={"pii": "redact", "pii_found": {"PHONE": 1}},
                              prompt="call me at [PHONE]", completion="ok")
            row_id = await log.append(rec)
            # Only now is the record acknowledged; the parent may SIGKILL us at any moment after this line.
            sys.stdout.write(f"ACK {rec.request_id} {row_id}\n")
            sys.stdout.flush()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    await log.close()
    sys.stdout.write("DONE\n")
    sys.stdout.flush()


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "quota-load":
        print(json.dumps(asyncio.run(quota_load(json.loads(sys.argv[2])))), flush=True)
    elif cmd == "audit-append":
        asyncio.run(audit_append(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
