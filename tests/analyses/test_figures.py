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
    axes = [a for a in fig.axes if a.get_title(loc="left")]
    assert [a.get_title(loc="left") for a in axes] == [f"{GROUP} = associative", f"{GROUP} = definitional"]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    # two probe-layer cells are missing in the fixture, so rows state their n (one probe has undefined recovery)
    assert labels == [f"{tok} [{i}] n=11" for i, tok in enumerate(["The", "Eiffel", "Tower", "is", "located", "in"])]
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
    assert [t.get_text() for t in ax.get_yticklabels()] == ["resid_pre n=23", "attn_out n=23", "mlp_out n=23"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(6)]


def test_line_plot_draws_one_band_per_group(results):
    ci = bootstrap_ci(results, between=GROUP, n_boot=200, **SEL)
    fig = line_by_layer(ci, GROUP)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["associative", "definitional"]
    lines = [line for line in ax.get_lines() if line.get_label() in ("associative", "definitional")]
    np.testing.assert_allclose(lines[0].get_ydata(), ci[ci[GROUP] == "associative"].sort_values("layer")["mean"])
    assert len(ax.collections) == 2  # the two CI bands
    assert lines[0].get_linestyle() != lines[1].get_linestyle()


def test_bar_plot_marks_trivial_sites(results):
    rows = results[results.metric == "logit_diff"]
    ci = bootstrap_ci(rows, within="site", between=GROUP, n_boot=200, include_trivial=True, vary=("site_kind",),
                      metric="logit_diff")
    order = site_order(rows)
    assert order[:3] == ["layers.0.resid_pre", "layers.0.attn_out", "layers.0.mlp_out"]
    assert order[-2:] == ["final_norm", "lm_head"]
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
    assert img.shape[1] == round(200 * width_in) == round(200 * COLUMN_WIDTH_IN)  # drawn width kept: shown at size
    assert img[..., :3].std() > 0.05  # not blank
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    with pytest.raises(ValueError, match="at least 200"):
        save_figure(fig, tmp_path / "low", dpi=100)


def test_single_group_panel():
    data = make_results(n_probes=3, n_layers=2, groups=None, metrics=("logit_diff",), site_kinds=("mlp_out",),
                        tokens=("a", "b"))
    fig = heatmap_layer_position(data, metric="logit_diff", site_kind="mlp_out")
    assert [a.get_title(loc="left") for a in fig.axes if a.get_title(loc="left")] == ["all probes"]


# --------------------------------------------------------------------------------- readable, honest figures

from matplotlib.text import Text  # noqa: E402
from scipy import stats as sps  # noqa: E402

from analyses.figures import (  # noqa: E402
    COLUMN_WIDTH_IN,
    MIN_FONT_PT,
    layer_contrast,
    layer_means,
    module_bars,
)

DEF_TOKENS = ("A", " cat", " is", " defined", " as", " a", " with")
ASSOC_TOKENS = ("Cats", " go", " with")


def two_prompt_lengths():
    """Definitional prompts of 7 tokens and associative ones of 3, each group labelled in its own tokens."""
    import pandas as pd

    a = make_results(n_probes=6, n_layers=4, groups={GROUP: ("definitional",)}, tokens=DEF_TOKENS,
                     metrics=("logit_diff",), site_kinds=("resid_pre",), trivial_sites=False, seed=11)
    b = make_results(n_probes=5, n_layers=4, groups={GROUP: ("associative",)}, tokens=ASSOC_TOKENS,
                     metrics=("logit_diff",), site_kinds=("resid_pre",), trivial_sites=False, seed=12)
    b["probe_id"] = "q" + b["probe_id"]
    return pd.concat([a, b], ignore_index=True)


def _texts(fig):
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _assert_readable(fig):
    assert fig.get_size_inches()[0] == pytest.approx(COLUMN_WIDTH_IN)
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < MIN_FONT_PT]
    assert not small, small


