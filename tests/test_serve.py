"""`plerec serve` over real HTTP: started by the test on a free localhost port, it answers /score and /rank
like the model, concurrent requests included, answers malformed input with a 4xx and a message, and keeps
serving afterwards; and hardened (issue: serve hardening): no value a client sends gets a 5xx or a null
prediction (a fuzz of 1,000 requests), bodies, headers and connections are bounded in size and time, a token
guards every endpoint but /health, and the docs pages are off."""

import json
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tiny_ship import candidates, train_tiny

from plerec.config import load_experiment
from plerec.rank import Scorer
from plerec.serve import RowReader, bind, create_app

FEATURES = ["cat", "device", "a", "b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, checkpoint, experiment file) of the tiny model, trained once for the module."""
    root = tmp_path_factory.mktemp("serve")
    return (root, *train_tiny(root))


@pytest.fixture(scope="module")
def service(tiny):
    """The CLI's server in a subprocess on a port the OS picks; yields (base URL, the same model in-process)."""
    root, checkpoint, experiment = tiny
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


# --- hardening: every value a client can send, bounded bodies, headers and connections, the token ------------

TASKS = ("click", "watch", "score", "log_score")


@pytest.fixture(scope="module")
def scorer(tiny):
    _, checkpoint, experiment = tiny
    return Scorer.from_checkpoint(checkpoint, load_experiment(experiment))


@pytest.fixture(scope="module")
def client(scorer):
    """The app in-process (httpx), default limits: fast enough for a fuzz of a thousand requests."""
    with TestClient(create_app(scorer), raise_server_exceptions=False) as test_client:
        yield test_client


def send(client, path: str, body=None, raw: bytes | None = None, **headers):
    data = raw if raw is not None else json.dumps(body).encode()  # NaN, Infinity; lone surrogates as \ud800
    return client.post(path, content=data, headers={"content-type": "application/json", **headers})


def assert_finite_answer(path: str, answer: dict) -> None:
    predictions = answer["predictions"] if path == "/score" else answer["items"]
    assert predictions
    for prediction in predictions:
        for task in TASKS:
            value = prediction[task]
            assert type(value) in (int, float) and math.isfinite(value), (task, value)


LONG = "z" * 500  # a bad value no error message may echo in full
NASTY = st.sampled_from(
    [1e300, -1e300, 3.5e38, 1e38, 1e-300, 5e-324, -0.0, 10**400, -(10**30), math.nan, math.inf, -math.inf]
    + ["NaN", "Infinity", "-inf", "1e999", "\ud800", "a\udfffb", LONG, "", "x", "é名", True, False, None, 0, 1, 2]
)
KEYS = st.one_of(
    st.sampled_from([*GOOD_ROW, "user", "item", "price", "", "\ud800", "\udc00x", LONG]), st.text(max_size=3)
)
SCALARS = st.one_of(NASTY, st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=4
)


NUMBERS = st.one_of(NASTY, st.floats(), st.integers())


@st.composite
def fuzzed_row(draw) -> dict:
    """A valid candidate with a few fields dropped, replaced or added: most requests reach the deep checks, and
    many (extreme numbers in numeric fields) the model itself."""
    row = {**GOOD_ROW, "item": draw(st.integers(0, 9))}
    if draw(st.booleans()):
        return row | draw(st.dictionaries(st.sampled_from(["a", "b", "device", "duration"]), NUMBERS, max_size=2))
    for key in draw(st.sets(st.sampled_from(sorted(row)), max_size=2)):
        del row[key]
    return row | draw(st.dictionaries(KEYS, VALUES, max_size=2))


@st.composite
def fuzzed_request(draw) -> tuple[str, object]:
    path = draw(st.sampled_from(["/score", "/rank"]))
    rows = draw(st.lists(fuzzed_row(), max_size=2))
    if path == "/score":
        body: object = {"rows": rows}
    else:
        body = {"candidates": rows}
        if draw(st.booleans()):
            body["user"] = draw(st.one_of(st.dictionaries(KEYS, VALUES, max_size=2), VALUES))
        if draw(st.booleans()):
            body["top_k"] = draw(st.one_of(st.integers(-2, 5), VALUES))
    shape = draw(st.integers(0, 9))
    if shape == 0:  # the whole body something else
        body = draw(st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=3)))
    elif shape == 1:  # an extra top-level field
        body = {**body, **draw(st.dictionaries(KEYS, VALUES, min_size=1, max_size=1))}
    return path, body


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzzed_request())
def test_fuzzed_requests_never_get_a_5xx_or_a_null_prediction(client, request_):
    path, body = request_
    response = send(client, path, body)
    event(f"{path} {response.status_code}")
    assert response.status_code < 500, response.text
    answer = response.json()
    if response.status_code == 200:
        assert_finite_answer(path, answer)
    else:
        assert response.status_code in (400, 413, 422), response.text
        assert isinstance(answer["error"], str) and len(answer["error"]) < 600, answer
        assert "z" * (100 + 1) not in answer["error"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/score", {"rows": [{**GOOD_ROW, "a": 1e300}]}, r"rows\[0\]: expected `a` to be a number whose standardised"),
        ("/score", {"rows": [GOOD_ROW, {**GOOD_ROW, "b": -1e300}]}, r"rows\[1\]: expected `b` .* but got -1e\+300"),
        ("/score", {"rows": [{**GOOD_ROW, "device": math.nan}]}, r"rows\[0\]: expected `device` to be a finite number"),
        ("/score", {"rows": [{**GOOD_ROW, "device": -math.inf}]}, r"expected `device` to be a finite number .* -inf"),
        ("/score", {"rows": [{**GOOD_ROW, "device": 10**400}]}, r"expected `device` to be a finite number"),
        ("/score", {"rows": [{**GOOD_ROW, "\ud800": 1}]}, r"rows\[0\]: expected field names to be valid Unicode text"),
        ("/score", {"rows": [{**GOOD_ROW, "cat": "\udfff"}]}, r"rows\[0\]: expected `cat` to be valid Unicode text"),
        ("/score", {"rows": [{**GOOD_ROW, "cat": ["x"]}]}, r"expected `cat` to be a string .* but got list \['x'\]"),
        (
            "/score",
            {"rows": [{**GOOD_ROW, "a": {"v": 1}}]},
            r"expected `a` to be a finite number or null, but got object",
        ),
        ("/score", {"rows": [{**GOOD_ROW, "a": LONG}]}, r"but got string 'z{99}… \(502 characters\)"),
        ("/score", {"rows": [{**GOOD_ROW, LONG: 1}]}, r"unknown field `'z{99}… \(502 characters\)`"),
        ("/score", {"rows": [GOOD_ROW], "\ud800": 1}, r"unable to parse raw data as a unicode string"),
        ("/rank", {"user": {"user": [1]}, "candidates": [{**GOOD_ROW, "item": 1}]}, r"user: expected the id `user`"),
        ("/rank", {"user": {"user": {"a": 1}}, "candidates": [{**GOOD_ROW, "item": 1}]}, r"but got object \{'a': 1\}"),
        ("/rank", {"user": {"\ud800": 1}, "candidates": [{**GOOD_ROW, "item": 1}]}, r"user: expected field names"),
        ("/rank", {"candidates": [{**GOOD_ROW, "item": math.nan}]}, r"candidates\[0\]: expected the id `item`"),
        ("/rank", {"candidates": [{**GOOD_ROW, "item": 1, "user": ["u"]}]}, r"candidates\[0\]: expected the id `user`"),
        ("/rank", {"candidates": [{**GOOD_ROW, "item": 1, "a": 1e300}]}, r"candidates\[0\]: expected `a` to be"),
    ],
)
def test_values_the_model_cannot_score_get_a_422_naming_row_and_field(client, path, body, message):
    import re

    response = send(client, path, body)
    assert response.status_code == 422, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_a_non_finite_prediction_gets_a_422_not_a_200(client, monkeypatch):
    from plerec.serve import Served

    real = Served.forward

    def overflowing(self, table):
        logits = real(self, table).clone()  # out of inference mode, to write to it
        logits[-1, 1] = math.inf  # the last row's `watch`: rank_weight 0, so only the output check sees it
        return logits

    monkeypatch.setattr(Served, "forward", overflowing)
    response = send(client, "/score", {"rows": [GOOD_ROW, GOOD_ROW]})
    assert response.status_code == 422, response.text
    assert "rows[1]: expected the model's `watch` to be a finite number, but it is inf" in response.json()["error"]
    response = send(client, "/rank", {"candidates": [{**GOOD_ROW, "item": 1}]})
    assert response.status_code == 422 and "candidates[0]" in response.json()["error"]


