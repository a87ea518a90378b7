"""A run's figures, its report.md (markdown linking the figures under ``plots/``) and
report.html (the same report as one file with the figures embedded, to share)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from milbench import plots
from milbench.config import RunConfig
from milbench.core.metrics import METRICS, format_intervals
from milbench.data import Cohort
from milbench.evaluation.cv import CVResult
from milbench.runs import Run
from milbench.synth.layout import PIXEL_CEILING_GLOB

if TYPE_CHECKING:  # pipeline imports this module
    from milbench.instances import InstanceViews
    from milbench.preparation import PreparedData


def write_plots(run: Run, cohort: Cohort, results: dict[str, CVResult]) -> None:
    run.save_figure("plots/clinical_by_class.png", plots.clinical_by_class(cohort.train().frame()))
    run.save_figure("plots/roc.png", plots.roc_curves({n: r.oof for n, r in results.items()}))
    cells = {n: {c: int(r.per_repeat[c].sum()) for c in ("tn", "fp", "fn", "tp")}
             for n, r in results.items()}
    run.save_figure("plots/confusion.png", plots.confusion_matrices(cells))
    run.save_figure("plots/bag_sizes_by_class.png", plots.bag_sizes_by_class(cohort.frame()))
    run.save_figure("plots/oof_scores_by_class.png",
                    plots.oof_scores_by_class({n: r.oof for n, r in results.items()}))


def render_html(markdown: str, folder: Path) -> str:
    """``markdown`` (a report) as one self-contained HTML page: tables rendered, every image it
    links under ``folder`` embedded, so the file can be shared alone."""
    import base64
    import html
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(match: re.Match) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>milbench report</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def _dash(value) -> str:
    return "–" if pd.isna(value) else f"{value:.3f}"


def render(config: RunConfig, data: PreparedData, table: pd.DataFrame,
           submissions: dict[str, Path], timings: pd.DataFrame, views: InstanceViews | None = None,
           comparisons: pd.DataFrame | None = None) -> str:
    root, cohort, train, test = data.root, data.cohort, data.train, data.test
    read = [view for view in data.views.values() if view.manifest]
    described = "; ".join(_describe_features(view) for view in read) or (
        "none (clinical attributes only)")
    hidden = [c for c in ("hidden_test_balanced_accuracy", "hidden_test_roc_auc") if c in table]
    table = table.copy()
    if "hidden_test_ci_low" in table:
        # The test figure with its bootstrap interval, in one readable cell.
        table["hidden_test_balanced_accuracy"] = format_intervals(
            table["hidden_test_balanced_accuracy"], table["hidden_test_ci_low"],
            table["hidden_test_ci_high"])
    selected = table["note"].astype(bool).any()
    instance = ["instance_auc"] if "instance_auc" in table else []
    multiple = "features" in table and table["features"].nunique() > 1
    shown = table[["model", *(["features"] if multiple else []), *METRICS, "seconds_per_fit",
                   *hidden, *instance,
                   *(["note"] if selected else [])]].copy()
    if instance:
        shown["instance_auc"] = shown["instance_auc"].map(_dash)
    lines = [
        f"# Run `{config.name}`",
        "",
        f"Data: `{root}` — {len(train)} train patients ({int(train.labels().sum())} tumoral), "
        f"{len(test)} test patients, {len(cohort.skipped)} skipped files.",
        f"Instance features: {described}.",
        f"Protocol: stratified {config.evaluation.n_splits}-fold CV × {config.evaluation.n_repeats} "
        f"repeats on {', '.join(config.evaluation.stratify) or 'the label'}; seed {config.seed}. "
        "Cells: mean ± std (max) over repeats."
        + (" `hidden_test_*`: the synthetic cohort's hidden test labels, read only after the "
           "models predicted (no real challenge folder has them); balanced accuracy with its "
           "bootstrap 95 % interval over test patients." if hidden else ""),
        "",
        shown.to_markdown(index=False),
        *(["", "An ensemble whose members were chosen by this CV (best k) scores optimistically "
           "here: the same folds picked and scored it. `seconds_per_fit` of an ensemble excludes "
           "member fits it shared with the members' own CV."] if selected else []),
        "",
        *_comparison_section(comparisons),
        "Wall time per stage (seconds):",
        "",
        timings.to_markdown(index=False, floatfmt=".1f"),
        "",
        "![ROC](plots/roc.png) ![confusion](plots/confusion.png)",
        "",
        *_instance_section(views, root),
        "## Class distributions",
        "",
        "Clinical attributes, bag sizes (images per patient) and each model's out-of-fold scores "
        "by class (training patients; bag sizes also for the test patients).",
        "",
        "![clinical](plots/clinical_by_class.png) ![bag sizes](plots/bag_sizes_by_class.png)",
        "![out-of-fold scores](plots/oof_scores_by_class.png)",
        "",
        "## Submissions",
        "",
        *([f"- {name}: `{path}`" for name, path in submissions.items()] or ["none"]),
    ]
    return "\n".join(lines) + "\n"


def _describe_features(view) -> str:
    """One extractor: kind, name, width, who reads it, and whether it saw the test images."""
    settings = view.manifest.get("config", {})
    return (f"{settings.get('kind')} `{view.name}`, {view.manifest.get('dim')}-d "
            f"(read by {', '.join(view.models) or 'no model'})"
            + (" — trained without labels on all images, test images included"
               if view.manifest.get("uses_test_images") else ""))


def _comparison_section(comparisons: pd.DataFrame | None) -> list[str]:
    if comparisons is None or comparisons.empty:
        return []
    shown = comparisons.copy()
    shown["difference [95 % CI]"] = format_intervals(
        shown["mean_difference"], shown["ci_low"], shown["ci_high"], signed=True)
    shown["p"] = shown["p_value"].map(lambda p: f"{p:.3f}")
    return [
        "## Paired comparisons",
        "",
        "Balanced accuracy of each model minus its reference over the same folds and repeats "
        "(per-fold differences; corrected resampled t-test, Nadeau & Bengio 2003). A model is "
        "better or worse only when the interval excludes zero (`comparisons.csv`).",
        "",
        shown[["model", "comparison", "reference", "difference [95 % CI]", "p", "verdict"]]
        .to_markdown(index=False),
        "",
    ]


def _instance_ceilings(root: Path) -> list[str]:
    """What the cohort's truth says an instance scorer can reach, beside the models' AUCs."""
    truth = root / "truth"
    lines = []
    difficulty = truth / "difficulty.json"
    if difficulty.is_file():
        oracle = json.loads(difficulty.read_text(encoding="utf-8")).get("oracle_instance_auc")
        if oracle is not None:
            lines.append(f"- the generator's oracle (each cell's true atypia): {oracle:.3f}")
    ceilings = sorted(truth.glob(PIXEL_CEILING_GLOB))
    for path in ceilings:
        figures = json.loads(path.read_text(encoding="utf-8"))
        lines.append(f"- the pixel ceiling at {figures['input_size']} px (a small CNN trained on the "
                     f"true instance labels, patient-grouped CV): {figures['instance_auc']:.3f}")
    if difficulty.is_file() and not ceilings:
        lines.append(f"- the pixel ceiling: not computed (`milbench bench cohort {root} "
                     "--pixel-ceiling` adds it)")
    return ["Instance AUC on this cohort, for reference:", "", *lines, ""] if lines else []


def _instance_section(views: InstanceViews | None, root: Path) -> list[str]:
    if views is None or (not views.montages and views.auc is None):
        return []
    lines = ["## Instances", ""]
    if views.auc is not None:
        lines += [
            "`instance_auc`: ROC AUC of the final model's instance scores (refit on all training "
            "patients) against the synthetic truth's atypical flag, over every test patient's image; "
            "– for models without instance scores. `instance_auc.csv` adds the mean AUC within "
            "bags (`within_bag_auc`; attention weights are normalised per bag) and the counts.",
            "",
            *_instance_ceilings(root),
        ]
    if views.montages:
        lines += ["Highest-scoring images per patient (final model; test patients, then a few "
                  "training patients scored in-sample):", ""]
        lines += [f"- {name}: ![{name} top instances]({path})" for name, path in views.montages.items()]
        lines.append("")
    return lines


# The terminal's short column names: the run's headline columns must fit one screen.
TERMINAL_NAMES = {"balanced_accuracy": "bal_acc", "seconds_per_fit": "s/fit",
                  "hidden_test_balanced_accuracy": "test_bal_acc", "hidden_test_roc_auc": "test_auc"}


def terminal_tables(table: pd.DataFrame, comparisons: pd.DataFrame
                    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A run's headline table (metrics.csv and report.md hold every metric) and its paired
    differences, each interval in one readable cell, for the terminal."""
    shown = table.drop(columns=["balanced_accuracy_mean", "f1", "precision", "recall"])
    if "hidden_test_ci_low" in shown:
        shown["hidden_test_balanced_accuracy"] = format_intervals(
            shown.pop("hidden_test_balanced_accuracy"), shown.pop("hidden_test_ci_low"),
            shown.pop("hidden_test_ci_high"))
    shown = shown.rename(columns=TERMINAL_NAMES)
    if comparisons.empty:
        return shown, None
    compared = comparisons[["model", "comparison", "reference"]].copy()
    compared["bal_acc difference [95% CI]"] = format_intervals(
        comparisons["mean_difference"], comparisons["ci_low"], comparisons["ci_high"], signed=True)
    compared["verdict"] = comparisons["verdict"]
    return shown, compared
