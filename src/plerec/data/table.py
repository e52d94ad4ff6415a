"""Reading tables (CSV, gzipped CSV, Parquet) and splitting them into train / valid / test."""

from __future__ import annotations

import csv as csvlib
import gzip
import io
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plerec.config import CsvOptions, DataConfig
from plerec.data.frames import arrow_frames, pd


def read_table(path: str | Path, csv: CsvOptions | None = None) -> pd.DataFrame:
    """One file (or a folder of Parquet files) as a DataFrame; the format comes from the suffix.

    The index is each row's number in the file, counted from 0 at the first data row."""
    path = Path(path)
    if _is_parquet(path):
        for file in _parquet_files(path):
            check_column_names(open_parquet(file).schema_arrow.names, str(file))
        with reader_errors(path):
            frame = pq.read_table(path, page_checksum_verification=True).to_pandas()
        frame.index = pd.RangeIndex(len(frame))  # not an index stored by pandas: errors name file rows
    else:
        csv = csv or CsvOptions()
        options = _csv_options(path, csv)
        check_field_counts(path, options, csv)
        with _csv_errors(path), _csv_input(path, csv) as source:
            frame = pd.read_csv(source, **options, low_memory=False)
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
            reader = open_parquet(file)
            names = reader.schema_arrow.names
            check_column_names(names, str(file))
            wanted = None if columns is None else [c for c in columns if c in names]
            # One decoding thread: with several, each keeps its own pages in Arrow's allocator after reading
            # (measured on the speed benchmark's 1M rows: 27 MiB more resident, no faster).
            batches = reader.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=False)
            with reader_errors(file):
                yield from arrow_frames(batches, str(file))
        return
    csv = csv or CsvOptions()
    options = _csv_options(path, csv)
    check_field_counts(path, options, csv)
    with _csv_input(path, csv) as source:
        with _csv_errors(path):
            reader = pd.read_csv(source, **options, chunksize=chunk_rows)
        with reader:
            while True:
                with _csv_errors(path):
                    frame = next(reader, None)
                if frame is None:
                    return
                frame.attrs["source"] = str(path)
                yield frame


@contextmanager
def _csv_input(path: Path, csv: CsvOptions) -> Iterator[Path | io.BufferedReader]:
    """What every reader of a CSV file reads (pandas, the field-count check): the file itself, or, with
    [data.csv] `skip_rows` or `comment`, its bytes without those lines. All of them then see the same rows
    and count them alike: row 0 is the first data row after the skipped lines and the comments."""
    if not (csv.skip_rows or csv.comment):
        yield path
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as file, io.BufferedReader(_KeptLines(file, csv.skip_rows, csv.comment)) as kept:
        yield kept


class _KeptLines(io.RawIOBase):
    """A binary file's lines without the first `skip` and without those that start with `comment` (a whole
    line, not the rest of one: pandas' own `comment` would also cut `a,C#` to `a,C`)."""

    def __init__(self, file, skip: int, comment: str):
        self._lines = self._kept(file, skip, comment.encode())
        self._buffer = b""
        self._start = 0

    @staticmethod
    def _kept(file, skip: int, comment: bytes) -> Iterator[bytes]:
        for number, line in enumerate(file):
            if number < skip:
                continue
            bare = line.removeprefix(b"\xef\xbb\xbf") if number == 0 else line  # a UTF-8 byte-order mark
            if comment and bare.startswith(comment):
                continue
            yield line

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while len(self._buffer) - self._start < len(target):
            lines = list(islice(self._lines, 4096))
            if not lines:
                break
            self._buffer = self._buffer[self._start :] + b"".join(lines)
            self._start = 0
        n = min(len(target), len(self._buffer) - self._start)
        target[:n] = memoryview(self._buffer)[self._start : self._start + n]
        self._start += n
        return n


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


def open_parquet(file: Path, **options) -> pq.ParquetFile:
    """A Parquet file whose pages are verified against their checksums as they are read (pages written with
    one: plerec writes them so); a file that is not Parquet, empty or damaged is an error naming it."""
    with reader_errors(file):
        return pq.ParquetFile(file, page_checksum_verification=True, **options)


@contextmanager
def reader_errors(path: str | Path) -> Iterator[None]:
    """What a reader raises on a file it cannot read — a truncated or corrupt gzip stream, a damaged or
    non-Parquet file, a page whose checksum fails, an OS error — as one ValueError naming the file."""
    try:
        yield
    except gzip.BadGzipFile as err:
        raise ValueError(f"Reading {path}: not a gzip file, or its gzip data is corrupt ({err})") from None
    except EOFError as err:
        raise ValueError(f"Reading {path}: the compressed data ends early, the file is truncated ({err})") from None
    except zlib.error as err:
        raise ValueError(f"Reading {path}: its gzip data is corrupt ({err})") from None
    except (OSError, pa.ArrowException) as err:
        message = " ".join(str(err).split())
        hint = ""
        if "checksum" in message.lower() or "crc" in message.lower():
            hint = "a page checksum does not match: the file is corrupted; "
        elif isinstance(err, pa.ArrowException):
            hint = "the file is damaged, truncated or not in the format its name says; "
        raise ValueError(f"Reading {path}: {hint}{message}") from None


@contextmanager
def _csv_errors(path: Path) -> Iterator[None]:
    """pandas' parse errors, its warning that a row has more fields than the header (data would be
    lost or shifted), and a broken gzip stream, as one ValueError naming the file."""
    try:
        with warnings.catch_warnings(), reader_errors(path):
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
    return sum(open_parquet(f).metadata.num_rows for f in _parquet_files(path))


