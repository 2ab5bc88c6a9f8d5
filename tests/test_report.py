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


def test_the_png_shows_every_record_of_metrics_jsonl(tmp_path, monkeypatch):
    """What plot_report saves is the figure of metrics.jsonl: per panel, the train series at steps 1-4 and the
    held-out series at steps 2 and 4, with the file's values, and an image of the figure's size (15 x 4
    inches at 110 dpi: 1650 x 440 pixels)."""
    import matplotlib.image
    from matplotlib.figure import Figure

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    saved = {}
    savefig = Figure.savefig

    def keep(fig, path, **kwargs):
        saved[str(path)] = fig
        return savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = plot_report(str(metrics), str(tmp_path / "report.png"), title="run")
    fig = saved[out]
    for ax, (key, _, _) in zip(fig.axes, PANELS):
        train, held_out = ax.get_lines()
        assert list(train.get_xdata()) == [1, 2, 3, 4]
        assert list(train.get_ydata()) == [r[key] for r in rows()]
        assert list(held_out.get_xdata()) == [2, 4]
        assert list(held_out.get_ydata()) == [r["eval/" + key] for r in rows() if "eval/" + key in r]
    assert matplotlib.image.imread(out).shape[:2] == (440, 1650)
