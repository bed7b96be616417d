"""Causal-trace tables and heatmaps in ROME's layout (Meng et al. 2022, figure 1).

Input: the tidy results of a ``trace:`` study (metric ``prob``, one row per probe x site x token), written by the
engine's trace run (``interventions``). The indirect effect of a cell is ``effect`` = p(answer | corrupted +
restored) - p(answer | corrupted). :func:`token_group_table` averages it over probes per traced component, layer
and ROME token group (with the spread over noise draws when the per-draw rows are given); :func:`trace_peaks`
reduces that table to each group's peak, as the study page shows it. Heatmaps put layers on x and tokens on y, one
panel per traced component (hidden states, MLP, attention); per probe the y labels are its tokens (the subject's
marked with ``*``), averaged over probes they are ROME's six token groups. :func:`write_trace_outputs` writes the
table and the heatmaps beside the results (``clap trace``, ``clap run``'s ``trace[NAME]`` stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from analyses.formatting import interval
from clap.contract import BEFORE_SUBJECT, TOKEN_GROUPS, atomic_write, atomic_write_frame
from clap.errors import ClapError
from clap.names import file_stem

#: panel titles per traced component
KIND_TITLES = {"resid_post": "hidden states", "resid_pre": "hidden states (block input)", "mlp_out": "MLP",
               "attn_out": "attention"}


def _traced(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = frame[(frame.metric == metric) & frame.position.notna()].copy()
    rows["kind"] = rows.site_kind
    return rows


def _rome_groups(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` regrouped as ROME's averages count tokens (``interventions.probes.token_groups``): a results row
    carries one ``token_group`` label, but in ROME a one-token subject's token is also the *last subject* token and
    the prompt's last token, when it directly follows the subject, is also the *first subsequent* one; such rows are
    added again under their second group. Tokens before the subject are in no group and are dropped (also those an
    older clap labelled ``further``).

    Both facts are read from the neighbouring tokens' labels: a subject is one token when no token of the probe is
    labelled middle or last subject and the token after its first is traced with a label outside the subject; the
    last token follows the subject when the token before it is labelled first or last subject. With the default
    ``positions: [each]`` every token is traced; with fewer positions a fact whose neighbour was not traced is not
    counted twice."""
    if rows.empty or "token_group" not in rows:
        return rows
    labels = rows.drop_duplicates(["probe_id", "position"]).set_index(["probe_id", "position"]).token_group.to_dict()
    firsts: dict = {}
    longer: set = set()
    for (probe, position), label in labels.items():
        if label == "first subject":
            firsts[probe] = min(int(position), firsts.get(probe, int(position)))
        elif label in ("middle subject", "last subject"):
            longer.add(probe)
    first_of = rows.probe_id.map(firsts)
    before = (rows.token_group == BEFORE_SUBJECT) | (
        (rows.token_group == "further") & first_of.notna() & (rows.position < first_of))
    rows = rows[~before]
    outside = ("first subsequent", "further", "last")

    def one_token(probe: str, position: int) -> bool:
        return probe not in longer and labels.get((probe, position + 1)) in outside

    is_first = rows.token_group == "first subject"
    single = is_first & pd.Series([one_token(p, int(q)) for p, q in zip(rows.probe_id, rows.position, strict=True)],
                                  index=rows.index, dtype=bool)
    is_last = rows.token_group == "last"
    after = is_last & pd.Series(
        [labels.get((p, int(q) - 1)) == "last subject"
         or (labels.get((p, int(q) - 1)) == "first subject" and one_token(p, int(q) - 1))
         for p, q in zip(rows.probe_id, rows.position, strict=True)], index=rows.index, dtype=bool)
    return pd.concat([rows, rows[single].assign(token_group="last subject"),
                      rows[after].assign(token_group="first subsequent")], ignore_index=True)


#: the keys of one cell of the token-group table
GROUP_KEYS = ["kind", "window", "layer", "token_group"]


