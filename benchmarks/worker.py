"""One measurement in its own process: train one epoch, time inference on the test split, report AUC and RSS.

Run by run.py as `python worker.py SPEC.json RESULT.json`. SPEC names the library (`plerec`,
`torch-rechub`, `deepctr-torch`, or a peer's model fed by plerec's batching:
`torch-rechub+plerec-batching`, `deepctr-torch+plerec-batching`, or plerec's own model in that same loop with
dense gradients: `plerec+plain-loop`), the model (`ple` or `mmoe`), the batch
size, the data folder, which training file to read and the number of threads.

Every library trains through its own recommended call, with the small validation file as its
validation data: plerec `fit`, torch-rechub `MTLTrainer.fit`, DeepCTR-Torch `model.fit(validation_data=...)`
(for the plerec-batching variants: plerec's batch source and a loop written here). What is timed is
the training only, as plerec's `FitResult.train_seconds` defines it (the epoch's steps, without the
validation pass, checkpointing or final evaluation): for torch-rechub the time of
`MTLTrainer.train_one_epoch` inside `fit`; for DeepCTR-Torch the time of `fit` less the time of the
`evaluate` call it makes for the validation data. Reading the Parquet files and turning them into the
arrays each library takes is not timed. Inference is timed separately over the whole test split at
the same batch size, with each library's own predict call.

The sequence case (a data set written by `datagen.py --history`, whose meta.json has `lists`): every
library also gets the list field `hist_item_ids`, mean-pooled over the embedding table of the item field
it holds ids of (`c01`): plerec `[features.lists.hist_item_ids]` with `share`, torch-rechub
`SequenceFeature(pooling="mean", shared_with=...)`, DeepCTR-Torch `VarLenSparseFeat(SparseFeat(...,
embedding_name=...), combiner="mean", length_name=...)`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, beside this file (the variants' names)
from report import PLEREC, PLEREC_VARIANTS  # noqa: E402

ARCH = {
    "embedding_dim": 16,
    "expert_dims": [256, 128],
    "tower_dims": [64],
    "ple": {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 1},
    "mmoe": {"num_experts": 3},
    "lr": 1e-3,
}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    load_start = os.getloadavg()  # other processes on the machine skew every number: keep a trace
    threads = spec["threads"]
    torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])
    data_dir = Path(spec["data"])
    meta = json.loads((data_dir / "meta.json").read_text())
    runner = {
        **dict.fromkeys(PLEREC_VARIANTS, run_plerec),
        "torch-rechub": run_rechub,
        "deepctr-torch": run_deepctr,
        "torch-rechub+plerec-batching": run_peer_on_plerec_batching,
        "deepctr-torch+plerec-batching": run_peer_on_plerec_batching,
        "plerec+plain-loop": run_plerec_plain_loop,
    }[spec["library"]]
    out = runner(spec, meta, data_dir)
    # The library's peak, before the harness imports scikit-learn to score the predictions.
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    from sklearn.metrics import roc_auc_score

    labels = out.pop("test_labels")
    probs = out.pop("test_scores")
    out["auc"] = {t: float(roc_auc_score(labels[:, k], probs[:, k])) for k, t in enumerate(meta["tasks"])}
    out["train_samples_per_s"] = out["train_rows"] / out["train_seconds"]
    out["infer_samples_per_s"] = out["infer_rows"] / out["infer_seconds"]
    out["torch_threads"] = torch.get_num_threads()
    out["load_average_start_end"] = [load_start[0], os.getloadavg()[0]]
    if "plerec" in sys.modules:
        out["plerec_imported_from"] = str(Path(sys.modules["plerec"].__file__).parent)
    Path(result_path).write_text(json.dumps({**spec, **out}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# plerec through its public API, reading the Parquet files itself


def plerec_experiment(spec: dict, meta: dict, data_dir: Path) -> dict:
    model = {"name": spec["model"], "embedding_dim": ARCH["embedding_dim"], "tower_dims": ARCH["tower_dims"]}
    model.update(expert_dims=ARCH["expert_dims"], **ARCH[spec["model"]])
    # the plain-loop and plerec-batching runs encode the data as the default plerec does
    variant = PLEREC_VARIANTS.get(spec["library"], PLEREC_VARIANTS[PLEREC])
    if variant.batch_norm:
        model["batch_norm"] = list(variant.batch_norm)
    return {
        "seed": spec["seed"],
        "data": {
            "train": str(data_dir / spec["train_file"]),
            "valid": str(data_dir / "valid.parquet"),
            "test": str(data_dir / "test.parquet"),
        },
        "features": {
            "categorical": meta["categorical"],
            "numeric": meta["numeric"],
            "lists": {
                name: {"share": h["field"], "pooling": "mean", "max_length": h["max_length"]}
                for name, h in meta.get("lists", {}).items()
            },
        },
        "tasks": [{"name": t, "kind": "binary", "label": t} for t in meta["tasks"]],
        "model": model,
        "train": {
            "lr": ARCH["lr"],
            "batch_size": spec["batch_size"],
            "epochs": 1,
            "threads": spec["threads"],
            "progress": False,
            "bf16": variant.bf16,
            **(
                {"compile": True, "compile_cache": spec["compile_cache"]} if variant.compile else {}  # else "auto"
            ),
        },
    }


def plerec_data(spec: dict, meta: dict, data_dir: Path):
    """The experiment and its encoded splits. With `encoder` in the spec (a short run on the head of the
    training file), the vocabularies fitted on the whole training file are reused, so every run of a
    configuration builds a model of the same size."""
    from plerec.config import experiment_from_dict
    from plerec.data.encode import Encoder
    from plerec.train import prepare_data

    exp = experiment_from_dict(plerec_experiment(spec, meta, data_dir))
    encoder = None
    if spec.get("encoder"):
        encoder = Encoder.from_state_dict(json.loads(Path(spec["encoder"]).read_text()))
    return exp, prepare_data(exp, encoder)


def run_plerec(spec: dict, meta: dict, data_dir: Path) -> dict:
    from plerec.config import experiment_to_dict
    from plerec.train import fit, predict

    exp, data = plerec_data(spec, meta, data_dir)
    result = fit(exp, data)
    test = data.splits["test"]
    return {
        **measured(
            len(data.splits["train"]),
            result.train_seconds,
            test.labels.numpy(),
            lambda: predict(result.model, test, spec["batch_size"]),
            lambda logits: torch.sigmoid(logits).numpy(),
        ),
        "plerec_test_auc": {t: m["auc"] for t, m in result.metrics["test"].items()},
        "plerec_compiled": result.compiled,  # whether the body was compiled, its compile seconds and step times
        "vocab_ids": sum(data.encoder.vocab_sizes),
        "plerec_train_config": experiment_to_dict(exp)["train"],
    }


def save_encoder(spec: dict, meta: dict, data_dir: Path, path: Path) -> None:
    """Fit plerec's encoder on the whole training file (what the full run does) and save it."""
    _, data = plerec_data(spec, meta, data_dir)
    path.write_text(json.dumps(data.encoder.state_dict()))


