"""Task conditions: `click == 1`, `income in [">50K", ">50K."]`, `age >= 30 and sex == "Female"`.

A condition compares a column with a constant (== != > >= < <=) or with a list of constants (`in [...]`,
`not in [...]`); comparisons combine with `and` and `or` (`and` binds tighter; parentheses group). A
comparison with a missing value is False, whatever its operator. A condition is parsed once, when the
experiment is read, and evaluated per chunk: in numpy where every column it reads is plain numbers
(`plain_condition`), through pandas otherwise (`evaluate_condition`, whose errors name the bad rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from plerec.data.frames import bad_rows, missing_values, pd, plain_column, plain_value

Value = str | float | bool
COMPARISONS = ("==", "!=", ">", ">=", "<", "<=")
MEMBERSHIP = ("in", "not in")

_COMPARE = {
    "==": np.equal,
    "!=": np.not_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "<": np.less,
    "<=": np.less_equal,
}
_NAME = r"[A-Za-z_][\w.]*"
_COMPARISON = re.compile(
    rf"^\s*(`[^`]+`|{_NAME})\s*(?:(==|!=|>=|<=|>|<)|(?<![\w.])(not\s+in|in)(?![\w.]))\s*(.+?)\s*$", re.DOTALL
)
_EXPECTED = (
    "a condition like `column == value` (operators == != > >= < <=, or `column in [v1, v2]` / "
    "`column not in [v1, v2]`; combined with `and` / `or` and parentheses)"
)


@dataclass(frozen=True, slots=True)
class Condition:
    """One comparison: `column op value`, or `column in (values)` / `column not in (values)`."""

    column: str
    op: str
    value: Value | tuple[Value, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Condition | Combination:
        """A condition's text as a Condition, or a Combination of them; errors name `where`."""
        return parse_condition(text, where)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def values(self) -> tuple[Value, ...]:
        return self.value if isinstance(self.value, tuple) else (self.value,)

    @property
    def on_text(self) -> bool:
        return isinstance(self.values[0], str)

    def __str__(self) -> str:
        column = (
            self.column if re.fullmatch(_NAME, self.column) and not _is_keyword(self.column) else f"`{self.column}`"
        )
        if self.op in MEMBERSHIP:
            return f"{column} {self.op} [{', '.join(map(_show, self.values))}]"
        return f"{column} {self.op} {_show(self.value)}"


