"""`plerec serve` over real HTTP: started by the test on a free localhost port, it answers /score and /rank
like the model, concurrent requests included, answers malformed input with a 4xx and a message, and keeps
serving afterwards."""

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_ship import candidates, train_tiny

from plerec.config import load_experiment
from plerec.rank import Scorer
from plerec.serve import RowReader, bind

FEATURES = ["cat", "device", "a", "b"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The CLI's server in a subprocess on a port the OS picks; yields (base URL, the same model in-process)."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint, experiment = train_tiny(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "plerec", "serve", "--checkpoint", str(checkpoint)]
    log = root / "serve.log"  # a file, not a pipe nobody reads: a chatty server never blocks on it
    process = subprocess.Popen(
        [*command, "--experiment", str(experiment), "--port", "0", "--max-rows", "50"],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line, log.read_text()
        url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(url + "/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.1)
        yield url, Scorer.from_checkpoint(checkpoint, load_experiment(experiment)), process
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def json_rows(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    """Rows as a client would send them: plain JSON values, null for missing."""
    rows = []
    for record in frame[columns].astype(object).to_dict(orient="records"):
        row = {}
        for key, value in record.items():
            value = value.item() if isinstance(value, np.generic) else value
            row[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
        rows.append(row)
    return rows


def test_health_describes_the_model(service):
    url, _, _ = service
    health = get(url + "/health")
    assert health["model"] == "ple"
    assert health["tasks"] == [
        {"name": "click", "kind": "binary", "rank_weight": 2.0},
        {"name": "watch", "kind": "regression", "rank_weight": 0.0},
    ]
    assert health["features"] == {"categorical": ["cat", "device"], "numeric": ["a", "b"]}


def test_score_answers_the_models_predictions_and_fused_score(service):
    url, scorer, _ = service
    frame = candidates(12, seed=21)  # with an unseen category, a missing category and a missing number
    status, body = post(url + "/score", {"rows": json_rows(frame, [*FEATURES, "duration"])})
    assert status == 200, body
    assert body["tasks"] == ["click", "watch"]
    expected = scorer.score(frame)
    got = pd.DataFrame(body["predictions"])
    for column in ("click", "watch", "score", "log_score"):
        np.testing.assert_allclose(got[column].to_numpy(), expected[column].to_numpy(), rtol=1e-6, atol=1e-7)


def expected_ranking(scorer, frame: pd.DataFrame, top_k: int) -> list:
    scores = scorer.score(frame)["log_score"].to_numpy()
    order = sorted(range(len(frame)), key=lambda i: (-scores[i], i))[:top_k]
    return [int(frame["item"].iloc[i]) for i in order]


def test_rank_answers_one_users_top_k(service):
    url, scorer, _ = service
    frame = candidates(15, seed=22)
    frame["user"] = "u7"
    frame["item"] = np.arange(300, 315)
    user = {"user": "u7", "device": int(frame["device"].iloc[0])}
    frame["device"] = user["device"]  # a user-level feature, sent once
    status, body = post(
        url + "/rank", {"user": user, "candidates": json_rows(frame, ["cat", "a", "b", "duration", "item"]), "top_k": 4}
    )
    assert status == 200, body
    assert body["user"] == "u7"
    assert [item["rank"] for item in body["items"]] == [1, 2, 3, 4]
    assert [item["item"] for item in body["items"]] == expected_ranking(scorer, frame, 4)
    scores = scorer.score(frame)
    for item in body["items"]:
        assert item["log_score"] == pytest.approx(scores["log_score"].iloc[item["index"]], rel=1e-6)
        assert int(frame["item"].iloc[item["index"]]) == item["item"]


def test_concurrent_requests_are_answered_correctly(service):
    url, scorer, _ = service
    frames = [candidates(5 + i, seed=100 + i).assign(item=np.arange(5 + i)) for i in range(16)]

    def call(i: int):
        if i % 2:
            return post(url + "/score", {"rows": json_rows(frames[i], [*FEATURES, "duration"])})
        rows = json_rows(frames[i], [*FEATURES, "duration", "item"])
        return post(url + "/rank", {"candidates": rows})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(call, range(16)))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        expected = scorer.score(frames[i])
        if i % 2:
            got = [row["click"] for row in body["predictions"]]
            np.testing.assert_allclose(got, expected["click"].to_numpy(), rtol=1e-6)
        else:
            assert [item["item"] for item in body["items"]] == expected_ranking(scorer, frames[i], len(frames[i]))


GOOD_ROW = {"cat": "x", "device": 1, "a": 0.5, "b": -1.0, "duration": 12.0}


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "/score",
            {"rows": [{k: v for k, v in GOOD_ROW.items() if k != "cat"}]},
            422,
            r"rows\[0\]: missing field `cat`",
        ),
        (
            "/score",
            {"rows": [GOOD_ROW, {**GOOD_ROW, "a": "0.5"}]},
            422,
            r"rows\[1\]: expected `a` to be a finite number",
        ),
        ("/score", {"rows": [{**GOOD_ROW, "cat": 3}]}, 422, r"expected `cat` to be a string .* but got number 3"),
        ("/score", {"rows": [{**GOOD_ROW, "device": "1"}]}, 422, r"expected `device` to be a number"),
        ("/score", {"rows": [{**GOOD_ROW, "price": 2}]}, 422, r"rows\[0\]: unknown field `price`"),
        ("/score", {"rows": [{**GOOD_ROW, "duration": None}]}, 422, r"expected the length `duration` to be a finite"),
        (
            "/score",
            {"rows": [{**GOOD_ROW, "duration": 0}]},
            422,
            r"Length column `duration`, row 0: expected a positive",
        ),
        ("/score", {"rows": [{**GOOD_ROW, "a": 1e999}]}, 422, r"expected `a` to be a finite number"),
        ("/score", {"rows": []}, 422, r"Expected at least one row in `rows`"),
        ("/score", {"rows": [GOOD_ROW] * 51}, 413, r"Expected at most 50 rows in `rows`, but got 51"),
        ("/score", {"row": [GOOD_ROW]}, 422, r"`rows`: Field required; `row`: Extra inputs are not permitted"),
        ("/score", {"rows": {"cat": "x"}}, 422, r"`rows`: Input should be a valid list"),
        ("/rank", {"candidates": []}, 422, r"Expected at least one row in `candidates`"),
        ("/rank", {"candidates": [GOOD_ROW]}, 422, r"candidates\[0\]: missing the item id `item`"),
        ("/rank", {"candidates": [{**GOOD_ROW, "item": 1}], "top_k": 0}, 422, r"Expected `top_k` >= 1, but got 0"),
        ("/rank", {"candidates": [{**GOOD_ROW, "item": 1}], "top_k": "3"}, 422, r"`top_k`: Input should be a valid"),
        (
            "/rank",
            {"candidates": [{**GOOD_ROW, "item": 1, "user": "a"}, {**GOOD_ROW, "item": 2, "user": "b"}]},
            422,
            r"Expected the candidates of one user, but `user` takes 2 values",
        ),
        (
            "/rank",
            {"user": {"cat": "x"}, "candidates": [{**GOOD_ROW, "item": 1}]},
            422,
            r"candidates\[0\]: repeats \['cat'\], already given in `user`",
        ),
        ("/rank", {"user": {"age": 3}, "candidates": [{**GOOD_ROW, "item": 1}]}, 422, r"user: unknown field `age`"),
    ],
)
def test_malformed_requests_get_a_4xx_that_says_what_is_wrong(service, path, body, status, message):
    import re

    url, _, _ = service
    got_status, got = post(url + path, body)
    assert got_status == status, got
    assert re.search(message, got["error"]), got["error"]


def test_invalid_json_gets_a_400_and_the_service_keeps_serving(service):
    url, scorer, process = service
    status, body = post(url + "/score", None, raw=b'{"rows": [{"cat": ')
    assert status == 400 and "not valid JSON" in body["error"]
    frame = pd.DataFrame([GOOD_ROW])
    status, body = post(url + "/score", {"rows": [GOOD_ROW]})
    assert status == 200
    assert body["predictions"][0]["click"] == pytest.approx(scorer.score(frame)["click"].iloc[0], rel=1e-6)
    assert process.poll() is None


def test_request_rows_are_encoded_exactly_as_the_encoder_does(service):
    _, scorer, _ = service
    frame = candidates(30, seed=23)
    frame.loc[5, "device"] = 7  # an unseen numeric id
    frame.loc[6, "device"] = None
    rows = json_rows(frame, FEATURES + ["duration"])
    assert rows[0]["cat"] == "never-seen" and rows[1]["cat"] is None and rows[2]["a"] is None
    reader = RowReader(scorer, max_rows=100)
    reader.check(rows, "rows")
    got = reader.encode(rows, "rows")
    expected = scorer.encoder.transform(frame, labels=False)
    assert got.sparse.tolist() == expected.sparse.long().tolist()
    assert got.sparse[:2, 0].tolist() == [0, 0] and got.sparse[6, 1] == 0 and got.sparse[5, 1] == 0
    assert torch.equal(got.dense, expected.dense)
    assert got.dense.shape[1] == 3 and got.dense[2, 2] == 1.0  # `a` was missing in training: an indicator


def test_bind_takes_a_free_localhost_port():
    sock = bind("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(OSError, match=f"Cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_cli_serve_defaults_to_localhost(capsys):
    from plerec.cli import _parser

    args = _parser().parse_args(["serve", "--checkpoint", "x.pt"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)


def test_cli_serve_errors(tmp_path, capsys):
    from plerec.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "plerec: error: Checkpoint" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--set", "rank.top_k=3"]) == 2
    assert "Expected --experiment next to --set" in capsys.readouterr().err
