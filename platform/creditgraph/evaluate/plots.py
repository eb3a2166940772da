"""Report figures (PNG). Each function draws one figure, writes it atomically and returns the path.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg rendering, no pyplot global
state), so they are safe to draw from worker processes and threads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from creditgraph.evaluate.metrics import expected_calibration_error
from creditgraph.policy.decide import check_grid
from creditgraph.utils.io import atomic_file

DPI = 120
TRUE_STYLE = {"color": "black", "linewidth": 2.4, "label": "true curve"}


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight")
    return path


def sample_users_by_segment(
    segments: Sequence | np.ndarray, k: int = 3, seed: int = 0
) -> dict[str, list[int]]:
    """Up to ``k`` random row positions per segment label (for :func:`plot_curves`)."""
    labels = np.asarray(segments).astype(str)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {}
    for seg in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == seg)
        out[seg] = sorted(rng.choice(rows, size=min(k, rows.size), replace=False).tolist())
    return out


def plot_curves(
    grid: np.ndarray,
    true_curves: np.ndarray | None,
    est_curves: Mapping[str, np.ndarray],
    users_by_segment: Mapping[str, Sequence[int]],
    path: str | Path,
    *,
    r_max: float | None = None,
    max_users: int = 4,
    limit_label: str = "credit limit",
    title: str = "True vs estimated risk curves p(default | do(limit))",
) -> Path:
    """Small multiples: one row per segment, one panel per sampled user (row index into the
    curve arrays), the true curve in black (when known) and each estimator in its own colour; a
    dashed line at the ceiling ``r_max`` when given."""
    grid = check_grid(grid)
    segs = [s for s, rows in users_by_segment.items() if len(rows)]
    if not segs:
        raise ValueError("users_by_segment has no users to plot")
    ncols = min(max_users, max(len(users_by_segment[s]) for s in segs))
    colors = _colors(list(est_curves))
    fig = Figure(figsize=(3.2 * ncols + 0.6, 2.6 * len(segs) + 0.9))
    axes = fig.subplots(len(segs), ncols, squeeze=False, sharex=True)
    for r, seg in enumerate(segs):
        rows = list(users_by_segment[seg])[:ncols]
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(rows):
                ax.set_visible(False)
                continue
            u = rows[c]
            if true_curves is not None:
                ax.plot(grid, true_curves[u], **TRUE_STYLE)
            for name, curves in est_curves.items():
                ax.plot(grid, curves[u], color=colors[name], linewidth=1.4, label=name)
            if r_max is not None:
                ax.axhline(
                    r_max, color="tab:red", linestyle="--", linewidth=1, label="ceiling R_max"
                )
            ax.set_title(f"{seg} · user row {u}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("p(default)")
            if r == len(segs) - 1:
                ax.set_xlabel(limit_label)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=min(len(labels), 5),
        frameon=False,
        bbox_to_anchor=(0.5, 1.0 - 0.25 / fig.get_figheight()),
    )
    fig.suptitle(title, y=1.0 + 0.1 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    return _save(fig, path)


def plot_calibration(
    tables: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    *,
    title: str = "Calibration of the factual default prediction",
) -> Path:
    """Reliability diagram: observed default rate against mean predicted probability per
    equal-mass bin (tables from :func:`~creditgraph.evaluate.metrics.calibration_table`), one
    line per model, ECE in the legend; the diagonal is perfect calibration."""
    if not tables:
        raise ValueError("no calibration tables to plot")
    colors = _colors(list(tables))
    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.subplots()
    top = 0.0
    for name, t in tables.items():
        x, y = np.asarray(t["mean_pred"]), np.asarray(t["obs_rate"])
        top = max(top, float(np.max(x, initial=0)), float(np.max(y, initial=0)))
        ece = expected_calibration_error(t)
        ax.plot(x, y, marker="o", markersize=4, color=colors[name], label=f"{name} (ECE {ece:.3f})")
    top = min(1.0, top * 1.05 + 1e-3)
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="perfect calibration")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted p(default) in bin")
    ax.set_ylabel("observed default rate in bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _aggregate(
    rows: Sequence[Mapping], metric: str, label_col: str, error_col: str | None, group_col: str
) -> list[tuple[str, float, float, str | None]]:
    by_label: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        if metric in row and row[metric] is not None and np.isfinite(row[metric]):
            by_label[str(row[label_col])].append(row)
    out = []
    for label, rs in by_label.items():
        vals = np.array([float(r[metric]) for r in rs])
        if len(rs) > 1:  # several seeds: mean ± sd
            err = float(vals.std(ddof=1))
        elif error_col is not None and rs[0].get(error_col) is not None:
            err = float(rs[0][error_col])
        else:
            err = 0.0
        out.append((label, float(vals.mean()), err, rs[0].get(group_col)))
    return out


def plot_metric_bars(
    rows: Sequence[Mapping],
    metric: str,
    path: str | Path,
    error_col: str | None = None,
    *,
    label_col: str = "name",
    group_col: str = "kind",
    higher_is_better: bool = False,
    title: str | None = None,
    xlabel: str | None = None,
) -> Path:
    """Horizontal bars of ``metric`` per model/ablation, best at the top.

    ``rows`` are dicts with ``label_col`` (the bar), ``metric`` and optionally ``group_col``
    (e.g. ``"model"``, ``"ablation"``, ``"baseline"``: the bar colour). Several rows with the same
    label (e.g. one per seed) become mean ± sd; a single row takes its error bar from
    ``error_col`` when given. Rows without a finite value for ``metric`` are left out.
    """
    agg = _aggregate(rows, metric, label_col, error_col, group_col)
    if not agg:
        raise ValueError(f"no rows with a finite {metric!r}")
    agg.sort(key=lambda a: a[1], reverse=not higher_is_better)  # barh draws bottom-up: best last
    groups = sorted({str(a[3]) for a in agg if a[3] is not None})
    colors = _colors(groups) if groups else {}
    fig = Figure(figsize=(7.0, 0.45 * len(agg) + 1.6))
    ax = fig.subplots()
    ypos = np.arange(len(agg))
    ax.barh(
        ypos,
        [a[1] for a in agg],
        xerr=[a[2] for a in agg],
        color=[colors.get(str(a[3]), "tab:blue") for a in agg],
        capsize=3,
        alpha=0.85,
    )
    for y, (_, v, e, _) in zip(ypos, agg, strict=True):
        ax.text(v + e, y, f" {v:.4g}", va="center", fontsize=8)
    ax.set_yticks(ypos, [a[0] for a in agg])
    ax.set_xlabel(
        xlabel or metric + (" (higher is better)" if higher_is_better else " (lower is better)")
    )
    ax.set_title(title or f"{metric} by model")
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    if groups:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colors[g], label=g) for g in groups], fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_policy(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    r_max: float | None = None,
    title: str = "Limit policy against the oracle",
) -> Path:
    """Two panels from :func:`~creditgraph.evaluate.metrics.policy_metrics` results per model:
    (left) ceiling violation rate vs granted/oracle limit ratio, the oracle at ratio 1; (right)
    mean policy value per user with the oracle's as a dashed line."""
    if not results:
        raise ValueError("no policy results to plot")
    names = list(results)
    colors = _colors(names)
    fig = Figure(figsize=(11.0, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    for name in names:
        m = results[name]
        ax1.scatter(m["violation_rate"], m["granted_ratio"], s=50, color=colors[name], label=name)
        ax1.annotate(
            name,
            (m["violation_rate"], m["granted_ratio"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ref = results[names[0]]
    ax1.scatter(ref["oracle_violation_rate"], 1.0, marker="*", s=160, color="black", label="oracle")
    ax1.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax1.set_xlabel("share of users whose true risk at the decided limit > R_max")
    ax1.set_ylabel("total granted limit / oracle total")
    ax1.set_title(
        "Violations vs credit granted" + (f" (R_max = {r_max:g})" if r_max is not None else "")
    )
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ypos = np.arange(len(names))
    ax2.barh(ypos, [results[n]["value_mean"] for n in names], color=[colors[n] for n in names])
    ax2.axvline(ref["oracle_value_mean"], color="black", linestyle="--", label="oracle")
    ax2.axvline(0.0, color="grey", linewidth=0.8)
    ax2.xaxis.set_major_locator(MaxNLocator(5))
    ax2.set_yticks(ypos, names)
    ax2.set_xlabel("mean policy value per user (limit units)")
    ax2.set_title("Policy value (margin·L·(1−p) − LGD·L·p)")
    ax2.grid(axis="x", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_frontier(
    points: Sequence[Mapping], policies: Sequence[Mapping], path: str | Path, r_max: float
) -> Path:
    """Each method's frontier: over-ceiling rate among granted users against the share of the
    oracle's credit granted, as the method tightens; the model's policy stages as markers."""
    names = list(dict.fromkeys(p["name"] for p in points))
    colors = _colors(names)
    fig = Figure(figsize=(7.2, 5.4))
    ax = fig.subplots()
    for name in names:
        pts = sorted((p for p in points if p["name"] == name), key=lambda p: p["granted_ratio"])
        ax.plot(
            [p["granted_ratio"] for p in pts],
            [p["over_ceiling_rate"] for p in pts],
            marker="o",
            markersize=3,
            color=colors[name],
            label=name,
        )
    markers = {"bare": "x", "calibrated": "s", "guaranteed": "D", "deployed": "*"}
    for row in policies:
        if row.get("policy") in markers and row.get("name") == names[0]:
            ax.scatter(
                row["granted_ratio"],
                row["over_ceiling_rate"],
                marker=markers[row["policy"]],
                s=70,
                color="black",
                zorder=5,
                label=f"{row['name']}: {row['policy']}",
            )
    ax.set_xlabel("credit granted / oracle's credit")
    ax.set_ylabel(f"share of granted users whose true risk > r_max = {r_max}")
    ax.set_title("Frontier: risk-ceiling breaches vs credit granted (each method tightening)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability_bands(reliability: Mapping[str, Mapping], path: str | Path) -> Path:
    """Reliability of the factual prediction per limit band, before and after calibration."""
    before, after = reliability["before"], reliability["after"]
    bands = [b for b in before if b != "all" and before[b].get("n", 0) > 0]
    fig = Figure(figsize=(3.0 * max(len(bands), 1) + 0.5, 3.4))
    axes = fig.subplots(1, max(len(bands), 1), squeeze=False)[0]
    for ax, band in zip(axes, bands, strict=False):
        top = 0.0
        for label, rel, color in (("before", before, "tab:red"), ("after", after, "tab:blue")):
            t = rel[band]["table"]
            x, y = np.asarray(t["mean_pred"]), np.asarray(t["obs_rate"])
            top = max(top, float(np.max(x, initial=0)), float(np.max(y, initial=0)))
            ax.plot(
                x,
                y,
                marker="o",
                markersize=3,
                color=color,
                label=f"{label} (ECE {rel[band]['ece']:.3f})",
            )
        top = min(1.0, top * 1.05 + 1e-3)
        ax.plot([0, top], [0, top], color="grey", linestyle=":")
        lo, hi = before[band].get("limit_lo"), before[band].get("limit_hi")
        span = "L = 0" if band == "zero" else f"{lo:,.0f}..{hi:,.0f}" if lo is not None else band
        ax.set_title(f"{band}: {span}", fontsize=9)
        ax.set_xlabel("mean predicted p(default)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("observed default rate")
    fig.suptitle("Calibration per limit band (held-out users)")
    fig.tight_layout()
    return _save(fig, path)