def _stacked(axes):
    """Panels one above the other: same left edge and width, each lower than the previous."""
    fig = axes[0].figure
    fig.canvas.draw()
    boxes = [a.get_position() for a in axes]
    assert all(b.x0 == pytest.approx(boxes[0].x0, abs=0.02) for b in boxes)
    assert all(b1.y0 > b2.y1 - 1e-6 for b1, b2 in zip(boxes, boxes[1:], strict=False))


def test_position_heatmap_labels_each_group_with_its_own_tokens_aligned_from_the_end():
    data = two_prompt_lengths()
    fig = heatmap_layer_position(data, group=GROUP, metric="logit_diff", site_kind="resid_pre")
    axes = [a for a in fig.axes if a.get_title(loc="left")]
    assert [a.get_title(loc="left") for a in axes] == [f"{GROUP} = associative", f"{GROUP} = definitional"]
    _stacked(axes)
    _assert_readable(fig)
    assoc = [t.get_text() for t in axes[0].get_yticklabels()]
    defin = [t.get_text() for t in axes[1].get_yticklabels()]
    # one row per role: -1 is the last token in both panels; the short prompts have no token at -7..-4
    assert defin == ["A [-7]", "cat [-6]", "is [-5]", "defined [-4]", "as [-3]", "a [-2]", "with [-1]"]
    assert assoc == ["– [-7]", "– [-6]", "– [-5]", "– [-4]", "Cats [-3]", "go [-2]", "with [-1]"]
    assert axes[0].get_ylabel() == "token [position from end]"
    # the unmeasured cells are masked (not drawn), the axes behind them hatched grey: never the colour of 0
    mesh = axes[0].collections[0]
    values = np.ma.asarray(mesh.get_array()).reshape(7, 4)
    assert values.mask[:4].all() and not values.mask[4:].any()
    face = np.asarray(matplotlib.colors.to_rgb(axes[0].get_facecolor()))
    assert axes[0].patch.get_hatch() and np.abs(face - np.asarray(mesh.cmap(0.5))[:3]).max() > 0.1
    # the measured cells hold each group's own means
    rows = data[data[GROUP] == "associative"]
    expected = rows.groupby(["position", "layer"]).recovery.mean().unstack().to_numpy()
    np.testing.assert_allclose(values[4:].filled(np.nan), expected, rtol=1e-10)
    # the same colour scale in both panels
    assert axes[0].collections[0].norm.vmax == axes[1].collections[0].norm.vmax


def test_heatmap_shows_n_where_it_varies():
    data = two_prompt_lengths()
    data = data[~((data["probe_id"] == "p000") & (data["layer"] == 2) & (data["position"] == 6))]
    fig = heatmap_layer_position(data, group=GROUP, metric="logit_diff", site_kind="resid_pre", annotate=False)
    ax = [a for a in fig.axes if a.get_title(loc="left") == f"{GROUP} = definitional"][0]
    assert ax.get_yticklabels()[-1].get_text() == "with [-1] n=6"
    cell_texts = [t.get_text() for t in ax.texts if t.get_text()]
    assert cell_texts == ["n=5"]  # the one cell with a probe fewer
    other = [a for a in fig.axes if a.get_title(loc="left") == f"{GROUP} = associative"][0]
    assert not [t.get_text() for t in other.texts if t.get_text()]  # n is constant there: no marks


def test_every_figure_fits_the_column_with_9pt_text(results):
    ci = bootstrap_ci(results, between=GROUP, n_boot=100, **SEL)
    means = layer_means(results, group=GROUP, site_kinds=("attn_out", "mlp_out"), metric="logit_diff")
    figs = [
        heatmap_layer_position(results, group=GROUP, **SEL),
        heatmap_layer_site_kind(results, group=GROUP, metric="logit_diff"),
        line_by_layer(ci, GROUP),
        layer_contrast(means, GROUP),
        module_bars(means, GROUP),
    ]
    for fig in figs:
        fig.canvas.draw()
        _assert_readable(fig)


def test_line_plot_thins_layer_ticks():
    data = make_results(n_probes=4, n_layers=40, groups=None, metrics=("logit_diff",), site_kinds=("resid_pre",),
                        tokens=("x",), trivial_sites=False)
    ci = bootstrap_ci(data, n_boot=100, metric="logit_diff", site_kind="resid_pre")
    fig = line_by_layer(ci)
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t for t, v in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True) if lo <= v <= hi and t.get_text()]
    assert 4 <= len(shown) <= 12
    assert all(float(t.get_text()).is_integer() for t in shown)