# ---------------------------------------------------------------------------------------------
# Peers: arrays as their own examples prepare them (ids as given, numeric features standardised)


def read_columns(path: Path, meta: dict, pad: int = 0) -> dict[str, np.ndarray]:
    """Every column as a numpy array; a list column as padded ids (N, max_length) (a row's last max_length
    elements first, oldest first, then `pad`) and its lengths (N,) under NAME_length."""
    table = pq.read_table(path)
    lists = meta.get("lists", {})
    out = {name: table.column(name).to_numpy() for name in table.column_names if name not in lists}
    for name, h in lists.items():
        out[name], out[f"{name}_length"] = padded_list(table.column(name).combine_chunks(), h["max_length"], pad)
    return out


def padded_list(array, max_length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = np.asarray(array.values, dtype=np.int64)  # a fresh list array: values start at offsets[0] = 0
    lengths = np.minimum(np.diff(offsets), max_length)
    positions = np.arange(max_length)
    keep = positions < lengths[:, None]  # (N, L)
    ids = np.full((len(lengths), max_length), pad, dtype=np.int64)
    ids[keep] = values[((offsets[1:] - lengths)[:, None] + positions)[keep]]
    return ids, lengths


def peer_arrays(spec: dict, meta: dict, data_dir: Path, pad: int = 0, lengths: bool = False):
    """(x, y) per split. A list field comes as padded ids (padding `pad`) and, with `lengths`, its
    lengths as one more input NAME_length."""
    splits = {
        "train": read_columns(data_dir / spec["train_file"], meta, pad),
        "valid": read_columns(data_dir / "valid.parquet", meta, pad),
        "test": read_columns(data_dir / "test.parquet", meta, pad),
    }
    # Standardise with the statistics of the whole training file (like plerec's encoder); the head
    # of the file gives nearly the same, but the full file keeps short and full runs identical.
    full = None
    if spec["train_file"] != "train.parquet":
        full = pq.read_table(data_dir / "train.parquet", columns=meta["numeric"])
    stats = {}
    for name in meta["numeric"]:
        values = (full.column(name).to_numpy() if full is not None else splits["train"][name]).astype(np.float64)
        stats[name] = (values.mean(), values.std() or 1.0)
    out = {}
    for split, cols in splits.items():
        x = {c: cols[c] for c in meta["categorical"]}
        for name in meta.get("lists", {}):
            x[name] = cols[name]
            if lengths:
                x[f"{name}_length"] = cols[f"{name}_length"]
        x.update({n: ((cols[n] - stats[n][0]) / stats[n][1]).astype(np.float32) for n in meta["numeric"]})
        y = np.stack([cols[t] for t in meta["tasks"]], axis=1).astype(np.float32)
        out[split] = (x, y)
    return out


def rechub_model(name: str, vocab_sizes: dict[str, int], numeric: list[str], lists: dict | None = None):
    """With `lists` (meta.json's), each list field is a SequenceFeature, mean-pooled over the table of the
    field it shares (`shared_with`). torch-rechub masks the padding by a padding id (`padding_idx`, which
    it only uses for the mask): the padding is id V of the shared field, one row more than its ids use, so
    no real id is masked (its ids start at 0)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE

    lists = lists or {}
    padded = {h["field"] for h in lists.values()}
    sizes = {c: v + (c in padded) for c, v in vocab_sizes.items()}
    features = [SparseFeature(c, vocab_size=v, embed_dim=ARCH["embedding_dim"]) for c, v in sizes.items()]
    features += [
        SequenceFeature(
            name,
            vocab_size=sizes[h["field"]],
            embed_dim=ARCH["embedding_dim"],
            pooling="mean",
            shared_with=h["field"],
            padding_idx=vocab_sizes[h["field"]],
        )
        for name, h in lists.items()
    ]
    features += [DenseFeature(n) for n in numeric]
    task_types = ["classification", "classification"]
    towers = [{"dims": ARCH["tower_dims"]} for _ in task_types]
    experts = {"dims": ARCH["expert_dims"]}
    if name == "ple":
        p = ARCH["ple"]
        return PLE(
            features,
            task_types,
            n_level=p["num_levels"],
            n_expert_specific=p["num_task_experts"],
            n_expert_shared=p["num_shared_experts"],
            expert_params=experts,
            tower_params_list=towers,
        )
    return MMOE(
        features, task_types, n_expert=ARCH["mmoe"]["num_experts"], expert_params=experts, tower_params_list=towers
    )


def run_rechub(spec: dict, meta: dict, data_dir: Path) -> dict:
    from torch.utils.data import DataLoader
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    lists = meta.get("lists", {})
    pad = meta["vocab_sizes"][next(iter(lists.values()))["field"]] if lists else 0  # see rechub_model
    arrays = peer_arrays(spec, meta, data_dir, pad=pad)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = arrays["train"], arrays["valid"], arrays["test"]
    model = rechub_model(spec["model"], meta["vocab_sizes"], meta["numeric"], lists)
    bs = spec["batch_size"]
    train_dl, valid_dl, _ = DataGenerator(x_train, y_train).generate_dataloader(
        x_valid, y_valid, x_test, y_test, batch_size=bs
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(
            model,
            task_types=["classification", "classification"],
            optimizer_params={"lr": ARCH["lr"], "weight_decay": 0.0},
            n_epoch=1,
            device="cpu",
            model_path=tmp,
        )
        epochs = timed(trainer, "train_one_epoch")
        trainer.fit(train_dl, valid_dl)
        train_seconds = sum(epochs)
    test_dl = DataLoader(PredictDataset(x_test), batch_size=bs, shuffle=False)
    return measured(
        len(y_train),
        train_seconds,
        y_test,
        lambda: trainer.predict(trainer.model, test_dl),
        lambda preds: np.asarray(preds, dtype=np.float64),
    )


def measured(train_rows: int, train_seconds: float, labels, predict, to_scores=lambda scores: scores) -> dict:
    """What every runner returns; `predict()` over the test split is timed as the inference, turning its
    output into probabilities (`to_scores`) is not."""
    start = time.perf_counter()
    output = predict()
    infer_seconds = time.perf_counter() - start
    return {
        "train_rows": train_rows,
        "train_seconds": train_seconds,
        "infer_rows": len(labels),
        "infer_seconds": infer_seconds,
        "test_labels": labels,
        "test_scores": to_scores(output),
    }


def timed(obj, method: str) -> list[float]:
    """Wrap obj.method (on this instance only) to record how long each call takes."""
    seconds: list[float] = []
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, method, wrapper)
    return seconds


def import_deepctr():
    import deepctr_torch

    # Importing deepctr_torch starts a thread that asks PyPI for a newer release; let it finish (or
    # fail) before anything is timed, so it does not compete for the two cores.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(timeout=10)  # past that it waits on the network, not on the CPU
    return deepctr_torch


def deepctr_model(name: str, vocab_sizes: dict[str, int], numeric: list[str], seed: int, lists: dict | None = None):
    """With `lists` (meta.json's), each list field is a VarLenSparseFeat whose SparseFeat names the shared
    field's table (`embedding_name`: DeepCTR builds one nn.Embedding per embedding name), mean-pooled with
    the lengths given as an input (`length_name`): without them DeepCTR masks id 0, a real id here."""
    import_deepctr()
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models.multitask import MMOE, PLE

    columns = [SparseFeat(c, vocabulary_size=v, embedding_dim=ARCH["embedding_dim"]) for c, v in vocab_sizes.items()]
    for list_name, h in (lists or {}).items():
        ids = SparseFeat(
            list_name,
            vocabulary_size=vocab_sizes[h["field"]],
            embedding_dim=ARCH["embedding_dim"],
            embedding_name=h["field"],
        )
        columns.append(
            VarLenSparseFeat(ids, maxlen=h["max_length"], combiner="mean", length_name=f"{list_name}_length")
        )
    columns += [DenseFeat(n, 1) for n in numeric]
    # The same objective as the others: no L2 terms (DeepCTR's defaults add 1e-5 on embeddings), and
    # gates that are a single linear layer (DeepCTR's default puts a 64-unit hidden layer in each gate).
    common = dict(
        expert_dnn_hidden_units=tuple(ARCH["expert_dims"]),
        gate_dnn_hidden_units=(),
        tower_dnn_hidden_units=tuple(ARCH["tower_dims"]),
        l2_reg_linear=0.0,
        l2_reg_embedding=0.0,
        l2_reg_dnn=0.0,
        seed=seed,
        task_types=("binary", "binary"),
        task_names=("click", "conversion"),
        device="cpu",
    )
    if name == "ple":
        p = ARCH["ple"]
        return PLE(
            columns,
            shared_expert_num=p["num_shared_experts"],
            specific_expert_num=p["num_task_experts"],
            num_levels=p["num_levels"],
            **common,
        )
    return MMOE(columns, num_experts=ARCH["mmoe"]["num_experts"], **common)


def run_deepctr(spec: dict, meta: dict, data_dir: Path) -> dict:
    arrays = peer_arrays(spec, meta, data_dir, lengths=True)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = arrays["train"], arrays["valid"], arrays["test"]
    model = deepctr_model(spec["model"], meta["vocab_sizes"], meta["numeric"], spec["seed"], meta.get("lists"))
    model.compile(
        torch.optim.Adam(model.parameters(), lr=ARCH["lr"]),
        loss=["binary_crossentropy", "binary_crossentropy"],
        metrics=["auc"],
    )
    bs = spec["batch_size"]
    validations = timed(model, "evaluate")
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=bs, epochs=1, verbose=0, validation_data=(x_valid, y_valid))
    train_seconds = time.perf_counter() - start - sum(validations)
    return measured(len(y_train), train_seconds, y_test, lambda: model.predict(x_test, batch_size=bs))


# ---------------------------------------------------------------------------------------------
# A peer's model class fed by plerec's batching: plerec reads and encodes the data, and its training
# batch source (the one `fit` uses) yields the batches; only the model and its loss differ from
# plerec's own loop, which separates model speed from pipeline speed.


def plerec_batches(table, batch_size: int, seed: int):
    """plerec's training batch source; a shuffled index-select loop like it where plerec has none."""
    try:
        from plerec.data.batches import InMemoryBatches
    except ImportError:
        InMemoryBatches = None
    if InMemoryBatches is not None:
        return InMemoryBatches(table, batch_size, seed).epoch()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(table), generator=generator)
    return (table.batch(order[i : i + batch_size]) for i in range(0, len(table), batch_size))


def plain_loop(model, forward, loss_fn, train, batch_size: int, seed: int) -> float:
    """One epoch of the plain loop over plerec's batches: `forward(batch)` (the model's (B, T) outputs), `loss_fn`
    per task summed, one torch.optim.Adam step over every parameter of `model`. Its seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=ARCH["lr"])
    start = time.perf_counter()
    model.train()
    for batch in plerec_batches(train, batch_size, seed):
        out = forward(batch)  # (B, T)
        loss = sum(loss_fn(out[:, k], batch.labels[:, k]) for k in range(out.shape[1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run_peer_on_plerec_batching(spec: dict, meta: dict, data_dir: Path) -> dict:
    exp, data = plerec_data(spec, meta, data_dir)
    vocab = dict(zip(data.encoder.categorical, data.encoder.vocab_sizes, strict=True))
    numeric = data.encoder.dense_names
    peer = spec["library"].split("+")[0]
    if peer == "torch-rechub":
        model = rechub_model(spec["model"], vocab, numeric)
        cat_names = data.encoder.categorical

        def inputs(batch):
            x = {c: batch.sparse[:, j] for j, c in enumerate(cat_names)}
            x.update({n: batch.dense[:, j] for j, n in enumerate(numeric)})
            return x
    else:
        model = deepctr_model(spec["model"], vocab, numeric, spec["seed"])

        def inputs(batch):
            # DeepCTR's models take one float matrix, sparse ids first (its feature_index order).
            return torch.cat([batch.sparse.float(), batch.dense], dim=1)

    train, test = data.splits["train"], data.splits["test"]
    bs = spec["batch_size"]
    loss_fn = torch.nn.functional.binary_cross_entropy  # peer models return probabilities
    train_seconds = plain_loop(model, lambda batch: model(inputs(batch)), loss_fn, train, bs, spec["seed"])
    model.eval()

    @torch.inference_mode()
    def predict():
        return torch.cat([model(inputs(test.batch(slice(i, i + bs)))) for i in range(0, len(test), bs)])

    return measured(
        len(train), train_seconds, test.labels.numpy(), predict, lambda probs: probs.numpy().astype(np.float64)
    )


def run_plerec_plain_loop(spec: dict, meta: dict, data_dir: Path) -> dict:
    """plerec's model (as `fit` builds it) in the loop of `run_peer_on_plerec_batching`: the same batches, dense
    embedding gradients and one torch.optim.Adam over every parameter (no RowSparseAdam), BCE on the logits
    per task summed. What plerec's model costs as a dense step, beside the peers' models in the same loop."""
    from plerec.models import build_model
    from plerec.train import predict

    exp, data = plerec_data(spec, meta, data_dir)
    model = build_model(exp.model_name, exp.model, num_tasks=len(exp.tasks), **data.encoder.model_inputs())
    model.input.set_sparse(False)
    train, test = data.splits["train"], data.splits["test"]
    bs = spec["batch_size"]
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    train_seconds = plain_loop(model, lambda batch: model(*batch.inputs), loss_fn, train, bs, spec["seed"])
    return measured(
        len(train),
        train_seconds,
        test.labels.numpy(),
        lambda: predict(model, test, bs),
        lambda logits: torch.sigmoid(logits).numpy(),
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--save-encoder":
        spec = json.loads(Path(sys.argv[2]).read_text())
        torch.set_num_threads(spec["threads"])
        data_dir = Path(spec["data"])
        save_encoder(spec, json.loads((data_dir / "meta.json").read_text()), data_dir, Path(sys.argv[3]))
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} SPEC.json RESULT.json | --save-encoder SPEC.json OUT.json")
