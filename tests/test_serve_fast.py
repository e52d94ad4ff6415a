"""`plerec serve` at production speed (issue 19): the columnar request gives the row form's answers, which are
`plerec rank`'s and the Python API's; micro-batched requests never get each other's rows; /metrics counts
requests and errors by status; a reload under a stream of requests fails none and switches the answers to
the new model; several workers answer on one port; SIGTERM finishes the request in flight."""

import json
import os
import re
import shutil
import signal
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
from starlette.testclient import TestClient
from tiny_ship import candidates, train_tiny

from plerec.cli import main
from plerec.config import load_experiment
from plerec.rank import Scorer
from plerec.serve import bind, create_app, make_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:starlette")

FEATURES = ["cat", "device", "a", "b", "duration"]
OUTPUTS = ["click", "watch", "score", "log_score"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    checkpoint, experiment = train_tiny(root)
    return root, checkpoint, experiment, Scorer.from_checkpoint(checkpoint, load_experiment(experiment))


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(tiny[3]), raise_server_exceptions=False) as test_client:
        yield test_client


def json_rows(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    rows = []
    for record in frame[columns].astype(object).to_dict(orient="records"):
        rows.append(
            {k: None if pd.isna(v) else (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}
        )
    return rows


def as_columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def test_columnar_score_gives_the_row_forms_answers_and_the_python_apis(tiny, client):
    scorer = tiny[3]
    frame = candidates(12, seed=31)  # an unseen category, a missing one, a missing number
    rows = json_rows(frame, FEATURES)
    by_rows = client.post("/score", json={"rows": rows})
    by_columns = client.post("/score", json={"columns": as_columns(rows)})
    assert by_rows.status_code == 200 and by_columns.status_code == 200, (by_rows.text, by_columns.text)
    predictions = by_rows.json()["predictions"]
    columns = by_columns.json()["columns"]
    assert by_columns.json()["tasks"] == ["click", "watch"] and list(columns) == OUTPUTS
    for name in OUTPUTS:  # the same tensors: equal, not close
        assert columns[name] == [p[name] for p in predictions], name
    expected = scorer.score(frame)
    for name in OUTPUTS:
        np.testing.assert_allclose(columns[name], expected[name].to_numpy(), rtol=1e-9, atol=0)


def test_columnar_rank_gives_the_row_forms_ranking_and_plerec_ranks(tiny, client, tmp_path, capsys):
    root, checkpoint, experiment, scorer = tiny
    frame = candidates(15, seed=32).assign(user="u7", item=np.arange(500, 515), device=2)
    cand = json_rows(frame, ["cat", "a", "b", "duration", "item"])
    user = {"user": "u7", "device": 2}  # a user-level feature, given once
    by_rows = client.post("/rank", json={"user": user, "candidates": cand, "top_k": 6})
    by_columns = client.post("/rank", json={"user": user, "columns": as_columns(cand), "top_k": 6})
    assert by_rows.status_code == 200 and by_columns.status_code == 200, (by_rows.text, by_columns.text)
    assert by_columns.json() == by_rows.json()
    items = by_columns.json()["items"]
    assert by_columns.json()["user"] == "u7" and [i["rank"] for i in items] == [1, 2, 3, 4, 5, 6]
    frame.to_csv(tmp_path / "cands.csv", index=False)
    args = ["rank", str(experiment), "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cands.csv")]
    assert main([*args, "--out", str(tmp_path / "ranked.csv"), "--top-k", "6"]) == 0, capsys.readouterr().err
    ranked = pd.read_csv(tmp_path / "ranked.csv")
    assert [i["item"] for i in items] == ranked["item"].tolist()
    np.testing.assert_allclose([i["log_score"] for i in items], ranked["log_score"], rtol=1e-9)
    api = scorer.rank_table(frame, top_k=6)
    np.testing.assert_allclose([i["click"] for i in items], api["click"], rtol=1e-9)
    for item in items:
        assert int(frame["item"].iloc[item["index"]]) == item["item"]


GOOD = {"cat": ["x", "y"], "device": [1, 2], "a": [0.5, None], "b": [-1.0, 2.0], "duration": [12.0, 3.0]}


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/score", {"columns": {**GOOD, "a": [0.5]}}, 422, r"one value per row, 2 as `cat` has, but `a` has 1"),
        ("/score", {"columns": {**GOOD, "price": [1, 2]}}, 422, r"`columns`: unknown field `price`"),
        (
            "/score",
            {"columns": {**GOOD, "a": [0.5, "0.5"]}},
            422,
            r"`columns` row 1: expected `a` to be a finite number",
        ),
        ("/score", {"columns": {**GOOD, "cat": ["x", 3]}}, 422, r"`columns` row 1: expected `cat` to be a string"),
        ("/score", {"columns": {**GOOD, "device": [1, True]}}, 422, r"row 1: expected `device` to be a number"),
        ("/score", {"columns": {**GOOD, "b": [1e999, 1]}}, 422, r"`columns` row 0: expected `b` to be a finite"),
        ("/score", {"columns": {**GOOD, "duration": [1, None]}}, 422, r"row 1: expected the length `duration`"),
        ("/score", {"columns": {k: v for k, v in GOOD.items() if k != "b"}}, 422, r"`columns`: missing field `b`"),
        ("/score", {"columns": {**GOOD, "a": 0.5}}, 422, r"`columns.a`: Input should be a valid list"),
        ("/score", {"columns": {k: [] for k in GOOD}}, 422, r"Expected at least one row in `columns`"),
        ("/score", {"columns": {k: v * 30 for k, v in GOOD.items()}}, 413, r"at most 50 rows in `columns`, but got 60"),
        ("/score", {"columns": GOOD, "rows": []}, 422, r"`rows`: Extra inputs are not permitted"),
        ("/rank", {"columns": GOOD}, 422, r"`columns` row 0: missing the item id `item`"),
        ("/rank", {"columns": {**GOOD, "item": [1, None]}}, 422, r"`columns` row 1: missing the item id `item`"),
        (
            "/rank",
            {"user": {"cat": "x"}, "columns": {**GOOD, "item": [1, 2]}},
            422,
            r"`cat` is already given in `user`",
        ),
        ("/rank", {"columns": {**GOOD, "item": [1, 2], "user": ["a", "b"]}}, 422, r"`user` takes 2 values"),
        ("/rank", {"columns": {**GOOD, "item": [1, 2]}, "top_k": 0}, 422, r"Expected `top_k` >= 1, but got 0"),
        ("/rank", {"user": {"a": "1"}, "columns": {**GOOD, "item": [1, 2]}}, 422, r"user: expected `a` to be a finite"),
    ],
)
def test_a_bad_columnar_request_gets_a_4xx_naming_the_column_and_row(tiny, path, body, status, message):
    from plerec.serve import Limits

    with TestClient(create_app(tiny[3], Limits(max_rows=50)), raise_server_exceptions=False) as small:
        response = small.post(path, content=json.dumps(body))
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_a_columnar_request_accepts_what_the_row_form_accepts(client):
    rows = [{"cat": c, "device": d, "a": a, "b": 0.0, "duration": 5} for c, d, a in [("x", 1, None), (None, None, 7)]]
    by_rows, by_columns = (
        client.post("/score", json={"rows": rows}),
        client.post("/score", json={"columns": as_columns(rows)}),
    )
    assert by_rows.status_code == by_columns.status_code == 200, (by_rows.text, by_columns.text)
    assert [p["click"] for p in by_rows.json()["predictions"]] == by_columns.json()["columns"]["click"]


