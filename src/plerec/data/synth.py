"""Synthetic two-task regression data with a controlled task correlation.

The generator of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, §3.2, with the settings of Tang et al., "Progressive Layered
Extraction (PLE)", RecSys 2020, §5.2, as defaults (d = 512, c = 1, m = 10, noise std 0.1):

    w1 = c·u1,  w2 = c·(p·u1 + sqrt(1 − p²)·u2)       u1 ⟂ u2 unit vectors in R^d
    y_i = w_iᵀx + Σ_j sin(α_j·w_iᵀx + β_j) + ε_i        x ~ N(0, I_d), α_j, β_j ~ N(0, 1)

so cos(w1, w2) = p is the knob that sets how related the two tasks are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plerec import jsonio
from plerec.safe_io import atomic_write

METADATA_KEY = b"plerec.synth"

# x is drawn and labelled this many rows at a time so that only one chunk is ever held in float64.
_CHUNK_ROWS = 16_384


@dataclass(frozen=True, kw_only=True, slots=True)
class SynthConfig:
    """Parameters of the MMoE synthetic generator; defaults are the PLE paper's (§5.2)."""

    rows: int = 100_000
    correlation: float = 0.5  # p = cos(w1, w2)
    dim: int = 512  # d
    scale: float = 1.0  # c
    num_sines: int = 10  # m
    noise_std: float = 0.1  # std of ε
    binary: bool = False  # also write labels thresholded at `threshold`
    threshold: str | float = "median"  # "median" of each regression label, or a number
    seed: int = 0

    def __post_init__(self) -> None:
        _expect(_is_int(self.rows) and self.rows >= 1, "rows", "an integer >= 1", self.rows)
        _expect(
            _is_real(self.correlation) and -1 <= self.correlation <= 1,
            "correlation",
            "in [-1, 1]",
            self.correlation,
        )
        # Two orthogonal task directions need at least two dimensions.
        _expect(_is_int(self.dim) and self.dim >= 2, "dim", "an integer >= 2", self.dim)
        # c = 0 would make both weight vectors zero and their cosine undefined.
        _expect(_is_real(self.scale) and self.scale > 0, "scale", "a finite number > 0", self.scale)
        _expect(_is_int(self.num_sines) and self.num_sines >= 0, "num_sines", "an integer >= 0", self.num_sines)
        _expect(
            _is_real(self.noise_std) and self.noise_std >= 0,
            "noise_std",
            "a finite number >= 0",
            self.noise_std,
        )
        _expect(isinstance(self.binary, bool), "binary", "a bool", self.binary)
        _expect(
            self.threshold == "median" or _is_real(self.threshold),
            "threshold",
            '"median" or a finite number',
            self.threshold,
        )
        _expect(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)


def _expect(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"Expected `{field}` to be {expected}, but got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _streams(config: SynthConfig) -> list[np.random.Generator]:
    # Independent streams for weights, sines, x and noise: the weights do not depend on `rows`,
    # and fewer rows give a prefix of the data set that more rows give.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4)]


def task_weights(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The two task weight vectors w1, w2 (float64, shape (dim,)) with cos(w1, w2) = correlation."""
    g = _streams(config)[0].standard_normal((config.dim, 2))
    # Gram-Schmidt rather than QR: no LAPACK sign convention decides the data set.
    u1 = g[:, 0] / np.linalg.norm(g[:, 0])
    u2 = g[:, 1] - (g[:, 1] @ u1) * u1
    u2 /= np.linalg.norm(u2)
    p, c = config.correlation, config.scale
    return c * u1, c * (p * u1 + math.sqrt(1 - p * p) * u2)


def sine_params(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sine frequencies α and phases β (float64, shape (num_sines,)), shared by both tasks."""
    rng = _streams(config)[1]
    alpha = rng.standard_normal(config.num_sines)
    beta = rng.standard_normal(config.num_sines)
    return alpha, beta


def generate(config: SynthConfig) -> pd.DataFrame:
    """The data set as a frame: x0..x{dim-1} (float32), y1, y2 (float32) and, if `binary`,
    y1_binary, y2_binary (int8, 1 where the regression label exceeds the threshold)."""
    w = np.stack(task_weights(config), axis=1)  # (d, 2)
    alpha, beta = sine_params(config)
    _, _, x_rng, noise_rng = _streams(config)

    x = np.empty((config.rows, config.dim), dtype=np.float32)
    y = np.empty((config.rows, 2), dtype=np.float32)
    for start in range(0, config.rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, config.rows)
        x[start:stop] = x_rng.standard_normal((stop - start, config.dim), dtype=np.float32)
        z = x[start:stop].astype(np.float64) @ w  # (n, 2): w_iᵀx
        sines = np.sin(z[:, :, None] * alpha + beta).sum(axis=2)  # (n, 2, m) -> (n, 2)
        eps = config.noise_std * noise_rng.standard_normal((stop - start, 2))
        y[start:stop] = z + sines + eps

    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(config.dim)], copy=False)
    for task in range(2):
        frame[f"y{task + 1}"] = y[:, task]
    if config.binary:
        for task in range(2):
            label = y[:, task]
            threshold = np.median(label) if config.threshold == "median" else config.threshold
            frame[f"y{task + 1}_binary"] = (label > threshold).astype(np.int8)
    return frame


def write_parquet(config: SynthConfig, path: str | Path) -> Path:
    """Write `generate(config)` to Parquet, with the config as JSON in the schema metadata under
    `METADATA_KEY` so that later tools can tell which correlation a file was made with."""
    table = pa.Table.from_pandas(generate(config), preserve_index=False)
    # Dictionary encoding cannot compress continuous random values; trying it makes the write
    # about 8x slower and the file about 50% larger.
    return write_with_config(table, path, METADATA_KEY, config, use_dictionary=False)


def read_synth_metadata(path: str | Path) -> SynthConfig | None:
    """The config a file was written with by `write_parquet`, or None if it carries none."""
    return read_config(path, METADATA_KEY, SynthConfig, "synthetic-data")


def write_with_config(table: pa.Table, path: str | Path, key: bytes, config, **options) -> Path:
    """Write a generated table to Parquet atomically, with page checksums (readers find flipped bits) and
    its generator's config (a dataclass) as JSON in the schema metadata under `key`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = jsonio.dumps(dataclasses.asdict(config), sort_keys=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), key: text.encode()})
    atomic_write(path, lambda handle: pq.write_table(table, handle, write_page_checksum=True, **options))
    return path


def read_config(path: str | Path, key: bytes, cls: type, what: str):
    """The `cls` config stored under `key` by `write_with_config`, or None if the file carries none."""
    from plerec.data.table import reader_errors

    with reader_errors(path):
        raw = (pq.read_schema(path).metadata or {}).get(key)
    if raw is None:
        return None
    fields = json.loads(raw)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Expected valid {what} metadata in {path}, but got: {error}") from error
