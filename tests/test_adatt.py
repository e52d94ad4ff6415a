"""AdaTT: a gradient for every parameter, gates that sum to 1 and name their experts, the fusion equation of one
level written out, stacked levels reading the previous level's outputs, config errors."""

import pytest
import torch

from plerec.models import build_model
from plerec.models.adatt import AdaTTConfig

VOCABS, NUM_DENSE = [5, 7, 3], 4


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in VOCABS], dim=1)
    return sparse, torch.randn(batch, NUM_DENSE, generator=g)


def _adatt(num_tasks: int = 3, seed: int = 0, **params):
    torch.manual_seed(seed)
    config = {"embedding_dim": 3, "tower_dims": [4], "expert_dims": [6], "num_levels": 2, **params}
    model = build_model("adatt", config, VOCABS, NUM_DENSE, num_tasks)
    with torch.no_grad():
        model.input.embedding.weight.normal_()
    return model


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("batch", [1, 8])
def test_every_parameter_gets_a_gradient_with_three_tasks_and_two_levels(shared, batch):
    model = _adatt(num_task_experts=2, num_shared_experts=shared)
    sparse, dense = _inputs(batch)
    logits = model(sparse, dense)
    assert logits.shape == (batch, 3) and torch.isfinite(logits).all()
    logits.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        if name != "input.embedding.weight":  # only the looked-up rows get one
            assert p.grad.abs().sum() > 0, f"{name} has a zero gradient"


@pytest.mark.parametrize("shared", [0, 1])
def test_gates_sum_to_one_over_every_expert_of_their_level(shared):
    model = _adatt(num_task_experts=2, num_shared_experts=shared, num_levels=3)
    sparse, dense = _inputs(10)
    weights, names = model.gate_weights(sparse, dense), model.gate_experts()
    expected = {f"L{j}.task{k}" for j in range(3) for k in range(3)}
    if shared:
        expected |= {"L0.shared", "L1.shared"}  # the last level feeds no next level's shared experts
    assert set(weights) == set(names) == expected
    assert names["L1.task2"] == [f"L1.task{k}.{i}" for k in range(3) for i in range(2)] + (["L1.shared0"] * shared)
    for gate, w in weights.items():
        assert w.shape == (10, 3 * 2 + shared), gate
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(10))
        assert not torch.allclose(w[:, 0], w[0, 0]), gate  # they depend on the row


def test_one_level_computes_the_fusion_equation():
    """Task k: softmax(W_k x_k) over every expert of every task and the shared ones, plus v_k · its own experts."""
    model = _adatt(num_levels=1, num_task_experts=2, num_shared_experts=1)
    with torch.no_grad():
        level = model.body.levels[0]
        level.native_weights.copy_(torch.tensor([[0.3, -0.7], [1.2, 0.5], [0.0, 2.0]]))
        sparse, dense = _inputs(5)
        x = model.input(sparse, dense)
        w1, b1 = level.experts.weights[0], level.experts.biases[0]
        experts = [torch.relu(x @ w1[e] + b1[e]) for e in range(7)]  # task 0's two, task 1's, task 2's, shared
        expected = []
        for k in range(3):
            gate = torch.softmax(x @ level.gates.weights[0][k], dim=-1)  # (B, 7)
            fused = sum(gate[:, e : e + 1] * experts[e] for e in range(7))
            native = sum(level.native_weights[k, i] * experts[2 * k + i] for i in range(2))
            expected.append(fused + native)
        got, _ = model.body.extract(x)
        torch.testing.assert_close(got, torch.stack(expected))


def test_deeper_levels_read_the_previous_levels_outputs():
    model = _adatt(num_levels=2, num_task_experts=1, num_shared_experts=1)
    sparse, dense = _inputs(6)
    seen = {}
    second = model.body.levels[1]
    second.register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    with torch.no_grad():
        x = model.input(sparse, dense)
        model.body.extract(x)
        task_out, shared_out, _ = model.body.levels[0](x, x)
    torch.testing.assert_close(seen["args"][0], task_out)  # (T, B, H): one stream per task
    torch.testing.assert_close(seen["args"][1], shared_out)
    assert task_out.shape == (3, 6, 6) and not torch.allclose(task_out[0], task_out[1])


def test_a_tasks_experts_read_that_tasks_stream_and_shared_experts_the_shared_one():
    model = _adatt(num_levels=2, num_task_experts=2, num_shared_experts=1)
    level = model.body.levels[1]
    outputs = []
    level.experts.register_forward_hook(lambda mod, args, out: outputs.append(out))
    g = torch.Generator().manual_seed(2)
    streams, shared = torch.randn(3, 4, 6, generator=g), torch.randn(4, 6, generator=g)
    with torch.no_grad():
        level(streams, shared)
        changed = streams.clone()
        changed[0] += 1.0  # task 0's stream only
        level(changed, shared)
        level(streams, shared + 1.0)
    before, after_task, after_shared = outputs  # (E, B, H): task 0's two experts, task 1's two, task 2's, shared
    assert not torch.allclose(after_task[0:2], before[0:2])
    torch.testing.assert_close(after_task[2:], before[2:])
    assert not torch.allclose(after_shared[6], before[6])
    torch.testing.assert_close(after_shared[:6], before[:6])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"num_task_experts": 0}, r"Expected `num_task_experts` to hold positive integers, but got \[0\]"),
        ({"num_shared_experts": -1}, r"Expected `num_shared_experts` to be an integer in 0 \.\. 1024, but got -1"),
        ({"num_levels": 0}, r"Expected `num_levels` to hold positive integers, but got \[0\]"),
        ({"expert_dims": ()}, r"Expected `expert_dims` to list at least one width, but got \[\]"),
    ],
)
def test_adatt_config_errors(params, message):
    with pytest.raises(ValueError, match=message):
        AdaTTConfig(**params)
