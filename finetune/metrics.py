"""Training metrics on disk: one JSON object per line in metrics.jsonl, and a loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Keep what happened up to `step` (a resumed run redoes the rest)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()


def plot_loss_curve(records: list[dict[str, Any]], out: Path, *, title: str = "") -> Path | None:
    """Train loss per step and validation loss per evaluation; None when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
