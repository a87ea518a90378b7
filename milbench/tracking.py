"""Optional MLflow logging of finished runs (``tracking.mlflow: true`` in a run config).

Everything is read back from the run directory once the run has finished, so a run logs exactly
what it recorded: one parent MLflow run per milbench run (the flattened resolved config and the
git commit as params, the milbench version and run directory as tags, the report, metrics tables,
plots and config as artifacts) and one nested child run per model (its params, the CV mean, std
and max of each metric, hidden-test metrics where the cohort has them, seconds per fit, and its
``models/<name>/`` files). An ablation grid logs the same way, one child run per variant.

MLflow is imported only when tracking is enabled; :func:`require` fails before any training when
it is enabled but not installed. The default store is a local file store, ``<workdir>/mlruns``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import yaml

from milbench.config import ConfigError, RunConfig, TrackingConfig
from milbench.runs import Run

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "milbench[mlflow]"'
RECORD_FILE = "mlflow.json"
# Parent-run artifacts, when the run directory has them.
RUN_ARTIFACTS = ("config.yaml", "environment.json", "report.md", "metrics.csv", "metrics.json",
                 "timings.csv", "features.json", "feature_stores.json", "instance_auc.csv", "plots")
ABLATION_ARTIFACTS = ("config.yaml", "environment.json", "ablation.md", "ablation.csv", "plots")
# MLflow's limits: param values (6000 characters since MLflow 2.x), params and metrics per batch.
MAX_PARAM_LENGTH = 6000
BATCH = 100


class TrackingError(ConfigError):
    """MLflow tracking is enabled but cannot be used, or logging a finished run failed."""


def _import_mlflow():
    try:
        import mlflow
    except ImportError as error:
        raise TrackingError(
            f"tracking.mlflow is true but MLflow cannot be imported ({error}); install it with "
            f"`{INSTALL_HINT}`, or set tracking.mlflow: false") from None
    return mlflow


def require(config: RunConfig) -> None:
    """Fail now, before any training, when tracking is enabled but MLflow is not importable or
    does not accept the tracking URI."""
    if not config.tracking.mlflow:
        return
    uri = tracking_uri(config.tracking, config.workdir)
    try:
        with client(uri):
            pass
    except TrackingError:
        raise
    except Exception as error:
        raise TrackingError(f"tracking.tracking_uri {uri!r}: MLflow cannot use it "
                            f"({type(error).__name__}: {error})") from error


def tracking_uri(tracking: TrackingConfig, workdir: str | Path) -> str:
    """The configured URI; a plain folder (the default: ``<workdir>/mlruns``) as a ``file:`` URI."""
    uri = tracking.tracking_uri
    if uri is None:
        return (Path(workdir) / "mlruns").resolve().as_uri()
    if len(urlparse(uri).scheme) <= 1:  # no scheme, or a Windows drive letter
        return Path(uri).expanduser().resolve().as_uri()
    return uri


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """Recent MLflow refuses its (maintenance-mode) file store unless MLFLOW_ALLOW_FILE_STORE is
    set; opt in for the duration of milbench's own calls only, leaving the environment as it was."""
    if urlparse(uri).scheme != "file" or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


