"""Which choice costs plerec's test AUC against torch-rechub? A diagnostic, not a benchmark of speed.

Trains plerec's model (the benchmark's architecture, worker.ARCH) for one epoch on the sequence case's data
(`run.py --sequence` writes it to results/sequence/data) with one choice changed at a time, for several
seeds, and appends one JSON line per run (test AUC per task, training seconds) to --out:

    default      plerec as the benchmark runs it (lr 1e-3, RowSparseAdam for the embedding tables)
    dense_adam   [train] sparse_embeddings = false: one dense Adam over every parameter
    bn           the same as norm_h below: BatchNorm (no affine, running statistics for evaluation) after every
                 hidden linear layer of the experts and towers (a monkeypatch)
    he_init      the experts', gates' and towers' weights drawn He-normal (std √(2 / fan-in)), biases 0, instead
                 of nn.Linear's uniform ±1/√fan-in, as each ParallelMLP is built (a monkeypatch)
    dense_init=he  the same through plerec's own option, [model] dense_init = "he" (drawn after the build)
    lrX          [train] lr = X for every parameter
    elrX, dlrX   lr X for the embedding tables' RowSparseAdam only (elr), or for the dense parameters only (dlr)
    norm_W[_affine]  BatchNorm after the layers W names ("h": experts' and towers' hidden layers, "e" or "t":
                 the experts' or the towers' only, "g": the gates' logits before their softmax, "hg": both, as
                 torch-rechub), with a learnable scale and shift per unit when "_affine" (a monkeypatch)
    batch_norm=P/Q  [model] batch_norm = [P, Q] (places among gates, experts, towers): plerec's own option
                 (norm_W_affine's BatchNorm; at the commit that measured "batch_norm=all" / "=gates" the option took
                 "all" = gates/experts/towers, "gates", "hidden" = experts/towers)
    glrX         lr X for the gates' weights only (the other dense parameters and the tables at the run's lr)
    eiX          [model] embedding_init_std = X: the embedding tables drawn N(0, X²) (the default X is 1e-4)

Variants joined by "+" apply together (batch_norm=gates/experts+dense_adam).

    python benchmarks/auc_variants.py default,dense_adam,bn 0,1,2 [--batch 1024] [--model ple] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import worker  # noqa: E402

import plerec.train as train_module  # noqa: E402
from plerec.models import layers  # noqa: E402
from plerec.optim import RowSparseAdam  # noqa: E402

EAGER_FORWARD = layers.ParallelMLP.forward
PLAIN_INIT = layers.ParallelMLP.__init__


def he_init(self, *args, **kwargs):
    PLAIN_INIT(self, *args, **kwargs)
    with torch.no_grad():
        for w in self.weights:  # (E, fan_in, fan_out)
            w.normal_(0.0, (2.0 / w.shape[1]) ** 0.5)
        for b in self.biases or ():
            b.zero_()


MAKE_OPTIMIZERS = train_module.make_optimizers


def _batch_stats(self, i: int, h):
    """Layer i's (E, 1, H) mean and variance: the batch's in training (moving the running ones toward them,
    momentum 0.1), the running ones in evaluation."""
    if not self.training:
        return self._stats[i]
    mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    with torch.no_grad():
        if self._stats[i] is None:
            self._stats[i] = [mean.detach().clone(), var.detach().clone()]
        else:
            self._stats[i][0].lerp_(mean.detach(), 0.1)
            self._stats[i][1].lerp_(var.detach(), 0.1)
    return mean, var


def rechub_norm(where: str, affine: bool):
    """ParallelMLP patches with BatchNorm after the chosen linear layers: "h" the hidden layers of experts and
    towers (those a ReLU follows; "e" the experts' only, "t" the towers' only), "g" the gates' logits
    (bias-free banks, before their softmax), as torch-rechub's MLP puts one after every layer it builds;
    affine: a learnable scale and shift per unit."""

    def init(self, *args, **kwargs):
        PLAIN_INIT(self, *args, **kwargs)
        last = len(self.weights) - 1
        relu = [i < last or self.final_activation for i in range(last + 1)]
        kinds = "he" if self.final_activation else "ht"  # expert banks end in a ReLU; towers in an output layer
        hidden = any(k in where for k in kinds)
        self._norm = [("g" in where) if self.biases is None else (hidden and r) for r in relu]
        self._stats = [None] * len(self.weights)
        if affine:
            shapes = [(w.shape[0], 1, w.shape[2]) for w in self.weights]
            self.bn_scale = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(s)) for s in shapes)
            self.bn_shift = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, x):
        h = x
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            h = torch.einsum("bd,edo->ebo", h, w) if h.dim() == 2 else torch.bmm(h, w)
            if self.biases is not None:
                h = h + self.biases[i].unsqueeze(1)
            if self._norm[i]:
                mean, var = _batch_stats(self, i, h)
                h = (h - mean) / torch.sqrt(var + 1e-5)
                if affine:
                    h = h * self.bn_scale[i] + self.bn_shift[i]
            if i < last or self.final_activation:
                h = torch.relu(h)
        return h

    return init, forward


def one_lr(which: str, lr: float):
    """make_optimizers with lr for the embedding tables' optimiser (which = "e") or the others ("d")."""

    def make(model, exp, params=()):
        optimizers = MAKE_OPTIMIZERS(model, exp, params)
        for optimizer in optimizers:
            if isinstance(optimizer, RowSparseAdam) == (which == "e"):
                for group in optimizer.param_groups:
                    group["lr"] = lr
        return optimizers

    return make


