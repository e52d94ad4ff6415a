"""`plerec export`: ONNX (run with onnxruntime) and TorchScript give the eager model's outputs; the sidecar alone
is enough to encode raw rows; every registry model exports; errors name the problem."""

import dataclasses
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_ship import candidates, train_tiny

from plerec.cli import main
from plerec.export import TaskOutputs, export_model, load_sidecar
from plerec.models import MODELS, build_model
from plerec.models.funnel import FUNNEL_MODELS
from plerec.train import load_checkpoint, predict

TOLERANCE = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    checkpoint, _ = train_tiny(root)
    return checkpoint


def eager_outputs(model, encoder, frame) -> np.ndarray:
    """(N, T): probabilities of binary tasks, values of regression tasks, from the eager model."""
    logits = predict(model, encoder.transform(frame, labels=False))
    return torch.stack([torch.sigmoid(logits[:, 0]), logits[:, 1]], dim=1).numpy()  # click binary, watch regression


def run_exported(fmt: str, path, sparse: np.ndarray, dense: np.ndarray, names: list[str]) -> np.ndarray:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["sparse", "dense"]
        assert [o.name for o in session.get_outputs()] == names
        outputs = session.run(names, {"sparse": sparse.astype(np.int64), "dense": dense.astype(np.float32)})
    else:
        module = torch.jit.load(str(path))
        result = module(torch.from_numpy(sparse.astype(np.int64)), torch.from_numpy(dense.astype(np.float32)))
        assert list(result) == names
        outputs = [result[name].numpy() for name in names]
    return np.stack(outputs, axis=1)  # (N, T)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_gives_the_eager_outputs_at_any_batch_size(trained, tmp_path, fmt):
    model, encoder, exp = load_checkpoint(trained)
    path, sidecar = export_model(model, encoder, exp, fmt, tmp_path / f"model.{fmt}")
    assert sidecar.name == f"model.{fmt}.json" and load_sidecar(sidecar)["runtime"] == fmt
    rows = candidates(41, seed=5)
    expected = eager_outputs(model, encoder, rows)
    assert not np.allclose(expected[:, 0], expected[0, 0])  # the rows really differ
    table = encoder.transform(rows, labels=False)
    for batch in (1, 2, 41):  # dynamic batch size, including 1
        got = run_exported(fmt, path, table.sparse[:batch].numpy(), table.dense[:batch].numpy(), ["click", "watch"])
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected[:batch], atol=TOLERANCE, rtol=0)


