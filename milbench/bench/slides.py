"""Slide-classification benchmark on real handwritten digits (``milbench bench slides``).

A CNN is trained on clean ``load_digits`` digits, a VAE on its feature vectors; test slides
come from held-out digits (``milbench.slides.digits``). For every slide the table compares the
accuracy of the plain CNN, the VAE round trip (decode, then the CNN head), the grid search,
the Bayesian search and the optimal-with-hindsight grid choice, and the time each takes
(for the clustering methods: the search and labelling, after the shared CNN and VAE passes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from milbench.io import atomic_write_text
from milbench.progress import progress_bar
from milbench.slides.clustering import SlideClusterer
from milbench.slides.cnn import InstanceClassifier, train_cnn
from milbench.slides.digits import (
    DigitSplit,
    distorted_slide,
    load_digit_split,
    stochastic_slide,
    sure_mask,
)
from milbench.slides.vae import VAEModel, fit_vae

MODES = ("stochastic", "distorted", "both")
METHODS = ("cnn", "vae", "grid", "bayes", "optimal")


@dataclass
class DigitPipeline:
    split: DigitSplit
    cnn: InstanceClassifier
    vae: VAEModel
    clusterer: SlideClusterer


def build_pipeline(
    seed: int = 0,
    *,
    latent_dim: int = 64,
    max_reference: int = 150,
    disagreement_cutoff: int | None = 25,
    assignment: str = "hungarian",
    cnn_epochs: int = 30,
    vae_epochs: int = 60,
) -> DigitPipeline:
    """Train CNN and VAE on the training digits; references = their latent vectors per class."""
    split = load_digit_split(seed=seed)
    cnn = train_cnn(split.train_images, split.train_labels, epochs=cnn_epochs, seed=seed)
    train_features = cnn.features(split.train_images)
    vae = fit_vae(train_features, latent_dim=latent_dim, epochs=vae_epochs, seed=seed)
    latent = vae.encode(train_features)
    rng = np.random.default_rng(seed)
    references = []
    for cls in range(10):
        rows = np.flatnonzero(split.train_labels == cls)
        if len(rows) > max_reference:  # EMD cost grows with reference size; a sample suffices
            rows = np.sort(rng.choice(rows, size=max_reference, replace=False))
        references.append(latent[rows])
    clusterer = SlideClusterer(
        references,
        assignment=assignment,
        disagreement_cutoff=disagreement_cutoff,
        random_state=seed,
    )
    return DigitPipeline(split, cnn, vae, clusterer)


def run_slides_benchmark(
    n_slides: int = 30,
    seed: int = 0,
    mode: str = "both",
    *,
    progress: bool = False,
    cnn_epochs: int = 30,
    vae_epochs: int = 60,
) -> pd.DataFrame:
    """One row per (slide, kind): accuracy and seconds per method."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_slides < 1:
        raise ValueError("n_slides must be at least 1")
    pipeline = build_pipeline(seed, cnn_epochs=cnn_epochs, vae_epochs=vae_epochs)
    split = pipeline.split
    confidence = pipeline.cnn.predict_proba(split.test_images).max(axis=1)
    sure = sure_mask(confidence, split.test_labels)
    kinds = ["stochastic", "distorted"] if mode == "both" else [mode]
    rng = np.random.default_rng(seed + 1)
    rows = []
    with progress_bar("slides", n_slides * len(kinds), enabled=progress, unit="slides") as advance:
        for kind in kinds:
            for number in range(n_slides):
                if kind == "stochastic":
                    slide = stochastic_slide(rng, split.test_images, split.test_labels, sure)
                else:
                    slide = distorted_slide(rng, split.test_images, split.test_labels)
                rows.append(_evaluate_slide(pipeline, slide, kind, number))
                advance(1)
    return pd.DataFrame(rows)


