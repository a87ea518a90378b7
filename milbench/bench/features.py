"""Feature-extraction speed: the whole path against the bare model forward, in one run.

For each extractor: images per second of the whole path (decode, preprocess, forward, durable
write into a scratch feature store) and of the bare forward pass on random tensors of the same
shape and batch size, and their ratio. Model weights do not change speed, so the autoencoder
is timed untrained and backbones without pretrained weights.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from milbench.io import atomic_write_json, atomic_write_text
from preprocessing.extract import ExtractorConfig, load_extractor_config, resolve_stain
from preprocessing.forward import default_workers, run_model_into
from preprocessing.preprocess import Preprocessor
from preprocessing.store import StoreWriter, hash_key, source_table

DEFAULT_EXTRACTORS: tuple[dict, ...] = (
    {"kind": "autoencoder", "name": "conv_ae", "input_size": 224, "latent": 8192},
    {"kind": "backbone", "name": "resnet18", "input_size": 224},
)


def speed_model(config: ExtractorConfig) -> torch.nn.Module:
    """The extractor's network with untrained weights (same cost as trained ones)."""
    if config.kind == "backbone":
        from preprocessing.backbones import build_backbone

        return build_backbone(config.name, None)
    from preprocessing.autoencoder import ConvAutoencoder, Encoder

    return Encoder(ConvAutoencoder(config.input_size, config.resolved_latent)).eval()


def bare_forward_rate(model: torch.nn.Module, n_images: int, input_size: int, batch_size: int,
                      channels_last: bool) -> float:
    """Images per second of the forward pass alone on random inputs."""
    model = model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    # A few distinct batches, cycled: the cost does not depend on the values, and holding
    # every input at once (600 MB for 1024 images at 224 px) would time memory, not the model.
    pool = [torch.rand(batch_size, 3, input_size, input_size, generator=generator)
            .contiguous(memory_format=memory_format) for _ in range(4)]
    sizes = [min(batch_size, n_images - start) for start in range(0, n_images, batch_size)]
    with torch.inference_mode():
        started = time.perf_counter()
        for index, size in enumerate(sizes):
            model(pool[index % len(pool)][:size]).float().numpy()
        return n_images / (time.perf_counter() - started)


def whole_path_rate(model: torch.nn.Module, paths: list[str], preprocessor: Preprocessor,
                    dim: int, batch_size: int, num_workers: int, channels_last: bool) -> float:
    """Images per second of decode → preprocess → forward → durable store write."""
    sources = pd.DataFrame({"row": range(len(paths)), "patient_id": "bench",
                            "position": range(len(paths)), "path": paths, "size": 0,
                            "mtime_ns": 0})
    with tempfile.TemporaryDirectory(prefix="milbench-bench-") as scratch:
        manifest = {"key": hash_key(paths), "config": {}, "dim": dim, "n_rows": len(paths)}
        writer = StoreWriter(Path(scratch) / "store", manifest, sources, commit_seconds=2.0)
        started = time.perf_counter()
        run_model_into(writer, paths, preprocessor, model, batch_size=batch_size,
                       num_workers=num_workers, channels_last=channels_last, progress=False)
        writer.finish()
        return len(paths) / (time.perf_counter() - started)


