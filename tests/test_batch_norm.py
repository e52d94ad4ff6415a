"""[model] batch_norm: BankNorm is nn.BatchNorm1d for every network of a bank, it goes exactly at the places the
option lists in every registry model, evaluation never mixes rows, and a model with it trains (a batch of one row
too), compiles, resumes from its checkpoint and exports as the eager one."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_ship import candidates, train_tiny

from plerec.export import export_model
from plerec.models import MODELS, build_model, model_config
from plerec.models.layers import BankNorm, ListSpec, ParallelMLP
from plerec.train import load_checkpoint, predict

VOCABS, NUM_DENSE, TASKS = [7, 5], 3, 2


ALL = ("gates", "experts", "towers")


def _model(name: str, batch_norm=(), lists=()):
    params = {"embedding_dim": 4, "tower_dims": [6], "batch_norm": list(batch_norm)}
    if "expert_dims" in {f for f in model_config(name).__slots__}:
        params["expert_dims"] = [5, 4]
    torch.manual_seed(0)
    return build_model(name, params, VOCABS, NUM_DENSE, TASKS, lists)


def _inputs(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (rows,), generator=g) for v in VOCABS], dim=1)
    return sparse, torch.randn(rows, NUM_DENSE, generator=g)


def test_bank_norm_is_batch_norm1d_for_each_network():
    """Three training steps and an evaluation: the outputs, the input's and γ, β's gradients and the running
    estimates of BankNorm(E, H) are those of E separate nn.BatchNorm1d(H) with the same γ, β."""
    torch.manual_seed(0)
    e, h = 3, 5
    bank = BankNorm(e, h)
    with torch.no_grad():
        bank.weight.uniform_(0.5, 2.0)
        bank.bias.normal_()
    refs = [torch.nn.BatchNorm1d(h) for _ in range(e)]
    for k, ref in enumerate(refs):
        with torch.no_grad():
            ref.weight.copy_(bank.weight[k, 0])
            ref.bias.copy_(bank.bias[k, 0])
    for step in range(3):
        x = (torch.randn(e, 16, h) * (step + 1) + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        out = bank(x)
        expected = torch.stack([ref(xr[k]) for k, ref in enumerate(refs)])
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
        for k, ref in enumerate(refs):
            torch.testing.assert_close(bank.weight.grad[k, 0], ref.weight.grad)
            torch.testing.assert_close(bank.bias.grad[k, 0], ref.bias.grad)
            ref.zero_grad()
        bank.zero_grad()
    for k, ref in enumerate(refs):
        torch.testing.assert_close(bank.running_mean[k, 0], ref.running_mean)
        torch.testing.assert_close(bank.running_var[k, 0], ref.running_var)
    bank.eval()
    x = torch.randn(e, 4, h)
    for ref in refs:
        ref.eval()
    torch.testing.assert_close(bank(x), torch.stack([ref(x[k]) for k, ref in enumerate(refs)]))


def test_the_flat_form_normalises_as_the_bank_form():
    """forward_flat on (B, E·H), the networks' units side by side (a bank's first layer), gives forward's outputs,
    input and γ, β gradients and running estimates on the same numbers as (E, B, H), training and evaluation."""
    torch.manual_seed(0)
    e, b, h = 3, 16, 5
    flat, bank = BankNorm(e, h), BankNorm(e, h)
    with torch.no_grad():
        for m in (flat, bank):
            m.weight.copy_(torch.linspace(0.5, 2.0, e * h).view(e, 1, h))
            m.bias.copy_(torch.linspace(-1.0, 1.0, e * h).view(e, 1, h))
    for step in range(3):
        x = (torch.randn(b, e * h) * (step + 1) + torch.arange(e * h)).requires_grad_()
        xb = x.detach().view(b, e, h).transpose(0, 1).contiguous().requires_grad_()
        out, expected = flat.forward_flat(x), bank(xb)
        torch.testing.assert_close(out.view(b, e, h).transpose(0, 1), expected)
        g = torch.randn(e, b, h)
        out.backward(g.transpose(0, 1).reshape(b, e * h))
        expected.backward(g)
        torch.testing.assert_close(x.grad.view(b, e, h).transpose(0, 1), xb.grad)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(flat, name).grad, getattr(bank, name).grad)
        flat.zero_grad()
        bank.zero_grad()
    torch.testing.assert_close(flat.running_mean, bank.running_mean)
    torch.testing.assert_close(flat.running_var, bank.running_var)
    flat.eval()
    bank.eval()
    x = torch.randn(4, e * h)
    by_network = x.view(4, e, h).transpose(0, 1)
    torch.testing.assert_close(flat.forward_flat(x).view(4, e, h).transpose(0, 1), bank(by_network))


def _expected_norms(bank: ParallelMLP, places) -> list[str]:
    """The layers (str indices) a bank normalises, from the layers' own shape: a gate's logits, every layer of a
    bank ending in a ReLU (experts), every layer but the output one of a bank ending in one (towers)."""
    layers = [str(i) for i in range(len(bank.weights))]
    if bank.gate:
        return layers[-1:] if "gates" in places else []
    if bank.final_activation:
        return layers if "experts" in places else []
    return layers[:-1] if "towers" in places else []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_norm_goes_where_the_option_says(name):
    """Every registry model, every combination of places: each bank has a norm after exactly the layers its
    places name, and nowhere else; no places add no state (old checkpoints load); the feature input's attention
    MLP never gets one; the norms of the places add up."""
    attention = ListSpec("hist", table=0, vocab_size=0, pooling="attention", max_length=3, target=0)
    assert not any("norms" in k for k in _model(name, (), [attention]).state_dict())
    counts = {}
    for places in (*((p,) for p in ALL), ("gates", "experts"), ALL):
        model = _model(name, places, [attention])
        for bank in (m for m in model.body.modules() if isinstance(m, ParallelMLP)):
            assert sorted(bank.norms or {}) == _expected_norms(bank, places), (places, bank)
        assert not any(isinstance(m, BankNorm) for m in model.input.modules())
        counts[places] = sum(isinstance(m, BankNorm) for m in model.modules())
    gates = sum(1 for m in _model(name).body.modules() if isinstance(m, ParallelMLP) and m.gate)
    assert counts[("gates",)] == gates  # one norm per gate bank (each is a single linear layer)
    assert counts[("experts",)] + counts[("towers",)] > 0
    assert counts[ALL] == sum(counts[(p,)] for p in ALL)
    assert counts[("gates", "experts")] == counts[("gates",)] + counts[("experts",)]


@pytest.mark.parametrize(
    ("name", "place", "expected"),
    [
        # PLE, 2 levels of experts [5, 4]: two task gates a level, the shared gate only below the last level
        ("ple", "gates", ["levels.0.task_gates.0", "levels.0.shared_gate.0", "levels.1.task_gates.0"]),
        ("ple", "experts", ["levels.0.experts.0", "levels.0.experts.1", "levels.1.experts.0", "levels.1.experts.1"]),
        ("ple", "towers", ["towers.mlp.0"]),  # towers [6]: its hidden layer, not the output layer
        ("mmoe", "gates", ["levels.0.task_gates.0"]),
        ("mmoe", "experts", ["levels.0.experts.0", "levels.0.experts.1"]),
        ("mmoe", "towers", ["towers.mlp.0"]),
    ],
)
def test_each_place_names_the_layers_of_the_papers_structure(name, place, expected):
    """Written out by hand from each model's structure, not from the rule the code follows: which layers each
    place normalises in PLE and MMoE (as `body.<bank>.norms.<layer>`)."""
    found = [k for k, m in _model(name, (place,)).body.named_modules() if isinstance(m, BankNorm)]
    assert found == [".norms.".join(e.rsplit(".", 1)) for e in expected]


def test_a_gated_model_marks_its_gates():
    """The models whose experts are mixed by softmax gates (AITM's attention is not one) mark those banks."""
    for name in ("omoe", "mmoe", "cgc", "ple", "ml_mmoe", "adatt"):
        assert any(isinstance(m, ParallelMLP) and m.gate for m in _model(name).modules()), name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["gate"], "Expected `batch_norm` to list places among gates, experts, towers, but got 'gate'. Did you mean"),
        (["gates", "gates"], "Expected `batch_norm` to list each place once, but got \\['gates', 'gates'\\]"),
        ("gates", "Expected \\[model\\] `batch_norm` to be a list of strings, but got 'gates'"),
        ([1], "Expected \\[model\\] `batch_norm` to be a list of strings, but got \\[1\\]"),
    ],
)
def test_batch_norm_must_list_known_places_once(value, message):
    with pytest.raises(ValueError, match=message):
        model_config("ple", {"batch_norm": value})


