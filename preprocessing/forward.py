"""The forward pass of an extraction: images (decoded by loader workers, or read from a pixels
store) → the extractor's network → durable writes into a store (or an in-memory shard), with
the loader-worker count and the shard ranges it runs under."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from preprocessing.preprocess import Preprocessor
from preprocessing.store import FeatureStore, StoreWriter


def default_workers(main_busy: bool = True) -> int:
    """Loader workers: one per spare core while the main process runs a model (decoding
    overlaps the forward pass); one per core when it only stores what they decode (pixels)."""
    cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1 if main_busy else cores))


def run_model_into(writer: StoreWriter, source: list[str] | FeatureStore,
                   preprocessor: Preprocessor, model: torch.nn.Module | None, *,
                   batch_size: int, num_workers: int, channels_last: bool, progress: bool,
                   on_batch: Callable[[int], None] | None = None,
                   description: str = "features", device: str = "cpu",
                   stop: int | None = None) -> None:
    """The whole path: images (decoded and preprocessed in loader workers from a list of paths,
    or read from a pixels store) → forward → durable write. ``model=None`` writes the uint8
    images themselves (the pixels extractor). ``stop`` ends early (a shard: pixels store only)."""
    from milbench.progress import progress_bar

    total = source.n_rows if isinstance(source, FeatureStore) else len(source)
    if stop is not None:
        if not isinstance(source, FeatureStore):
            raise ValueError("a shard of an extraction reads a pixels store")
        total = stop
    if writer.rows_written >= total:
        return
    if isinstance(source, FeatureStore):
        batches = stored_batches(source, preprocessor.input_size, writer.rows_written, batch_size,
                                 total)
    else:
        batches = decoded_batches(source, preprocessor, writer.rows_written, batch_size,
                                  num_workers)
    if model is not None:
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    with progress_bar(description, total=total, completed=writer.rows_written,
                      enabled=progress, unit="img") as advance, torch.inference_mode():
        for start, raw in batches:
            if model is None:
                vectors = raw.flatten(1).numpy()
            else:
                images = preprocessor.finish(raw.to(device, non_blocking=True))
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                vectors = model(images).float().cpu().numpy()
            writer.write(start, np.ascontiguousarray(vectors))
            advance(len(raw))
            if on_batch is not None:
                on_batch(writer.rows_done)


def decoded_batches(paths: list[str], preprocessor: Preprocessor, start: int, batch_size: int,
                    num_workers: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, uint8 images)`` from row ``start`` on, decoded by loader workers."""
    from preprocessing.preprocess import ImageDataset

    dataset = ImageDataset(paths, preprocessor, start=start, raw=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None)
    batches = iter(loader)
    try:
        for rows, raw in batches:
            yield int(rows[0]), raw
    except Exception as error:
        if num_workers:
            # A worker's error: the loader frames of its traceback keep the workers alive until
            # the error is collected, which then waits out the loader's 5 s shutdown timeout.
            # Stop them now (the worker's own traceback is in the message).
            error.with_traceback(None)
            del batches
        raise


def stored_batches(pixels: FeatureStore, input_size: int, start: int, batch_size: int,
                   stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, uint8 images)`` of rows ``start`` to ``stop`` (default: the last), read
    from a pixels store."""
    matrix = pixels.features()
    stop = pixels.n_rows if stop is None else stop
    for first in range(start, stop, batch_size):
        block = np.array(matrix[first:min(first + batch_size, stop)])
        yield first, torch.from_numpy(block).view(len(block), 3, input_size, input_size)


def shard_ranges(n_rows: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """``shards`` row ranges covering ``n_rows``, each starting on a multiple of
    ``batch_size`` (fewer when there are fewer batches than shards)."""
    batches = -(-n_rows // batch_size)
    per_shard = -(-batches // max(1, shards))
    return [(first * batch_size, min(n_rows, (first + per_shard) * batch_size))
            for first in range(0, batches, per_shard)]


class RowsInMemory:
    """The writer interface of ``run_model_into`` over an in-memory block of rows (a shard)."""

    def __init__(self, start: int, stop: int, dim: int):
        self.start, self.rows_written, self.rows_done = start, start, start
        self.block = np.empty((stop - start, dim), dtype=np.float32)

    def write(self, start: int, block: np.ndarray) -> None:
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected {self.rows_written}, "
                             f"got {start}")
        if not np.all(np.isfinite(block)):
            raise ValueError(f"non-finite features in rows {start}..{start + len(block) - 1}")
        self.block[start - self.start:start - self.start + len(block)] = block
        self.rows_written = self.rows_done = start + len(block)
