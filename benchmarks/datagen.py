"""A recommendation-shaped synthetic data set with a hidden ground-truth model, deterministic by seed.

20 categorical fields with Zipf-distributed ids (vocabularies from 20 to 100,000 ids, about 260,000 in
all), 8 numeric fields, and two binary tasks: `click` (about 15 % positive) and `conversion` (about 3 %,
only ever positive on a click, so strongly correlated with it).

The hidden model: every id of every field has a scalar effect on the click logit; two "user-like"
fields and two "item-like" fields also carry 4-dimensional latent vectors whose dot products add
interactions; the numeric fields enter linearly and through non-linear transforms. The conversion
logit (given a click) shares part of the click logit and adds effects of its own. Intercepts are
calibrated on the generated rows so that the expected positive rates are 15 % and 3 %.

With `--history` (the benchmark's sequence case) the rows also carry `hist_item_ids`, a Parquet
list<int64> of up to 50 ids of the item field `c01` (oldest first; about 10 % of the rows have an empty
history), and the click logit gets a term from the history's match with the row's item (see
`_history`). Without it the data set is exactly the one it always was.

Rows are generated as one stream and cut into train / valid / test, so a larger --rows keeps the same
hidden model. Ids are compacted over the whole stream: field f's vocabulary is the set of ids that
occur anywhere in the data set, numbered 0..V_f-1 in an order unrelated to frequency.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Nominal id-space sizes; the realised vocabularies (ids that occur) are a little smaller for the
# largest fields and are written to meta.json.
FIELD_SIZES = (
    100_000, 50_000, 30_000, 20_000, 15_000, 12_000, 8_000, 6_000, 5_000, 4_000,
    3_000, 2_500, 2_000, 1_500, 1_000, 500, 200, 100, 50, 20,
)  # fmt: skip
CATEGORICAL = tuple(f"c{i:02d}" for i in range(len(FIELD_SIZES)))
NUMERIC = tuple(f"n{i}" for i in range(8))
TASKS = ("click", "conversion")
CLICK_RATE, CONVERSION_RATE = 0.15, 0.03
LATENT = 4
USER_FIELDS, ITEM_FIELDS = (0, 3), (1, 2)
HISTORY = "hist_item_ids"
HISTORY_FIELD = 1  # c01: the history holds ids of this item field and shares its vocabulary
HISTORY_MAX = 50
HISTORY_EMPTY = 0.1  # share of rows with an empty history
HISTORY_CANDIDATES = 4  # each element is the best of this many popularity-drawn items for the row's intent
HISTORY_MATCH, HISTORY_REPEAT = 3.0, 0.5  # weights of the history's terms in the click logit


def split_sizes(rows: int, test_rows: int | None = None) -> dict[str, int]:
    """Default: `rows` training rows, rows / 5 test rows, and a small validation split for early stopping."""
    valid = min(10_000, max(1_000, rows // 20))
    return {"train": rows, "valid": valid, "test": rows // 5 if test_rows is None else test_rows}


def _hidden_model(seed: int) -> dict:
    rng = np.random.default_rng([seed, 1])
    # Per-field strength of the id effects: a few strong fields, most weak, some pure noise.
    strength = rng.choice([0.0, 0.15, 0.3, 0.5], size=len(FIELD_SIZES), p=[0.2, 0.35, 0.3, 0.15])
    strength[list(USER_FIELDS + ITEM_FIELDS)] = 0.4
    click_effects = [rng.normal(0, s, size=v) if s else np.zeros(v) for s, v in zip(strength, FIELD_SIZES, strict=True)]
    conv_fields = rng.choice(len(FIELD_SIZES), size=6, replace=False)
    conv_effects = {int(f): rng.normal(0, 0.4, size=FIELD_SIZES[f]) for f in conv_fields}
    latents = {f: rng.normal(0, 0.5, size=(FIELD_SIZES[f], LATENT)) for f in USER_FIELDS + ITEM_FIELDS}
    exponents = np.where(np.array(FIELD_SIZES) >= 10_000, 0.9, 1.05)
    id_order = [rng.permutation(v) for v in FIELD_SIZES]  # rank -> id, so ids do not reveal frequency
    return {
        "click_effects": click_effects,
        "conv_effects": conv_effects,
        "latents": latents,
        "exponents": exponents,
        "id_order": id_order,
        "numeric_weights": rng.normal(0, 0.3, size=(2, len(NUMERIC))),
    }


def _zipf_ids(rng: np.random.Generator, size: int, exponent: float, n: int) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n)), size - 1)


def _numeric(rng: np.random.Generator, n: int) -> np.ndarray:
    """Eight numeric fields of different shapes: normal, log-normal (price-like), counts, uniform, bimodal."""
    cols = [
        rng.normal(0, 1, n),
        rng.lognormal(3, 1, n),
        rng.poisson(3, n).astype(np.float64),
        rng.uniform(0, 1, n),
        rng.exponential(2, n),
        np.where(rng.random(n) < 0.3, rng.normal(-2, 0.5, n), rng.normal(1, 1, n)),
        rng.normal(5, 2, n),
        rng.gamma(2, 2, n),
    ]
    return np.stack(cols, axis=1)


def _calibrate(logits: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """The intercept b such that the mean of weight * sigmoid(logits + b) equals `target` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = 1 / (1 + np.exp(-(logits + mid)))
        mean = float(np.mean(p if weight is None else weight * p))
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (lo + hi) / 2


