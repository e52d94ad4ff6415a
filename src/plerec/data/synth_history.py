"""Synthetic click / purchase impressions with user histories, where the history carries the signal.

The generative story, all of it vectorised and fixed by `seed`:

1. Items. `num_categories` category centres are random unit vectors in R^latent_dim; an item's vector is
   its centre plus noise of relative size `within_category_spread`, normalised, so items of one category
   are alike (cosine about 1 / (1 + spread²)) and items of two categories nearly orthogonal. Category
   sizes, item popularity and user activity are Zipf-like; item ids are shuffled, so an id does not tell
   its category. Each item has a log-normal price around a per-category price level.
2. Users. A user lives through `num_interests` interest categories one after the other along a timeline
   of 0..`timeline_length` items (the interest at position p is slot ⌊K·p/T + jitter⌋, jitter ~
   N(0, `interest_jitter`²)); a share `explore_rate` of the timeline is drawn from global popularity
   instead. So a user's id says which categories they ever liked, but only the history says which
   they like now.
3. Rows (impressions). A user is drawn by activity and a moment t in their timeline; the history is
   the up to `max_history` items before t, oldest first (empty at t = 0: a new user). The target item
   comes from the user's current interest with probability `candidate_interest_rate`, else from
   global popularity (an exploratory impression). `hour` is uniform in [0, 24); `price` is the item's
   price with a ±10 % promotion.
4. Labels. With s_j the cosine between the target and history item j,

       match = Σ_j softmax_j(s / temperature) · s_j             (0 for an empty history)
       click logit    = click_bias + match_weight·match + user bias + popularity_weight·z(log pop)
                        + hour_weight·cos(2π(hour − 20) / 24)
       purchase logit = purchase_bias + purchase_match_weight·match − price_weight·z(log price)

   z standardises over the items. A small temperature makes `match` close to the best single
   similarity: an attention over the history (DIN) can recover it, a mean over a long mixed history
   dilutes it. `purchase` is drawn for every row but written only where click == 1 and null elsewhere,
   so the purchase task's sample space is the clicked rows (`space = "click == 1"`, or the default
   "present"; both select the same rows).

`generate_with_truth` also returns the hidden quantities (`HistoryTruth`), for tests and oracles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from plerec.data.synth import _expect, _is_int, _is_real, read_config, write_with_config

METADATA_KEY = b"plerec.synth_history"

# Similarities are computed this many history elements at a time, so only one chunk of gathered
# (n, latent_dim) vectors is ever held.
_CHUNK_VALUES = 1 << 18
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryConfig:
    """Parameters of the user-history generator (see the module docstring for the story)."""

    rows: int = 100_000
    num_users: int = 2_000
    num_items: int = 5_000
    num_categories: int = 50
    max_history: int = 50  # longest history written; a row's history has 0..max_history items
    timeline_length: int = 100  # a user's timeline has 0..timeline_length items (uniform)
    num_interests: int = 4  # interest categories a user goes through along the timeline
    interest_jitter: float = 0.5  # std of the interest slot around its place on the timeline
    explore_rate: float = 0.2  # share of timeline items drawn from global popularity
    candidate_interest_rate: float = 0.5  # share of targets drawn from the user's current interest
    latent_dim: int = 32
    within_category_spread: float = 0.7
    item_zipf: float = 1.0  # exponent of item popularity, within a category and overall
    user_zipf: float = 0.8  # exponent of user activity
    category_zipf: float = 0.5  # exponent of category sizes and popularity
    temperature: float = 0.1  # of the softmax over the history's similarities
    click_bias: float = -4.5
    match_weight: float = 5.0
    user_bias_std: float = 0.3
    popularity_weight: float = 0.3
    hour_weight: float = 0.3
    purchase_bias: float = -6.5
    purchase_match_weight: float = 6.0
    price_weight: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("rows", 1),
            ("num_users", 1),
            ("num_items", 1),
            ("num_categories", 1),
            ("max_history", 1),
            ("timeline_length", 0),
            ("num_interests", 1),
            ("latent_dim", 2),
            ("seed", 0),
        ):
            value = getattr(self, name)
            _expect(_is_int(value) and value >= low, name, f"an integer >= {low}", value)
        # Every category needs an item, and a user's interests are distinct categories.
        _expect(
            self.num_categories <= self.num_items,
            "num_categories",
            f"at most num_items ({self.num_items})",
            self.num_categories,
        )
        _expect(
            self.num_interests <= self.num_categories,
            "num_interests",
            f"at most num_categories ({self.num_categories})",
            self.num_interests,
        )
        for name in ("explore_rate", "candidate_interest_rate"):
            value = getattr(self, name)
            _expect(_is_real(value) and 0 <= value <= 1, name, "a number in [0, 1]", value)
        for name in ("interest_jitter", "within_category_spread", "item_zipf", "user_zipf", "category_zipf"):
            value = getattr(self, name)
            _expect(_is_real(value) and value >= 0, name, "a finite number >= 0", value)
        _expect(
            _is_real(self.temperature) and self.temperature > 0, "temperature", "a finite number > 0", self.temperature
        )
        for name in (
            "click_bias",
            "match_weight",
            "user_bias_std",
            "popularity_weight",
            "hour_weight",
            "purchase_bias",
            "purchase_match_weight",
            "price_weight",
        ):
            value = getattr(self, name)
            _expect(_is_real(value), name, "a finite number", value)
        _expect(self.user_bias_std >= 0, "user_bias_std", "a finite number >= 0", self.user_bias_std)


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryTruth:
    """What the generator knows and the data does not show; arrays of one value per row unless noted."""

    item_vectors: np.ndarray  # (num_items, latent_dim) float64, unit rows
    item_categories: np.ndarray  # (num_items,) int64
    user_interests: np.ndarray  # (num_users, num_interests) int64 categories, in timeline order
    match: np.ndarray  # softmax(s / temperature)-weighted similarity, the click logit's history term
    max_match: np.ndarray  # max_j s_j (0 for an empty history)
    mean_match: np.ndarray  # mean_j s_j (0 for an empty history)
    interest_match: np.ndarray  # max over the user's lifetime interests of cos(target, centre): no history
    base_logit: np.ndarray  # the click logit without its history term: user, item and hour alone
    click_logit: np.ndarray
    purchase_logit: np.ndarray


def _streams(config: HistoryConfig, count: int = 13) -> list[np.random.Generator]:
    # One stream per quantity: the items and users do not depend on `rows`, and fewer rows give a
    # prefix of the rows that more rows give.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(count)]


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights (n,) proportional to rank^-exponent, the ranks shuffled over the n ids."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights[rng.permutation(n)] / weights.sum()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn with the probabilities whose cumulative sum is `cdf`, one per uniform in `u`."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


@dataclass(frozen=True, slots=True)
class _World:
    vectors: np.ndarray  # (I, d) unit rows
    centres: np.ndarray  # (C, d) unit rows
    categories: np.ndarray  # (I,) int64
    log_popularity_z: np.ndarray  # (I,) standardised log item popularity
    price: np.ndarray  # (I,) float64
    item_cdf: np.ndarray  # (I,) cumulative item popularity, overall
    by_category: np.ndarray  # (I,) item ids sorted by category
    category_key: np.ndarray  # (I,) category + within-category cumulative popularity, sorted like by_category
    interests: np.ndarray  # (U, K) int64
    timeline_lengths: np.ndarray  # (U,) int64
    user_cdf: np.ndarray  # (U,)
    user_bias: np.ndarray  # (U,)


def _world(config: HistoryConfig, item_rng: np.random.Generator, user_rng: np.random.Generator) -> _World:
    n_items, n_cats, d = config.num_items, config.num_categories, config.latent_dim
    category_weights = np.arange(1, n_cats + 1, dtype=np.float64) ** -config.category_zipf
    category_weights /= category_weights.sum()
    # One item per category first, so none is empty; the rest by category size; then shuffled over ids.
    rest = _sample(np.cumsum(category_weights), item_rng.random(n_items - n_cats))
    categories = item_rng.permutation(np.concatenate([np.arange(n_cats), rest])).astype(np.int64)

    centres = _normalise(item_rng.standard_normal((n_cats, d)))
    noise = item_rng.standard_normal((n_items, d)) / np.sqrt(d)  # norm about 1, like a centre
    vectors = _normalise(centres[categories] + config.within_category_spread * noise)

    popularity = _zipf(n_items, config.item_zipf, item_rng)
    price_level = np.exp(3.0 + 0.5 * item_rng.standard_normal(n_cats))
    price = price_level[categories] * np.exp(0.3 * item_rng.standard_normal(n_items))

    # Drawing an item of category c: c + U[0, 1) searched in c + (within-category cdf), items sorted by
    # category, lands on an item of c with its share of c's popularity (the last cdf of each c is c + 1).
    by_category = np.argsort(categories, kind="stable")
    sorted_cats = categories[by_category]
    sorted_pop = popularity[by_category]
    cat_totals = np.bincount(sorted_cats, weights=sorted_pop, minlength=n_cats)
    within = np.cumsum(sorted_pop) - np.concatenate([[0.0], np.cumsum(cat_totals)[:-1]])[sorted_cats]
    within /= cat_totals[sorted_cats]
    last = np.r_[sorted_cats[1:] != sorted_cats[:-1], True]
    within[last] = 1.0

    n_users, k = config.num_users, config.num_interests
    # Distinct interests by popularity: the top k of log weight + Gumbel noise (sampling without replacement).
    keys = np.log(category_weights) + user_rng.gumbel(size=(n_users, n_cats))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k] if k < n_cats else np.tile(np.arange(n_cats), (n_users, 1))
    interests = user_rng.permuted(top, axis=1).astype(np.int64)  # the order they are lived in
    timeline_lengths = user_rng.integers(0, config.timeline_length + 1, size=n_users)
    user_bias = config.user_bias_std * user_rng.standard_normal(n_users)
    user_cdf = np.cumsum(_zipf(n_users, config.user_zipf, user_rng))

    return _World(
        vectors=vectors,
        centres=centres,
        categories=categories,
        log_popularity_z=_standardise(np.log(popularity)),
        price=price,
        item_cdf=np.cumsum(popularity),
        by_category=by_category,
        category_key=sorted_cats + within,
        interests=interests,
        timeline_lengths=timeline_lengths.astype(np.int64),
        user_cdf=user_cdf,
        user_bias=user_bias,
    )


def _items_of(world: _World, categories: np.ndarray, u: np.ndarray) -> np.ndarray:
    """An item of each category in `categories`, by popularity within it; `u` uniform in [0, 1)."""
    return world.by_category[_sample(world.category_key, categories + u)]


def _interest_slots(config: HistoryConfig, position: np.ndarray, length: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """The interest slot (0..K-1) lived at `position` of a timeline of `length` items."""
    k = config.num_interests
    slot = np.floor(k * position / np.maximum(length, 1) + config.interest_jitter * jitter)
    return np.clip(slot, 0, k - 1).astype(np.int64)


def _pool(s: np.ndarray, lengths: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the softmax(s / temperature)-weighted mean, the max and the mean of its segment of `s`
    (segments laid end to end with `lengths`); 0 for an empty segment."""
    rows = len(lengths)
    soft, top, mean = np.zeros(rows), np.zeros(rows), np.zeros(rows)
    full = lengths > 0
    if not full.any():
        return soft, top, mean
    # reduceat over the starts of the non-empty segments only: each then runs to the next one's start.
    starts = (np.cumsum(lengths) - lengths)[full]
    n = lengths[full]
    top[full] = np.maximum.reduceat(s, starts)
    e = np.exp((s - np.repeat(top[full], n)) / temperature)
    soft[full] = np.add.reduceat(e * s, starts) / np.add.reduceat(e, starts)
    mean[full] = np.add.reduceat(s, starts) / n
    return soft, top, mean


