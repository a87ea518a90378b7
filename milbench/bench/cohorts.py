"""Many cohorts (`milbench bench cohorts`): does a model beat the clinical baseline on cohorts
like the challenge? One cohort of 163 patients cannot say: the corrected resampled t-test's
variance has a floor (its test/train term) that more CV repeats do not lower. The synthetic
generator can draw as many independent cohorts as wanted, each with its own hidden test set, so
the answer here is a mean gain over cohorts with an interval that shrinks as cohorts are added.

Per cohort (preset, knobs, seed): the cohort is generated (cached in the config's workdir, keyed
by preset, seed and knobs as for any run), the config's pipeline runs its CV and refit on it, and
one record per model is written to ``OUT/records/<cell>/seed-<seed>/<model>.json``: CV balanced
accuracy (the mean over folds, so that the gain is its difference from the baseline's; a run's
own table pools each repeat's folds instead, and may differ in the second decimal), the per-fold
paired differences from the baseline (same folds) with the cohort's own corrected-t interval,
hidden-test balanced accuracy and its difference from the baseline's (same test patients),
instance AUC where the model has instance scores, and seconds per fit.

Across cohorts, for every model: the mean gain over the baseline in CV and on the hidden test
with a 95 % interval, and the share of the room it takes: its mean gain over the mean room, where
a cohort's room is its combined oracle (true witness fraction plus the clinical attributes) minus
clinical-only, from the cohort's truth (both in the difficulty's own 5 × 5 CV). Cohorts are
independent draws of the generator, so their gains are independent and an ordinary one-sample t
interval over cohorts is valid (unlike over the folds of one cohort, which share training
patients). Also the share of cohorts a model wins, and the
power at the observed spread: the smallest mean gain that these cohorts detect with 80 % power
(two-sided, 5 %), and how many cohorts a given gain would need.

Resumable: a cohort's records are written atomically once its pipeline ends, and the pipeline
itself records each fit as it ends in its run directory (``workdir/runs``); a rerun into OUT
skips cohorts with records, resumes an interrupted cohort's run directory, and with more seeds or
sweep values adds only the new cohorts. OUT is tied to one config: a rerun with another config
is refused, naming what differs.

Cohorts are the tasks of the execution backend: on Ray one cohort per worker, each generating its
own data; locally one at a time, or ``jobs`` at once in worker processes. Inside a cohort the
pipeline runs its folds one after another with the task's threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from milbench.config import ConfigError, RunConfig, load_config, resolved_dict
from milbench.evaluation.compare import fold_metric, paired_comparison
from milbench.execution import ExecutionConfig, Executor, require_ray
from milbench.io import atomic_write_json
from milbench.progress import progress_bar
from milbench.runs import environment_record
from milbench.synth.presets import parse_knob_assignments, resolve_knobs

log = logging.getLogger(__name__)

POWER = 0.8
LEVEL = 0.95
RECORD_COLUMNS = ["cell", "seed", "model", "baseline", "cv_balanced_accuracy", "cv_gain",
                  "cv_gain_ci_low", "cv_gain_ci_high", "test_balanced_accuracy", "test_gain",
                  "instance_auc", "seconds_per_fit", "room", "room_test", "fold_differences", "run_dir"]


@dataclass(frozen=True)
class Cohort:
    """One cohort of the bench: a cell (knobs) and a generator seed."""

    cell: str  # a readable name of the knobs: "default", or "witness_rate=0.1"
    knobs: dict[str, Any]
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.cell}/seed-{self.seed}"


def parse_seeds(cohorts: int, seeds: str | None) -> list[int]:
    """Seeds 0..cohorts-1, or the comma-separated ``seeds`` when given."""
    if seeds is None:
        return list(range(cohorts))
    try:
        return [int(seed) for seed in seeds.split(",") if seed.strip()]
    except ValueError:
        raise ValueError(f"--seeds {seeds!r} must be comma-separated integers") from None


def parse_sweep(sweep: str | None) -> tuple[str, list[Any]] | None:
    """``key=v1,v2,...`` → (key, values); values are read as YAML scalars."""
    if sweep is None:
        return None
    key, separator, raw = sweep.partition("=")
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not separator or not key.strip() or not values:
        raise ValueError(f"--sweep {sweep!r} must look like knob=value1,value2,...")
    return key.strip(), values


def plan_cohorts(preset: str, seeds: Sequence[int], knobs: dict[str, Any],
                 sweep: tuple[str, list[Any]] | None) -> list[Cohort]:
    """Every (cell, seed) to run; each cell's knobs are checked against the preset first."""
    if not seeds:
        raise ValueError("no cohorts to run: the seed list is empty (give --cohorts N >= 1 or --seeds)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {list(seeds)}")
    cells = [("default" if not knobs else _cell_name(knobs), dict(knobs))]
    if sweep is not None:
        key, values = sweep
        cells = [(_cell_name({key: value}), {**knobs, key: value}) for value in values]
    for name, cell_knobs in cells:
        try:
            resolve_knobs(preset, cell_knobs)
        except ValueError as error:
            raise ValueError(f"cohort {name}: {error}") from None
    return [Cohort(name, cell_knobs, seed) for name, cell_knobs in cells for seed in seeds]


