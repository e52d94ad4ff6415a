"""Reading tables (CSV, gzipped CSV, Parquet) and splitting them into train / valid / test."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from plerec.config import CsvOptions, DataConfig
from plerec.data.frames import arrow_frames, pd


def read_table(path: str | Path, csv: CsvOptions | None = None) -> pd.DataFrame:
    """One file (or a folder of Parquet files) as a DataFrame; the format comes from the suffix.

    The index is each row's number in the file, counted from 0 at the first data row."""
    path = Path(path)
    if _is_parquet(path):
        for file in _parquet_files(path):
            check_column_names(pq.ParquetFile(file).schema_arrow.names, str(file))
        frame = pq.read_table(path).to_pandas()
        frame.index = pd.RangeIndex(len(frame))  # not an index stored by pandas: errors name file rows
    else:
        options = _csv_options(path, csv or CsvOptions())
        with _csv_errors(path):
            frame = pd.read_csv(path, **options, low_memory=False)
    frame.attrs["source"] = str(path)
    return frame


def iter_frames(
    path: str | Path, csv: CsvOptions | None = None, chunk_rows: int = 32_768, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """A file (or a folder of Parquet files) in chunks of at most `chunk_rows` rows, so that reading
    never holds more than one chunk as a DataFrame. Each chunk's index is its rows' numbers in the file.
    Parquet chunks are `ArrowFrame`s: DataFrames only when a column is not plain numbers.

    `columns` (Parquet only) reads just those columns; ones the file lacks are left out, for the caller
    to report with its own words."""
    path = Path(path)
    if _is_parquet(path):
        for file in _parquet_files(path):
            reader = pq.ParquetFile(file)
            names = reader.schema_arrow.names
            check_column_names(names, str(file))
            wanted = None if columns is None else [c for c in columns if c in names]
            # One decoding thread: with several, each keeps its own pages in Arrow's allocator after reading
            # (measured on the speed benchmark's 1M rows: 27 MiB more resident, no faster).
            batches = reader.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=False)
            yield from arrow_frames(batches, str(file))
        return
    options = _csv_options(path, csv or CsvOptions())
    with _csv_errors(path):
        reader = pd.read_csv(path, **options, chunksize=chunk_rows)
    with reader:
        while True:
            with _csv_errors(path):
                frame = next(reader, None)
            if frame is None:
                return
            frame.attrs["source"] = str(path)
            yield frame


def check_column_names(names: list, source: str) -> None:
    """Every column needs its own non-empty name: pandas would rename a duplicate `x` to `x.1` and an
    empty name to `Unnamed: 3`, so that the data read would not be the data written."""
    empty = [i for i, name in enumerate(names) if str(name).strip() == ""]
    if empty:
        raise ValueError(
            f"Expected every column of {source} to have a name, but column{'s' if len(empty) > 1 else ''} "
            f"{', '.join(map(str, empty))} (counted from 0) {'have' if len(empty) > 1 else 'has'} an empty name. "
            "Name it in the header (or give [data.csv] names); a pandas index written by to_csv is one such column"
        )
    counts = Counter(str(name) for name in names)
    repeated = [name for name, n in counts.items() if n > 1]
    if repeated:
        where = "; ".join(
            f"`{name}` at columns {', '.join(str(i) for i, n in enumerate(names) if str(n) == name)}"
            for name in repeated
        )
        raise ValueError(
            f"Expected distinct column names in {source}, but got {where} (counted from 0). "
            "Rename the columns so that each has its own name"
        )


@contextmanager
def _csv_errors(path: Path) -> Iterator[None]:
    """pandas' parse errors, and its warning that a row has more fields than the header (data would be
    lost or shifted), as one ValueError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            yield
    except pd.errors.EmptyDataError:
        raise ValueError(f"Reading {path}: the file is empty (no header, no rows)") from None
    except pd.errors.ParserWarning:
        raise ValueError(
            f"Reading {path}: the first data row has more fields than there are column names; pandas would "
            "shift the columns. Name every column in the header (or in [data.csv] names)"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"Reading {path}: {' '.join(str(err).split())}") from None


def count_rows(path: str | Path) -> int | None:
    """The number of rows of a Parquet file or folder from its metadata; None for CSV (unknown unread)."""
    path = Path(path)
    if not _is_parquet(path):
        return None
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(path))


def _parquet_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"Expected Parquet files (*.parquet) under {path}, but found none")
    return files


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
        "index_col": False,  # a header shorter than the rows must not turn the first column into the index
    }
    if csv.names:
        options.update(header=0 if csv.header else None, names=list(csv.names))
    elif not csv.header:
        raise ValueError(f"Reading {path}: a CSV without a header needs [data.csv] `names`")
    else:
        with _csv_errors(path):
            header = pd.read_csv(
                path, **{**options, "keep_default_na": False, "na_values": None}, header=None, nrows=1, dtype=str
            )
        check_column_names(header.iloc[0].tolist() if len(header) else [], f"the header of {path}")
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
            _require_rows(frame, f"the {split} file")
        return tables
    frame = read_table(data.path, data.csv)
    _require_rows(frame, "[data] path")
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
            raise ValueError(
                f"The {split} split of {data.path} is empty ({len(frame)} rows, split {list(data.split)}): "
                "use more rows or a larger fraction"
            )
    return tables


def _require_rows(frame: pd.DataFrame, what: str) -> None:
    if len(frame) == 0:
        raise ValueError(f"Expected {what} {frame.attrs['source']} to have data rows, but it has none")
