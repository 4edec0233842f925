"""The three figure types every study draws: boxplots by group, a radar chart of per-group AUC, a bar chart of a
metric by method (with CI whiskers). matplotlib only; each returns the PNG path."""
from pathlib import Path

import numpy as np

from common.report import fit_title, pyplot


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def boxplots(data, path, title, ylabel, group_colors=None, points=None, points_label=None):
    """data: {category: {group: values}} -> grouped boxplots (e.g. train set x test group, as Lopez-Perez Fig. 3).
    points: optional {category: {group: values}} drawn as dots over the boxes (e.g. each repeat's median)."""
    cats = list(data)
    groups = list(dict.fromkeys(g for c in cats for g in data[c]))
    plt = pyplot()
    colors = group_colors or dict(zip(groups, plt.cm.tab10.colors))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cats), 3.6))
    for j, g in enumerate(groups):
        pos = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(cats))]
        vals = [np.asarray(data[c].get(g, []), float) for c in cats]
        bp = ax.boxplot(vals, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(colors[g])
            box.set_alpha(0.75)
        ax.plot([], [], color=colors[g], lw=8, alpha=0.75, label=str(g))
        for x, c in zip(pos, cats) if points else ():
            v = np.asarray(points.get(c, {}).get(g, []), float)
            ax.scatter(np.full(len(v), x) + np.linspace(-0.25, 0.25, len(v)) * width, v, s=14, c="black", zorder=3,
                       label=points_label if (j, c) == (0, cats[0]) else None)
    ax.set_xticks(range(len(cats)), labels=cats)
    ax.set_ylabel(ylabel)
    fit_title(ax, title, 10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def radar(values, path, title):
    """values: {series (method): {axis (group): AUC}} -> one radar chart; axes are the groups."""
    series = list(values)
    axes = list(dict.fromkeys(a for s in series for a in values[s]))
    if len(axes) < 3:  # a radar needs three axes: fall back to bars
        return bars({s: {a: (values[s][a], None) for a in axes} for s in series}, path, title, "AUROC")
    ang = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    fig, ax = pyplot().subplots(figsize=(4.8, 4.8), subplot_kw={"polar": True})
    for s in series:
        v = [values[s].get(a, np.nan) for a in axes]
        ax.plot(ang + ang[:1], v + v[:1], label=str(s))
        ax.fill(ang + ang[:1], v + v[:1], alpha=0.08)
    ax.set_xticks(ang, labels=[str(a) for a in axes], fontsize=8)
    fit_title(ax, title, 10)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.3, 1.1))
    return _save(fig, path)


def bars(values, path, title, ylabel):
    """values: {method: {series: (value, (lo, hi) or None)}} -> grouped bars with CI whiskers. A value outside its
    percentile CI (a max - min gap near 0: resampling inflates it) gets no whisker on that side."""
    methods = list(values)
    series = list(dict.fromkeys(s for m in methods for s in values[m]))
    width = 0.8 / len(series)
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.1 * len(methods) * max(1, len(series) / 3), 3.6))
    for j, s in enumerate(series):
        x = np.arange(len(methods)) + (j - (len(series) - 1) / 2) * width
        v = np.array([values[m].get(s, (np.nan, None))[0] for m in methods], float)
        ci = [values[m].get(s, (np.nan, None))[1] for m in methods]
        err = np.clip(np.array([[vi - c[0], c[1] - vi] if c is not None else [0, 0] for vi, c in zip(v, ci)]).T,
                      0, None)
        ax.bar(x, v, width * 0.95, label=str(s), yerr=err if any(c is not None for c in ci) else None, capsize=2)
    ax.set_xticks(range(len(methods)), labels=methods, fontsize=8, rotation=15)
    ax.set_ylabel(ylabel)
    fit_title(ax, title, 10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def lines(values, path, title, xlabel, ylabel):
    """values: {series: {x: y}} -> one line per series (e.g. accuracy vs synthetic ratio per classifier)."""
    fig, ax = pyplot().subplots(figsize=(5, 3.6))
    for s, pts in values.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=str(s))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fit_title(ax, title, 10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def scatter(points, path, title, xlabel, ylabel, hline=None, vline=None):
    """points: {label: (x, (x_lo, x_hi) or None, y, (y_lo, y_hi) or None)} -> labelled points with CI bars in both
    directions (e.g. female AUROC gain against generator fidelity, gap against AUROC); hline / vline: reference
    lines (e.g. 0: no difference)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for i, (label, (x, xci, y, yci)) in enumerate(points.items()):
        xerr = None if xci is None else np.clip([[x - xci[0]], [xci[1] - x]], 0, None)
        yerr = None if yci is None else np.clip([[y - yci[0]], [yci[1] - y]], 0, None)
        color = plt.cm.tab10.colors[i % 10]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=2, ms=5, lw=1)
        ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    if vline is not None:
        ax.axvline(vline, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fit_title(ax, title, 10)
    return _save(fig, path)
