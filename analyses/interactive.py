"""Interactive layer x position heatmaps inside the self-contained HTML report: no network, no library.

Each heatmap's numbers travel as inline JSON (``<script type="application/json">``) and one small inline script
draws them as SVG. Hovering a cell shows its mean, token, n and 95 % t interval; clicking it lists the per-probe
values behind the mean. The URL fragment ``#cell=<heatmap>-<group>-<row>-<column>`` opens a cell directly (the
same functions the mouse uses), so a cell can be linked to, and a headless browser can check the page.

The values are computed by the rule of every other figure (each probe's rows in a cell averaged first, then the
mean over probes), from :func:`analyses.figures.align_positions` and the same selection.
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np
import pandas as pd

from analyses.figures import (
    DIVERGING_CMAP,
    align_positions,
    colour_limit,
    t_interval,
    token_labels,
)
from analyses.select import select_rows

#: A heatmap with more cells than this is left to the static figure (the page stays light).
MAX_CELLS = 4000


def heatmap_payload(data: pd.DataFrame, dv: str = "recovery", group: str | None = None, subject: str = "probe_id",
                    *, title: str = "", align: str = "auto", **select: Any) -> dict[str, Any] | None:
    """The JSON of one layer x position heatmap: per group, row labels (that group's tokens), layers, and per cell
    ``v`` (mean), ``n``, ``lo`` / ``hi`` (95 % t interval), ``tok``, ``c`` (fill colour) and ``p`` (per-probe
    ``[id, value]``). ``None`` when there is nothing per position or the grid is too large."""
    import matplotlib
    from matplotlib.colors import Normalize, to_hex

    sel = select_rows(data, dv, **select)
    rows = sel.rows[sel.rows["position"].notna()]
    if rows.empty:
        return None
    pos, used = align_positions(rows, align, subject)
    rows = rows.assign(_pos=pos.to_numpy(), layer=rows["layer"].astype(int))
    per = rows.groupby([*([group] if group else []), subject, "_pos", "layer"], observed=True)[dv].mean().reset_index()
    positions = sorted(per["_pos"].unique().tolist())
    layers = sorted(per["layer"].unique().tolist())
    groups = sorted(per[group].unique().tolist(), key=str) if group else [None]
    if len(positions) * len(layers) * len(groups) > MAX_CELLS:
        return None
    means = per.groupby([*([group] if group else []), "_pos", "layer"])[dv].mean()
    vmax = colour_limit(means.to_numpy(float))
    cmap, norm = matplotlib.colormaps[DIVERGING_CMAP], Normalize(-vmax, vmax)
    out = {"title": title, "dv": dv, "align": used, "vmax": vmax, "layers": layers, "groups": []}
    for g in groups:
        part = per if g is None else per[per[group] == g]
        labels = token_labels(rows if g is None else rows[rows[group] == g],
                               (rows if g is None else rows[rows[group] == g])["_pos"])
        cells = []
        for p in positions:
            line = []
            for layer in layers:
                cell = part[(part["_pos"] == p) & (part["layer"] == layer)]
                if cell.empty:
                    line.append(None)
                    continue
                x = cell[dv].to_numpy(float)
                mean, lo, hi = t_interval(x)
                line.append({
                    "v": round(mean, 6), "n": int(len(x)), "lo": None if np.isnan(lo) else round(lo, 6),
                    "hi": None if np.isnan(hi) else round(hi, 6), "tok": labels.get(int(p), ""),
                    "c": to_hex(cmap(norm(mean))),
                    "p": [[str(s), round(float(v), 6)] for s, v in zip(cell[subject], x, strict=True)],
                })
            cells.append(line)
        out["groups"].append({"name": f"{group} = {g}" if g is not None else "all probes",
                              "rows": [labels.get(int(p), f"– [{int(p)}]") for p in positions], "cells": cells})
    return out


SCRIPT = r"""
(function(){
  var maps = JSON.parse(document.getElementById('clap-heatmaps').textContent);
  var tip = document.getElementById('clap-tip'), detail = document.getElementById('clap-detail');
  function f(x){ return x === null ? '–' : (Math.abs(x) < 1e-3 && x !== 0 ? x.toExponential(2) : x.toFixed(3)); }
  function cellOf(id){ var k = id.split('-').map(Number); var m = maps[k[0]]; if(!m) return null;
    var g = m.groups[k[1]]; if(!g || !g.cells[k[2]]) return null;
    return {m:m, g:g, c:g.cells[k[2]][k[3]], layer:m.layers[k[3]], id:id}; }
  function describe(x){ return x.g.name + ' · ' + x.c.tok + ' · layer ' + x.layer + ': ' + x.m.dv + ' ' + f(x.c.v) +
    ', n = ' + x.c.n + ', 95 % CI [' + f(x.c.lo) + ', ' + f(x.c.hi) + ']'; }
  function showTip(x, ev){ tip.textContent = describe(x); tip.dataset.cell = x.id; tip.style.display = 'block';
    if(ev){ tip.style.left = (ev.pageX + 12) + 'px'; tip.style.top = (ev.pageY + 12) + 'px'; } }
  function openDetail(x){ var rows = x.c.p.slice().sort(function(a, b){ return b[1] - a[1]; });
    detail.innerHTML = ''; var h = document.createElement('h4'); h.textContent = describe(x); detail.appendChild(h);
    var t = document.createElement('table'); t.className = 'probes';
    t.innerHTML = '<thead><tr><th>probe</th><th>' + x.m.dv + '</th></tr></thead>';
    var body = document.createElement('tbody');
    rows.forEach(function(r){ var tr = document.createElement('tr');
      var a = document.createElement('td'); a.textContent = r[0];
      var b = document.createElement('td'); b.textContent = f(r[1]);
      tr.appendChild(a); tr.appendChild(b); body.appendChild(tr); });
    t.appendChild(body); detail.appendChild(t); detail.dataset.cell = x.id; detail.style.display = 'block';
    var host = document.getElementById('clap-heatmap-' + x.id.split('-')[0]); if(host) host.appendChild(detail); }
  var NS = 'http://www.w3.org/2000/svg';
  maps.forEach(function(m, i){
    var host = document.getElementById('clap-heatmap-' + i); if(!host) return;
    m.groups.forEach(function(g, j){
      var cw = Math.max(14, Math.min(44, 560 / m.layers.length)), ch = 20, left = 150, top = 22;
      var svg = document.createElementNS(NS, 'svg');
      svg.setAttribute('width', left + cw * m.layers.length + 10);
      svg.setAttribute('height', top + ch * g.rows.length + 24);
      var title = document.createElementNS(NS, 'text'); title.setAttribute('x', 0); title.setAttribute('y', 14);
      title.textContent = g.name; title.setAttribute('class', 'hm-title'); svg.appendChild(title);
      g.rows.forEach(function(label, r){
        var t = document.createElementNS(NS, 'text');
        t.setAttribute('x', left - 6); t.setAttribute('y', top + ch * r + 14);
        t.setAttribute('text-anchor', 'end'); t.textContent = label; svg.appendChild(t);
        m.layers.forEach(function(layer, c){
          var cell = g.cells[r][c], rect = document.createElementNS(NS, 'rect'), id = [i, j, r, c].join('-');
          rect.setAttribute('x', left + cw * c); rect.setAttribute('y', top + ch * r);
          rect.setAttribute('width', cw - 1); rect.setAttribute('height', ch - 1);
          rect.setAttribute('id', 'cell-' + id);
          if(cell === null){ rect.setAttribute('fill', 'url(#clap-missing)'); rect.setAttribute('class', 'missing'); }
          else { rect.setAttribute('fill', cell.c); rect.setAttribute('class', 'cell');
            rect.addEventListener('mousemove', function(ev){ showTip(cellOf(id), ev); });
            rect.addEventListener('mouseleave', function(){ tip.style.display = 'none'; });
            rect.addEventListener('click', function(){
              history.replaceState(null, '', '#cell=' + id); openDetail(cellOf(id)); }); }
          svg.appendChild(rect); });
      });
      m.layers.forEach(function(layer, c){ var t = document.createElementNS(NS, 'text');
        t.setAttribute('x', left + cw * c + cw / 2); t.setAttribute('y', top + ch * g.rows.length + 14);
        t.setAttribute('text-anchor', 'middle'); t.textContent = layer; svg.appendChild(t); });
      host.appendChild(svg);
    });
  });
  function fromHash(){ var m = /cell=([0-9]+-[0-9]+-[0-9]+-[0-9]+)/.exec(location.hash); if(!m) return;
    var x = cellOf(m[1]); if(x && x.c){ openDetail(x); var r = document.getElementById('cell-' + x.id);
      r.scrollIntoView({block: 'center'}); var b = r.getBoundingClientRect();
      showTip(x, {pageX: b.right + window.scrollX, pageY: b.bottom + window.scrollY}); } }
  window.addEventListener('hashchange', fromHash); fromHash();
  document.body.dataset.heatmaps = 'ready';
})();
"""

CSS = """
.hm svg{display:block;margin:.3rem 0 .6rem;font-size:12px;font-family:inherit}
.hm rect.cell{cursor:pointer}.hm rect.cell:hover{stroke:#000;stroke-width:1.5}
.hm .hm-title{font-weight:600}
#clap-tip{position:absolute;display:none;background:#222;color:#fff;padding:.3rem .5rem;border-radius:3px;
font-size:.8rem;pointer-events:none;max-width:28rem;z-index:10}
#clap-detail{display:none;border:1px solid #ccc;padding:.5rem 1rem;background:#fafafa;max-height:24rem;overflow:auto}
"""


def render(payloads: list[dict[str, Any]]) -> str:
    """The interactive section: one host per heatmap, the JSON, the hatch pattern, tooltip, detail panel, script."""
    if not payloads:
        return ""
    blob = json.dumps(payloads, separators=(",", ":")).replace("</", "<\\/")
    hosts = "".join(
        f"<div class=\"hm\" id=\"clap-heatmap-{i}\"><h4>{html.escape(p['title'])}</h4>"
        f"<p class=\"hm-note\">Positions {'counted from the end' if p['align'] == 'end' else 'from the start'}; "
        "hover a cell for its mean, token, n and 95 % t interval, click it for the per-probe values; hatched: not "
        "measured.</p></div>"
        for i, p in enumerate(payloads)
    )
    pattern = ("<svg width=\"0\" height=\"0\" style=\"position:absolute\"><defs>"
               "<pattern id=\"clap-missing\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" "
               "patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#c7c7c7\"/>"
               "<line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#8c8c8c\" stroke-width=\"2\"/>"
               "</pattern></defs></svg>")
    return (f"<style>{CSS}</style>{pattern}{hosts}<div id=\"clap-tip\"></div><div id=\"clap-detail\"></div>"
            f"<script type=\"application/json\" id=\"clap-heatmaps\">{blob}</script><script>{SCRIPT}</script>")
