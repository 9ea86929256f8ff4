"""Applying a changed PII rules file to the running gateway, without a restart.

Compliance adds a kind (a new customer-number format) by editing one file: `pii-rules.yaml`, or on Kubernetes the
`sovereign-pii-rules` ConfigMap, whose mounted copy the kubelet swaps within about a minute. Every replica then finds
the new kind within seconds, and no request is refused or let through unredacted in between.

The file is read every `interval_s`; a change is applied once two reads in a row agree, so a file caught half-written
(an editor that truncates before it writes) is never applied. A file that would misbehave is refused as it would be at
start, naming the rule, and the kinds in force stay in force: a typo never turns redaction off. The default file's
removal means no kinds of the organisation's own any more; a file named by SOVEREIGN_PII_RULES must stay, so its
removal is refused like a bad file.

Everything runs on the event loop's thread, where the requests find PII: a request sees the old kinds or the new ones,
never a mix of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from gateway.background import cancel_and_wait
from gateway.metrics import GatewayMetrics
from sovereign import pii_rules
from sovereign.errors import ConfigError

log = logging.getLogger("sovereign.gateway.pii")

_MISSING = "missing"  # what a read "hashes" to when SOVEREIGN_PII_RULES names a file that is gone


class PiiRulesWatch:
    def __init__(self, interval_s: float, metrics: GatewayMetrics) -> None:
        self.interval_s = interval_s
        self.metrics = metrics
        self.refused: dict[str, str] | None = None  # the content refused last ({sha256, error}) while it is on disk
        self._seen = self.loaded.sha256  # what the previous read found (None: no file)
        self._task: asyncio.Task | None = None
        metrics.pii_rules_kinds.set(len(self.loaded.kinds))

    @property
    def loaded(self) -> pii_rules.PiiRules:
        """The rules in force: what `sovereign.pii_rules` last installed."""
        return pii_rules.installed()

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="pii-rules-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check()
            except Exception as exc:  # keep the kinds in force and look again next round
                log.warning("PII rules check failed", extra={"error": repr(exc)})

    def status(self) -> dict[str, Any]:
        return {"file": self.loaded.file, "sha256": self.loaded.sha256, "kinds": self.loaded.kinds,
                "refused": self.refused}

    def check(self) -> str | None:
        """Read the rules file once and act on it: "applied", "refused", or None when there is nothing to do yet."""
        path = raw = None
        try:
            path = pii_rules.rules_path()
            raw = path.read_bytes() if path is not None else None
        except (ConfigError, OSError) as exc:
            digest, error = _MISSING, str(exc)
        else:
            digest, error = (hashlib.sha256(raw).hexdigest() if raw is not None else None), None
        stable, self._seen = digest == self._seen, digest
        if digest == self.loaded.sha256:  # back to the rules in force
            self._clear_refusal()
            return None
        if not stable or (self.refused is not None and self.refused["sha256"] == digest):
            return None
        previous = self.loaded
        try:
            if error is not None:
                raise ConfigError(error)
            rules = pii_rules.install_bytes(raw, path) if path is not None else pii_rules.uninstall()
        except ConfigError as exc:
            self.refused = {"sha256": digest, "error": str(exc)}
            self.metrics.pii_rules_reloads.labels("refused").inc()
            self.metrics.pii_rules_refused.set(1)
            log.error("PII rules change refused; the kinds loaded before stay in force",
                      extra={"error": str(exc), "kinds": self.loaded.kinds, "sha256": self.loaded.sha256})
            return "refused"
        self._clear_refusal()
        self.metrics.pii_rules_reloads.labels("applied").inc()
        self.metrics.pii_rules_kinds.set(len(rules.kinds))
        log.info("PII rules reloaded", extra={"file": rules.file, "kinds": rules.kinds, "sha256": rules.sha256,
                                              "previous_kinds": previous.kinds})
        return "applied"

    def _clear_refusal(self) -> None:
        if self.refused is not None:
            self.refused = None
            self.metrics.pii_rules_refused.set(0)
