"""Reading tables (CSV, gzipped CSV, Parquet) and splitting them into train / valid / test."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from plerec.config import CsvOptions, DataConfig


def read_table(path: str | Path, csv: CsvOptions | None = None) -> pd.DataFrame:
    """One file (or a folder of Parquet files) as a DataFrame; the format comes from the suffix."""
    path = Path(path)
    if _is_parquet(path):
        return pq.read_table(path).to_pandas()
    try:
        return pd.read_csv(path, **_csv_options(path, csv or CsvOptions()), low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"Reading {path}: {err}") from None


def iter_frames(
    path: str | Path, csv: CsvOptions | None = None, chunk_rows: int = 131_072, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """A file (or a folder of Parquet files) in chunks of at most `chunk_rows` rows, so that reading
    never holds more than one chunk as a DataFrame. Each chunk's index is its rows' numbers in the file."""
    path = Path(path)
    if _is_parquet(path):
        for file in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
            first = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=chunk_rows, columns=columns):
                frame = batch.to_pandas()
                frame.index = pd.RangeIndex(first, first + len(frame))
                frame.attrs["source"] = str(file)
                first += len(frame)
                yield frame
        return
    try:
        for frame in pd.read_csv(path, **_csv_options(path, csv or CsvOptions()), chunksize=chunk_rows):
            frame.attrs["source"] = str(path)
            yield frame
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"Reading {path}: {err}") from None


def count_rows(path: str | Path) -> int | None:
    """The number of rows of a Parquet file or folder from its metadata; None for CSV (unknown unread)."""
    path = Path(path)
    if not _is_parquet(path):
        return None
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _is_parquet(path: Path) -> bool:
    if not path.exists():
        raise ValueError(f"Data file {path} does not exist")
    name = path.name.lower()
    if path.is_dir() or name.endswith((".parquet", ".pq")):
        return True
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz", ".gz")):
        return False
    raise ValueError(f"Expected {path} to end in .csv, .csv.gz, .tsv or .parquet, but got {path.name!r}")


def _csv_options(path: Path, csv: CsvOptions) -> dict:
    name = path.name.lower()
    options = {
        "sep": "\t" if ".tsv" in name and csv.sep == "," else csv.sep,
        "skipinitialspace": csv.skipinitialspace,
        "keep_default_na": csv.keep_default_na,
        "na_values": list(csv.na_values) or None,
    }
    if csv.names:
        options.update(header=0 if csv.header else None, names=list(csv.names))
    elif not csv.header:
        raise ValueError(f"Reading {path}: a CSV without a header needs [data.csv] `names`")
    return options


def load_splits(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The train / valid / test tables; each keeps its file's row numbers as index, for error messages.

    A single file is shuffled with `split_seed` (default: the experiment seed) and cut by fractions.
    """
    if data.train:
        files = {"train": data.train, "valid": data.valid, "test": data.test}
        tables = {split: read_table(path, data.csv) for split, path in files.items() if path}
        for split, frame in tables.items():
            frame.attrs["source"] = files[split]
        return tables
    frame = read_table(data.path, data.csv)
    rng = np.random.default_rng(seed if data.split_seed is None else data.split_seed)
    order = rng.permutation(len(frame))
    n_train = int(round(data.split[0] * len(frame)))
    n_valid = int(round(data.split[1] * len(frame)))
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, len(frame))}
    tables = {}
    for split, (start, stop) in bounds.items():
        if stop > start:
            part = frame.iloc[np.sort(order[start:stop])]
            part.attrs["source"] = f"{data.path} ({split} split)"
            tables[split] = part
    for split in ("train", "valid"):
        if split not in tables:
            raise ValueError(f"The {split} split of {data.path} is empty ({len(frame)} rows, split {data.split})")
    return tables
