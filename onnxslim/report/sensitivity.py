"""`onnxslim sensitivity`: damage curves per channel group, as a table, JSON or a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnxslim.prune.state import SensitivityCurves
from onnxslim.report.format import format_count, format_percent, format_table, require_plotting

__all__ = ["render_sensitivity", "sensitivity_json", "plot_sensitivity"]


def render_sensitivity(curves: SensitivityCurves, *, top: int | None = None) -> str:
    """Groups from most to least sensitive: damage (1 - worst output cosine) and top-1 at each ratio."""
    labelled = curves.accuracy_original is not None
    headers = ["group", "channels", "MACs at stake"] + [f"cos @{r:g}" for r in curves.ratios]
    if labelled:
        headers += [f"top-1 @{r:g}" for r in curves.ratios]
    shown = curves.groups if top is None else curves.groups[:top]
    rows = []
    for group in shown:
        row = [group.group, group.channels, format_count(group.macs)]
        row += [f"{p.cosine:.4f}" for p in group.points]
        if labelled:
            row += [format_percent(p.accuracy) for p in group.points]
        rows.append(row)
    lines = [
        f"criterion  {curves.criterion}   recover {curves.recover}   measured on {curves.samples} samples of {curves.data}"
        + (f"   original top-1 {format_percent(curves.accuracy_original)}" if labelled else ""),
        f"cost       {curves.trials} trials, about {curves.forward_passes} passes of the data through a model, "
        f"{curves.seconds:.1f} s",
        "",
        format_table(headers, rows),
        "",
        "(each group pruned alone at each ratio, its readers refit as --recover says; cos: the worst output's "
        "mean cosine against the original; most sensitive first)",
    ]
    if top is not None and len(curves.groups) > top:
        lines.append(f"{len(curves.groups) - top} less sensitive groups not shown (--top, or --json)")
    return "\n".join(lines)

def sensitivity_json(curves: SensitivityCurves) -> dict[str, Any]:
    """The `sensitivity --json` object: groups most sensitive first, a point per ratio."""
    return {
        "criterion": curves.criterion,
        "recover": curves.recover,
        "data": curves.data,
        "samples": curves.samples,
        "trials": curves.trials,
        "forward_passes": curves.forward_passes,
        "seconds": curves.seconds,
        "ratios": list(curves.ratios),
        "accuracy_original": curves.accuracy_original,
        "groups": [
            {
                "group": group.group,
                "channels": group.channels,
                "macs": group.macs,
                "points": [
                    {"ratio": p.ratio, "removed": p.removed, "cosine": p.cosine, "accuracy": p.accuracy}
                    for p in group.points
                ],
            }
            for group in curves.groups
        ],
    }

def plot_sensitivity(curves: SensitivityCurves, path: str | Path, *, top: int = 12) -> Path:
    """Damage curves of the most sensitive groups as a PNG (needs matplotlib: the `plot` extra)."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(20)])  # 12 curves, 12 colours
    for group in curves.groups[:top]:
        ratios = [0.0, *(p.ratio for p in group.points)]
        cosines = [1.0, *(p.cosine for p in group.points)]
        axis.plot(ratios, cosines, marker="o", label=f"{group.group} ({format_count(group.macs)} MACs)")
    axis.set_xlabel("fraction of the group's channels removed (alone)")
    axis.set_ylabel("worst output cosine vs original")
    axis.set_title(f"sensitivity: {curves.criterion} + {curves.recover} recovery, {curves.samples} samples")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial.png")  # written whole, then renamed: atomic
    try:
        figure.savefig(partial, dpi=120)
        partial.replace(target)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return target