def benchmark_extractor(config: ExtractorConfig, paths: list[str], *, batch_size: int = 32,
                        num_workers: int | None = None, channels_last: bool = True,
                        cohort=None, cache_dir: str | os.PathLike | None = None,
                        warmup_images: int | None = None, repeats: int = 3) -> dict:
    """One row of the table: whole path, bare forward, ratio (plus the settings used).

    The two are timed alternately ``repeats`` times. ``whole_path_img_s`` and
    ``bare_forward_img_s`` are the best of each (other processes only ever slow a timing down)
    and ``ratio`` their quotient; ``paired_ratio_median`` is the median of the back-to-back
    pairs' ratios.
    """
    workers = default_workers() if num_workers is None else num_workers
    stain = resolve_stain(config.stain, cohort, Path(cache_dir or tempfile.gettempdir()))
    normalize = "imagenet" if config.kind == "backbone" else None
    preprocessor = Preprocessor(config.input_size, config.segmentation, config.background,
                                stain, normalize)
    torch.manual_seed(0)
    model = speed_model(config)
    dim = model.dim
    warmup = warmup_images or batch_size
    bare_forward_rate(model, warmup, config.input_size, batch_size, channels_last)
    pairs = []
    for _ in range(repeats):
        pairs.append((bare_forward_rate(model, len(paths), config.input_size, batch_size,
                                        channels_last),
                      whole_path_rate(model, paths, preprocessor, dim, batch_size, workers,
                                      channels_last)))
    bare = max(b for b, _ in pairs)
    whole = max(w for _, w in pairs)
    # Each pair is timed back to back, so its ratio is the least disturbed by other load.
    paired = sorted(w / b for b, w in pairs)
    return {"extractor": f"{config.kind}:{config.name}", "input_size": config.input_size,
            "segmentation": config.segmentation or "-", "dim": dim, "images": len(paths),
            "batch_size": batch_size, "workers": workers, "torch_threads": torch.get_num_threads(),
            "channels_last": channels_last, "repeats": repeats, "whole_path_img_s": whole,
            "bare_forward_img_s": bare, "ratio": whole / bare,
            "paired_ratio_median": paired[len(paired) // 2]}


def _bench_paths(root: str | os.PathLike | None, n_images: int, scratch: Path
                 ) -> tuple[list[str], Any]:
    if root is not None:
        from milbench.data import load_challenge

        cohort = load_challenge(root)
    else:
        from preprocessing.toy import write_toy_cohort

        per_patient = 16
        cohort = write_toy_cohort(scratch, n_patients=-(-n_images // per_patient),
                                  images_per_patient=per_patient, n_test=0)
    paths = list(source_table(cohort.image_table())["path"])[:n_images]
    if len(paths) < n_images:
        raise ValueError(f"{root} has {len(paths)} images, the benchmark asked for {n_images}")
    return paths, cohort


def bench_features_command(root: str | os.PathLike | None = None,
                           extractors: list[str | os.PathLike | dict] | None = None, *,
                           n_images: int = 256, batch_size: int = 32,
                           num_workers: int | None = None, channels_last: bool = True,
                           repeats: int = 3, out: str | os.PathLike | None = None,
                           print_table: bool = True) -> pd.DataFrame:
    """Time each extractor (configs or YAML paths; default autoencoder 224 and resnet18).

    Images come from the challenge folder ``root`` or, without one, drawn 224 px smears.
    With ``out``, writes ``features_bench.csv`` and ``.json`` there.
    """
    configs = [load_extractor_config(e) for e in (extractors or DEFAULT_EXTRACTORS)]
    with tempfile.TemporaryDirectory(prefix="milbench-bench-data-") as scratch:
        paths, cohort = _bench_paths(root, n_images, Path(scratch))
        rows = [benchmark_extractor(c, paths, batch_size=batch_size, num_workers=num_workers,
                                    channels_last=channels_last, cohort=cohort,
                                    cache_dir=scratch, repeats=repeats)
                for c in configs]
    table = pd.DataFrame(rows)
    if print_table:
        from rich.console import Console
        from rich.table import Table

        view = Table(title=f"feature extraction speed ({n_images} images, CPU)")
        columns = ["extractor", "input_size", "batch_size", "workers", "torch_threads",
                   "whole_path_img_s", "bare_forward_img_s", "ratio", "paired_ratio_median"]
        for column in columns:
            view.add_column(column)
        for row in table.itertuples(index=False):
            view.add_row(*[f"{getattr(row, c):.2f}" if isinstance(getattr(row, c), float)
                           else str(getattr(row, c)) for c in columns])
        Console().print(view)
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "features_bench.csv", table.to_csv(index=False))
        atomic_write_json(out / "features_bench.json", table.to_dict(orient="records"))
    return table