def encode_from_sidecar(sidecar: dict, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The sidecar's encoding rules, written out with plain Python: what another runtime would do."""
    sparse = np.zeros((len(rows), len(sidecar["categorical"])), dtype=np.int64)
    dense_columns = sidecar["inputs"][1]["columns"]
    dense = np.zeros((len(rows), len(dense_columns)), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, spec in enumerate(sidecar["categorical"]):
            value = row[spec["column"]]
            sparse[i, j] = spec["vocabulary"].index(value) + 1 if value in spec["vocabulary"] else 0
        for spec in sidecar["numeric"]:
            value = row[spec["column"]]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            dense[i, dense_columns.index(spec["column"])] = 0.0 if missing else (value - spec["mean"]) / spec["std"]
            if spec["indicator"]:
                dense[i, dense_columns.index(spec["indicator"])] = float(missing)
    return sparse, dense


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_sidecar_alone_turns_raw_rows_into_the_models_inputs(trained, tmp_path, fmt):
    model, encoder, exp = load_checkpoint(trained)
    path, sidecar_path = export_model(model, encoder, exp, fmt, tmp_path / f"m.{fmt}")
    sidecar = json.loads(sidecar_path.read_text())
    assert [o["name"] for o in sidecar["outputs"]] == ["click", "watch"]
    assert [o["value"] for o in sidecar["outputs"]] == ["probability", "value"]
    assert [o["rank_weight"] for o in sidecar["outputs"]] == [2.0, 0.0]
    assert sidecar["rank"]["length_transform"] == "log"
    assert any(spec["indicator"] == "a__missing" for spec in sidecar["numeric"])  # training had missing `a`
    frame = candidates(9, seed=8)  # an unseen category, a missing category, a missing number
    rows = [
        {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()}
        for r in frame.astype(object).to_dict(orient="records")
    ]
    rows = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]
    sparse, dense = encode_from_sidecar(sidecar, rows)
    table = encoder.transform(frame, labels=False)
    np.testing.assert_array_equal(sparse, table.sparse.numpy())
    np.testing.assert_allclose(dense, table.dense.numpy(), atol=1e-6)
    got = run_exported(fmt, path, sparse, dense, ["click", "watch"])
    np.testing.assert_allclose(got, eager_outputs(model, encoder, frame), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_to_torchscript_with_a_sparse_embedding(trained, tmp_path, name):
    _, encoder, exp = load_checkpoint(trained)
    torch.manual_seed(0)
    model = build_model(
        name, {"embedding_dim": 3, "tower_dims": (4,)}, encoder.vocab_sizes, len(encoder.dense_names), 2
    )
    model.input.embedding.sparse = True  # as training leaves it
    model.eval()
    kinds = ["binary", "regression"]
    if name in FUNNEL_MODELS:  # a funnel's steps are binary: the watch task as a second binary step
        exp = dataclasses.replace(exp, tasks=(exp.tasks[0], dataclasses.replace(exp.tasks[1], kind="binary")))
        kinds = ["binary", "binary"]
    exp = exp.with_model(name, {"embedding_dim": 3, "tower_dims": (4,)})
    path, _ = export_model(model, encoder, exp, "torchscript", tmp_path / "m.pt")
    assert model.input.embedding.sparse  # the model itself is left as it was
    generator = torch.Generator().manual_seed(1)
    sparse = torch.randint(0, 3, (6, len(encoder.categorical)), generator=generator)
    dense = torch.randn(6, len(encoder.dense_names), generator=generator)
    expected = torch.stack(TaskOutputs(model, ["click", "watch"], kinds)(sparse, dense), 1)
    logits = model(sparse, dense).detach()
    np.testing.assert_allclose(expected[:, 0].numpy(), torch.sigmoid(logits[:, 0]).numpy(), atol=1e-7)
    got = run_exported("torchscript", path, sparse.numpy(), dense.numpy(), ["click", "watch"])
    np.testing.assert_allclose(got, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_onnx_export_of_mmoe_with_a_sparse_embedding(trained, tmp_path):
    _, encoder, exp = load_checkpoint(trained)
    torch.manual_seed(0)
    model = build_model("mmoe", {"num_experts": 3}, encoder.vocab_sizes, len(encoder.dense_names), 2).eval()
    model.input.embedding.sparse = True
    path, _ = export_model(model, encoder, exp.with_model("mmoe", {"num_experts": 3}), "onnx", tmp_path / "m.onnx")
    sparse = torch.randint(0, 3, (5, len(encoder.categorical)))
    dense = torch.randn(5, len(encoder.dense_names))
    logits = model(sparse, dense).detach()
    expected = torch.stack([torch.sigmoid(logits[:, 0]), logits[:, 1]], 1).numpy()
    np.testing.assert_allclose(
        run_exported("onnx", path, sparse.numpy(), dense.numpy(), ["click", "watch"]), expected, atol=TOLERANCE, rtol=0
    )


def test_cli_export_writes_the_model_and_its_sidecar(trained, tmp_path, capsys):
    out = tmp_path / "deep" / "model.pt"
    assert main(["export", str(trained), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "deep" / "model.pt.json").is_file()
    assert "click (probability), watch (value)" in capsys.readouterr().out


def test_cli_export_errors(trained, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "m")]) == 2
    assert "Checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(trained), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_task_named_like_an_input_is_refused(trained, tmp_path):
    model, encoder, exp = load_checkpoint(trained)
    from dataclasses import replace

    renamed = replace(exp, tasks=(replace(exp.tasks[0], name="dense"), exp.tasks[1]))
    with pytest.raises(ValueError, match=r"Task names \['dense'\] clash with the exported inputs"):
        export_model(model, encoder, renamed, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="Expected the export format to be one of"):
        export_model(model, encoder, exp, "tflite", tmp_path / "m.tfl")
