"""The shipped example experiments load, and the Ali-CCP-shaped one trains on the tiny real sample."""

from pathlib import Path

import pytest

from plerec.config import load_experiment
from plerec.train import fit

ROOT = Path(__file__).resolve().parents[1]
ALI_CCP = ROOT.parent / "shared" / "data" / "recsys-mtl-samples" / "torch-rechub" / "ali-ccp"


@pytest.mark.parametrize("name", ["census_income.toml", "ali_ccp.toml", "synthetic_sweep.toml"])
def test_examples_load(name):
    exp = load_experiment(ROOT / "examples" / name)
    assert len(exp.tasks) == 2


def test_ali_ccp_cvr_is_learnt_on_clicked_rows_only():
    if not ALI_CCP.exists():
        pytest.skip(f"needs the tiny Ali-CCP sample at {ALI_CCP} (../shared/data is absent)")
    exp = load_experiment(ROOT / "examples" / "ali_ccp.toml", ["train.progress=false"])
    result = fit(exp)
    test = result.metrics["test"]
    # 50 test rows, 2 clicked (SOURCE.md: click rate 0.04): the CVR space is the clicked rows only.
    assert test["ctr"]["n"] == 50
    assert test["cvr"]["n"] == 2
    assert result.metrics["valid"]["cvr"]["n"] == 3  # 3 clicks among the 50 validation rows
    assert "auc" in test["ctr"]


def test_the_history_example_trains_on_the_history_generator(tmp_path):
    from plerec.data.synth_history import HistoryConfig, write_parquet

    data = write_parquet(HistoryConfig(rows=3_000, num_users=100, num_items=300), tmp_path / "data.parquet")
    exp = load_experiment(
        ROOT / "examples" / "history.toml", [f"data.path={data}", "train.epochs=1", "train.progress=false"]
    )
    assert {name: spec.pooling for name, spec in exp.features.lists.items()} == {
        "hist_item_ids": "attention",
        "hist_cat_ids": "attention",
    }
    result = fit(exp)
    assert result.model.input.attention and len(result.model.input.attention) == 2
    assert result.metrics["test"]["purchase"]["n"] < result.metrics["test"]["click"]["n"]  # clicked rows only
