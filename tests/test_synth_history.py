import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from plerec.cli import main
from plerec.data import synth_history
from plerec.data.synth import SynthConfig
from plerec.data.synth import write_parquet as write_mmoe_parquet
from plerec.data.synth_history import (
    METADATA_KEY,
    HistoryConfig,
    generate,
    generate_with_truth,
    read_history_metadata,
    write_parquet,
)

SMALL = dict(rows=5_000, num_users=300, num_items=1_000, num_categories=20)
TINY = dict(rows=300, num_users=40, num_items=200, num_categories=10, max_history=12, timeline_length=20)

COLUMNS = ["user_id", "item_id", "item_cat", "hist_item_ids", "hist_cat_ids", "hour", "price", "click", "purchase"]


def lengths_of(table: pa.Table, column: str = "hist_item_ids") -> np.ndarray:
    return table[column].combine_chunks().value_lengths().to_numpy()


def test_schema():
    table = generate(HistoryConfig(**TINY))
    assert table.column_names == COLUMNS
    types = dict(zip(table.column_names, table.schema.types, strict=True))
    assert types["user_id"] == types["item_id"] == types["item_cat"] == pa.int64()
    assert types["hist_item_ids"] == types["hist_cat_ids"] == pa.list_(pa.int64())
    assert types["hour"] == types["price"] == pa.float32()
    assert types["click"] == types["purchase"] == pa.int8()
    assert table.num_rows == 300
    assert table["click"].null_count == 0


def test_same_seed_same_table_other_seed_differs():
    a = generate(HistoryConfig(**TINY, seed=3))
    assert a.equals(generate(HistoryConfig(**TINY, seed=3)))
    b = generate(HistoryConfig(**TINY, seed=4))
    for column in ("user_id", "item_id", "hist_item_ids", "hour", "click"):
        assert not a[column].equals(b[column]), column


def test_fewer_rows_give_a_prefix():
    whole = generate(HistoryConfig(**TINY))
    assert generate(HistoryConfig(**{**TINY, "rows": 100})).equals(whole.slice(0, 100))


def test_chunking_does_not_change_the_data(monkeypatch):
    config = HistoryConfig(**TINY)
    whole, truth = generate_with_truth(config)
    monkeypatch.setattr(synth_history, "_CHUNK_VALUES", 7)
    chunked, chunked_truth = generate_with_truth(config)
    assert chunked.equals(whole)
    np.testing.assert_array_equal(chunked_truth.match, truth.match)


def test_history_lengths_are_bounded_and_some_are_empty():
    config = HistoryConfig(**SMALL, max_history=30)
    table = generate(config)
    lengths = lengths_of(table)
    assert lengths.min() == 0 and lengths.max() == 30
    assert 0.02 < (lengths == 0).mean() < 0.2  # cold starts: some, not most
    assert len(np.unique(lengths)) == 31  # every length in between occurs
    np.testing.assert_array_equal(lengths_of(table, "hist_cat_ids"), lengths)
    assert table["hist_item_ids"].null_count == 0


