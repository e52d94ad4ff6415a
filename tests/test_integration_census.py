"""PLE on UCI Census-income (the PLE paper's public benchmark), trained from the example experiment."""

from pathlib import Path

import pytest

from plerec.config import load_experiment
from plerec.train import fit

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "examples" / "census_income.toml"
DATA = ROOT.parent / "shared" / "data" / "census-income-kdd" / "census-income.test.gz"


@pytest.mark.integration
def test_ple_on_census_income_reaches_the_expected_test_auc():
    if not DATA.is_file():
        pytest.skip(f"Census-income data is absent: {DATA} (see ../shared/data/README)")
    exp = load_experiment(EXPERIMENT, ["train.progress=false"])
    assert exp.model_name == "ple"
    assert Path(exp.data.path) == DATA.resolve()
    result = fit(exp)
    test = result.metrics["test"]
    assert test["income"]["n"] == test["marital"]["n"] == 24_941  # what is left of 99,762 rows after 50% + 25%
    assert test["income"]["auc"] >= 0.93, test
    assert test["marital"]["auc"] >= 0.99, test