def _history(seed: int, ranks: np.ndarray, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Histories of the item field and their click-logit term, from a random stream of their own.

    Every row has a hidden intent (a latent vector of the item field's space) that no column carries. Its
    history is 0 (10 % of the rows) to 50 items, each the best-aligned with the intent of 4 items drawn
    by the field's own popularity, so the history reveals the intent. The term is
    3 · mean_j <v(h_j), v(item)> (v the item field's hidden latent vectors; 0 for an empty history),
    plus 0.5 when the row's item is in its history.
    Returns the element ranks (flat), offsets (N + 1), the term (N,) and a description."""
    rng = np.random.default_rng([seed, 3])
    n, size = len(ranks), len(latents)
    lengths = np.where(rng.random(n) < HISTORY_EMPTY, 0, rng.integers(1, HISTORY_MAX + 1, n))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    intent = rng.normal(0, 1, size=(n, latents.shape[1]))
    rows = np.repeat(np.arange(n), lengths)
    elements = np.empty(len(rows), dtype=np.int64)
    chunk = 1 << 21  # elements at a time: the (chunk, candidates, latent) gather stays ~256 MiB
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        candidates = _zipf_ids(rng, size, 0.9, len(r) * HISTORY_CANDIDATES).reshape(len(r), HISTORY_CANDIDATES)
        fit = np.einsum("nkd,nd->nk", latents[candidates], intent[r])
        elements[start : start + chunk] = candidates[np.arange(len(r)), fit.argmax(1)]
    target = ranks[rows]
    match = np.einsum("nd,nd->n", latents[elements], latents[target])
    term = HISTORY_MATCH * np.bincount(rows, weights=match, minlength=n) / np.maximum(lengths, 1)
    repeat = np.bincount(rows, weights=elements == target, minlength=n) > 0
    term += HISTORY_REPEAT * repeat
    described = {
        "field": CATEGORICAL[HISTORY_FIELD],
        "max_length": HISTORY_MAX,
        "mean_length": float(lengths.mean()),
        "empty_share": float((lengths == 0).mean()),
        "item_in_history_share": float(repeat.mean()),
        "term_std": float(term.std()),
    }
    return elements, offsets, term, described


def generate(
    rows: int, seed: int = 0, test_rows: int | None = None, history: bool = False
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """The splits as column dicts, and the metadata (realised vocabularies, positive rates); with `history`
    also the list column `hist_item_ids` (a pyarrow list array) and its click term."""
    sizes = split_sizes(rows, test_rows)
    n = sum(sizes.values())
    hidden = _hidden_model(seed)
    rng = np.random.default_rng([seed, 2])

    ranks = np.empty((n, len(FIELD_SIZES)), dtype=np.int64)
    for f, size in enumerate(FIELD_SIZES):
        ranks[:, f] = _zipf_ids(rng, size, hidden["exponents"][f], n)
    raw = _numeric(rng, n)
    standard = (raw - raw.mean(0)) / raw.std(0)  # the hidden model sees standardised inputs

    click_logit = np.zeros(n)
    for f in range(len(FIELD_SIZES)):
        click_logit += hidden["click_effects"][f][ranks[:, f]]
    for u in USER_FIELDS:
        for i in ITEM_FIELDS:
            lu, li = hidden["latents"][u][ranks[:, u]], hidden["latents"][i][ranks[:, i]]
            click_logit += 0.5 * np.einsum("nd,nd->n", lu, li)
    w_lin, w_nonlin = hidden["numeric_weights"]
    click_logit += standard @ w_lin + np.sin(2 * standard) @ w_nonlin + 0.2 * np.maximum(standard[:, 0], 0) ** 2
    if history:
        f = HISTORY_FIELD
        hist_ranks, hist_offsets, hist_term, hist_meta = _history(seed, ranks[:, f], hidden["latents"][f])
        click_logit += hist_term

    conv_logit = 0.6 * (click_logit - click_logit.mean())
    for f, effects in hidden["conv_effects"].items():
        conv_logit += effects[ranks[:, f]]
    conv_logit += 0.4 * standard[:, 1] - 0.3 * np.abs(standard[:, 5])

    click_logit += _calibrate(click_logit, CLICK_RATE)
    p_click = 1 / (1 + np.exp(-click_logit))
    conv_logit += _calibrate(conv_logit, CONVERSION_RATE, weight=p_click)
    p_conv = 1 / (1 + np.exp(-conv_logit))
    click = rng.random(n) < p_click
    conversion = click & (rng.random(n) < p_conv)

    columns: dict[str, np.ndarray] = {}
    vocab = {}
    for f, name in enumerate(CATEGORICAL):
        ids = hidden["id_order"][f][ranks[:, f]]
        if history and f == HISTORY_FIELD:  # one vocabulary over the field and its histories
            ids = np.concatenate([ids, hidden["id_order"][f][hist_ranks]])
        _, compact = np.unique(ids, return_inverse=True)  # ids that occur, numbered 0..V-1
        vocab[name] = int(compact.max()) + 1
        if history and f == HISTORY_FIELD:
            compact, elements = compact[:n], compact[n:]
            columns[HISTORY] = pa.ListArray.from_arrays(pa.array(hist_offsets.astype(np.int32)), pa.array(elements))
        columns[name] = compact.astype(np.int32)
    for j, name in enumerate(NUMERIC):
        columns[name] = raw[:, j].astype(np.float32)
    columns["click"] = click.astype(np.int8)
    columns["conversion"] = conversion.astype(np.int8)

    splits, start = {}, 0
    for split, count in sizes.items():
        splits[split] = {k: v[start : start + count] for k, v in columns.items()}
        start += count
    meta = {
        "seed": seed,
        "rows": sizes,
        "categorical": list(CATEGORICAL),
        "numeric": list(NUMERIC),
        "tasks": list(TASKS),
        "vocab_sizes": vocab,
        "total_ids": sum(vocab.values()),
        "nominal_ids": sum(FIELD_SIZES),
        "positive_rate": {split: {t: float(cols[t].mean()) for t in TASKS} for split, cols in splits.items()},
        # The AUC of the hidden model's own probabilities on the test split: what no learner can beat.
        "oracle_test_auc": {
            "click": _auc(splits["test"]["click"], p_click[-sizes["test"] :]),
            "conversion": _auc(splits["test"]["conversion"], (p_click * p_conv)[-sizes["test"] :]),
        },
    }
    if history:
        meta["lists"] = {HISTORY: hist_meta}
    return splits, meta


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC (scores are continuous, so ties are negligible)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def write(
    out: Path,
    rows: int,
    seed: int = 0,
    heads: dict[str, int] | None = None,
    test_rows: int | None = None,
    history: bool = False,
) -> dict:
    """Write train/valid/test Parquet files, meta.json, and for each NAME: N in `heads` a file
    NAME.parquet holding the first N training rows."""
    out.mkdir(parents=True, exist_ok=True)
    splits, meta = generate(rows, seed, test_rows, history)
    for split, cols in splits.items():
        pq.write_table(pa.table(cols), out / f"{split}.parquet", row_group_size=1 << 18)
    for name, count in (heads or {}).items():
        head = {k: v[:count] for k, v in splits["train"].items()}
        pq.write_table(pa.table(head), out / f"{name}.parquet", row_group_size=1 << 18)
        meta["rows"][name] = len(head["click"])
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", action="append", default=[], help="NAME=ROWS: also write NAME.parquet")
    parser.add_argument("--test-rows", type=int, default=None)
    parser.add_argument("--history", action="store_true", help=f"also write the list column {HISTORY}")
    args = parser.parse_args()
    heads = {name: int(n) for name, n in (h.split("=", 1) for h in args.head)}
    print(json.dumps(write(args.out, args.rows, args.seed, heads, args.test_rows, args.history)))