def generate_with_truth(config: HistoryConfig) -> tuple[pa.Table, HistoryTruth]:
    """The data set as a table (see `generate`) and the hidden quantities it was drawn from."""
    (item_rng, user_rng, timeline_rng, user_pick, moment, source, target_interest, target_popular, target_jitter,
     hour_rng, promo_rng, click_rng, purchase_rng) = _streams(config)  # fmt: skip
    world = _world(config, item_rng, user_rng)
    rows, n_users, span = config.rows, config.num_users, config.timeline_length

    # Timelines (U, span): positions past a user's length are drawn but never shown.
    shape = (n_users, span)
    position = np.broadcast_to(np.arange(span), shape)
    slots = _interest_slots(config, position, world.timeline_lengths[:, None], timeline_rng.standard_normal(shape))
    interest_items = _items_of(world, np.take_along_axis(world.interests, slots, axis=1), timeline_rng.random(shape))
    explore_items = _sample(world.item_cdf, timeline_rng.random(shape))
    timeline = np.where(timeline_rng.random(shape) < config.explore_rate, explore_items, interest_items)

    user = _sample(world.user_cdf, user_pick.random(rows))
    length_u = world.timeline_lengths[user]
    t = np.minimum(np.floor(moment.random(rows) * (length_u + 1)).astype(np.int64), length_u)  # 0..T_u
    lengths = np.minimum(t, config.max_history)
    total = int(lengths.sum())
    if total > _INT32_MAX:
        raise ValueError(
            f"Expected at most {_INT32_MAX} history items in all, but rows={rows} and max_history="
            f"{config.max_history} give {total}: lower rows or max_history"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Flat position of each history element in its user's timeline: the row's start, then 0, 1, ...
    within = np.arange(total) - np.repeat(offsets[:-1], lengths)
    hist_items = timeline[np.repeat(user, lengths), np.repeat(t - lengths, lengths) + within]

    current = world.interests[user, _interest_slots(config, t, length_u, target_jitter.standard_normal(rows))]
    from_interest = _items_of(world, current, target_interest.random(rows))
    from_popularity = _sample(world.item_cdf, target_popular.random(rows))
    target = np.where(source.random(rows) < config.candidate_interest_rate, from_interest, from_popularity)
    hour = 24.0 * hour_rng.random(rows)
    price = world.price[target] * np.exp(0.1 * promo_rng.standard_normal(rows))

    s = np.empty(total)
    hist_target = np.repeat(target, lengths)
    for start in range(0, total, _CHUNK_VALUES):
        stop = min(start + _CHUNK_VALUES, total)
        a, b = world.vectors[hist_items[start:stop]], world.vectors[hist_target[start:stop]]  # (n, d) each
        s[start:stop] = np.einsum("nd,nd->n", a, b)
    match, max_match, mean_match = _pool(s, lengths, config.temperature)
    interest_match = np.einsum("nd,nkd->nk", world.vectors[target], world.centres[world.interests[user]]).max(axis=1)

    base_logit = (
        config.click_bias
        + world.user_bias[user]
        + config.popularity_weight * world.log_popularity_z[target]
        + config.hour_weight * np.cos(2 * np.pi * (hour - 20.0) / 24.0)
    )
    click_logit = base_logit + config.match_weight * match
    log_price_z = (np.log(price) - np.log(world.price).mean()) / max(np.log(world.price).std(), 1e-12)
    purchase_logit = config.purchase_bias + config.purchase_match_weight * match - config.price_weight * log_price_z
    click = click_rng.random(rows) < 1.0 / (1.0 + np.exp(-click_logit))
    purchase = purchase_rng.random(rows) < 1.0 / (1.0 + np.exp(-purchase_logit))

    offsets32 = pa.array(offsets.astype(np.int32))
    table = pa.table(
        {
            "user_id": pa.array(user.astype(np.int64)),
            "item_id": pa.array(target.astype(np.int64)),
            "item_cat": pa.array(world.categories[target]),
            "hist_item_ids": pa.ListArray.from_arrays(offsets32, pa.array(hist_items.astype(np.int64))),
            "hist_cat_ids": pa.ListArray.from_arrays(offsets32, pa.array(world.categories[hist_items])),
            "hour": pa.array(hour.astype(np.float32)),
            "price": pa.array(price.astype(np.float32)),
            "click": pa.array(click.astype(np.int8)),
            "purchase": pa.array(purchase.astype(np.int8), mask=~click),
        }
    )
    truth = HistoryTruth(
        item_vectors=world.vectors,
        item_categories=world.categories,
        user_interests=world.interests,
        match=match,
        max_match=max_match,
        mean_match=mean_match,
        interest_match=interest_match,
        base_logit=base_logit,
        click_logit=click_logit,
        purchase_logit=purchase_logit,
    )
    return table, truth


def generate(config: HistoryConfig) -> pa.Table:
    """The data set: user_id, item_id, item_cat (int64); hist_item_ids, hist_cat_ids (list<int64>,
    oldest first, 0..max_history long); hour, price (float32); click (int8); purchase (int8, null
    where click == 0)."""
    return generate_with_truth(config)[0]


def write_parquet(config: HistoryConfig, path: str | Path) -> Path:
    """Write `generate(config)` to Parquet, with the config as JSON in the schema metadata under
    `METADATA_KEY` (read back by `read_history_metadata`)."""
    return write_with_config(generate(config), path, METADATA_KEY, config)


def read_history_metadata(path: str | Path) -> HistoryConfig | None:
    """The config a file was written with by `write_parquet`, or None if it carries none."""
    return read_config(path, METADATA_KEY, HistoryConfig, "history-generator")