def test_categories_are_those_of_the_items():
    table, truth = generate_with_truth(HistoryConfig(**SMALL))
    items = table["hist_item_ids"].combine_chunks().values.to_numpy()
    cats = table["hist_cat_ids"].combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(cats, truth.item_categories[items])
    np.testing.assert_array_equal(table["item_cat"].to_numpy(), truth.item_categories[table["item_id"].to_numpy()])
    # And the item -> category map the table shows is a function: one category per item id.
    all_items = np.r_[items, table["item_id"].to_numpy()]
    all_cats = np.r_[cats, table["item_cat"].to_numpy()]
    pairs = np.unique(np.stack([all_items, all_cats]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    assert 0 <= items.min() and items.max() < SMALL["num_items"]


def test_purchase_is_null_exactly_where_not_clicked():
    table = generate(HistoryConfig(**SMALL))
    click = table["click"].to_numpy()
    purchase = table["purchase"].combine_chunks()
    np.testing.assert_array_equal(purchase.is_null().to_numpy(zero_copy_only=False), click == 0)
    bought = purchase.drop_null().to_numpy()
    assert set(np.unique(click)) == {0, 1} and set(np.unique(bought)) == {0, 1}
    assert 0.15 < click.mean() < 0.6 and 0.05 < bought.mean() < 0.6


def test_match_is_the_softmax_pooled_similarity_of_the_history():
    # A per-row reference of the module docstring's equation, against the vectorised ragged version.
    config = HistoryConfig(**TINY)
    table, truth = generate_with_truth(config)
    v = truth.item_vectors
    for history, target, match, mean in zip(
        table["hist_item_ids"].to_pylist(), table["item_id"].to_pylist(), truth.match, truth.mean_match, strict=True
    ):
        if not history:
            assert match == mean == 0
            continue
        s = v[history] @ v[target]
        w = np.exp(s / config.temperature)
        assert match == pytest.approx((w @ s) / w.sum(), abs=1e-12)
        assert mean == pytest.approx(s.mean(), abs=1e-12)
    np.testing.assert_allclose(truth.click_logit, truth.base_logit + config.match_weight * truth.match)


def test_the_most_recent_items_are_the_most_relevant():
    # Oldest first: interests drift along the timeline, so the last item is nearer the target than the first.
    table, truth = generate_with_truth(HistoryConfig(**SMALL))
    v = truth.item_vectors
    rows = zip(table["hist_item_ids"].to_pylist(), table["item_id"].to_pylist(), strict=True)
    long = [(h, t) for h, t in rows if len(h) >= 10]
    first = np.mean([v[h[0]] @ v[t] for h, t in long])
    last = np.mean([v[h[-1]] @ v[t] for h, t in long])
    assert last - first > 0.06  # 0.17 vs 0.05 at seed 0


def clicks_and_truth(seed: int = 0):
    table, truth = generate_with_truth(HistoryConfig(**SMALL, seed=seed))
    return table["click"].to_numpy(), truth


def test_the_signal_is_in_the_history():
    click, truth = clicks_and_truth()
    with_history = roc_auc_score(click, truth.click_logit)
    user_and_item = roc_auc_score(click, truth.base_logit)
    # The best the user's id can tell: how near the target is to the categories the user ever liked.
    lifetime_interests = roc_auc_score(click, truth.base_logit + 5.0 * truth.interest_match)
    # Measured at seed 0: 0.884, 0.685, 0.737.
    assert with_history > 0.84
    assert with_history > user_and_item + 0.12
    assert with_history > lifetime_interests + 0.08


def test_attention_beats_mean_pooling_beats_no_history():
    click, truth = clicks_and_truth()
    w = HistoryConfig().match_weight
    attention = roc_auc_score(click, truth.base_logit + w * truth.max_match)
    mean = roc_auc_score(click, truth.base_logit + w * truth.mean_match)
    none = roc_auc_score(click, truth.base_logit)
    # Measured at seed 0: 0.883, 0.757, 0.685. The max over the history is a cheap attention oracle.
    assert attention > mean + 0.07
    assert mean > none + 0.03


def test_purchase_depends_on_the_match_and_the_price():
    table, truth = generate_with_truth(HistoryConfig(**SMALL))
    clicked = table["click"].to_numpy() == 1
    bought = table["purchase"].to_numpy(zero_copy_only=False)[clicked].astype(int)
    assert roc_auc_score(bought, truth.purchase_logit[clicked]) > 0.65
    assert roc_auc_score(bought, truth.match[clicked]) > 0.57
    assert roc_auc_score(bought, -table["price"].to_numpy()[clicked]) > 0.55


def test_metadata_round_trips(tmp_path):
    config = HistoryConfig(**TINY, seed=7, temperature=0.25)
    path = write_parquet(config, tmp_path / "sub" / "history.parquet")
    assert read_history_metadata(path) == config
    assert pq.read_table(path).replace_schema_metadata(None).equals(generate(config).replace_schema_metadata(None))
    assert METADATA_KEY in pq.read_schema(path).metadata


def test_metadata_is_none_for_other_files(tmp_path):
    mmoe = write_mmoe_parquet(SynthConfig(rows=5, dim=4), tmp_path / "mmoe.parquet")
    assert read_history_metadata(mmoe) is None
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    assert read_history_metadata(plain) is None


def test_bad_metadata_is_an_error(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1]}).replace_schema_metadata({METADATA_KEY: b'{"rows": 0}'}), path)
    with pytest.raises(ValueError, match=r"valid history-generator metadata in .*`rows` to be an integer >= 1"):
        read_history_metadata(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": 0}, r"Expected `rows` to be an integer >= 1, but got 0"),
        ({"max_history": 0}, r"`max_history` to be an integer >= 1"),
        ({"num_users": 2.0}, r"`num_users` to be an integer >= 1, but got 2.0"),
        ({"num_categories": 60, "num_items": 50}, r"`num_categories` to be at most num_items \(50\)"),
        ({"num_interests": 11, "num_categories": 10}, r"`num_interests` to be at most num_categories \(10\)"),
        ({"explore_rate": 1.5}, r"`explore_rate` to be a number in \[0, 1\]"),
        ({"temperature": 0.0}, r"`temperature` to be a finite number > 0"),
        ({"match_weight": float("nan")}, r"`match_weight` to be a finite number"),
        ({"user_bias_std": -1.0}, r"`user_bias_std` to be a finite number >= 0"),
        ({"seed": True}, r"`seed` to be an integer >= 0, but got True"),
    ],
)
def test_bad_config_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        HistoryConfig(**change)


def test_every_interest_can_be_used():
    # num_interests == num_categories takes the whole permutation path, not the top-k one.
    config = HistoryConfig(**{**TINY, "num_categories": 4, "num_interests": 4})
    _, truth = generate_with_truth(config)
    assert (np.sort(truth.user_interests, axis=1) == np.arange(4)).all()


def test_cli_writes_the_history_data_set(tmp_path, capsys):
    out = tmp_path / "h.parquet"
    args = ["synth", "--history", "--out", str(out), "--rows", "200", "--users", "30", "--items", "100"]
    assert main([*args, "--categories", "5", "--max-history", "8", "--seed", "2"]) == 0
    config = read_history_metadata(out)
    assert config == dataclasses.replace(
        HistoryConfig(), rows=200, num_users=30, num_items=100, num_categories=5, max_history=8, seed=2
    )
    table = pq.read_table(out)
    assert table.column_names == COLUMNS and lengths_of(table).max() <= 8
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--history", "--dim", "8"], "Expected only --out, --rows, --seed, --users, --items, --categories, "
         "--max-history with --history, but got --dim (MMoE generator flags)"),
        (["--users", "8"], "Expected --users only with --history, but got no --history"),
        (["--history", "--users", "0"], "Expected `num_users` to be an integer >= 1, but got 0"),
    ],
)  # fmt: skip
def test_cli_rejects_flags_of_the_other_generator(tmp_path, capsys, args, error):
    out = tmp_path / "h.parquet"
    assert main(["synth", "--out", str(out), "--rows", "5", *args]) == 2
    assert capsys.readouterr().err.strip() == f"plerec: error: {error}"
    assert not out.exists()