def check_field_counts(path: Path, options: dict, csv: CsvOptions) -> None:
    """Every row of a CSV file must have a field for every column: pandas reads a row with too few as if
    the missing fields were empty, so a truncated line or a lost separator would become missing values.
    One pass of Arrow's CSV parser counts the fields of every row (measured on 100,000 rows of 13 columns,
    17 MB, on a busy 2-core machine: 0.08 s against 0.49 s for pandas' read; gzipped, 0.28 s against 0.73 s);
    the `csv` module (0.9 s there) does it where Arrow's dialect differs (skipinitialspace, a regular
    expression as separator).
    Rows with more fields than columns are left to pandas, which reports them. A file is checked once per
    process while its size and modification time stay the same (training reads a file twice)."""
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ino, repr(options), repr(csv))
    if key in _CHECKED:
        return
    width = len(csv.names) if csv.names else _header_width(path, options, csv)
    sep, header = options["sep"], int(csv.header)
    short: list[tuple[int, int, str]] = []  # (row counted from 0 at the first data row, fields, text)
    count = 0
    with _csv_errors(path):
        for row, fields, text in _field_counts(path, csv, sep, width, header):
            if fields < width:
                count += 1
                if len(short) < 5:
                    short.append((row, fields, text))
    if short:
        row, fields, text = short[0]
        shown = text if len(text) <= 80 else text[:77] + "..."
        listed = ", ".join(f"{r} ({n} field{'s' if n != 1 else ''})" for r, n, _ in short)
        raise ValueError(
            f"Reading {path}, row {row}: expected {width} fields (one per column), but the row has {fields}: "
            f"{shown!r}. pandas would read the missing fields as empty; fix the row (a truncated line, or a "
            f"missing separator). Short rows (counted from 0 = the first data row of the file): {listed}; "
            f"{count} in all"
        )
    _CHECKED.add(key)


_CHECKED: set[tuple] = set()  # files whose field counts were checked (see check_field_counts)


def _header_width(path: Path, options: dict, csv: CsvOptions) -> int:
    with _csv_errors(path), _csv_input(path, csv) as source:
        first = pd.read_csv(
            source, **{**options, "keep_default_na": False, "na_values": None}, header=None, nrows=1, dtype=str
        )
    return len(first.columns)


def _field_counts(path: Path, csv: CsvOptions, sep: str, width: int, header: int) -> Iterator[tuple]:
    """(row, fields, text) of the data rows with a field count other than `width` (Arrow), or of every
    data row (the `csv` module); blank lines are skipped, as pandas skips them, and so are the lines
    [data.csv] skip_rows and comment leave out (`_csv_input`)."""
    with _csv_input(path, csv) as source:
        yield from _counted(source, sep, csv.skipinitialspace, width, header)


def _counted(source, sep: str, skipinitialspace: bool, width: int, header: int) -> Iterator[tuple]:
    if len(sep) == 1 and not skipinitialspace:
        import pyarrow.csv as pacsv

        found: list[tuple] = []

        def odd_row(row) -> str:
            if row.text.strip():  # a line of blanks: pandas skips it
                found.append((row.number - 1 - header, row.actual_columns, row.text))  # number: 1 = first line
            return "skip"

        names = [f"c{i}" for i in range(width)]
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(use_threads=False, column_names=names, skip_rows=header),
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=odd_row),
            convert_options=pacsv.ConvertOptions(include_columns=names[:1], column_types={names[0]: pa.binary()}),
        )
        for _batch in reader:
            yield from found
            found.clear()
        yield from found
        return
    if isinstance(source, Path):
        opener = gzip.open if source.name.lower().endswith(".gz") else open
        f = opener(source, "rt", newline="", encoding="utf-8")
    else:
        f = io.TextIOWrapper(source, encoding="utf-8", newline="")
    with f:
        if len(sep) == 1:
            rows = ((r, sep.join(r)) for r in csvlib.reader(f, delimiter=sep, skipinitialspace=skipinitialspace))
        else:  # pandas reads a longer separator as a regular expression, without quoting
            pattern = re.compile(sep)
            rows = ((pattern.split(line.rstrip("\r\n")), line.rstrip("\r\n")) for line in f)
        data = (item for item in rows if "".join(item[0]).strip())
        for i, (fields, text) in enumerate(data):
            if i >= header:
                yield i - header, len(fields), text


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
        with _csv_errors(path), _csv_input(path, csv) as source:
            header = pd.read_csv(
                source, **{**options, "keep_default_na": False, "na_values": None}, header=None, nrows=1, dtype=str
            )
        check_column_names(header.iloc[0].tolist() if len(header) else [], f"the header of {path}")
    return options


def load_splits(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The train / valid / test tables; each keeps its file's row numbers as index, for error messages.

    A single file is shuffled with `split_seed` (default: the experiment seed) and cut by fractions; with
    a separate `test` file next to it, into train and valid only (the valid split takes what train leaves),
    and the test split is that file.
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
    n_valid = len(frame) - n_train if data.test else int(round(data.split[1] * len(frame)))
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
    if data.test:  # the file's own rows, never rows of `path`
        test = read_table(data.test, data.csv)
        test.attrs["source"] = data.test
        _require_rows(test, "the test file")
        tables["test"] = test
    return tables


def _require_rows(frame: pd.DataFrame, what: str) -> None:
    if len(frame) == 0:
        raise ValueError(f"Expected {what} {frame.attrs['source']} to have data rows, but it has none")