def gate_lr(lr: float):
    """make_optimizers with the gates' weights (every parameter whose name holds "gate") in a group at lr."""

    def make(model, exp, params=()):
        optimizers = MAKE_OPTIMIZERS(model, exp, params)
        gates = {id(p) for name, p in model.named_parameters() if "gate" in name}
        dense = optimizers[0]
        rest = [p for p in dense.param_groups[0]["params"] if id(p) not in gates]
        chosen = [p for p in dense.param_groups[0]["params"] if id(p) in gates]
        optimizers[0] = torch.optim.Adam([{"params": rest}, {"params": chosen, "lr": lr}], lr=exp.train.lr)
        return optimizers

    return make


def configure(exp, variants: str):
    """The experiment with every "+"-joined variant of `variants` applied, the patches of the last call undone."""
    layers.ParallelMLP.forward = EAGER_FORWARD
    layers.ParallelMLP.__init__ = PLAIN_INIT
    train_module.make_optimizers = MAKE_OPTIMIZERS
    for variant in variants.split("+"):
        exp = _apply(exp, variant)
    return exp


def _apply(exp, variant: str):
    if variant == "default":
        return exp
    if variant == "dense_adam":
        return replace(exp, train=replace(exp.train, sparse_embeddings=False))
    if variant == "dense_init=he":
        return replace(exp, model=replace(exp.model, dense_init="he"))
    if variant.startswith("batch_norm="):
        return replace(exp, model=replace(exp.model, batch_norm=tuple(variant.split("=", 1)[1].split("/"))))
    if variant == "he_init":
        layers.ParallelMLP.__init__ = he_init
        return exp
    if variant == "bn":  # the name of the first such patch, kept for the raw lines that carry it
        variant = "norm_h"
    if variant.startswith("norm_"):  # norm_<h|g|hg>[_affine]
        parts = variant.split("_")
        layers.ParallelMLP.__init__, layers.ParallelMLP.forward = rechub_norm(parts[1], parts[-1] == "affine")
        return exp
    if variant.startswith("glr"):
        train_module.make_optimizers = gate_lr(float(variant[3:]))
        return exp
    if variant.startswith(("elr", "dlr")):
        train_module.make_optimizers = one_lr(variant[0], float(variant[3:]))
        return exp
    if variant.startswith("ei"):
        return replace(exp, model=replace(exp.model, embedding_init_std=float(variant[2:])))
    if variant.startswith("lr"):
        return replace(exp, train=replace(exp.train, lr=float(variant[2:])))
    raise SystemExit(f"unknown variant {variant!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", help="comma-separated, e.g. default,dense_adam,bn,lr2e-3,dlr4e-3")
    parser.add_argument("seeds", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--model", default="ple", choices=["ple", "mmoe"])
    parser.add_argument("--data", type=Path, default=HERE / "results" / "sequence" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "auc_variants.jsonl")
    args = parser.parse_args()
    meta = json.loads((args.data / "meta.json").read_text())
    spec = {
        "model": args.model,
        "seed": 0,
        "train_file": "train.parquet",
        "batch_size": args.batch,
        "threads": 0,
        "library": "plerec",
    }
    base, data = worker.plerec_data(spec, meta, args.data)
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            exp = configure(replace(base, seed=seed), variant)
            began = time.time()
            result = train_module.fit(exp, data)
            row = {
                "model": args.model,
                "batch": args.batch,
                "variant": variant,
                "seed": seed,
                "test_auc": {t: m["auc"] for t, m in result.metrics["test"].items()},
                "train_seconds": result.train_seconds,
                "wall": time.time() - began,
            }
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
