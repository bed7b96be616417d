"""Figures: the right cells, token labels, a diverging scale centred on 0, PNG at 200 dpi and valid SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest

from analyses import bootstrap_ci
from analyses.figures import (
    DIVERGING_CMAP,
    bar_by_module,
    heatmap_layer_position,
    heatmap_layer_site_kind,
    line_by_layer,
    position_labels,
    save_figure,
    site_order,
)
from analyses.synthetic import make_results
from clap.errors import ClapError

from .conftest import GROUP

SEL = dict(metric="logit_diff", site_kind="resid_pre")


def _mesh(ax):
    return ax.collections[0]


def test_layer_position_heatmap_cells_labels_and_scale(results):
    fig = heatmap_layer_position(results, group=GROUP, **SEL)
    axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in axes] == [f"{GROUP} = associative", f"{GROUP} = definitional"]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["The [0]", "Eiffel [1]", "Tower [2]", "is [3]", "located [4]", "in [5]"]
    mesh = _mesh(axes[0])
    reference = matplotlib.colormaps[DIVERGING_CMAP]
    grid = np.linspace(0, 1, 9)
    np.testing.assert_allclose(mesh.cmap(grid), reference(grid), atol=0.02)  # seaborn re-samples the same map
    assert np.all(np.asarray(mesh.cmap(0.5))[:3] > 0.9)  # the centre (0) is near white
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)  # symmetric: 0 is the neutral colour
    # The cell values are the mean over probes of each probe's value at that layer and position.
    rows = results[(results.metric == "logit_diff") & (results.site_kind == "resid_pre") & results.recovery_defined
                   & (results[GROUP] == "associative")]
    expected = rows.groupby(["position", "layer"]).recovery.mean().unstack().to_numpy()
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected, rtol=1e-10)


def test_position_labels_align_end_and_mark_disagreement(results):
    rows = results[(results.metric == "logit_diff") & (results.site_kind == "resid_pre")].copy()
    rows.loc[rows.probe_id == "p000", "token"] = "X"
    pos, labels = position_labels(rows, align="end")
    assert pos.max() == -1 and pos.min() == -6
    assert labels[-1] == "in* [-1]"


def test_heatmap_needs_single_positions(results):
    rows = results.copy()
    rows["position"] = rows["position"].astype("Int64") * np.nan
    rows["position"] = rows["position"].astype("Int64")
    with pytest.raises(ClapError, match="needs single-position patches"):
        heatmap_layer_position(rows, **SEL)


def test_site_kind_heatmap_orders_kinds(results):
    fig = heatmap_layer_site_kind(results, metric="logit_diff")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["resid_pre", "attn_out", "mlp_out"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(6)]


def test_line_plot_draws_one_band_per_group(results):
    ci = bootstrap_ci(results, between=GROUP, n_boot=200, **SEL)
    fig = line_by_layer(ci, GROUP)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["associative", "definitional"]
    lines = [l for l in ax.get_lines() if l.get_label() in ("associative", "definitional")]
    np.testing.assert_allclose(lines[0].get_ydata(), ci[ci[GROUP] == "associative"].sort_values("layer")["mean"])
    assert len(ax.collections) == 2  # the two CI bands
    assert lines[0].get_linestyle() != lines[1].get_linestyle()


def test_bar_plot_marks_trivial_sites(results):
    rows = results[results.metric == "logit_diff"]
    ci = bootstrap_ci(rows, within="site", between=GROUP, n_boot=200, include_trivial=True, vary=("site_kind",), metric="logit_diff")
    order = site_order(rows)
    assert order[:3] == ["layers.0.resid_pre", "layers.0.attn_out", "layers.0.mlp_out"] and order[-2:] == ["final_norm", "lm_head"]
    ci = ci.set_index("site").loc[order].reset_index()
    fig = bar_by_module(ci, GROUP, trivial_sites=["lm_head", "final_norm"])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "lm_head (trivial)" and labels[0] == "layers.0.resid_pre"
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2 * 2  # two trivial sites x two groups


def test_save_figure_png_dpi_and_svg(tmp_path, results):
    fig = heatmap_layer_site_kind(results, metric="logit_diff")
    paths = save_figure(fig, tmp_path / "fig")
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg"
    img = mpimg.imread(png)
    width_in = fig.get_size_inches()[0]
    assert img.shape[1] >= 0.8 * 200 * width_in  # tight bbox trims a little, but the resolution is 200 dpi
    assert img[..., :3].std() > 0.05  # not blank
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    with pytest.raises(ValueError, match="at least 200"):
        save_figure(fig, tmp_path / "low", dpi=100)


def test_single_group_panel():
    data = make_results(n_probes=3, n_layers=2, groups=None, metrics=("logit_diff",), site_kinds=("mlp_out",), tokens=("a", "b"))
    fig = heatmap_layer_position(data, metric="logit_diff", site_kind="mlp_out")
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["all probes"]
