"""Where a run's data comes from: the configured challenge folder or a generated synthetic
cohort (cached under the work directory, reused only when its manifest and checksums match), the
source set of models that bootstrap from one, and a synthetic cohort's hidden test labels."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from milbench.config import ConfigError, DataConfig, RunConfig

log = logging.getLogger(__name__)


def check_generated(path: Path, what: str) -> None:
    """Refuse a generated directory whose files changed since it was written (naming them);
    one made before checksums were recorded is reused with a logged warning."""
    from milbench.synth.layout import verify_generated

    problems = verify_generated(path)
    if problems is None:
        log.warning("%s %s records no checksums (made by an older milbench); reusing it "
                    "unchecked", what, path)
    elif problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise ConfigError(f"{path}: the {what} was changed since it was written ({shown}); "
                          "remove it to regenerate")


def synthetic_cohort_path(data: DataConfig, workdir: str | Path) -> Path:
    """Where the configured synthetic cohort is cached: named by preset and seed, plus a hash of
    the knobs when any is overridden (every knob is part of the key)."""
    synthetic = data.synthetic
    name = f"synthetic-{synthetic.preset}-seed{synthetic.seed}"
    if synthetic.knobs:
        digest = hashlib.sha256(json.dumps(synthetic.knobs, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:10]}"
    return Path(workdir) / "data" / name


def resolve_data_root(data: DataConfig, workdir: str | Path, progress: bool = True) -> Path:
    """The challenge folder to read: the configured one, or a generated synthetic cohort (cached
    under the work directory and reused when its manifest matches)."""
    if data.root is not None:
        return Path(data.root)
    from milbench.synth import GENERATOR_VERSION, generate_cohort, read_manifest

    synthetic = data.synthetic
    path = synthetic_cohort_path(data, workdir)
    if path.exists():
        manifest = read_manifest(path) or {}
        wanted = {"preset": synthetic.preset, "seed": synthetic.seed,
                  "knobs": json.loads(json.dumps(synthetic.knobs)),
                  "generator_version": GENERATOR_VERSION}
        found = {key: manifest.get(key) for key in wanted}
        if found != wanted:
            differing = sorted(k for k in wanted if found[k] != wanted[k])
            raise ConfigError(f"{path} exists but is not the synthetic cohort the config asks for "
                              f"(differs in {differing}); remove it to regenerate")
        check_generated(path, "generated cohort")
        log.info("reusing synthetic cohort %s", path)
        return path
    log.info("generating synthetic %s cohort in %s", synthetic.preset, path)
    generate_cohort(path, preset=synthetic.preset, seed=synthetic.seed, knobs=synthetic.knobs,
                    workers=2, progress=progress)
    return path


def resolve_source_root(config: RunConfig, progress: bool = True) -> Path:
    """The ALL-IDB2-layout source set: the configured one, or a synthetic one generated once."""
    source = config.source
    if source.root is not None:
        return Path(source.root)
    from milbench.synth import generate_allidb2

    path = Path(config.workdir) / "data" / f"allidb2-seed{source.seed}-n{source.n_per_class}"
    if not path.exists():
        generate_allidb2(path, seed=source.seed, n_per_class=source.n_per_class, progress=progress)
    else:
        check_generated(path, "generated source set")
    return path


def hidden_test_labels(root: Path, test_ids: list[str]) -> np.ndarray | None:
    """Test labels of a synthetic cohort (its hidden truth), for scoring after prediction only;
    None for real challenge folders, which have no truth."""
    if not (root / "truth" / "test_labels.csv").is_file() or not test_ids:
        return None
    from milbench.synth import load_truth

    labels = load_truth(root).test_labels
    missing = [pid for pid in test_ids if pid not in labels]
    if missing:
        raise ConfigError(f"{root}/truth/test_labels.csv lacks test patients {missing[:10]}")
    return np.array([labels[pid] for pid in test_ids])