def _cell_name(knobs: dict[str, Any]) -> str:
    return ",".join(f"{key}={knobs[key]}" for key in sorted(knobs))


def baseline_of(config: RunConfig) -> str:
    from milbench.pipeline import baseline_label

    baseline = baseline_label(config)
    if baseline is None:
        raise ConfigError(f"config {config.name!r} has no baseline: list a clinical-only model "
                          "(clinical_logreg) or set evaluation.baseline")
    return baseline


def cohort_config(config_path: Path, overrides: Sequence[str], preset: str, cohort: Cohort,
                  cpus: int) -> RunConfig:
    """The run config of one cohort: the bench's config on that synthetic cohort, no submission,
    its folds run one after another with ``cpus`` threads inside the cohort's task."""
    return load_config(config_path, [
        *overrides, "data.root=null", f"data.synthetic.preset={preset}",
        f"data.synthetic.seed={cohort.seed}",
        f"data.synthetic.knobs={json.dumps(cohort.knobs)}", "submission.enabled=false",
        "execution.backend=local", "execution.jobs=1", f"execution.cpus_per_task={cpus}"])


# Settings that do not change a cohort's records: where and how the work runs, what else a run
# writes, and where the extractor mapping was read from (a config given by another path).
NOT_IDENTITY = (("execution",), ("workdir",), ("name",), ("save_models",), ("tracking",),
                ("submission",), ("features", "source"), ("data", "synthetic", "seed"),
                ("data", "synthetic", "knobs"))


def _bench_identity(config: RunConfig | dict, preset: str) -> dict[str, Any]:
    """What a bench folder's records depend on: the config but for ``NOT_IDENTITY`` (the data
    seed and knobs are each cohort's own), and the preset."""
    resolved = config if isinstance(config, dict) else resolved_dict(config)
    resolved = json.loads(json.dumps(resolved, default=str))
    for path in NOT_IDENTITY:
        parent = resolved
        for key in path[:-1]:
            parent = parent.get(key, {})
        parent.pop(path[-1], None)
    return {"preset": preset, "config": resolved}


def _check_out(out: Path, identity: dict[str, Any]) -> None:
    from milbench.pipeline import config_differences

    recorded = out / "bench.json"
    if recorded.is_file():
        saved = json.loads(recorded.read_text(encoding="utf-8"))["identity"]
        saved = _bench_identity(saved["config"], saved["preset"])  # as this version reads it
        changed = config_differences(saved, identity)
        if changed:
            raise ConfigError(f"{out} holds a cohorts bench of another config (it differs in "
                              f"{', '.join(changed)}); give another --out")


def run_cohort(config_json: str, baseline: str) -> list[dict[str, Any]]:
    """One cohort as a worker runs it: its pipeline (resuming an interrupted run directory of
    the same cohort), then one record per model."""
    from milbench.pipeline import run_pipeline

    config = RunConfig.model_validate_json(config_json)
    resume = _unfinished_run(config)
    try:
        outcome = run_pipeline(config, progress=False, resume=resume)
    except ConfigError as error:
        if resume is None:
            raise
        log.warning("cohort %s: starting afresh (%s)", config.name, error)
        outcome = run_pipeline(config, progress=False)
    return cohort_records(outcome.run_dir, baseline)


