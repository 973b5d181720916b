"""Bar chart of a benchmark-suite result: each peer's time as a ratio to
torch.func (1.00), per workload, the workloads grouped into compute-bound
and overhead-bound, on a log scale.

``benchmarks/suite.py`` draws it after a run; to redraw from a saved run:

    python benchmarks/plot.py benchmarks/results/<date>-<machine>.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {"torchxform": "#d62728", "torch.compile": "#9467bd", "loop": "#7f7f7f", "opacus": "#2ca02c"}
GROUPS = ("compute-bound", "overhead-bound")


def draw(results: dict, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for g in GROUPS for r in results["workloads"] if r["group"] == g]
    peers = [p for p in COLORS if any(r["peers"].get(p, {}).get("status") == "ok" for r in records)]
    width = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.05 * len(records) + 2), 5.2))
    for i, peer in enumerate(peers):
        xs, ys = [], []
        for j, r in enumerate(records):
            e = r["peers"].get(peer, {})
            if e.get("status") == "ok" and e.get("ratio_to_torch_func"):
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(e["ratio_to_torch_func"])
        # Bars grow from torch.func's 1.00: up when slower, down when faster.
        bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=peer, color=COLORS[peer], zorder=3)
        if peer == "torchxform":
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 1 else "top", fontsize=7, xytext=(0, 2 if y >= 1 else -2),
                            textcoords="offset points")
    ax.axhline(1.0, color="black", lw=1, zorder=4, label="torch.func = 1")
    ax.set_yscale("log")
    ax.set_ylabel("time / torch.func time (log; lower is faster)")
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([r["name"] for r in records], rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    # Separate the groups and label them.
    start = 0
    for g in GROUPS:
        n = sum(r["group"] == g for r in records)
        if not n:
            continue
        if start:
            ax.axvline(start - 0.5, color="black", ls="--", lw=0.8)
        s = results.get("summary", {}).get(g)
        label = g + (f"\ntorchxform/torch.func geomean {s['geomean_torchxform_over_torch_func']:.2f}" if s else "")
        ax.text(start + (n - 1) / 2, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=9)
        start += n
    m = results["machine"]
    ax.set_title(f"{m['cpu']}, {m['threads']} thread(s), torch {m['torch']}", fontsize=9, pad=30)
    ax.legend(fontsize=8, loc="upper left", ncols=len(peers) + 1)
    ax.set_xlim(-0.6, len(records) - 0.4)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 3)  # room for the legend
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else source.with_suffix(".png")
    draw(json.loads(source.read_text()), out)
    print(f"wrote {out}")
