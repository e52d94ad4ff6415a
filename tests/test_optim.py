"""plerec's Adam: torch.optim.Adam's updates and state layout, without torch.optim.Optimizer's import of
TorchDynamo (72 MiB of resident memory and 1.3 s per training process, measured with torch 2.13)."""

import subprocess
import sys

import pytest
import torch

from plerec import optim
from plerec.optim import Adam, RowSparseAdam


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)]


def _train(params, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p**3 - p).sum() for p in params).backward()
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_equals_torch_adam_bit_for_bit_and_its_fallback_within_rounding(weight_decay, monkeypatch):
    ours, fused, plain = _params(), _params(), _params()
    _train(ours, Adam(ours, lr=0.01, weight_decay=weight_decay), 6)
    _train(fused, torch.optim.Adam(fused, lr=0.01, weight_decay=weight_decay, fused=True), 6)
    assert all(torch.equal(a, b) for a, b in zip(ours, fused, strict=True))
    assert not torch.equal(ours[0], _params()[0])  # it moved
    # devices without the fused kernel use torch.optim.Adam's single-tensor arithmetic
    monkeypatch.setattr(optim, "FUSED_DEVICES", ())
    single = _params()
    _train(single, Adam(single, lr=0.01, weight_decay=weight_decay), 6)
    _train(plain, torch.optim.Adam(plain, lr=0.01, weight_decay=weight_decay, foreach=False), 6)
    for a, b in zip(single, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_resumes_exactly_and_reads_torch_optim_states():
    straight = _params()
    _train(straight, Adam(straight, lr=0.02), 5)
    first = _params()
    opt = Adam(first, lr=0.02)
    _train(first, opt, 3)
    saved = opt.state_dict()
    assert sorted(saved["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert saved["param_groups"][0]["params"] == [0, 1]
    again = [p.detach().clone().requires_grad_() for p in first]
    resumed = Adam(again, lr=0.02)
    resumed.load_state_dict(saved)
    _train(again, resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(again, straight, strict=True))
    # a state written by torch.optim.Adam (checkpoints of earlier plerec versions) continues the same way
    theirs = _params()
    torch_opt = torch.optim.Adam(theirs, lr=0.02, fused=True)
    _train(theirs, torch_opt, 3)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    adopted = Adam(ours, lr=0.02)
    adopted.load_state_dict(torch_opt.state_dict())
    _train(theirs, torch_opt, 2)
    _train(ours, adopted, 2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[1\], but the saved state has \[2\]"):
        Adam([torch.zeros(2, requires_grad=True)]).load_state_dict(saved)


def test_row_sparse_adam_state_round_trips():
    table = torch.nn.Embedding(30, 4, sparse=True)
    opt = RowSparseAdam(table.parameters(), lr=0.05)
    ids = torch.tensor([[1, 2, 2, 7], [3, 1, 9, 9]])
    for _ in range(3):
        opt.zero_grad()
        table(ids).pow(2).sum().backward()
        opt.step()
    copy = torch.nn.Embedding(30, 4, sparse=True)
    copy.load_state_dict(table.state_dict())
    restored = RowSparseAdam(copy.parameters(), lr=0.05)
    restored.load_state_dict(opt.state_dict())
    for module, o in ((table, opt), (copy, restored)):
        o.zero_grad()
        module(ids).pow(2).sum().backward()
        o.step()
    assert torch.equal(table.weight, copy.weight)
    assert opt.state_dict()["state"][0]["step"] == 4


def test_bad_settings_and_gradients_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        Adam(_params(), lr=0.0)
    with pytest.raises(ValueError, match="weight_decay >= 0"):
        Adam(_params(), weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"betas in \[0, 1\), but got lr=0.001, betas=\(0.9, 1.0\)"):
        RowSparseAdam(torch.nn.Embedding(3, 2, sparse=True).parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="at least one parameter"):
        Adam([])
    table = torch.nn.Embedding(5, 2, sparse=True)
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="RowSparseAdam for sparse"):
        Adam(table.parameters()).step()


def test_training_optimizers_do_not_import_torchdynamo():
    code = (
        "import sys, torch\n"
        "from plerec.config import experiment_from_dict\n"
        "from plerec.models import build_model\n"
        "from plerec.train import make_optimizers\n"
        "exp = experiment_from_dict({'data': {'path': 'x.csv'}, 'features': {'categorical': ['a']},"
        " 'tasks': [{'name': 't', 'kind': 'binary', 'label': 't'}]})\n"
        "model = build_model('ple', {'expert_dims': [4], 'tower_dims': [2]}, [5], 1, 1)\n"
        "model.input.embedding.sparse = True\n"
        "opts = make_optimizers(model, exp)\n"
        "model(torch.tensor([[1]]), torch.zeros(1, 1)).sum().backward()\n"
        "[o.step() for o in opts]\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_row_sparse_adam_sums_duplicate_ids_as_the_dense_gradient_does():
    """A batch's sparse gradient repeats an id once per lookup; the update must see each row's summed
    gradient (what a dense gradient holds), whatever the order and multiplicity of the ids."""
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(50, 4, generator=g)
    sparse_table = torch.nn.Parameter(weights.clone())
    dense_table = torch.nn.Parameter(weights.clone())
    sparse_opt, dense_opt = RowSparseAdam([sparse_table], lr=0.01), RowSparseAdam([dense_table], lr=0.01)
    for _ in range(6):
        ids = torch.randint(0, 20, (300,), generator=g)  # 20 rows touched ~15 times each, in random order
        values = torch.randn(len(ids), 4, generator=g)
        grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (50, 4), check_invariants=True)
        assert not grad.is_coalesced()
        sparse_table.grad, dense_table.grad = grad, grad.to_dense()
        sparse_opt.step()
        dense_opt.step()
        torch.testing.assert_close(sparse_table, dense_table, rtol=1e-6, atol=1e-7)
    assert torch.equal(sparse_table[20:], weights[20:])  # rows no batch touched never move
    assert not torch.equal(sparse_table[:20], weights[:20])
    # a gradient without rows (a table only empty lists looked up) changes nothing, but counts as a step
    before = sparse_table.detach().clone()
    sparse_table.grad = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, 4), (50, 4), check_invariants=True
    )
    sparse_opt.step()
    assert torch.equal(sparse_table, before)
    assert sparse_opt.state_dict()["state"][0]["step"] == 7