def _group_means(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean effect per ``by`` + token group: first within a probe (several ``further`` tokens count once), then over
    probes; with the number of probes."""
    per_probe = rows.groupby([*by, "probe_id"], observed=True).effect.mean()
    table = per_probe.groupby(by, observed=True).agg(["mean", "count"])
    return table.rename(columns={"mean": "effect", "count": "n_probes"}).reset_index()


def token_group_table(frame: pd.DataFrame, metric: str = "prob", samples: pd.DataFrame | None = None,
                      confidence: float = 0.95) -> pd.DataFrame:
    """Mean indirect effect (and its n) per traced component, layer and ROME token group, averaged first within a
    probe and then over probes. The groups are ROME's (``_rome_groups``): a one-token subject's token counts as its
    first and its last subject token, a last token right after the subject as the last and the first subsequent
    token, and tokens before the subject in no group. One difference from ROME, on purpose: ROME pools the tokens
    of the *middle subject* and *further* groups over all facts, so a fact with many such tokens weighs more; here
    each probe's tokens in a group are averaged first, so every probe counts once.

    With ``samples`` (the per-draw rows, ``samples.parquet``) the table also says how much that mean moves between
    noise draws: the same mean computed per draw, then ``n_samples``, ``sample_sd`` (their standard deviation,
    ddof 1) and a ``confidence`` t interval over draws (``sample_ci_low``, ``sample_ci_high``). The mean over draws
    equals ``effect`` (every step is a mean), so the interval is centred on it."""
    table = _group_means(_rome_groups(_traced(frame, metric)), GROUP_KEYS)
    if samples is not None and len(samples):
        per_draw = _group_means(_rome_groups(_traced(samples, metric)), [*GROUP_KEYS, "sample"])
        spread = per_draw.groupby(GROUP_KEYS, observed=True).effect.agg(["count", "std"]).reset_index()
        spread = spread.rename(columns={"count": "n_samples", "std": "sample_sd"})
        table = table.merge(spread, on=GROUP_KEYS, how="left")
        n = table.n_samples.to_numpy(dtype=float)
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * table.sample_sd.to_numpy(dtype=float) / n ** 0.5
        table["sample_ci_low"], table["sample_ci_high"] = table.effect - half, table.effect + half
    table["token_group"] = pd.Categorical(table.token_group, categories=TOKEN_GROUPS, ordered=True)
    return table.sort_values(["kind", "window", "token_group", "layer"]).reset_index(drop=True)


def plot_groups(frame: pd.DataFrame, path: str | Path, metric: str = "prob") -> Path:
    """Layers x token groups heatmaps of the mean indirect effect, one panel per component."""
    table = token_group_table(frame, metric)
    panels = [(k, w) for k, w in table[["kind", "window"]].drop_duplicates().itertuples(index=False)]
    grids = [table[(table.kind == k) & (table.window == w)].pivot(index="token_group", columns="layer",
                                                                  values="effect") for k, w in panels]
    return _draw(grids, [f"{KIND_TITLES.get(k, k)}" + (f" (window {w})" if w > 1 else "") for k, w in panels],
                 path, "mean indirect effect on p(answer)")


def plot_probe(frame: pd.DataFrame, probe_id: str, path: str | Path, metric: str = "prob") -> Path:
    """One probe's layers x tokens heatmaps, the subject's tokens marked with ``*``."""
    rows = _traced(frame, metric)
    rows = rows[rows.probe_id == probe_id]
    panels = rows[["kind", "window"]].drop_duplicates().itertuples(index=False)
    grids, titles = [], []
    for kind, window in panels:
        part = rows[(rows.kind == kind) & (rows.window == window)]
        labels = part.drop_duplicates("position").set_index("position")
        grid = part.pivot_table(index="position", columns="layer", values="effect")
        grid.index = [f"{labels.token[i]!r}" + ("*" if "subject" in str(labels.token_group[i]) else "")
                      for i in grid.index]
        grids.append(grid)
        titles.append(KIND_TITLES.get(kind, kind) + (f" (window {window})" if window > 1 else ""))
    return _draw(grids, titles, path, f"indirect effect on p(answer), {probe_id}")


def _draw(grids: list[pd.DataFrame], titles: list[str], path: str | Path, label: str) -> Path:
    import seaborn as sns

    n = len(grids)
    height = 0.3 * max(len(g) for g in grids) + 1.2
    fig = Figure(figsize=(3.6 * n, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)
    for ax, grid, title in zip(axes[0], grids, titles, strict=True):
        sns.heatmap(grid, ax=ax, cmap="Purples", cbar_kws={"label": label}, xticklabels=max(1, grid.shape[1] // 10))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=9)
        ax.set_ylabel("")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


#: the files :func:`write_trace_outputs` writes beside the results (per-probe heatmaps are ``trace_<probe id>.png``,
#: the id made file-safe by :func:`clap.names.file_stem`)
TABLE_FILE, GROUPS_FIGURE = "token_groups.csv", "trace_groups.png"


def write_trace_outputs(frame: pd.DataFrame, out_dir: str | Path, n_probe_figures: int = 3,
                        samples: pd.DataFrame | None = None, figures: bool = True) -> list[Path]:
    """``token_groups.csv`` (with the spread over noise draws when ``samples`` are given), ``trace_groups.png`` and
    the first ``n_probe_figures`` probes' heatmaps (no figures with ``figures=False``)."""
    if not (frame.metric == "prob").any():
        measured = ", ".join(sorted(map(str, frame.metric.unique()))) or "none"
        raise ClapError(f"the causal-trace table and heatmaps read the metric `prob` (the indirect effect on "
                        f"p(answer)); these results hold {measured}: rerun the trace with `prob` in `metrics:`")
    out = Path(out_dir)
    written = [atomic_write_frame(out / TABLE_FILE, token_group_table(frame, samples=samples))]
    if not figures:
        return written
    written.append(plot_groups(frame, out / GROUPS_FIGURE))
    for probe_id in list(dict.fromkeys(frame.probe_id))[:n_probe_figures]:
        written.append(plot_probe(frame, probe_id, out / f"trace_{file_stem(probe_id)}.png"))
    return written


def trace_peaks(table: pd.DataFrame) -> pd.DataFrame:
    """From a causal trace's token-group table (``token_groups.csv``): per traced component and ROME token group,
    the largest mean indirect effect over layers, its layer, and its interval over noise draws when recorded."""
    rows = []
    for (kind, window, group), part in table.groupby(["kind", "window", "token_group"], sort=False, observed=True):
        best = part.loc[part["effect"].idxmax()]
        row: dict[str, Any] = {"component": kind + (f" (window {window})" if window > 1 else ""), "token group": group,
                               "peak effect": best["effect"], "layer": int(best["layer"]),
                               "probes": int(best["n_probes"])}
        if "sample_sd" in part.columns:
            row["draws"] = int(best["n_samples"])
            row["95 % t interval over draws"] = interval(best["sample_ci_low"], best["sample_ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def trace_sentence(draws: int) -> str:
    """What the token-group table's numbers are, for a page that shows them (``draws``: noise draws per cell)."""
    return ("Indirect effect = p(answer | corrupted + restored) - p(answer | corrupted), the corruption being noise "
            "on the subject's token embeddings; per component and ROME token group the mean over probes (within a "
            f"probe first over its tokens in the group), each value the average over {draws} seeded noise draw(s)"
            + ("; the interval is a t interval over the draws' means." if draws > 1 else "."))