def test_layer_means_are_per_probe_last_position_values_with_t_intervals(results):
    """Each probe contributes its value at its own last token (the default reduction), never a mean over positions."""
    means = layer_means(results, group=GROUP, site_kinds=("attn_out",), metric="logit_diff")
    rows = results[(results.metric == "logit_diff") & (results.site_kind == "attn_out") & results.recovery_defined]
    last = rows.groupby("probe_id").position.transform("max")
    per_probe = rows[rows.position == last].groupby(["probe_id", GROUP, "layer"]).recovery.mean().reset_index()
    assert per_probe.groupby(["probe_id", "layer"]).size().max() == 1
    for (g, layer), cell in per_probe.groupby([GROUP, "layer"]):
        row = means[(means[GROUP] == g) & (means["layer"] == layer)].iloc[0]
        x = cell["recovery"].to_numpy()
        low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        assert row["n"] == len(x) and row["mean"] == pytest.approx(x.mean())
        assert row["ci_low"] == pytest.approx(low) and row["ci_high"] == pytest.approx(high)


def test_contrast_figure_draws_both_groups_per_site_kind(results):
    means = layer_means(results, group=GROUP, site_kinds=("resid_pre", "mlp_out"), metric="logit_diff")
    fig = layer_contrast(means, GROUP, differ=means[(means["site_kind"] == "mlp_out") & (means["layer"] == 2)])
    axes = fig.axes
    assert len(axes) == 2 and [a.get_ylabel() for a in axes] == ["recovery\n(resid_pre)", "recovery\n(mlp_out)"]
    _stacked(axes)
    containers = {c.get_label(): c for c in axes[1].containers}
    assert sorted(containers) == ["associative", "definitional"]
    for g, c in containers.items():
        expected = means[(means.site_kind == "mlp_out") & (means[GROUP] == g)].sort_values("layer")
        data_line, _, (bars,) = c.lines
        np.testing.assert_allclose(np.asarray(data_line.get_ydata(), float), expected["mean"].to_numpy(float))
        # error bars: each layer's t interval
        spans = np.array([[seg[:, 1].min(), seg[:, 1].max()] for seg in map(np.asarray, bars.get_segments())])
        np.testing.assert_allclose(spans, expected[["ci_low", "ci_high"]].to_numpy())
    assert [t.get_text() for t in axes[1].texts] == ["*"] and not axes[0].texts


def test_module_bars_draw_attention_and_mlp_for_deep_models():
    # 48 layers x 3 kinds = 144 sites: more than a per-site bar plot shows; the module view has one bar per layer
    data = make_results(n_probes=4, n_layers=48, metrics=("logit_diff",),
                        site_kinds=("resid_pre", "attn_out", "mlp_out"), tokens=("x",), trivial_sites=False)
    means = layer_means(data, group=GROUP, site_kinds=("attn_out", "mlp_out"), metric="logit_diff")
    fig = module_bars(means, GROUP)
    axes = fig.axes
    assert [a.get_title(loc="left") for a in axes] == ["attn_out", "mlp_out"]
    _stacked(axes)
    _assert_readable(fig)
    heights = sorted(round(p.get_height(), 9) for p in axes[1].patches)
    assert heights == sorted(round(v, 9) for v in means.loc[means.site_kind == "mlp_out", "mean"])
    assert len(axes[1].patches) == 48 * 2


def test_long_titles_wrap_inside_the_figure(results):
    ci = bootstrap_ci(results, between=GROUP, n_boot=100, **SEL)
    fig = line_by_layer(ci, GROUP, title="recovery by layer (metric=logit_diff, operation=replace, "
                                          "direction=denoising, positions=all, site_kind=resid_pre)")
    fig.canvas.draw()
    title = fig.axes[0].title
    box = title.get_window_extent()
    assert "\n" in title.get_text() and box.x0 >= 0 and box.x1 <= fig.bbox.width
