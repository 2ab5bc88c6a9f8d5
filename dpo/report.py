"""train/report.png: loss, reward accuracy and reward margins against step, from metrics.jsonl."""

from __future__ import annotations

import os

from dpo.checkpoint import read_metrics

PANELS = [
    ("loss", "loss", "DPO loss"),
    ("rewards/accuracies", "reward accuracy", "implicit-reward accuracy"),
    ("rewards/margins", "reward margin", "reward margin (chosen - rejected)"),
]


def figure(rows: list[dict], title: str = ""):
    """The report's figure: one panel per metric, train line and held-out points, axes labelled."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for ax, (key, ylabel, panel_title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + key]) for r in rows if r.get(prefix + key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label="eval (held out)" if prefix else "train", markersize=4)
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_report(metrics_path: str, out_path: str, title: str = "") -> str:
    import matplotlib.pyplot as plt

    fig = figure(read_metrics(metrics_path), title)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