def test_a_50_mb_body_is_refused_with_413_before_it_is_parsed(client, monkeypatch):
    parsed = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: parsed.append(len(text)) or loads(text, *a, **k))
    body = json.dumps({"rows": [GOOD_ROW]}).encode() + b" " * 50_000_000  # valid JSON: one row, then spaces
    start = time.monotonic()
    response = send(client, "/score", raw=body)
    took = time.monotonic() - start
    assert response.status_code == 413, response.text
    assert not parsed, parsed  # json.loads never ran on the body (nor did the handler)
    monkeypatch.undo()
    assert "at most 8388608 bytes, but got 50000" in response.json()["error"]
    assert response.headers["connection"] == "close"
    assert took < 10  # the JSON parse and a 50 MB repr in the error would take longer on this machine
    assert send(client, "/score", {"rows": [GOOD_ROW]}).status_code == 200


def test_a_token_guards_every_endpoint_but_health(scorer):
    token = "s3cret-token-0123456789"
    with TestClient(create_app(scorer, token=token), raise_server_exceptions=False) as guarded:
        assert guarded.get("/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": token}):
            response = send(guarded, "/score", {"rows": [GOOD_ROW]}, **headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
            assert "Expected `Authorization: Bearer TOKEN`" in response.json()["error"]
        assert guarded.get("/nowhere").status_code == 401  # no probing for paths without the token
        for scheme in ("Bearer", "bearer"):
            response = send(guarded, "/score", {"rows": [GOOD_ROW]}, authorization=f"{scheme} {token}")
            assert response.status_code == 200, response.text
        response = send(guarded, "/rank", {"candidates": [{**GOOD_ROW, "item": 1}]}, authorization=f"Bearer {token}")
        assert response.status_code == 200, response.text


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    from plerec.serve import TOKEN_ENV, read_token

    path = tmp_path / "token"
    path.write_text("  file-token-0123456789\n")
    assert read_token(path, {TOKEN_ENV: "env-token-0123456789"}) == "file-token-0123456789"
    assert read_token(None, {TOKEN_ENV: "env-token-0123456789"}) == "env-token-0123456789"
    assert read_token(None, {}) is None
    with pytest.raises(ValueError, match="Expected the token in .* at least 16 visible ASCII characters"):
        path.write_text("short")
        read_token(path, {})
    with pytest.raises(ValueError, match=r"Expected \$PLEREC_SERVE_TOKEN to be at least 16 .* with others"):
        read_token(None, {TOKEN_ENV: "has a space in it, 0123"})
    with pytest.raises(ValueError, match="Cannot read the token file"):
        read_token(tmp_path / "missing", {})


def test_binding_beyond_loopback_without_a_token_is_refused(scorer, capsys, monkeypatch):
    from plerec.cli import main
    from plerec.serve import check_exposure, serve

    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", "a-token-0123456789")
    with pytest.raises(ValueError, match=r"Refusing to serve on 0.0.0.0 \(0.0.0.0\), beyond loopback, without a token"):
        serve(scorer, "0.0.0.0", 0)
    monkeypatch.delenv("PLEREC_SERVE_TOKEN", raising=False)
    assert main(["serve", "--checkpoint", "missing.pt", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Refusing to serve on 0.0.0.0" in err and "--token-file" in err


def test_docs_are_off_by_default(client, scorer):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    with TestClient(create_app(scorer, docs=True)) as documented:
        schema = documented.get("/openapi.json")
        assert schema.status_code == 200 and "/score" in schema.json()["paths"]
        assert documented.get("/docs").status_code == 404  # no HTML page: it would load scripts from a CDN


def test_limits_and_cli_options_are_checked():
    from plerec.cli import _parser
    from plerec.serve import Limits

    with pytest.raises(ValueError, match="Expected the limit `max_body_bytes` to be an integer > 0, but got 0"):
        Limits(max_body_bytes=0)
    with pytest.raises(ValueError, match="Expected the limit `body_timeout`"):
        Limits(body_timeout=math.inf)
    with pytest.raises(ValueError, match="Expected the limit `max_rows` to be an integer > 0, but got 2.5"):
        Limits(max_rows=2.5)
    assert Limits(body_timeout=2).body_timeout == 2
    args = _parser().parse_args(["serve", "--checkpoint", "x.pt"])
    assert (args.max_body_bytes, args.timeout, args.max_connections, args.token_file, args.docs) == (
        8 * 2**20,
        10.0,
        512,
        None,
        False,
    )


@pytest.fixture(scope="module")
def live(scorer):
    """A real uvicorn server in a thread on a free localhost port, with short timeouts and small caps."""
    from plerec.serve import Limits, make_server

    limits = Limits(header_timeout=2, body_timeout=2, keep_alive_timeout=2, max_connections=8, max_in_flight=2)
    server = make_server(create_app(scorer, limits), limits)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(address) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def answer_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection, waiting at most `seconds` in all."""
    data, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"still open after {seconds} s, having sent {data[:200]!r}")


def health(address) -> int:
    with connect(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        return int(answer_within(sock, 5).split(b" ")[1])


def trickle(sock: socket.socket, data: bytes, seconds: float) -> tuple[float, bytes]:
    """Send `data` one byte a second until the server answers or closes; (seconds it took, the answer)."""
    start = time.monotonic()
    for byte in data[: int(seconds)]:
        try:
            sock.send(bytes([byte]))
        except OSError:  # closed under us
            break
        if select.select([sock], [], [], 1.0)[0]:
            break
    answer = answer_within(sock, max(0.1, seconds - (time.monotonic() - start)))
    return time.monotonic() - start, answer


def test_slow_clients_are_cut_off(live):
    head = b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n"
    with connect(live) as sock:  # headers at once, then the body one byte a second: 408 after 2 s
        sock.sendall(head)
        took, answer = trickle(sock, json.dumps({"rows": [GOOD_ROW]}).encode(), 6)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"within 2 s" in answer and 1.5 < took < 4, took
    with connect(live) as sock:  # the headers themselves one byte a second: closed after 2 s
        took, answer = trickle(sock, head, 6)
    assert answer == b"" and 1.5 < took < 4, (took, answer)
    with connect(live) as sock:  # an idle connection: closed too
        start = time.monotonic()
        assert answer_within(sock, 4) == b"" and time.monotonic() - start > 1.5
    assert health(live) == 200


def test_a_chunked_body_is_cut_off_at_the_limit(live):
    chunk = b" " * 2**20
    sent = 0
    with connect(live) as sock:
        sock.sendall(
            b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 50 * 2**20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server closed the connection while we sent
            pass
        answer = answer_within(sock, 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 30 * 2**20, sent  # the server answered long before the 50 MB were sent


def test_connection_and_in_flight_caps_keep_health_answering(live):
    head = b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n"
    full = b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n"
    slow = [connect(live) for _ in range(2)]  # two requests in flight, reading their bodies (2 s at most)
    try:
        for sock in slow:
            sock.sendall(head + b"{")
        deadline, answer = time.monotonic() + 1.5, b""
        while not answer.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline:
            with connect(live) as sock:  # a complete request: 422 until both slow ones are in flight, then 503
                sock.sendall(full + b'{"rows": []}')
                answer = answer_within(sock, 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"requests in flight (at most 2)" in answer, answer
        assert health(live) == 200  # /health is not counted
    finally:
        for sock in slow:
            sock.close()
    idle = [connect(live) for _ in range(8 + 3)]  # at most 8 open connections: the rest answered 503 and closed
    try:
        deadline, refused = time.monotonic() + 1.5, []
        while len(refused) < 3 and time.monotonic() < deadline:  # idle ones stay silent for 2 s (header timeout)
            for sock in select.select(idle, [], [], 0.1)[0]:
                idle.remove(sock)
                refused.append(answer_within(sock, 2))
                sock.close()
        assert len(refused) >= 3, refused
        assert all(a.startswith(b"HTTP/1.1 503") and b"too many open connections" in a for a in refused), refused
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the closed connections are gone once the server has seen them close
        try:
            if health(live) == 200:
                break
        except (OSError, IndexError, AssertionError):
            pass
        assert time.monotonic() < deadline, "/health did not come back"
        time.sleep(0.1)
