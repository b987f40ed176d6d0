"""`python -m benchmarks serving-paths`: what one batch costs on each serving path of the same checkpoint.

The worker serves by a NumPy forward pass over the saved weights (streamadapt.model.graph); a network with a
layer that pass does not compute is served through TensorFlow (streamadapt.model.checkpoint.KerasForward).
Both paths serve the same checkpoint here, timed pair by pair (NumPy, then TensorFlow, for each repeat) on
the same random batches, and must agree.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from streamadapt.model.checkpoint import ServingModel, load_checkpoint

BATCH_SIZES = (1, 16, 256, 2000)


def measure_paths(checkpoint: Path, repeats: int = 200, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> list[dict]:
    """Per batch size: the median milliseconds of a batch on each path, their ratio, and how far apart the
    two paths' probabilities are."""
    numpy_path = ServingModel.from_checkpoint(checkpoint)
    keras_model, meta = load_checkpoint(checkpoint)
    tensorflow_path = ServingModel.of_keras(keras_model, meta, force_keras=True)
    if numpy_path.path != "numpy":
        raise ValueError(f"{checkpoint} is served through TensorFlow already: no NumPy path to compare")
    rng = np.random.default_rng(0)
    rows = []
    for size in batch_sizes:
        x = rng.normal(size=(size, meta.n_features)).astype(np.float32)
        gap = float(np.max(np.abs(numpy_path.predict_many(x) - tensorflow_path.predict_many(x))))  # also warms up
        timings: dict[str, list[float]] = {"numpy": [], "tensorflow": []}
        for _ in range(repeats):
            for name, model in (("numpy", numpy_path), ("tensorflow", tensorflow_path)):
                started = time.perf_counter()
                model.predict_many(x)
                timings[name].append((time.perf_counter() - started) * 1000.0)
        numpy_ms, tensorflow_ms = (float(np.median(timings[name])) for name in ("numpy", "tensorflow"))
        rows.append({"batch": size, "numpy_ms": numpy_ms, "tensorflow_ms": tensorflow_ms,
                     "ratio": tensorflow_ms / numpy_ms, "largest_difference": gap})
    return rows


def print_paths(rows: list[dict], echo=print) -> None:
    echo(f"{'batch':>6}  {'NumPy ms':>9}  {'TensorFlow ms':>13}  {'TF / NumPy':>10}  {'largest difference':>18}")
    for row in rows:
        echo(f"{row['batch']:>6}  {row['numpy_ms']:>9.3f}  {row['tensorflow_ms']:>13.3f}  {row['ratio']:>10.1f}  "
             f"{row['largest_difference']:>18.1e}")