def test_the_onnx_backend_gives_the_torch_backends_answers(tiny, client):
    frame = candidates(10, seed=36).assign(item=np.arange(10))
    rows = json_rows(frame, FEATURES)
    with TestClient(create_app(tiny[3], backend="onnx"), raise_server_exceptions=False) as onnx:
        for body in ({"rows": rows}, {"columns": as_columns(rows)}):
            got, want = onnx.post("/score", json=body), client.post("/score", json=body)
            assert got.status_code == 200, got.text
            if "rows" in body:
                got_scores, want_scores = (
                    [[p[n] for n in OUTPUTS] for p in r.json()["predictions"]] for r in (got, want)
                )
            else:
                got_scores, want_scores = ([r.json()["columns"][n] for n in OUTPUTS] for r in (got, want))
            np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
        body = {"columns": as_columns(json_rows(frame, [*FEATURES, "item"]))}
        ranked, expected = (
            onnx.post("/rank", json=body).json()["items"],
            client.post("/rank", json=body).json()["items"],
        )
        assert [i["item"] for i in ranked] == [i["item"] for i in expected]


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_requests_and_errors_by_status(tiny):
    token = "metrics-token-0123456789"
    auth = {"authorization": f"Bearer {token}"}
    rows = json_rows(candidates(4, seed=33), FEATURES)
    with TestClient(create_app(tiny[3], token=token), raise_server_exceptions=False) as app:
        for _ in range(3):
            assert app.post("/score", json={"rows": rows}, headers=auth).status_code == 200
        assert app.post("/score", json={"columns": as_columns(rows)}, headers=auth).status_code == 200
        assert app.post("/score", json={"rows": [{**rows[0], "a": "1"}]}, headers=auth).status_code == 422
        assert app.post("/score", json={"rows": []}, headers=auth).status_code == 422
        assert app.post("/score", content=b'{"rows": [', headers=auth).status_code == 400
        assert app.post("/score", json={"rows": rows}).status_code == 401
        cands = [{**r, "item": i} for i, r in enumerate(rows)]
        assert app.post("/rank", json={"candidates": cands}, headers=auth).status_code == 200
        assert app.get("/health").status_code == 200
        assert app.get("/metrics").status_code == 401  # the token guards /metrics too
        response = app.get("/metrics", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert metric(text, "plerec_requests_total", path="/score", status=200) == 4
    assert metric(text, "plerec_requests_total", path="/score", status=422) == 2
    assert metric(text, "plerec_requests_total", path="/score", status=400) == 1
    assert metric(text, "plerec_requests_total", path="/score", status=401) == 1
    assert metric(text, "plerec_requests_total", path="/rank", status=200) == 1
    assert metric(text, "plerec_requests_total", path="/health", status=200) == 1
    assert metric(text, "plerec_requests_total", path="/metrics", status=401) == 1
    assert metric(text, "plerec_request_errors_total", path="/score", status=422) == 2
    assert metric(text, "plerec_request_errors_total", path="/score", status=200) == 0
    assert metric(text, "plerec_rows_scored_total", path="/score") == 16
    assert metric(text, "plerec_rows_scored_total", path="/rank") == 4
    assert metric(text, "plerec_forward_passes_total") == 5
    assert metric(text, "plerec_request_duration_seconds_count", path="/score") == 8
    buckets = re.findall(r'plerec_request_duration_seconds_bucket\{path="/score",le="([^"]+)"\} (\d+)', text)
    counts = [int(c) for _, c in buckets]
    assert buckets[-1] == ("+Inf", "8") and counts == sorted(counts)  # cumulative
    assert metric(text, "plerec_request_duration_seconds_sum", path="/score") > 0


@pytest.fixture(scope="module")
def batched(tiny):
    """A real server in a thread whose requests are micro-batched within a 50 ms window."""
    app = create_app(tiny[3], batch_window=0.05)
    server = make_server(app)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_micro_batched_requests_get_their_own_rows_only(tiny, batched, client):
    url, app = batched
    frames = [candidates(3 + i, seed=200 + i).assign(item=np.arange(3 + i)) for i in range(12)]

    def call(i: int):
        rows = json_rows(frames[i], FEATURES + ["item"] * (i % 3 == 2))
        if i % 3 == 0:
            return post(url + "/score", {"rows": rows})
        if i % 3 == 1:
            return post(url + "/score", {"columns": as_columns(rows)})
        return post(url + "/rank", {"columns": as_columns(rows)})  # every item: [rank] top_k is 0

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(call, range(12)))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        alone = client.post("/score", json={"rows": json_rows(frames[i], FEATURES)}).json()["predictions"]
        if i % 3 == 0:
            got = [p["log_score"] for p in body["predictions"]]
        elif i % 3 == 1:
            got = body["columns"]["log_score"]
        else:
            got = [item["log_score"] for item in sorted(body["items"], key=lambda item: item["index"])]
        assert len(got) == len(frames[i])
        np.testing.assert_allclose(got, [p["log_score"] for p in alone], rtol=1e-6, atol=1e-7)
    metrics = app.state.metrics
    assert metrics.forward_requests == 12 and metrics.forwards < 12  # some passes scored several requests


