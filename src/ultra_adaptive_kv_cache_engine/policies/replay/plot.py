"""A PNG of token hit rate against capacity: one curve per policy, Belady's bound dashed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .runner import BELADY, ReplayResult


def plot_hit_rates(results: Sequence[ReplayResult], path: str | os.PathLike[str], title: str = "") -> Path:
    """Write the plot of `results` (one trace) to `path` (PNG) and return the path.

    Needs matplotlib (ImportError naming it otherwise); draws off-screen (Agg), never opens a window.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_hit_rates needs matplotlib: pip install matplotlib") from exc
    if not results:
        raise ValueError("results is empty: nothing to plot")
    policies = list(dict.fromkeys(r.policy for r in results))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for policy in policies:
        rows = sorted((r.capacity_tokens, r.token_hit_rate) for r in results if r.policy == policy)
        xs = [c / 1e6 for c, _ in rows]
        ys = [100 * h for _, h in rows]
        style = {"linestyle": "--", "color": "black"} if policy == BELADY else {"marker": "o"}
        ax.plot(xs, ys, label=policy, linewidth=2 if policy == "adaptive" else 1.2, **style)
    ax.set_xscale("log")
    ticks = sorted({r.capacity_tokens / 1e6 for r in results})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("capacity (million tokens)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_title(title or results[0].trace)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
