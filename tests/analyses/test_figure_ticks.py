"""Figures label every panel's layers and keep their text inside the figure: the three-panel contrast figure
labelled only layers 20-28 (its panels shared the head panel's axis, which starts at 18), and the comparison
heatmaps printed 30 layer labels that ran together."""

from __future__ import annotations

import pandas as pd
import pytest

from analyses import figures
from analyses.synthetic import make_results


def thirty_layers_and_upper_heads(seed: int = 1) -> pd.DataFrame:
    """attn_out and mlp_out at layers 0-29, heads at layers 18-29 only (the demo's design)."""
    full = make_results(n_probes=8, n_layers=30, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",),
                        tokens=("x",), trivial_sites=False, seed=seed)
    heads = make_results(n_probes=8, n_layers=12, site_kinds=("head",), metrics=("logit_diff",), tokens=("x",),
                         trivial_sites=False, seed=seed + 1)
    heads["layer"] = (heads["layer"] + 18).astype("Int64")
    heads["site"] = [f"layers.{layer}.heads.0" for layer in heads["layer"]]
    heads["head"] = pd.array([0] * len(heads), dtype="Int64")
    return pd.concat([full, heads], ignore_index=True)


def labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


def visible_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]


def inside(fig) -> None:
    """Everything drawn (titles, tick labels, legend) lies within the figure's canvas: the tight bounding box of
    the drawn artists is inside the figure's own box."""
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    tol = 1 / 72
    assert drawn.x0 >= -tol and drawn.y0 >= -tol and drawn.x1 <= width + tol and drawn.y1 <= height + tol, \
        (drawn, width, height)


def test_every_panel_of_the_contrast_figure_labels_the_shared_layer_axis():
    means = figures.layer_means(thirty_layers_and_upper_heads(), group="knowledge_type")
    assert sorted(means["site_kind"].unique()) == ["attn_out", "head", "mlp_out"]
    fig = figures.layer_contrast(means, "knowledge_type")
    axes = fig.axes
    assert len(axes) == 3
    expected = [str(v) for v in range(0, 30, 4)]  # 30 layers -> every 4th, at most 12 labels
    for ax in axes:
        assert visible_labels(ax) == expected, ax.get_ylabel()
        assert ax.get_xlim()[0] < 0 and ax.get_xlim()[1] > 29  # one scale for all panels
    inside(fig)


def test_module_bars_label_every_panel():
    means = figures.layer_means(thirty_layers_and_upper_heads(), group="knowledge_type",
                                site_kinds=("attn_out", "mlp_out"))
    fig = figures.module_bars(means, "knowledge_type")
    for ax in fig.axes:
        assert visible_labels(ax) == [str(v) for v in range(0, 30, 4)]
    inside(fig)


def test_long_titles_and_group_names_stay_inside_the_figure():
    data = thirty_layers_and_upper_heads()
    data["knowledge_type"] = data["knowledge_type"].map(
        {"definitional": "definitional knowledge of the disorder", "associative": "associative knowledge of drugs"})
    means = figures.layer_means(data, group="knowledge_type")
    fig = figures.layer_contrast(means, "knowledge_type", title="Mean recovery per layer by knowledge type, each "
                                 "probe reduced to its last token, heads summed per layer (95% t-based CI)")
    inside(fig)


def test_a_legend_of_four_long_group_names_fits_the_figure():
    """Four groups with long names used to get four legend columns, wider than the figure."""
    names = ("definitional (disease, organ)", "associative (drug, indication)", "associative (gene, disorder)",
             "definitional (symptom, cause)")
    data = make_results(n_probes=8, n_layers=6, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",),
                        tokens=("x",), trivial_sites=False, groups={"knowledge_type": names})
    fig = figures.layer_contrast(figures.layer_means(data, group="knowledge_type"), "knowledge_type")
    inside(fig)
    fig = figures.module_bars(figures.layer_means(data, group="knowledge_type"), "knowledge_type")
    inside(fig)


@pytest.mark.parametrize("n_layers, expected", [
    (30, [str(v) for v in range(0, 30, 2)]),  # at most 16 labels: every 2nd
    (12, [str(v) for v in range(12)]),        # few layers: every one
])
def test_heatmap_layer_labels_are_thinned_not_run_together(n_layers, expected):
    data = make_results(n_probes=6, n_layers=n_layers, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",),
                        tokens=("x",), trivial_sites=False)
    fig = figures.heatmap_layer_site_kind(data, group="knowledge_type")
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
    assert len(panels) == 2
    for ax in panels:
        assert labels(ax) == expected
        ticks = ax.get_xticks()
        assert list(ticks) == [int(v) + 0.5 for v in expected]  # each label centred on its layer's column
    inside(fig)


def test_layer_tick_values():
    assert figures.layer_tick_values(range(12)) == list(range(12))
    assert figures.layer_tick_values(range(30)) == list(range(0, 30, 4))
    assert figures.layer_tick_values(range(18, 30)) == list(range(18, 30))
    assert figures.layer_tick_values(range(48)) == list(range(0, 48, 4))
    assert figures.layer_tick_values(range(80)) == list(range(0, 80, 10))
    assert figures.layer_tick_values(range(30), 16) == list(range(0, 30, 2))