def _unfinished_run(config: RunConfig) -> Path | None:
    """The newest run directory of this cohort's run name that never wrote its metrics."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.name)
    candidates = sorted(p for p in Path(config.workdir, "runs").glob(f"*-{safe}")
                        if (p / "config.yaml").is_file() and not (p / "metrics.csv").is_file())
    return candidates[-1] if candidates else None


def cohort_records(run_dir: Path, baseline: str) -> list[dict[str, Any]]:
    """One record per model of a finished run: CV and hidden-test figures against ``baseline``."""
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("model")
    oof = {model: pd.read_csv(run_dir / "models" / model / "oof.csv", dtype={"patient_id": str})
           for model in metrics.index}
    reference = fold_metric(oof[baseline])
    records = []
    for model, row in metrics.iterrows():
        record = {"model": model, "baseline": baseline, "run_dir": str(run_dir),
                  "cv_balanced_accuracy": float(fold_metric(oof[model]).mean()),
                  "seconds_per_fit": float(row["seconds_per_fit"]),
                  "instance_auc": _number(row.get("instance_auc")),
                  "test_balanced_accuracy": _number(row.get("hidden_test_balanced_accuracy"))}
        record["test_gain"] = record["test_balanced_accuracy"] - _number(
            metrics.loc[baseline].get("hidden_test_balanced_accuracy"))
        if model == baseline:
            record.update(cv_gain=0.0, cv_gain_ci_low=0.0, cv_gain_ci_high=0.0,
                          fold_differences=[0.0] * len(reference))
        else:
            test = paired_comparison(oof[model], oof[baseline])
            record.update(cv_gain=test["mean_difference"], cv_gain_ci_low=test["ci_low"],
                          cv_gain_ci_high=test["ci_high"],
                          fold_differences=(fold_metric(oof[model]) - reference).tolist())
        records.append(record)
    return records


def _number(value: Any) -> float:
    return float("nan") if value is None or pd.isna(value) else float(value)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and the ordinary t interval of independent values (NaN bounds for fewer than 2)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def detectable_gain(sd: float, n: int, power: float = POWER, level: float = LEVEL) -> float:
    """The smallest true mean gain a two-sided one-sample t-test over ``n`` cohorts detects with
    ``power`` at spread ``sd`` (the usual approximation: (t_{1-a/2} + t_power) * sd / sqrt(n))."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    quantiles = stats.t.ppf(0.5 + level / 2, df=n - 1) + stats.t.ppf(power, df=n - 1)
    return float(quantiles * sd / math.sqrt(n))


def cohorts_needed(gain: float, sd: float, power: float = POWER, level: float = LEVEL,
                   limit: int = 100_000) -> float:
    """The fewest cohorts whose detectable gain is at most ``|gain|`` (NaN if none up to limit)."""
    if not np.isfinite(gain) or not np.isfinite(sd) or gain == 0:
        return float("nan")
    if sd == 0:
        return 2.0
    for n in range(2, limit + 1):
        if detectable_gain(sd, n, power, level) <= abs(gain):
            return float(n)
    return float("nan")


def aggregate(records: pd.DataFrame, target_gain: float = 0.05) -> pd.DataFrame:
    """Per (cell, model), over cohorts: mean CV and hidden-test gains over the baseline with t
    intervals, win shares (a win is a gain above zero), and the power figures."""
    rows = []
    for (cell, model), group in records.groupby(["cell", "model"], sort=False):
        cv, cv_low, cv_high = t_interval(group["cv_gain"])
        test, test_low, test_high = t_interval(group["test_gain"])
        n = len(group)
        sd = float(group["cv_gain"].std(ddof=1)) if n > 1 else float("nan")
        rows.append({
            "cell": cell, "model": model, "baseline": group["baseline"].iloc[0], "cohorts": n,
            "cv_balanced_accuracy": float(group["cv_balanced_accuracy"].mean()),
            "cv_gain": cv, "cv_gain_ci_low": cv_low, "cv_gain_ci_high": cv_high,
            "cv_win_share": float((group["cv_gain"] > 0).mean()),
            "test_balanced_accuracy": float(group["test_balanced_accuracy"].mean()),
            "test_gain": test, "test_gain_ci_low": test_low, "test_gain_ci_high": test_high,
            "test_win_share": float((group["test_gain"] > 0).mean()),
            # The share of the room the images leave that the model takes (ratio of means).
            "room": float(group["room"].mean()),
            "room_share": cv / float(group["room"].mean()),
            "test_room_share": test / float(group["room_test"].mean()),
            "instance_auc": float(group["instance_auc"].mean()),
            "seconds_per_fit": float(group["seconds_per_fit"].mean()),
            "cv_gain_sd": sd,
            "detectable_cv_gain": detectable_gain(sd, n),
            "cohorts_for_observed_gain": cohorts_needed(cv, sd),
            "target_gain": target_gain,
            "cohorts_for_target_gain": cohorts_needed(target_gain, sd),
        })
    return pd.DataFrame(rows)