@pytest.mark.parametrize("name", ["ple", "mmoe", "shared_bottom"])
def test_evaluation_scores_each_row_alone_and_training_takes_a_one_row_batch(name):
    """After a few training steps, evaluation gives a row the same output alone as in a batch (the running
    estimates, not the batch's); a training step on one row gives finite losses and gradients and leaves the
    running estimates as they were (nn.BatchNorm1d raises there)."""
    model = _model(name, ALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        sparse, dense = _inputs(32, seed=step)
        optimizer.zero_grad()
        model(sparse, dense).square().mean().backward()
        optimizer.step()
    norms = [m for m in model.modules() if isinstance(m, BankNorm)]
    assert norms and all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    model.eval()
    sparse, dense = _inputs(9, seed=10)
    together = model(sparse, dense)
    alone = torch.cat([model(sparse[i : i + 1], dense[i : i + 1]) for i in range(9)])
    torch.testing.assert_close(alone, together)
    model.train()
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    model.zero_grad()
    out = model(*_inputs(1, seed=11))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is None or torch.isfinite(p.grad.to_dense()).all() for p in model.parameters())
    for m, (mean, var) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["ple", "mmoe"])
def test_compiled_body_with_batch_norm_gives_the_eager_step(name):
    """The compiled body (Inductor) gives the eager losses, gradients and running estimates with batch_norm."""
    torch._dynamo.reset()
    eager, compiled = _model(name, ALL).train(), _model(name, ALL).train()
    sparse, dense = _inputs(16)
    compiled.compile_body(torch.compile(compiled.body, backend="inductor", dynamic=False), 16)
    for model in (eager, compiled):
        model(sparse, dense).square().mean().backward()
    torch.testing.assert_close(compiled(sparse, dense), eager(sparse, dense), rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.to_dense(), p.grad.to_dense(), rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=n)


def test_a_trained_model_with_batch_norm_reloads_and_exports_to_onnx_as_it_predicts(tmp_path):
    """Trained through `fit` with a norm at every place: the checkpoint carries the option and the running
    estimates (the reloaded model predicts what the trained one did), and ONNX gives its outputs."""
    checkpoint, _ = train_tiny(tmp_path, overrides=('model.batch_norm=["gates", "experts", "towers"]',))
    model, encoder, exp = load_checkpoint(checkpoint)
    assert exp.model.batch_norm == ALL
    norms = [m for m in model.modules() if isinstance(m, BankNorm)]
    assert norms and not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    table = encoder.transform(candidates(23, seed=4), labels=False)
    logits = predict(model, table)
    path, _ = export_model(model, encoder, exp, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"sparse": table.sparse.numpy().astype(np.int64), "dense": table.dense.numpy().astype(np.float32)}
    got = session.run(["click", "watch"], feed)
    np.testing.assert_allclose(got[0], torch.sigmoid(logits[:, 0]).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], logits[:, 1].numpy(), atol=1e-5, rtol=0)
