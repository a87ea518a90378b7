"""What `milbench bench cohorts` writes into OUT: ``records.csv`` (one row per cohort × model),
``summary.csv`` (per cell and model, over cohorts), ``table.md``, a forest plot per cell and,
for a sweep, ``sweep.csv`` and ``sweep.png`` (each model's mean gain against the knob)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.core.metrics import format_intervals
from milbench.io import atomic_write, atomic_write_text


def write_outputs(out: Path, records: pd.DataFrame, summary: pd.DataFrame,
                  sweep: tuple[str, list] | None, preset: str, target_gain: float) -> list[Path]:
    written = [atomic_write(out / "records.csv", lambda tmp: records.to_csv(tmp, index=False)),
               atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))]
    cells = list(dict.fromkeys(records["cell"]))
    for cell in cells:
        name = "forest.png" if len(cells) == 1 else f"forest-{_slug(cell)}.png"
        written.append(_save(out / name, forest_plot(records[records["cell"] == cell],
                                                     summary[summary["cell"] == cell], cell)))
    if sweep is not None:
        key, values = sweep
        table = summary.assign(**{key: summary["cell"].map(
            {f"{key}={value}": value for value in values})})
        written.append(atomic_write(out / "sweep.csv", lambda tmp: table.to_csv(tmp, index=False)))
        written.append(_save(out / "sweep.png", sweep_plot(table, key)))
    written.append(atomic_write_text(out / "table.md", render_table(summary, preset, target_gain)))
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _save(path: Path, figure) -> Path:
    import matplotlib.pyplot as plt

    written = atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return written


def render_table(summary: pd.DataFrame, preset: str, target_gain: float) -> str:
    """Markdown: per cell, every model's mean gains with intervals, win shares and power."""
    lines = [f"# Many cohorts: gains over the clinical baseline on `{preset}`", "",
             "Mean over independent cohorts, with the ordinary t interval over cohorts (95 %); "
             "a win is a gain above zero. CV gain: the mean per-fold paired difference in balanced "
             "accuracy (same folds); test gain: the difference on each cohort's hidden test set "
             "(same patients). Detectable: the smallest mean CV gain these cohorts detect with 80 % "
             "power at the observed spread. Room share: the mean CV gain over the mean room, a cohort's room "
             "being its combined oracle (true witness fraction plus the clinical attributes) minus "
             "clinical-only.", ""]
    for cell, group in summary.groupby("cell", sort=False):
        baseline = group["baseline"].iloc[0]
        lines += [f"## {cell} ({int(group['cohorts'].max())} cohorts; baseline {baseline}; mean room "
                  f"{_number(group['room'].iloc[0])})", "",
                  "| model | CV bal. acc. | CV gain [95 % CI] | CV wins | hidden test bal. acc. | "
                  f"test gain [95 % CI] | test wins | room share | instance AUC | s/fit | detectable | "
                  f"cohorts for +{target_gain:g} |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        cv = format_intervals(group["cv_gain"], group["cv_gain_ci_low"], group["cv_gain_ci_high"],
                              signed=True)
        test = format_intervals(group["test_gain"], group["test_gain_ci_low"],
                                group["test_gain_ci_high"], signed=True)
        for row, cv_text, test_text in zip(group.itertuples(index=False), cv, test, strict=True):
            own = row.model != baseline  # the baseline has no gain over itself
            cells = [row.model, f"{row.cv_balanced_accuracy:.3f}", cv_text if own else "–",
                     _share(row.cv_win_share) if own else "–", _number(row.test_balanced_accuracy),
                     test_text if own else "–", _share(row.test_win_share) if own else "–",
                     _number(row.room_share) if own else "–", _number(row.instance_auc),
                     f"{row.seconds_per_fit:.1f}", _number(row.detectable_cv_gain) if own else "–",
                     _count(row.cohorts_for_target_gain) if own else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _number(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.3f}"


def _share(value: float) -> str:
    return f"{100 * value:.0f} %"


def _count(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{int(value)}"


def forest_plot(records: pd.DataFrame, summary: pd.DataFrame, cell: str):
    """One panel per model (the baseline left out): each cohort's CV gain with its own
    corrected-t interval and its hidden-test gain, then the pooled means with t intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = summary["baseline"].iloc[0]
    models = [m for m in summary["model"] if m != baseline]
    seeds = list(dict.fromkeys(records["seed"]))
    figure, axes = plt.subplots(1, max(len(models), 1), figsize=(3.6 * max(len(models), 1),
                                                                 1.2 + 0.32 * (len(seeds) + 2)),
                                sharey=True, squeeze=False)
    positions = {seed: len(seeds) + 1 - i for i, seed in enumerate(seeds)}
    for axis, model in zip(axes[0], models, strict=False):
        rows = records[records["model"] == model]
        y = rows["seed"].map(positions).to_numpy(dtype=float)
        axis.errorbar(rows["cv_gain"], y, xerr=[rows["cv_gain"] - rows["cv_gain_ci_low"],
                                                rows["cv_gain_ci_high"] - rows["cv_gain"]],
                      fmt="o", color="tab:blue", markersize=4, capsize=2, label="CV gain")
        axis.plot(rows["test_gain"], y - 0.25, "x", color="tab:orange", label="hidden-test gain")
        pooled = summary[summary["model"] == model].iloc[0]
        for offset, column, colour in ((0.0, "cv_gain", "tab:blue"), (-0.35, "test_gain", "tab:orange")):
            mean, low, high = pooled[column], pooled[f"{column}_ci_low"], pooled[f"{column}_ci_high"]
            if np.isfinite(low):
                axis.plot([low, high], [offset, offset], color=colour, linewidth=3)
            axis.plot([mean], [offset], "D", color=colour, markersize=7)
        axis.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        low, high = axis.get_xlim()  # a balanced-accuracy difference lies in [-1, 1]
        axis.set_xlim(max(low, -1.0), min(high, 1.0))
        axis.set_title(model, fontsize=10)
        axis.set_xlabel(f"balanced accuracy − {baseline}")
    axes[0][0].set_yticks([*positions.values(), 0], [f"seed {s}" for s in seeds] + ["pooled"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, [f"{label} (diamond and bar: mean over cohorts, 95 % t interval)"
                            if label == "CV gain" else label for label in labels],
                  loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"Gain over {baseline} per cohort ({cell})", fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def sweep_plot(table: pd.DataFrame, key: str):
    """Each model's mean gain over the baseline (t interval over cohorts) against the knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = table["baseline"].iloc[0]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, column, title in ((axes[0], "cv_gain", "cross-validation"),
                                (axes[1], "test_gain", "hidden test")):
        for model, rows in table[table["model"] != baseline].groupby("model", sort=False):
            rows = rows.sort_values(key)
            axis.errorbar(rows[key], rows[column], yerr=[rows[column] - rows[f"{column}_ci_low"],
                                                         rows[f"{column}_ci_high"] - rows[column]],
                          marker="o", capsize=3, label=model)
        axis.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        axis.set(xlabel=key, title=f"{title}: gain over {baseline}")
    axes[0].set_ylabel("mean balanced-accuracy gain (95 % CI over cohorts)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    return figure
