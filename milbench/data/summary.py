"""Cohort summary: patient and image counts per split and label, clinical distributions, plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from milbench import plots
from milbench.data.cohort import Cohort
from milbench.io import atomic_write, atomic_write_json


def _group_name(row) -> str:
    if row["split"] == "test":
        return "test"
    return f"train, {'tumoral' if row['label'] == 1 else 'reactive'}"


def summary_table(cohort: Cohort) -> pd.DataFrame:
    """One row per group (train tumoral, train reactive, test, all)."""
    frame = cohort.frame()
    frame["group"] = frame.apply(_group_name, axis=1)
    groups = [(name, part) for name, part in frame.groupby("group", sort=True)] + [("all", frame)]
    rows = []
    for name, part in groups:
        rows.append({
            "group": name,
            "patients": len(part),
            "images": int(part["n_images"].sum()),
            "images_min": int(part["n_images"].min()),
            "images_median": float(part["n_images"].median()),
            "images_max": int(part["n_images"].max()),
            "age_median": round(float(part["age"].median()), 1),
            "age_range": f"{part['age'].min():.0f}–{part['age'].max():.0f}",
            "count_median": round(float(part["lymph_count"].median()), 2),
            "count_range": f"{part['lymph_count'].min():.2f}–{part['lymph_count'].max():.2f}",
            "female_share": round(float((part["gender"] == "F").mean()), 2),
        })
    return pd.DataFrame(rows)


def write_summary(cohort: Cohort, out_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.json``, ``skipped.csv`` and ``clinical_by_class.png``."""
    out_dir = Path(out_dir)
    table = summary_table(cohort)
    skipped = pd.DataFrame([(s.path, s.reason) for s in cohort.skipped], columns=["path", "reason"])
    written = {
        "summary_csv": atomic_write(out_dir / "summary.csv", lambda t: table.to_csv(t, index=False)),
        "summary_json": atomic_write_json(out_dir / "summary.json", {
            "root": str(cohort.root), "reference_date": cohort.reference_date.isoformat(),
            "groups": table.to_dict(orient="records"), "skipped_files": len(skipped),
        }),
        "skipped_csv": atomic_write(out_dir / "skipped.csv", lambda t: skipped.to_csv(t, index=False)),
    }
    if cohort.train().patients:
        import matplotlib.pyplot as plt

        figure = plots.clinical_by_class(cohort.train().frame())
        written["plot"] = atomic_write(out_dir / "clinical_by_class.png",
                                       lambda t: figure.savefig(t, format="png", dpi=110))
        plt.close(figure)
    return written