SERVER = """
import functools, sys
from plerec.config import load_experiment
from plerec.rank import Scorer
from plerec.serve import serve
checkpoint, experiment, workers, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
load = functools.partial(Scorer.from_checkpoint, checkpoint, load_experiment(experiment))
serve(load(), port=0, workers=workers, load=load, batch_window=window, threads=1,
      on_ready=lambda host, port: print(f"on http://{host}:{port}", flush=True))
"""


def start(root, checkpoint, experiment, workers: int, window: float):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SERVER, str(checkpoint), str(experiment), str(workers), str(window)]
    log = root / f"serve-{workers}.log"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    line = process.stdout.readline()
    assert "on http://" in line, log.read_text()
    url = line.split("on ", 1)[1].strip()
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=30) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()
        time.sleep(0.2)


def test_reload_under_a_stream_of_requests_drops_none_and_switches_models(tiny, tmp_path):
    """Two workers, micro-batching on; the checkpoint replaced and SIGHUP sent while requests stream in."""
    root, checkpoint, experiment, old = tiny
    other = tmp_path / "other"
    other.mkdir()
    new_checkpoint, _ = train_tiny(other, model="mmoe")
    new = Scorer.from_checkpoint(new_checkpoint, load_experiment(experiment))
    served = tmp_path / "served.pt"
    shutil.copy(checkpoint, served)
    frame = candidates(6, seed=34)
    rows = json_rows(frame, FEATURES)
    before, after = old.score(frame)["log_score"].to_numpy(), new.score(frame)["log_score"].to_numpy()
    assert not np.allclose(before, after, rtol=1e-3)
    process, url = start(tmp_path, served, experiment, workers=2, window=0.002)
    answers: list[tuple[int, object]] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            status, body = post(url + "/score", {"columns": as_columns(rows)})
            answers.append((status, body["columns"]["log_score"] if status == 200 else body))

    try:
        streams = [threading.Thread(target=stream) for _ in range(3)]
        for thread in streams:
            thread.start()
        serving: set[str] = set()  # both workers up, so both take the SIGHUP as a reload (one still starting
        deadline = time.monotonic() + 60  # would load the new file as its first model, counting no reload)
        while len(serving) < 2:
            assert time.monotonic() < deadline, serving
            text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
            serving.add(re.search(r'pid="(\d+)"', text).group(1))
        time.sleep(1.0)
        shutil.copy(new_checkpoint, tmp_path / "next.pt")
        os.replace(tmp_path / "next.pt", served)  # atomic: a worker never reads half a file
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not (len(answers) > 20 and all(np.allclose(a, after, rtol=1e-6) for _, a in answers[-12:])):
            assert time.monotonic() < deadline, answers[-3:]
            time.sleep(0.2)
        stop.set()
        for thread in streams:
            thread.join(timeout=30)
        # Each worker's reload count, scraped until both have answered and reloaded (under load the kernel may
        # hand many connections in a row to one worker, and the other may still be loading the new model).
        reloads: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(reloads) < 2 or any(count != 1 for count in reloads.values()):
            assert time.monotonic() < deadline, reloads
            text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
            reloads[re.search(r'pid="(\d+)"', text).group(1)] = metric(text, "plerec_reloads_total", result="ok")
    finally:
        stop.set()
        process.terminate()
        process.wait(timeout=60)
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    kinds = [
        "old" if np.allclose(a, before, rtol=1e-6) else "new" if np.allclose(a, after, rtol=1e-6) else "?"
        for _, a in answers
    ]
    assert "?" not in kinds and kinds[0] == "old" and kinds[-1] == "new"
    assert len(reloads) == 2 and all(count == 1 for count in reloads.values())  # both workers, each reloaded once


