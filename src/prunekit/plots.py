"""Figures that methods add to a report (PNG bytes), drawn from what they put in ``PruneResult.info``.

Methods name their figures in their registration (``figures=``), so the report draws whatever a
method declares without knowing any method's keys. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def threshold_histogram(samples: Sequence[float], cut: float | None, label: str,
                        components: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
                        xlabel: str = "log10 |γ|") -> bytes:
    """Histogram of scores with the pruning cut and, for a learned threshold, both mixture components."""
    vals = np.asarray(samples, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(vals, bins=60, density=True, color="#9bb7d4", label=label)
    if components is not None:
        xs = np.linspace(vals.min(), vals.max(), 300)
        for i, (w, mu, sd) in enumerate(zip(*components, strict=True)):
            sd = max(sd, 1e-12)
            dens = w * np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
            ax.plot(xs, dens, label=f"component {i + 1}")
    if cut is not None:
        ax.axvline(cut, color="crimson", ls="--", label=f"threshold {cut:.2f}")
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    ax.set_title("scores and the pruning threshold" if cut is not None
                 else "scores: no threshold learned (unimodal, nothing pruned)")
    return png(fig)


def kept_histograms(name: str, values: Sequence[float], panels: Sequence[tuple[str, Sequence[float]]]) -> bytes:
    """One layer's score histogram beside the histograms of the subsets that different rules keep."""
    all_v = np.asarray(values, dtype=float)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3 * (1 + len(panels)), 2.8), sharex=True, sharey=True)
    bins = np.linspace(all_v.min(), all_v.max(), 16)
    for ax, (title, vals) in zip(axes, [(f"original ({len(all_v)})", all_v), *panels], strict=True):
        ax.hist(np.asarray(vals, dtype=float), bins=bins, color="#2f6db3")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"filter norms of {name}", fontsize=10, y=1.06)
    return png(fig)


def actions_per_group(groups: dict[str, dict]) -> bytes:
    """imp-sim (auto): channels removed vs merged per group, and what each kind cost (summed error)."""
    names = list(groups)
    idx = np.arange(len(names))
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(names)), 5), sharex=True)
    removed = [groups[n]["removed"] for n in names]
    merged = [groups[n]["merged"] for n in names]
    ax.bar(idx, removed, color="#2f6db3", label="removed (mean folded)")
    ax.bar(idx, merged, bottom=removed, color="#e08a2c", label="merged into a partner")
    ax.set_ylabel("channels")
    ax.legend(fontsize=7)
    ax.set_title("imp-sim: what left each coupled group, and at what cost")
    bx.bar(idx - 0.2, [groups[n]["cost_removed"] for n in names], 0.4, color="#2f6db3")
    bx.bar(idx + 0.2, [groups[n]["cost_merged"] for n in names], 0.4, color="#e08a2c")
    bx.set_yscale("symlog", linthresh=1e-6)
    bx.set_ylabel("estimated error")
    bx.set_xticks(idx, names, rotation=90, fontsize=6)
    return png(fig)
