"""JSON files plerec writes hold standard JSON only: NaN and ±inf become null, at any depth."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from plerec import jsonio
from plerec.config import experiment_from_dict
from plerec.data.encode import Encoder
from plerec.data.stream import load_encoder, save_encoder
from plerec.train import write_json

SRC = Path(__file__).resolve().parents[1] / "src" / "plerec"


def strict_load(text: str):
    """Python's parser accepts NaN and Infinity; other parsers (jq, JavaScript, Go) do not."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("write", [jsonio.write_json, write_json], ids=["jsonio", "train.write_json"])
def test_non_finite_numbers_become_null_at_any_depth(tmp_path, write):
    value = {
        "auc": math.nan,
        "history": [{"monitor": math.inf, "loss": [0.5, -math.inf]}],
        "pair": (np.float64("nan"), 1),
        "text": "NaN",
        "n": 3,
    }
    write(tmp_path / "m.json", value)
    text = (tmp_path / "m.json").read_text()
    assert not re.search(r"NaN|Infinity", text.replace('"NaN"', ""))
    assert strict_load(text) == {
        "auc": None,
        "history": [{"monitor": None, "loss": [0.5, None]}],
        "pair": [None, 1],
        "text": "NaN",
        "n": 3,
    }
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: the temporary file was renamed


def test_dumps_refuses_what_it_cannot_make_finite():
    assert jsonio.dumps({"x": [math.nan]}) == '{"x": [null]}'
    with pytest.raises(TypeError):
        jsonio.dumps({"x": np.float32("nan")})  # not a float: json itself cannot write it


def test_every_json_dump_in_plerec_goes_through_jsonio():
    calls = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        if path.name != "jsonio.py"
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\bjson\.dumps?\(", line)
    ]
    assert calls == []


def test_an_infinite_category_round_trips_through_encoder_json(tmp_path):
    """A category ±inf is written as its text, which is the same category: no Infinity token, same ids."""
    exp = experiment_from_dict(
        {
            "data": {"path": "unused.csv"},
            "features": {"categorical": ["c"], "numeric": []},
            "tasks": [{"name": "ctr", "kind": "binary", "label": "y"}],
        }
    )
    frame = pd.DataFrame({"c": [math.inf, -math.inf, 1.5, math.inf, 2.0, np.nan], "y": [0, 1, 0, 1, 0, 1]})
    encoder = Encoder.fit(exp, frame)
    path = save_encoder(encoder, tmp_path)
    strict_load(path.read_text())
    loaded = load_encoder(tmp_path, exp)
    assert loaded.transform(frame).sparse.tolist() == encoder.transform(frame).sparse.tolist()
    assert sorted(set(encoder.transform(frame).sparse[:, 0].tolist())) == [0, 1, 2, 3, 4]