@contextlib.contextmanager
def client(uri: str) -> Iterator[Any]:
    """An ``mlflow.MlflowClient`` for ``uri`` (file stores allowed while the block runs)."""
    mlflow = _import_mlflow()
    with _file_store_allowed(uri):
        yield mlflow.MlflowClient(tracking_uri=uri)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` → ``{"a.b": "1", "c.0.d": "2"}``; other lists, None
    and booleans are written as JSON, long values are cut to MLflow's limit."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[_key(name)] = text[:MAX_PARAM_LENGTH]
    return flat


def _key(name: str) -> str:
    """A param or metric key MLflow accepts (letters, digits, ``_-. /``)."""
    return re.sub(r"[^\w\-. /]", "_", name)[:250]


def log_run(config: RunConfig, run_dir: str | Path) -> str | None:
    """Log a finished ``milbench run`` directory to MLflow when ``config`` enables it; the parent
    run id (None when disabled). The ids are also written to the run's ``mlflow.json``."""
    if not config.tracking.mlflow:
        return None
    run_dir = Path(run_dir)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    entries = {entry.get("label") or entry["name"]: entry for entry in resolved.pop("models")}
    resolved["models"] = list(entries)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    summaries = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    children = []
    for row in metrics.to_dict(orient="records"):
        name = str(row.pop("model"))
        features = row.pop("features", None)
        values = _numbers(row)
        for metric, stats in summaries.get(name, {}).get("summary", {}).items():
            values.update({f"{metric}_{stat}": stats.get(stat) for stat in ("mean", "std", "max")})
        params = flatten(entries.get(name, {"name": name}))
        if isinstance(features, str):
            params["features_read"] = features  # the extractor this model's bags came from
        children.append((name, params, values, run_dir / "models" / name))
    return _log(config, run_dir, flatten(resolved), RUN_ARTIFACTS, children)


def log_ablation(config: RunConfig, run_dir: str | Path, table: pd.DataFrame) -> str | None:
    """Log a finished ``milbench ablate`` directory (``table``: its ablation.csv, one row per
    variant); ``config`` is a variant's run config, whose ``tracking`` section decides."""
    if not config.tracking.mlflow:
        return None
    run_dir = Path(run_dir)
    record = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    overrides = record.get("ablation", {}).get("variants", {})
    children = []
    for variant, row in table.iterrows():
        resolved = record.get("variants", {}).get(variant, {})
        params = {**flatten({"overrides": overrides.get(variant, [])}), **flatten(resolved)}
        values = _numbers({str(k).replace(":", "_"): v for k, v in row.items()})
        children.append((str(variant), params, values, None))
    shared = {k: v for k, v in record.get("ablation", {}).items() if k != "variants"}
    return _log(config, run_dir, flatten(shared), ABLATION_ARTIFACTS, children,
                default_experiment=str(record.get("ablation", {}).get("name", config.name)))


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric cells of a table row: formatted ``mean ± std`` strings and empty cells (NaN
    once read back, as an empty text column is) are left out."""
    values = {}
    for key, value in row.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isnan(number):
            values[key] = number
    return values


def _log(config: RunConfig, run_dir: Path, params: dict[str, str], artifacts: tuple[str, ...],
         children: list[tuple[str, dict[str, str], dict[str, float], Path | None]],
         default_experiment: str | None = None) -> str:
    _import_mlflow()
    from mlflow.entities import Metric, Param, RunStatus

    environment = _environment(run_dir)
    git = environment.get("git") or {}
    params = {**params, "git.commit": str(git.get("commit")), "git.dirty": json.dumps(git.get("dirty"))}
    tags = {"milbench.version": str(environment.get("milbench_version")),
            "milbench.run_dir": str(run_dir.resolve())}
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = git["commit"]
    uri = tracking_uri(config.tracking, config.workdir)
    experiment = config.tracking.experiment or default_experiment or config.name
    stamp = int(time.time() * 1000)
    ids: dict[str, Any] = {}
    with client(uri) as mlflow_client:  # require() has checked the URI before the run
        try:
            experiment_id = _experiment_id(mlflow_client, experiment)
            parent = mlflow_client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
            ids = {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id,
                   "run_id": parent, "children": {}}
            _log_batch(mlflow_client, parent, [Param(k, v) for k, v in params.items()], [])
            for name in artifacts:
                path = run_dir / name
                if path.is_dir():
                    mlflow_client.log_artifacts(parent, str(path), name)
                elif path.is_file():
                    mlflow_client.log_artifact(parent, str(path))
            for name, child_params, values, folder in children:
                child = mlflow_client.create_run(experiment_id, run_name=name, tags={
                    "mlflow.parentRunId": parent, "milbench.model": name,
                    "milbench.run_dir": str(run_dir.resolve())}).info.run_id
                ids["children"][name] = child
                metrics = [Metric(_key(k), float(v), stamp, 0) for k, v in values.items() if v is not None]
                _log_batch(mlflow_client, child, [Param(k, v) for k, v in child_params.items()], metrics)
                if folder is not None and folder.is_dir():
                    mlflow_client.log_artifacts(child, str(folder))
                mlflow_client.set_terminated(child, RunStatus.to_string(RunStatus.FINISHED))
            mlflow_client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
        except Exception as error:
            for run_id in [ids.get("run_id"), *ids.get("children", {}).values()]:
                if run_id:
                    with contextlib.suppress(Exception):
                        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise TrackingError(f"{run_dir}: the run finished, but logging it to MLflow at {uri} "
                                f"failed: {type(error).__name__}: {error}") from error
    Run(run_dir).write_json(RECORD_FILE, ids)
    log.info("logged to MLflow %s: experiment %r, run %s (%d nested)", uri, experiment, ids["run_id"],
             len(children))
    return ids["run_id"]


def _experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:  # created meanwhile by a concurrent run
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_batch(mlflow_client, run_id: str, params: list, metrics: list) -> None:
    for start in range(0, max(len(params), len(metrics)), BATCH):
        mlflow_client.log_batch(run_id, params=params[start:start + BATCH],
                                metrics=metrics[start:start + BATCH])


def _environment(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "environment.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