def run_cohorts_bench(config_path: Path, out: Path, preset: str = "realistic",
                      seeds: Sequence[int] = (0,), knob: Sequence[str] = (), sweep: str | None = None,
                      overrides: Sequence[str] = (), backend: str = "local", jobs: int = 1,
                      target_gain: float = 0.05, progress: bool = True) -> CohortsOutcome:
    """Run every cohort that OUT has no records of, then aggregate every cohort asked for."""
    from milbench.bench.cohorts_report import write_outputs

    cohorts = plan_cohorts(preset, list(seeds), parse_knob_assignments(knob), parse_sweep(sweep))
    execution = ExecutionConfig(backend=backend, jobs=jobs,
                                cpus_per_task=max(1, (os.cpu_count() or 1) // jobs))
    require_ray(execution)
    configs = [cohort_config(config_path, overrides, preset, c, execution.cpus_per_task)
               for c in cohorts]
    first = configs[0]
    baseline = baseline_of(first)
    identity = _bench_identity(first, preset)
    _check_out(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    Path(first.workdir).mkdir(parents=True, exist_ok=True)  # workers check that they see it
    atomic_write_json(out / "bench.json", {
        "identity": identity, "config_path": str(config_path), "overrides": list(overrides),
        "seeds": list(seeds), "knobs": parse_knob_assignments(knob), "sweep": sweep,
        "execution": execution.model_dump(), "environment": environment_record()})
    todo = [i for i, c in enumerate(cohorts)
            if not (out / "records" / c.folder / "done.json").is_file()]
    if len(todo) < len(cohorts):
        log.info("%d of %d cohorts already recorded in %s", len(cohorts) - len(todo), len(cohorts), out)
    tasks = [(configs[i].model_copy(update={"name": _run_name(first.name, cohorts[i])}).model_dump_json(),
              baseline) for i in todo]
    with Executor(execution, shared_paths=[first.workdir, out]) as executor, \
            progress_bar("cohorts", len(cohorts), completed=len(cohorts) - len(todo),
                         enabled=progress, unit="cohorts") as advance:
        for index, records in executor.map(run_cohort, tasks):
            _write_records(out, cohorts[todo[index]], records)
            advance()
    table = load_records(out, cohorts)
    summary = aggregate(table, target_gain)
    outputs = write_outputs(out, table, summary, parse_sweep(sweep), preset, target_gain)
    return CohortsOutcome(out=out, records=table, summary=summary, files=outputs)


@dataclass
class CohortsOutcome:
    out: Path
    records: pd.DataFrame
    summary: pd.DataFrame
    files: list[Path]


def _run_name(name: str, cohort: Cohort) -> str:
    digest = hashlib.sha256(cohort.cell.encode()).hexdigest()[:8]
    return f"{name}-cohorts-{digest}-seed{cohort.seed}"


def _write_records(out: Path, cohort: Cohort, records: list[dict[str, Any]]) -> None:
    folder = out / "records" / cohort.folder
    for record in records:
        atomic_write_json(folder / f"{record['model']}.json",
                          {"cell": cohort.cell, "knobs": cohort.knobs, "seed": cohort.seed, **record})
    # Last: the cohort counts as done only once every model's record is on disk.
    atomic_write_json(folder / "done.json", {"models": [r["model"] for r in records]})


def load_records(out: Path, cohorts: Sequence[Cohort]) -> pd.DataFrame:
    """The records of ``cohorts`` (in their order, models in the config's order), each with its
    cohort's room (:func:`cohort_room`)."""
    rows = []
    for cohort in cohorts:
        folder = out / "records" / cohort.folder
        models = json.loads((folder / "done.json").read_text(encoding="utf-8"))["models"]
        records = [json.loads((folder / f"{m}.json").read_text(encoding="utf-8")) for m in models]
        room = cohort_room(folder / "room.json", Path(records[0]["run_dir"]))
        rows += [{**record, **room} for record in records]
    return pd.DataFrame(rows).reindex(columns=RECORD_COLUMNS)


def cohort_room(cached: Path, run_dir: Path) -> dict[str, float]:
    """How much a cohort's images can add: the combined oracle (true witness fraction plus the
    clinical attributes) minus clinical-only, in CV and on the hidden test, from the cohort's
    truth (``milbench.synth.difficulty``); computed once, then read from ``cached``."""
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    from milbench.synth.difficulty import cohort_difficulty

    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    root = Path(config["data"]["resolved_root"])
    if not (root / "truth" / "patients.csv").is_file():
        log.warning("%s: no cohort truth at %s, so no room figure for this cohort", run_dir, root)
        return {"room": float("nan"), "room_test": float("nan")}
    figures = cohort_difficulty(root)
    clinical, combined = figures["clinical_only"], figures["combined_oracle"]
    room = {"room": combined["cv_balanced_accuracy_mean"] - clinical["cv_balanced_accuracy_mean"],
            "room_test": combined.get("hidden_test_balanced_accuracy", float("nan"))
            - clinical.get("hidden_test_balanced_accuracy", float("nan"))}
    atomic_write_json(cached, room)
    return room

