"""List fields ([features.lists]) out of the training code: ONNX and TorchScript exports take `lists` and
`lengths` and give the eager model's outputs for every pooling, ragged and empty lists included; the
sidecar alone builds those inputs; `plerec rank` scores CSV and Parquet candidates with list columns; and
`plerec serve` takes JSON arrays, encoding them exactly as `Encoder.transform` does (the same ids from a CSV
file, a Parquet file, a streamed file and a request), and answers a bad element with a 422 naming the row,
the field and the element."""

import json
import math

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from starlette.testclient import TestClient

from plerec.cli import main
from plerec.config import Experiment, experiment_from_dict, load_experiment
from plerec.data.encode import Encoder, encode_file
from plerec.data.table import read_table
from plerec.export import export_model, input_names, sidecar_dict
from plerec.models import build_model
from plerec.rank import Scorer
from plerec.serve import RowReader, create_app
from plerec.train import fit, predict

TOLERANCE = 1e-5  # as tests/test_export.py
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:starlette"),
]

# hist: integer item ids sharing item's vocabulary; tags: text with a vocabulary of its own; clicks: integer
# ids sharing the hashed `shop` field; cats: integers with a vocabulary of their own.
LISTS = {
    "hist": {"share": "item", "max_length": 3, "pooling": "attention", "target": "item"},
    "tags": {"max_length": 2, "pooling": "mean"},
    "clicks": {"share": "shop", "max_length": 2, "pooling": "sum"},
    "cats": {"max_length": 2, "pooling": "max"},
}
FEATURES = ["item", "shop", "a", *LISTS]


def rows_frame(rows: int, seed: int) -> pd.DataFrame:
    """Features with lists of 0 to 5 elements (so longer than some max_length, and empty), and labels."""
    rng = np.random.default_rng(seed)

    def lists(draw):
        return [draw(int(rng.integers(0, 6))) for _ in range(rows)]

    out = pd.DataFrame(
        {
            "user": rng.choice(["u1", "u2"], rows),
            "item": rng.integers(1, 12, rows),
            "shop": rng.integers(1, 50, rows),
            "a": rng.normal(size=rows),
            "hist": lists(lambda k: [int(v) for v in rng.integers(1, 12, k)]),
            "tags": lists(lambda k: [str(v) for v in rng.choice(["red", "green", "blue", "x y"], k)]),
            "clicks": lists(lambda k: [int(v) for v in rng.integers(1, 50, k)]),
            "cats": lists(lambda k: [int(v) for v in rng.integers(100, 105, k)]),
        }
    )
    out["click"] = (out["a"] + 0.3 * out["hist"].map(len) + rng.normal(size=rows) > 1).astype(int)
    out["watch"] = 1 + out["a"] ** 2
    return out


def experiment(lists: dict = LISTS, tasks=("click", "watch"), widths: dict | None = None) -> Experiment:
    return experiment_from_dict(
        {
            "data": {"path": "train.csv"},
            "features": {
                "categorical": ["item", "shop"],
                "numeric": ["a"],
                "hash_buckets": {"shop": 16},
                "lists": lists,
                "embedding_dims": widths or {},
            },
            "tasks": [
                {"name": tasks[0], "kind": "binary", "label": "click"},
                {"name": tasks[1], "kind": "regression", "label": "watch"},
            ],
            "model": {"name": "ple", "embedding_dim": 4, "expert_dims": [8], "tower_dims": [4]},
        }
    )


def random_model(encoder: Encoder, exp) -> torch.nn.Module:
    """An untrained model whose outputs vary from row to row well beyond the tolerance."""
    torch.manual_seed(0)
    model = build_model("ple", exp.model, num_tasks=2, **encoder.model_inputs())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model.eval()


def ragged(rows: int = 9) -> pd.DataFrame:
    """Rows to score whose lists are empty, missing, one element, exactly max_length and longer."""
    frame = rows_frame(max(rows, 4), seed=4)
    frame.at[0, "hist"], frame.at[1, "hist"], frame.at[2, "hist"] = [], None, [3, 4, 5, 6, 7]
    frame.at[0, "tags"], frame.at[1, "tags"] = None, ["red"]
    frame.at[0, "clicks"], frame.at[3, "cats"] = [], []
    return frame.head(rows)


