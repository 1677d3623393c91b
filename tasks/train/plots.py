"""The loss curve as a PNG, drawn from `loss.jsonl` records (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_curve_png(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train loss by step, and val loss where it was measured. None when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; and importing pyplot only here keeps stage imports fast
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same curve, the same bytes
    plt.close(fig)
    return path