@dataclass(frozen=True, slots=True)
class Combination:
    """Conditions joined by `and` (every one holds) or `or` (at least one holds)."""

    op: str
    parts: tuple[Condition | Combination, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the parts read, each once, in the order they first appear."""
        return tuple(dict.fromkeys(c for part in self.parts for c in part.columns))

    def __str__(self) -> str:
        return f" {self.op} ".join(
            f"({part})" if isinstance(part, Combination) and self.op == "and" else str(part) for part in self.parts
        )


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_condition(text: str, where: str) -> Condition | Combination:
    """`a == 1 or b in ["x", "y"] and c > 2` as or(a == 1, and(b in [...], c > 2))."""
    tokens = _tokens(text)
    position = 0

    def fail(problem: str) -> ValueError:
        return ValueError(f"Expected {where} to be {_EXPECTED}, but got {text!r}: {problem}")

    def joined(op: str, operand) -> Condition | Combination:
        nonlocal position
        parts = [operand()]
        while position < len(tokens) and tokens[position] == op:
            position += 1
            if position == len(tokens) or tokens[position] in ("and", "or", ")"):
                raise fail(f"`{op}` needs a comparison after it")
            parts.append(operand())
        flat = [q for p in parts for q in (p.parts if isinstance(p, Combination) and p.op == op else (p,))]
        return flat[0] if len(flat) == 1 else Combination(op, tuple(flat))

    def either() -> Condition | Combination:
        return joined("or", both)

    def both() -> Condition | Combination:
        return joined("and", single)

    def single() -> Condition | Combination:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            if position == len(tokens) or tokens[position] == ")":
                raise fail("`()` holds no comparison")
            inner = either()
            if position == len(tokens) or tokens[position] != ")":
                raise fail("a `(` is not closed by `)`")
            position += 1
            return inner
        if token in ("and", "or", ")"):
            raise fail(f"`{token}` needs a comparison before it")
        return _comparison(token, where, text)

    if not tokens:
        raise ValueError(f"Expected {where} to be {_EXPECTED}, but got {text!r}")
    result = either()
    if position < len(tokens):
        token = tokens[position]
        problem = "a `)` without its `(`" if token == ")" else "comparisons need `and` or `or` between them"
        raise fail(problem)
    return result


def _tokens(text: str) -> list[str]:
    """The text cut into "(", ")", "and", "or" and the comparisons between them (stripped); quoted
    strings, `backticked names` and [lists] are never cut."""
    tokens: list[str] = []
    piece, i = "", 0

    def flush() -> None:
        nonlocal piece
        if piece.strip():
            tokens.append(piece.strip())
        piece = ""

    while i < len(text):
        ch = text[i]
        if ch in "\"'`":
            end = text.find(ch, i + 1)
            end = len(text) - 1 if end < 0 else end
            piece += text[i : end + 1]
            i = end + 1
        elif ch == "[":
            end = i + 1
            while end < len(text) and text[end] != "]":
                if text[end] in "\"'":
                    close = text.find(text[end], end + 1)
                    end = len(text) if close < 0 else close + 1
                else:
                    end += 1
            piece += text[i : end + 1]
            i = end + 1
        elif ch in "()":
            flush()
            tokens.append(ch)
            i += 1
        elif (word := re.match(r"(and|or)(?![\w.`])", text[i:])) and (i == 0 or not re.match(r"[\w.`]", text[i - 1])):
            flush()
            tokens.append(word.group(1))
            i += len(word.group(1))
        else:
            piece += ch
            i += 1
    flush()
    return tokens


def _comparison(piece: str, where: str, text: str) -> Condition:
    within = f" in {text!r}" if piece != text.strip() else ""
    match = _COMPARISON.match(piece)
    if not match:
        raise ValueError(f"Expected {where} to be {_EXPECTED}, but got {piece!r}{within}")
    column, op, member, raw = match.groups()
    column = column.strip("`")
    if member:
        op = " ".join(member.split())  # `not   in` as `not in`
        if not (raw.startswith("[") and raw.endswith("]")):
            raise ValueError(
                f"Expected `{op}` in {where} ({piece!r}{within}) to be followed by a list like [1, 2] or "
                f'["a", "b"], but got {raw!r}'
            )
        items = _list_items(raw[1:-1])
        if not items:
            raise ValueError(f"Expected the list in {where} ({piece!r}{within}) to hold at least one value, but got []")
        values = tuple(_value(item, where, piece, within) for item in items)
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            raise ValueError(
                f"Expected the values in {where} ({piece!r}{within}) to be all numbers, all true/false or all "
                f"quoted strings, but got {raw}"
            )
        return Condition(column, op, values)
    if raw.startswith("["):
        raise ValueError(
            f"Expected {where} to compare a list with `in` or `not in`, but got {op!r} in {piece!r}{within}"
        )
    value = _value(raw, where, piece, within)
    if isinstance(value, str) and op not in ("==", "!="):
        raise ValueError(f"Expected {where} to compare a string with == or !=, but got {op!r} in {piece!r}{within}")
    return Condition(column, op, value)


def _list_items(inner: str) -> list[str]:
    """The comma-separated items of a list's inside, commas in quoted strings kept; a trailing comma allowed."""
    items, item, quote = [], "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            items.append(item.strip())
            item = ""
            continue
        item += ch
    items.append(item.strip())
    if items and items[-1] == "" and len(items) > 1:
        items.pop()
    return [] if items == [""] else items


def _value(raw: str, where: str, piece: str, within: str) -> Value:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return float(raw)
    except ValueError:
        raise ValueError(
            f"Expected the value in {where} ({piece!r}{within}) to be a number, true/false or a quoted string, "
            f"but got {raw!r}"
        ) from None


def _show(value: Value) -> str:
    if isinstance(value, str):
        return f"'{value}'" if '"' in value else f'"{value}"'
    return str(value).lower()


def _is_keyword(name: str) -> bool:
    return name in ("and", "or", "in", "not")


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_condition(cond: Condition | Combination, frame, source: str) -> np.ndarray:
    """The condition per row (N,) bool of a DataFrame or ArrowFrame; a one-column condition also takes the
    column itself as a Series. A comparison with a missing value is False."""
    if isinstance(frame, pd.Series):
        frame = {col: frame for col in cond.columns}
    return _evaluate(cond, frame, source, {})


def known_rows(cond: Condition | Combination, frame) -> np.ndarray:
    """(N,) bool: rows where every column the condition reads has a value. A label defined by a condition
    is missing (the row outside the task) where any of them is."""
    known = np.ones(len(frame), dtype=bool)
    for col in cond.columns:
        known &= ~missing_values(frame[col])
    return known


def plain_condition(cond: Condition | Combination, frame) -> tuple[np.ndarray, np.ndarray] | None:
    """(holds, known) per row as `evaluate_condition` and `known_rows` compute them, in numpy without
    pandas; None where a column read is not plain numbers or a comparison is on text."""
    if _compares_text(cond):
        return None
    columns = {}
    for col in cond.columns:
        numbers = plain_column(frame, col)
        if numbers is None:
            return None
        columns[col] = numbers.astype(np.float64)
    known = np.ones(len(frame), dtype=bool)
    for numbers in columns.values():
        known &= ~np.isnan(numbers)
    return _plain(cond, columns), known


def _plain(cond: Condition | Combination, columns: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(cond, Combination):
        return _join(cond.op, [_plain(part, columns) for part in cond.parts])
    numbers = columns[cond.column]
    return _compare(cond.op, numbers, [float(v) for v in cond.values]) & ~np.isnan(numbers)


def _evaluate(cond: Condition | Combination, frame, source: str, numeric: dict) -> np.ndarray:
    if isinstance(cond, Combination):
        return _join(cond.op, [_evaluate(part, frame, source, numeric) for part in cond.parts])
    column = frame[cond.column]
    missing = missing_values(column)
    if cond.on_text:
        hits = column.astype(str).str.strip().isin([v.strip() for v in cond.values]).to_numpy(dtype=bool)
        if cond.op == "==" or cond.op == "in":
            return hits & ~missing
        return ~hits & ~missing
    if cond.column not in numeric:  # each column converted once per evaluation, however often it is compared
        numeric[cond.column] = _numbers(cond, column, missing, source)
    return _compare(cond.op, numeric[cond.column], [float(v) for v in cond.values]) & ~missing


def _numbers(cond: Condition, column, missing: np.ndarray, source: str) -> np.ndarray:
    numbers = pd.to_numeric(column.where(~missing), errors="coerce")
    bad = numbers.isna().to_numpy() & ~missing
    if bad.any():
        row = column.index[bad.argmax()]
        raise ValueError(
            f"Column `{cond.column}` of {source}, row {row}: expected a number to compare in `{cond}`, but got "
            f"{plain_value(column.loc[row])!r}." + bad_rows(column, bad)
        )
    return numbers.to_numpy(dtype=np.float64)


def _compare(op: str, numbers: np.ndarray, targets: list[float]) -> np.ndarray:
    if op in MEMBERSHIP:
        hits = np.isin(numbers, targets)
        return hits if op == "in" else ~hits
    return np.asarray(_COMPARE[op](numbers, targets[0]), dtype=bool)


def _join(op: str, results: list[np.ndarray]) -> np.ndarray:
    return np.logical_and.reduce(results) if op == "and" else np.logical_or.reduce(results)


def _compares_text(cond: Condition | Combination) -> bool:
    if isinstance(cond, Combination):
        return any(_compares_text(part) for part in cond.parts)
    return cond.on_text
