"""results.png: ms/step per system, one panel per model; loopback on top, emulated links below.

Needs matplotlib, which lives in the `bench` dependency group (`uv run --group bench ...`) so the
library and its CI never install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from bench.matrix import LINKS  # noqa: E402


def _bars(ax: Any, rows: list[dict[str, Any]], groups: list[Any], group_key: Any, title: str) -> None:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            r = next((r for r in rows if r["system"] == system and group_key(r) == g and r["step_ms"]), None)
            if r:
                s = r["step_ms"]
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=system, capsize=2)
    ring = {j: r["ddp_wire_ms"] for j, g in enumerate(groups) for r in rows
            if group_key(r) == g and r.get("ddp_wire_ms")}
    if ring:
        ax.plot(list(ring), list(ring.values()), "k_", markersize=24, mew=2, label="DDP ring wire time (computed)")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], fontsize=7)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("ms/step (log)")
    ax.grid(axis="y", alpha=0.3)


def plot(results: dict[str, Any], path: Path) -> None:
    models = list(results["models"])
    rows = [r for r in results["rows"] if r["step_ms"]]
    has_links = any(r["link"] in LINKS for r in rows)
    fig, axes = plt.subplots(2 if has_links else 1, len(models), figsize=(5.5 * len(models), 8 if has_links else 4.5),
                             squeeze=False)
    for col, model in enumerate(models):
        local = [r for r in rows if r["model"] == model and r["link"] in ("loopback", "none") and r["workers"] > 1]
        workers = sorted({r["workers"] for r in local})
        _bars(axes[0][col], local, workers, lambda r: r["workers"], f"{model}: loopback, by workers N")
        if has_links:
            linked = [r for r in results["rows"] if r["model"] == model and r["link"] in LINKS]
            groups = list(dict.fromkeys((r["link"], r["workers"]) for r in linked))
            _bars(axes[1][col], linked, groups, lambda r: (r["link"], r["workers"]), f"{model}: emulated links")
            axes[1][col].set_xticks(range(len(groups)), [f"{link}\nN={n}" for link, n in groups])
    for ax in axes.flat:
        if ax.has_data():
            ax.legend(fontsize=7)
    m = results["meta"]
    fig.suptitle(f"smolcluster benchmark — {m['cpu']}, {m['cores']} cores, torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
