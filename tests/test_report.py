"""train/report.png: every panel has its axes labelled and shows train and held-out values."""

import json

from dpo.report import PANELS, figure, plot_report


def rows():
    out = []
    for step in (1, 2, 3, 4):
        row = {"step": step, "loss": 0.7 - 0.1 * step, "rewards/accuracies": 0.5 + 0.1 * step,
               "rewards/margins": 0.2 * step}
        if step % 2 == 0:
            row.update({"eval/loss": 0.7, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.1})
        out.append(row)
    return out


def test_axes_are_labelled_and_both_series_drawn():
    fig = figure(rows(), "run")
    assert len(fig.axes) == len(PANELS)
    for ax, (key, ylabel, _) in zip(fig.axes, PANELS):
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == ylabel
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["train", "eval (held out)"], key
        assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3, 4]
        assert list(ax.get_lines()[1].get_xdata()) == [2, 4]


def test_png_is_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = plot_report(str(metrics), str(tmp_path / "report.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
