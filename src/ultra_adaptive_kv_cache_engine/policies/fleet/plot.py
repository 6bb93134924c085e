"""A PNG of a fleet sweep against the number of instances: token hit rate, prefill tokens saved, and the hit
rate of the instances' own pools (the hits that need no transfer); one curve per routing policy (solid: with
the global tier, dashed: local caches only), the one-cache bound dotted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .simulator import ONE_CACHE, FleetResult


def plot_fleet(results: Sequence[FleetResult], path: str | os.PathLike[str], title: str = "") -> Path:
    """Writes the plot of `results` (one trace, one local capacity) to `path` (PNG, off-screen) and returns it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_fleet needs matplotlib: pip install matplotlib") from exc
    if not results:
        raise ValueError("results is empty: nothing to plot")
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    curves = list(dict.fromkeys((r.routing, r.global_tokens > 0) for r in results))
    colors: dict[str, str] = {}
    for routing, shared in curves:
        rows = sorted((r.instances, r) for r in results if r.routing == routing and (r.global_tokens > 0) == shared)
        xs = [n for n, _ in rows]
        if routing == ONE_CACHE:
            style = {"color": "black", "linestyle": ":", "label": "one cache of the summed capacity"}
        else:
            color = colors.setdefault(routing, f"C{len(colors)}")
            style = {"color": color, "marker": "o", "linestyle": "-" if shared else "--",
                     "label": f"{routing} {'+ global tier' if shared else '(local only)'}"}
        left.plot(xs, [100 * r.token_hit_rate for _, r in rows], **style)
        middle.plot(xs, [r.prefill_tokens_saved / 1e6 for _, r in rows], **style)
        right.plot(xs, [100 * r.local_hit_rate for _, r in rows], **style)
    sizes = sorted({r.instances for r in results})
    for ax, label in ((left, "token hit rate (%)"), (middle, "prefill tokens saved (millions)"),
                      (right, "hit rate of the instance's own pool (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("instances")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    first = results[0]
    left.set_title(title or f"{first.trace}: {first.local_tokens / 1e6:g}M tokens per instance")
    right.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
