"""The main job (`plerec demo`, run by `make run`): a comparison with intervals and verdicts, quickly."""

import re

from plerec.cli import main
from plerec.demo import DEMO_MODELS


def test_demo_prints_gains_with_intervals_and_verdicts_for_every_model(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--rows", "1200", "--epochs", "2", "--seeds", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for model in DEMO_MODELS[1:]:
        row = next(line for line in printed.splitlines() if line.startswith(f"| {model} |"))
        # two tasks, each: mean [low, high] verdict; then the model's verdict
        assert len(re.findall(r"[+−]\d+\.\d{4} \[[+−]\d+\.\d{4}, [+−]\d+\.\d{4}\] (gain|loss|n\.s\.)", row)) == 2, row
        assert row.rstrip().endswith("|") and row.split("|")[-2].strip(), row
    assert re.search(r"\(\d+\.\d min\)", printed), "the demo prints how long it took"
    # the single-task baseline is two one-task fits per seed, and every run kept its test predictions
    for seed in (0, 1):
        assert (tmp_path / "runs" / "single" / f"seed{seed}" / "tasks" / "y2" / "best.pt").exists()
        for model in DEMO_MODELS:
            assert (tmp_path / "runs" / model / f"seed{seed}" / "test_predictions.npz").exists()
    assert "Verdict rule" in (tmp_path / "summary.md").read_text()