def eager(model, encoder, frame) -> np.ndarray:
    logits = predict(model, encoder.transform(frame, labels=False))
    return torch.stack([torch.sigmoid(logits[:, 0]), logits[:, 1]], dim=1).numpy()  # (N, 2)


def run_exported(fmt: str, path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [
            ("sparse", "tensor(int64)"),
            ("dense", "tensor(float)"),
            ("lists", "tensor(int64)"),
            ("lengths", "tensor(int64)"),
        ]
        return np.stack(session.run(["click", "watch"], inputs), axis=1)
    module = torch.jit.load(str(path))
    result = module(*(torch.from_numpy(inputs[name]) for name in ("sparse", "dense", "lists", "lengths")))
    return np.stack([result["click"].numpy(), result["watch"].numpy()], axis=1)


def model_inputs(encoder: Encoder, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    batch = encoder.transform(frame, labels=False).batch(slice(None))
    sparse, dense, lists, lengths = batch.inputs
    return {"sparse": sparse.long().numpy(), "dense": dense.numpy(), "lists": lists.long().numpy(),
            "lengths": lengths.long().numpy()}  # fmt: skip


@pytest.fixture(scope="module")
def fitted():
    exp = experiment()
    encoder = Encoder.fit(exp, rows_frame(200, seed=0))
    return encoder, exp, random_model(encoder, exp)


def check_parity(fmt: str, path, model, encoder, frame) -> None:
    expected = eager(model, encoder, frame)
    inputs = model_inputs(encoder, frame)
    assert (inputs["lengths"] == 0).any() and (inputs["lengths"] > 0).any()
    no_lists = {**inputs, "lengths": np.zeros_like(inputs["lengths"])}
    assert np.abs(run_exported(fmt, path, no_lists) - expected).max() > 100 * TOLERANCE  # the lists matter
    for batch in (1, 2, len(frame)):  # dynamic batch size, including 1
        got = run_exported(fmt, path, {k: v[:batch] for k, v in inputs.items()})
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected[:batch], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_with_every_pooling_gives_the_eager_outputs(fitted, tmp_path, fmt):
    encoder, exp, model = fitted
    assert {s.pooling for s in encoder.list_specs} == {"mean", "sum", "max", "attention"}
    path, _ = export_model(model, encoder, exp, fmt, tmp_path / f"m.{fmt}")
    check_parity(fmt, path, model, encoder, ragged())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_with_embedding_widths_per_field_gives_the_eager_outputs(tmp_path, fmt):
    exp = experiment(widths={"item": 6, "tags": 3, "cats": 2})
    encoder = Encoder.fit(exp, rows_frame(200, seed=0))
    model = random_model(encoder, exp)
    assert sorted(t.embedding_dim for t in model.input.embedding_tables()) == [2, 3, 4, 6]
    path, _ = export_model(model, encoder, exp, fmt, tmp_path / f"m.{fmt}")
    check_parity(fmt, path, model, encoder, ragged())


@pytest.mark.parametrize("pooling", ["mean", "sum", "max", "attention"])
def test_torchscript_export_of_each_pooling_alone(tmp_path, pooling):
    spec = {"share": "item", "max_length": 3, "pooling": pooling} | (
        {"target": "item"} if pooling == "attention" else {}
    )
    exp = experiment({"hist": spec})
    encoder = Encoder.fit(exp, rows_frame(120, seed=0).drop(columns=["tags", "clicks", "cats"]))
    model = random_model(encoder, exp)
    path, _ = export_model(model, encoder, exp, "torchscript", tmp_path / "m.pt")
    check_parity("torchscript", path, model, encoder, ragged())


def test_the_sidecar_describes_and_alone_builds_the_list_inputs(fitted, tmp_path):
    encoder, exp, _ = fitted
    sidecar = json.loads(json.dumps(sidecar_dict(encoder, exp, "onnx", "m.onnx")))  # as a runtime reads it
    assert [i["name"] for i in sidecar["inputs"]] == ["sparse", "dense", "lists", "lengths"]
    lists_input, lengths_input = sidecar["inputs"][2:]
    assert lists_input["shape"] == ["batch", 9] and lists_input["dtype"] == "int64"
    assert lists_input["fields"] == [
        {"column": "hist", "start": 0, "max_length": 3},
        {"column": "tags", "start": 3, "max_length": 2},
        {"column": "clicks", "start": 5, "max_length": 2},
        {"column": "cats", "start": 7, "max_length": 2},
    ]
    assert lengths_input == {"name": "lengths", "dtype": "int64", "shape": ["batch", 4], "columns": list(LISTS)}
    described = {f["column"]: f for f in sidecar["lists"]}
    assert [described[c]["pooling"] for c in LISTS] == ["attention", "mean", "sum", "max"]
    assert described["hist"]["share"] == "item" and described["hist"]["vocabulary"] is None
    assert described["hist"]["target"] == "item" and described["tags"]["target"] is None
    assert described["tags"]["share"] is None and sorted(described["tags"]["vocabulary"]) == sorted(
        ["red", "green", "blue", "x y"]
    )
    assert [described[c]["elements"] for c in LISTS] == ["integer", "text", "integer", "integer"]

    # What another runtime would do with the sidecar (the hashed `clicks` aside: its ids need the hash).
    frame = ragged()
    vocabularies = {c["column"]: c["vocabulary"] for c in sidecar["categorical"]}
    lists = np.zeros((len(frame), 9), dtype=np.int64)
    lengths = np.zeros((len(frame), 4), dtype=np.int64)
    for f, field in enumerate(sidecar["lists"]):
        if field["column"] == "clicks":
            continue
        vocabulary = field["vocabulary"] or vocabularies[field["share"]]
        for i, values in enumerate(frame[field["column"]]):
            kept = list(values or [])[-field["max_length"] :]  # the most recent elements
            ids = [vocabulary.index(v) + 1 if v in vocabulary else 0 for v in kept]
            lists[i, field["start"] : field["start"] + len(ids)] = ids
            lengths[i, f] = len(ids)
    table = encoder.transform(frame, labels=False)
    keep = [j for j in range(9) if not 5 <= j < 7]
    np.testing.assert_array_equal(lists[:, keep], table.lists.long().numpy()[:, keep])
    np.testing.assert_array_equal(lengths[:, [0, 1, 3]], table.lengths.long().numpy()[:, [0, 1, 3]])
    assert lengths[2, 0] == 3 and lists[2, :3].tolist() == [vocabularies["item"].index(v) + 1 for v in (5, 6, 7)]


def test_a_model_without_lists_keeps_two_inputs_and_names_are_checked(fitted, tmp_path):
    encoder, exp, model = fitted
    assert input_names(encoder) == ("sparse", "dense", "lists", "lengths")
    plain = experiment({})
    plain_encoder = Encoder.fit(plain, rows_frame(50, seed=0).drop(columns=list(LISTS)))
    assert input_names(plain_encoder) == ("sparse", "dense")
    sidecar = sidecar_dict(plain_encoder, plain, "onnx", "m.onnx")
    assert [i["name"] for i in sidecar["inputs"]] == ["sparse", "dense"] and "lists" not in sidecar
    with pytest.raises(ValueError, match=r"Task names \['lengths'\] clash with the exported inputs"):
        export_model(model, encoder, experiment(tasks=("click", "lengths")), "torchscript", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


# --- a trained model: rank and serve ---------------------------------------------------------------------

EXPERIMENT = """\
seed = 1

[data]
train = "train.csv"
valid = "valid.csv"

[features]
categorical = ["item", "shop"]
numeric = ["a"]
hash_buckets = { shop = 16 }

[features.lists.hist]
share = "item"
max_length = 3
pooling = "attention"
target = "item"

[features.lists.tags]
max_length = 2

[features.lists.clicks]
share = "shop"
max_length = 2
pooling = "sum"

[features.lists.cats]
max_length = 2
pooling = "max"

[[tasks]]
name = "click"
kind = "binary"
label = "click"

[[tasks]]
name = "watch"
kind = "regression"
label = "watch"
rank_weight = 0.0

[model]
name = "ple"
embedding_dim = 4
expert_dims = [8]
tower_dims = [4]

[train]
epochs = 1
batch_size = 32
progress = false

[rank]
group = "user"
item = "item"
"""


def as_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """List columns as CSV cells: elements joined by "|", an empty cell for a missing or empty list."""
    out = frame.copy()
    for column in LISTS:
        out[column] = out[column].map(lambda v: "|".join(map(str, v)) if v is not None else "")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    as_csv(rows_frame(240, seed=0)).to_csv(root / "train.csv", index=False)
    as_csv(rows_frame(60, seed=1)).to_csv(root / "valid.csv", index=False)
    (root / "exp.toml").write_text(EXPERIMENT)
    exp = load_experiment(root / "exp.toml")
    fit(exp, out_dir=root / "run")
    return root, Scorer.from_checkpoint(root / "run" / "best.pt", exp)


def test_rank_scores_csv_and_parquet_candidates_with_list_columns(trained, capsys):
    root, scorer = trained
    frame = ragged(12).drop(columns=["click", "watch"])
    as_csv(frame).to_csv(root / "cands.csv", index=False)
    frame.to_parquet(root / "cands.parquet", index=False)
    outputs = {}
    for suffix in ("csv", "parquet"):
        args = ["rank", str(root / "exp.toml"), "--checkpoint", str(root / "run" / "best.pt")]
        args += ["--input", str(root / f"cands.{suffix}"), "--out", str(root / f"ranked_{suffix}.csv")]
        assert main(args) == 0, capsys.readouterr().err
        outputs[suffix] = pd.read_csv(root / f"ranked_{suffix}.csv")
    pd.testing.assert_frame_equal(outputs["csv"], outputs["parquet"])
    expected = scorer.rank_table(frame)  # the same rows in memory, lists as Python lists
    np.testing.assert_allclose(outputs["csv"]["click"], expected["click"], rtol=1e-6)
    assert outputs["csv"]["item"].tolist() == expected["item"].tolist()
    # The lists reach the model: dropping them changes the scores.
    other = frame.assign(hist=[[1]] * len(frame), tags=[["red"]] * len(frame), clicks=[[1]] * len(frame))
    assert not np.allclose(scorer.score(other)["click"], scorer.score(frame)["click"], rtol=0, atol=1e-6)


def json_rows(frame: pd.DataFrame) -> list[dict]:
    """Rows as a client sends them: plain JSON values, arrays for lists, null for a missing list."""
    rows = []
    for record in frame[FEATURES].astype(object).to_dict(orient="records"):
        rows.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()})
    return rows


def test_serve_csv_parquet_and_streamed_files_give_the_same_ids(trained, tmp_path):
    """The issue's check: a list column read from CSV, from Parquet, streamed, and sent to serve gives the
    same ids."""
    _, scorer = trained
    encoder = scorer.encoder
    frame = ragged(20)  # with labels: a streamed file is encoded for training
    frame.at[4, "hist"] = [3, 999, 4]  # an id never seen in training
    frame.at[4, "tags"] = [" red ", "never-seen"]  # trimmed as a file's cell is; unseen
    frame.at[5, "cats"] = [101, 999, 104, 100, 102]  # longer than max_length: the last 2 kept
    rows = json_rows(frame)
    assert rows[1]["hist"] is None and rows[0]["hist"] == []
    reader = RowReader(scorer, max_rows=100)
    reader.check(rows, "rows")
    served = reader.encode(rows, "rows")
    in_memory = encoder.transform(frame.drop(columns=["click", "watch"]), labels=False)
    as_csv(frame).to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet", index=False)
    tables = {
        "in memory": in_memory,
        "csv": encoder.transform(read_table(tmp_path / "c.csv"), labels=False),
        "parquet": encoder.transform(read_table(tmp_path / "c.parquet"), labels=False),
        "streamed csv": encode_file(str(tmp_path / "c.csv"), encoder, chunk_rows=7),
        "streamed parquet": encode_file(str(tmp_path / "c.parquet"), encoder, chunk_rows=7),
    }
    for name, table in tables.items():
        assert torch.equal(served.sparse, table.ids().long()), name  # `shop` hashed: serve hashes as the encoder
        assert torch.equal(served.lists, table.lists), name
        assert torch.equal(served.lengths, table.lengths), name
    assert served.lists.dtype == in_memory.lists.dtype and served.lengths.dtype == torch.int16
    lists, lengths = served.lists.long(), served.lengths.long()
    assert lengths[0, 0] == 0 and lengths[1, 0] == 0 and lengths[2, 0] == 3
    assert lists[4, 1] == 0 and lists[4, 0] > 0 and lists[4, 2] > 0  # 999 unseen: id 0, between real ids
    assert lists[4, 3] == lists[1, 3] and lists[4, 4] == 0  # " red " is "red"; "never-seen" gets 0
    cats = [str(v) for v in encoder.vocabs["cats"]]  # trained from CSV cells: "100" or 100 alike
    assert lists[5, 7:9].tolist() == [cats.index("100") + 1, cats.index("102") + 1]
    assert lists[:, 5:7].max() > 0  # `clicks` shares the hashed `shop`: buckets, as in the files


@pytest.fixture(scope="module")
def client(trained):
    with TestClient(create_app(trained[1]), raise_server_exceptions=False) as test_client:
        yield test_client


def test_score_and_rank_take_json_arrays(trained, client):
    _, scorer = trained
    frame = ragged(8).drop(columns=["click", "watch"])
    rows = json_rows(frame)
    rows[3]["hist"] = [float(v) for v in rows[3]["hist"]]  # 7.0 is the integer 7, as in a file
    response = client.post("/score", json={"rows": rows})
    assert response.status_code == 200, response.json()
    expected = scorer.score(frame)
    got = [p["click"] for p in response.json()["predictions"]]
    np.testing.assert_allclose(got, expected["click"], rtol=1e-6)
    health = client.get("/health").json()["features"]["lists"]
    assert health["hist"] == {"elements": "integer", "max_length": 3, "pooling": "attention", "share": "item"}
    assert health["tags"]["elements"] == "text"

    user = {"user": "u1", "hist": [1, 2, 3, 4], "tags": ["red"], "clicks": None, "cats": [100]}
    candidates = [{"item": i, "shop": 3, "a": 0.1 * i} for i in range(1, 6)]
    response = client.post("/rank", json={"user": user, "candidates": candidates})
    assert response.status_code == 200, response.json()
    items = response.json()["items"]
    table = pd.DataFrame([{**user, **c} for c in candidates])
    expected = scorer.score(table)
    by_index = {item["index"]: item["click"] for item in items}
    np.testing.assert_allclose([by_index[i] for i in range(5)], expected["click"], rtol=1e-6)
    other = client.post("/rank", json={"user": {**user, "hist": []}, "candidates": candidates}).json()["items"]
    other_by_index = {item["index"]: item["click"] for item in other}
    assert not np.allclose([other_by_index[i] for i in range(5)], expected["click"], rtol=1e-6)  # the list counts


@pytest.mark.parametrize(
    ("field", "value", "start", "end"),
    [
        ("hist", [1, [2]], "rows[1]: expected `hist` element 1 to be an integer", "but got a nested array [2]"),
        ("hist", [1, True], "rows[1]: expected `hist` element 1 to be an integer", "but got boolean True"),
        ("hist", [1, 2, 1.5], "rows[1]: expected `hist` element 2 to be an integer", "but got number 1.5"),
        ("hist", ["7"], "rows[1]: expected `hist` element 0 to be an integer", "but got string '7'"),
        ("hist", [5, 2**63], "rows[1]: expected `hist` element 1 to be an integer within int64", "9223372036854775808"),
        ("hist", [float("nan")], "rows[1]: expected `hist` element 0 to be an integer", "but got number nan"),
        ("hist", [1e300], "rows[1]: expected `hist` element 0 to be an integer", "but got number 1e+300"),
        ("hist", [None], "rows[1]: expected `hist` element 0 to be an integer", "but got null"),
        ("hist", "1|2", "rows[1]: expected `hist` to be an array of integers", "or null, but got string '1|2'"),
        ("hist", 3, "rows[1]: expected `hist` to be an array of integers", "but got number 3"),
        ("hist", {"a": 1}, "rows[1]: expected `hist` to be an array of integers", "but got object {'a': 1}"),
        ("tags", ["red", 3], "rows[1]: expected `tags` element 1 to be a string", "but got number 3"),
        ("tags", ["red", " "], "rows[1]: expected `tags` element 1 to be an id", "but got blank text ' '"),
        ("tags", ["\ud800"], "rows[1]: expected `tags` element 0 to be valid Unicode text", "(a lone surrogate)"),
        ("tags", [{"k": "v"}], "rows[1]: expected `tags` element 0 to be a string", "a nested object {'k': 'v'}"),
    ],
)
def test_a_bad_list_gets_a_422_naming_row_field_and_element(client, field, value, start, end):
    rows = json_rows(ragged(2).drop(columns=["click", "watch"]))
    rows[1][field] = value
    body = json.dumps({"rows": rows}).encode()  # NaN and lone surrogates as Python's json writes them
    response = client.post("/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.startswith(start) and error.endswith(end), error


def test_a_bad_list_in_the_rank_user_names_the_user(client):
    candidates = [{"item": 1, "shop": 3, "a": 0.1}]
    user = {"user": "u1", "hist": [1, "2"], "tags": [], "clicks": [], "cats": []}
    response = client.post("/rank", json={"user": user, "candidates": candidates})
    assert response.status_code == 422
    assert response.json()["error"].startswith("user: expected `hist` element 1 to be an integer")
    response = client.post("/rank", json={"user": {**user, "hist": [1]}, "candidates": [{**candidates[0], "tags": []}]})
    assert response.status_code == 422 and "repeats ['tags']" in response.json()["error"]


def test_random_list_values_never_get_a_5xx(client):
    """A small fuzz: any JSON a client may put in a list field gets a 200 with finite predictions or a 422."""
    rng = np.random.default_rng(7)
    atoms = [0, 1, -1, 7, 2**63, -(2**63), 3.0, 2.5, float("inf"), float("nan"), True, None, "", " ", "red", "7",
             "\ud800", [], [1], {}, 1e300]  # fmt: skip
    base = json_rows(ragged(1).drop(columns=["click", "watch"]))[0]
    statuses = set()
    for _ in range(150):
        row = dict(base)
        for field in LISTS:
            if rng.random() < 0.5:
                k = int(rng.integers(0, 6))
                row[field] = [atoms[j] for j in rng.integers(0, len(atoms), k)] if rng.random() < 0.9 else atoms[0]
        body = json.dumps({"rows": [row]}).encode()
        response = client.post("/score", content=body, headers={"content-type": "application/json"})
        statuses.add(response.status_code)
        assert response.status_code in (200, 422), response.json()
        if response.status_code == 200:
            assert all(math.isfinite(v) for v in response.json()["predictions"][0].values())
    assert statuses == {200, 422}


def test_columnar_requests_with_lists_give_the_row_forms_answers(client):
    """Issue 19: list fields as columns of arrays (and in the /rank user, given once) encode as the rows do."""
    rows = json_rows(ragged(8).drop(columns=["click", "watch"]))
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    by_rows = client.post("/score", json={"rows": rows}).json()
    by_columns = client.post("/score", json={"columns": columns}).json()
    for name in ("click", "watch", "score", "log_score"):
        assert by_columns["columns"][name] == [p[name] for p in by_rows["predictions"]], name
    user = {"user": "u1", "hist": [1, 2, 3, 4], "tags": ["red"], "clicks": None, "cats": [100]}
    candidates = [{"item": i, "shop": 3, "a": 0.1 * i} for i in range(1, 6)]
    as_rows = client.post("/rank", json={"user": user, "candidates": candidates}).json()
    cand_columns = {key: [c[key] for c in candidates] for key in candidates[0]}
    as_columns = client.post("/rank", json={"user": user, "columns": cand_columns}).json()
    assert as_columns == as_rows and len(as_rows["items"]) == 5
    bad = client.post("/score", json={"columns": {**columns, "hist": [[1], [2, "x"], *columns["hist"][2:]]}})
    assert bad.status_code == 422
    assert "`columns` row 1: expected `hist` element 1 to be an integer" in bad.json()["error"]