def _evaluate_slide(pipeline: DigitPipeline, slide, kind: str, number: int) -> dict:
    row: dict = {"kind": kind, "slide": number, "n_images": len(slide.labels)}
    start = time.perf_counter()
    features = pipeline.cnn.features(slide.images)
    cnn_labels = pipeline.cnn.head_proba(features).argmax(axis=1)
    row["cnn_acc"] = float((cnn_labels == slide.labels).mean())
    row["cnn_s"] = time.perf_counter() - start
    start = time.perf_counter()
    latent = pipeline.vae.encode(features)
    vae_labels = pipeline.cnn.head_proba(pipeline.vae.decode(latent)).argmax(axis=1)
    row["vae_acc"] = float((vae_labels == slide.labels).mean())
    row["vae_s"] = time.perf_counter() - start
    for search in ("grid", "bayes", "optimal"):
        start = time.perf_counter()
        result = pipeline.clusterer.classify(latent, cnn_labels, search=search, truth=slide.labels)
        row[f"{search}_acc"] = float((result.labels == slide.labels).mean())
        row[f"{search}_s"] = time.perf_counter() - start
        row[f"{search}_fell_back"] = result.fell_back
        row[f"{search}_evaluations"] = result.n_evaluations
    return row


def summarize(per_slide: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and seconds per slide, per slide kind and method."""
    records = []
    for kind, group in per_slide.groupby("kind", sort=False):
        for method in METHODS:
            record = {
                "slides": kind,
                "method": method,
                "n_slides": len(group),
                "accuracy": group[f"{method}_acc"].mean(),
                "accuracy_std": group[f"{method}_acc"].std(ddof=0),
                "wins_vs_cnn": int((group[f"{method}_acc"] > group["cnn_acc"]).sum()),
                "losses_vs_cnn": int((group[f"{method}_acc"] < group["cnn_acc"]).sum()),
                "s_per_slide": group[f"{method}_s"].mean(),
            }
            fell_back = f"{method}_fell_back"
            record["fell_back"] = int(group[fell_back].sum()) if fell_back in group else 0
            records.append(record)
    return pd.DataFrame(records)


def _markdown(summary: pd.DataFrame, command: str) -> str:
    header = "| slides | method | n | accuracy | std | wins/losses vs CNN | fell back | s/slide |"
    lines = [f"Command: `{command}`", "", header, "|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        lines.append(
            f"| {r.slides} | {r.method} | {r.n_slides} | {r.accuracy:.4f} | {r.accuracy_std:.4f} "
            f"| {r.wins_vs_cnn}/{r.losses_vs_cnn} | {r.fell_back} | {r.s_per_slide:.3f} |"
        )
    return "\n".join(lines) + "\n"


def bench_slides_command(n_slides: int, seed: int, out: Path | None, mode: str) -> pd.DataFrame:
    """Run the digits slide benchmark, print a rich table, optionally write CSV + markdown.

    Writes ``slides_per_slide.csv``, ``slides_summary.csv`` and ``slides_summary.md`` into
    ``out`` (atomically). Returns the summary table.
    """
    console = Console()
    per_slide = run_slides_benchmark(n_slides, seed, mode, progress=True)
    summary = summarize(per_slide)
    table = Table(title=f"Slide classification on load_digits ({mode}, seed {seed})")
    for column in (
        "slides",
        "method",
        "n",
        "accuracy",
        "std",
        "wins/losses vs CNN",
        "fell back",
        "s/slide",
    ):
        text_column = column in ("slides", "method")
        table.add_column(column, justify="left" if text_column else "right", no_wrap=text_column)
    for r in summary.itertuples(index=False):
        table.add_row(
            r.slides, r.method, str(r.n_slides), f"{r.accuracy:.4f}", f"{r.accuracy_std:.4f}",
            f"{r.wins_vs_cnn}/{r.losses_vs_cnn}", str(r.fell_back), f"{r.s_per_slide:.3f}",
        )  # fmt: skip
    console.print(table)
    if out is not None:
        out = Path(out)
        command = f"milbench bench slides --n-slides {n_slides} --seed {seed} --mode {mode}"
        atomic_write_text(out / "slides_per_slide.csv", per_slide.to_csv(index=False))
        atomic_write_text(out / "slides_summary.csv", summary.to_csv(index=False))
        atomic_write_text(out / "slides_summary.md", _markdown(summary, command))
        console.print(f"wrote {out / 'slides_summary.md'}")
    return summary