def test_sigterm_finishes_the_request_in_flight(tiny, tmp_path):
    root, checkpoint, experiment, scorer = tiny
    process, url = start(tmp_path, checkpoint, experiment, workers=1, window=0.0)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"rows": json_rows(candidates(3, seed=35), FEATURES)}).encode()
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head.encode() + body[:10])  # in flight: headers read, the body still coming
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[10:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn ends by the signal once it is done
    finally:
        if process.poll() is None:
            process.kill()


def test_a_failed_reload_keeps_the_current_model_serving(tiny, client):
    def broken():
        raise ValueError("Checkpoint new.pt: not a plerec checkpoint")

    app = create_app(tiny[3], load=broken)
    before = app.state.model.current
    with pytest.raises(ValueError, match="not a plerec checkpoint"):
        app.state.model.reload()
    assert app.state.model.current is before
    with pytest.raises(ValueError, match="Expected a loader to reload the model with"):
        create_app(tiny[3]).state.model.reload()
    with pytest.raises(ValueError, match=r"Expected batch_window in \[0, 1\] seconds, but got 5"):
        create_app(tiny[3], batch_window=5)
    with pytest.raises(ValueError, match="Expected backend to be one of torch, onnx, but got 'tf'"):
        create_app(tiny[3], backend="tf")


def test_scoring_answered_in_front_of_the_app_as_the_routes_answer(tiny):
    """POST /score and /rank are answered by the middleware, not FastAPI's routes: the answers and statuses
    the routes gave, an unexpected failure a JSON 500 (counted), other methods still the app's (405)."""
    rows = json_rows(candidates(3, seed=34), FEATURES)
    app = create_app(tiny[3])

    def broken(table):
        raise RuntimeError("the forward pass broke")

    with TestClient(app, raise_server_exceptions=False) as client:
        fast = client.post("/score", json={"rows": rows})
        assert fast.status_code == 200 and fast.headers["content-type"] == "application/json"
        assert int(fast.headers["content-length"]) == len(fast.content)
        assert client.get("/score").status_code == 405  # not a POST: FastAPI's answer
        bad = client.post("/score", json={"rows": [{**rows[0], "nope": 1}]})
        assert bad.status_code == 422 and "nope" in bad.json()["error"]
        app.state.model.current.forward = broken
        failed = client.post("/rank", json={"candidates": [{**r, "item": i} for i, r in enumerate(rows)]})
        text = client.get("/metrics").text
    assert failed.status_code == 500
    assert failed.json() == {"error": "Internal error: RuntimeError: the forward pass broke"}
    assert metric(text, "plerec_requests_total", path="/rank", status=500) == 1
    assert metric(text, "plerec_request_errors_total", path="/score", status=422) == 1
