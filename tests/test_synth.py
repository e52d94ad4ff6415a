import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plerec.data import synth
from plerec.data.synth import (
    SynthConfig,
    generate,
    read_synth_metadata,
    sine_params,
    task_weights,
    write_parquet,
)

TINY = dict(rows=200, dim=8, num_sines=3)


def x_of(frame: pd.DataFrame, dim: int) -> np.ndarray:
    return frame[[f"x{i}" for i in range(dim)]].to_numpy()


@pytest.mark.parametrize("p", [0.0, 1.0, -1.0, -0.3, 0.5, 0.9])
def test_weights_have_requested_cosine_and_norm(p):
    config = SynthConfig(correlation=p, dim=64, scale=2.5)
    w1, w2 = task_weights(config)
    assert w1.dtype == w2.dtype == np.float64 and w1.shape == w2.shape == (64,)
    cos = w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2))
    assert cos == pytest.approx(p, abs=1e-12)
    assert np.linalg.norm(w1) == pytest.approx(2.5, abs=1e-12)
    assert np.linalg.norm(w2) == pytest.approx(2.5, abs=1e-12)


def test_columns_and_dtypes():
    frame = generate(SynthConfig(**TINY, binary=True))
    assert list(frame.columns) == [f"x{i}" for i in range(8)] + ["y1", "y2", "y1_binary", "y2_binary"]
    assert len(frame) == 200
    assert (frame.dtypes.iloc[:10] == np.float32).all()
    assert (frame.dtypes.iloc[10:] == np.int8).all()
    assert list(generate(SynthConfig(**TINY)).columns)[-2:] == ["y1", "y2"]


def test_same_seed_same_frame_other_seed_differs():
    a = generate(SynthConfig(**TINY, seed=3))
    pd.testing.assert_frame_equal(a, generate(SynthConfig(**TINY, seed=3)))
    b = generate(SynthConfig(**TINY, seed=4))
    assert not np.array_equal(a.to_numpy(), b.to_numpy())


def test_chunking_does_not_change_the_data(monkeypatch):
    config = SynthConfig(**TINY)
    whole = generate(config)
    monkeypatch.setattr(synth, "_CHUNK_ROWS", 7)
    chunked = generate(config)
    np.testing.assert_array_equal(x_of(chunked, 8), x_of(whole, 8))
    np.testing.assert_allclose(chunked[["y1", "y2"]], whole[["y1", "y2"]], rtol=0, atol=1e-6)


def test_fewer_rows_give_a_prefix():
    small = generate(SynthConfig(**{**TINY, "rows": 50}))
    pd.testing.assert_frame_equal(small, generate(SynthConfig(**TINY)).iloc[:50])


def test_labels_follow_the_formula_without_noise():
    config = SynthConfig(**TINY, noise_std=0.0, correlation=-0.3)
    frame = generate(config)
    w = np.stack(task_weights(config), axis=1)
    alpha, beta = sine_params(config)
    z = x_of(frame, 8).astype(np.float64) @ w
    for task in range(2):
        expected = z[:, task] + sum(np.sin(a * z[:, task] + b) for a, b in zip(alpha, beta, strict=True))
        np.testing.assert_allclose(frame[f"y{task + 1}"], expected, rtol=1e-6, atol=1e-5)


def test_noise_has_requested_std_and_is_independent_per_task():
    config = SynthConfig(rows=20_000, dim=8, num_sines=3, noise_std=0.1)
    clean = generate(SynthConfig(rows=20_000, dim=8, num_sines=3, noise_std=0.0))
    residual = (generate(config)[["y1", "y2"]] - clean[["y1", "y2"]]).to_numpy(np.float64)
    assert residual.std(axis=0) == pytest.approx([0.1, 0.1], rel=0.03)
    assert abs(np.corrcoef(residual.T)[0, 1]) < 0.05


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.5, 0.9])
def test_linear_parts_correlate_like_the_weights(p):
    config = SynthConfig(rows=20_000, dim=16, correlation=p)
    z = x_of(generate(config), 16).astype(np.float64) @ np.stack(task_weights(config), axis=1)
    assert np.corrcoef(z.T)[0, 1] == pytest.approx(p, abs=0.03)


def test_binary_labels_at_the_median():
    frame = generate(SynthConfig(**TINY, binary=True))
    for task in ("y1", "y2"):
        y = frame[task].to_numpy()
        np.testing.assert_array_equal(frame[f"{task}_binary"], (y > np.median(y)).astype(np.int8))
        assert frame[f"{task}_binary"].mean() == pytest.approx(0.5, abs=0.01)


def test_binary_labels_at_a_fixed_threshold():
    frame = generate(SynthConfig(**TINY, binary=True, threshold=0.25))
    for task in ("y1", "y2"):
        np.testing.assert_array_equal(frame[f"{task}_binary"], (frame[task] > 0.25).astype(np.int8))


def test_parquet_is_reproducible_and_carries_the_config(tmp_path):
    config = SynthConfig(**TINY, correlation=-0.3, binary=True, threshold=0.5)
    a = write_parquet(config, tmp_path / "nested" / "dir" / "a.parquet")
    b = write_parquet(config, tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a), generate(config))
    assert read_synth_metadata(a) == config
    c = write_parquet(dataclasses.replace(config, seed=1), tmp_path / "c.parquet")
    assert c.read_bytes() != a.read_bytes()


def test_metadata_round_trip_of_defaults_and_missing_metadata(tmp_path):
    config = SynthConfig(rows=5, dim=2)
    assert read_synth_metadata(write_parquet(config, tmp_path / "s.parquet")) == config
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), plain)
    assert read_synth_metadata(plain) is None


def test_corrupt_metadata_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    table = pa.table({"a": [1]}).replace_schema_metadata({synth.METADATA_KEY: b'{"correlation": 2.0}'})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="bad.parquet"):
        read_synth_metadata(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rows", 0),
        ("rows", 1.5),
        ("correlation", 1.5),
        ("correlation", -1.01),
        ("correlation", float("nan")),
        ("dim", 1),
        ("scale", 0.0),
        ("scale", float("inf")),
        ("num_sines", -1),
        ("noise_std", -0.1),
        ("binary", 1),
        ("threshold", "mean"),
        ("threshold", True),
        ("seed", -1),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Expected `{field}` to be .*, but got"):
        SynthConfig(**{field: value})


def test_correlation_error_message():
    with pytest.raises(ValueError, match=r"^Expected `correlation` to be in \[-1, 1\], but got 1.5$"):
        SynthConfig(correlation=1.5)
