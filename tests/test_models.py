"""The model family: golden routing fixtures, structure of PLE/CGC/MMoE, gradients for every parameter."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_fixtures import CONFIGS, build_fixture, expected_outputs

from plerec.models import MODELS, build_model, model_config
from plerec.models.family import PLE, LevelConfig
from plerec.models.layers import ExtractionLayer, ParallelMLP

# The shared golden fixtures; PLEREC_REFERENCE_DIR points elsewhere (a missing folder leaves the built ones).
REFERENCE = Path(os.environ.get("PLEREC_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
FIXTURE_SEED = 20200922
SOURCES = ["shared", "built"]
VOCABS, NUM_DENSE = [5, 7, 3], 4


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in VOCABS], dim=1)
    return sparse, torch.randn(batch, NUM_DENSE, generator=g)


def _load_fixture(name: str, source: str = "shared"):
    """The golden fixture `name`: the shared .npz (skips when absent) or built here from the equations."""
    if source == "built":  # never skips: tests/reference_fixtures.py, the same configs as the shared files
        return json.loads(json.dumps(CONFIGS[name])), build_fixture(CONFIGS[name], FIXTURE_SEED)
    path = REFERENCE / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"shared golden fixtures absent ({path}); the 'built' variant checks the same config")
    npz = np.load(path)
    return json.loads(str(npz["config"])), {k: npz[k] for k in npz.files if k != "config"}


def _set_weights(body: PLE, cfg: dict, arrays: dict) -> None:
    """Copy the fixture's per-expert (in, out) weights into the batched banks (E, in, out).

    Every parameter of the extraction layers must be set from the fixture: one that is not is a parameter
    the equations lack. Gate biases are such a one (Eq. 3 has none), so the fixture's zero gate biases are
    not loaded: a constant bias would even hide from the outputs, since a softmax ignores a constant shift.
    """
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    num_tasks = cfg["num_tasks"]
    loaded: set[int] = set()

    def load(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value)
        loaded.add(id(param))

    for j, (layer, lv) in enumerate(zip(body.levels, cfg["levels"], strict=True)):
        names = [f"L{j}.task{k}.expert{i}" for k in range(num_tasks) for i in range(lv["num_task_experts"])]
        names += [f"L{j}.shared.expert{i}" for i in range(lv["num_shared_experts"])]
        with torch.no_grad():
            for l_ in range(len(lv["expert_dims"])):
                load(layer.experts.weights[l_], torch.stack([t(arrays[f"{n}.W{l_}"]) for n in names]))
                load(layer.experts.biases[l_], torch.stack([t(arrays[f"{n}.b{l_}"]) for n in names]))
            gates = torch.stack([t(arrays[f"L{j}.task{k}.gate.W"]) for k in range(num_tasks)])  # (K, in, m_k+m_s)
            load(layer.task_gates.weights[0], gates)
            if layer.shared_gate is not None:
                load(layer.shared_gate.weights[0], t(arrays[f"L{j}.shared.gate.W"])[None])
    unset = [f"levels.{n}" for n, p in body.levels.named_parameters() if id(p) not in loaded]
    assert not unset, f"parameters the papers' equations do not have (no fixture value sets them): {unset}"


def _body_for(cfg: dict) -> PLE:
    levels = tuple(
        LevelConfig(
            num_task_experts=lv["num_task_experts"],
            num_shared_experts=lv["num_shared_experts"],
            expert_dims=tuple(lv["expert_dims"]),
        )
        for lv in cfg["levels"]
    )
    return PLE(levels, (4,), cfg["input_dim"], cfg["num_tasks"])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_golden_fixture_tower_inputs_and_gates(name, source):
    cfg, arrays = _load_fixture(name, source)
    body = _body_for(cfg)
    _set_weights(body, cfg, arrays)
    tower_inputs, gates = body.extract(torch.tensor(arrays["x"], dtype=torch.float32))
    for k in range(cfg["num_tasks"]):
        np.testing.assert_allclose(tower_inputs[k].detach().numpy(), arrays[f"out.task{k}"], rtol=1e-5, atol=1e-5)
    expected_gates = {k[len("gate.") :]: v for k, v in arrays.items() if k.startswith("gate.")}
    assert set(gates) == set(expected_gates)
    for key, expected in expected_gates.items():
        np.testing.assert_allclose(gates[key].detach().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", SOURCES)
def test_mmoe_registry_model_matches_fixture_routing(source):
    """The registry's `mmoe` is built from the same layer and loads the MMoE fixture."""
    cfg, arrays = _load_fixture("mmoe", source)
    lv = cfg["levels"][0]
    config = model_config("mmoe", {"num_experts": lv["num_shared_experts"], "expert_dims": lv["expert_dims"]})
    model = build_model("mmoe", config, [], cfg["input_dim"], cfg["num_tasks"])
    _set_weights(model.body, cfg, arrays)
    x = torch.tensor(arrays["x"], dtype=torch.float32)
    tower_inputs, _ = model.body.extract(x)
    np.testing.assert_allclose(tower_inputs[1].detach().numpy(), arrays["out.task1"], rtol=1e-5, atol=1e-5)
    # The model's input for dense-only data is the data itself.
    assert torch.equal(model.input(torch.empty(7, 0, dtype=torch.long), x), x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_built_fixtures_agree_with_shared_ones(name):
    """The in-test reference covers the shared files' configs and keys, and recomputes their outputs."""
    cfg, shared = _load_fixture(name, "shared")
    assert cfg == CONFIGS[name]
    assert set(build_fixture(cfg, FIXTURE_SEED)) == set(shared)
    for key, value in expected_outputs(cfg, shared).items():
        np.testing.assert_allclose(value, shared[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_ple_with_one_level_equals_cgc():
    params = {"num_task_experts": 2, "num_shared_experts": 3, "expert_dims": [6, 5], "tower_dims": [4]}
    torch.manual_seed(3)
    cgc = build_model("cgc", params, VOCABS, NUM_DENSE, 3)
    torch.manual_seed(3)
    ple = build_model("ple", {**params, "num_levels": 1}, VOCABS, NUM_DENSE, 3)
    assert [n for n, _ in cgc.named_parameters()] == [n for n, _ in ple.named_parameters()]
    ple.load_state_dict(cgc.state_dict())
    sparse, dense = _inputs(9)
    torch.testing.assert_close(ple(sparse, dense), cgc(sparse, dense), rtol=0, atol=0)


def _unequal_ple(num_tasks=3):
    return build_model(
        "ple",
        {"num_levels": 3, "num_task_experts": 2, "num_shared_experts": 3, "expert_dims": [6], "tower_dims": [4]},
        VOCABS,
        NUM_DENSE,
        num_tasks,
    )


def test_ple_gate_spans():
    model = _unequal_ple()
    levels = model.body.levels
    for j, layer in enumerate(levels):
        # A task gate spans its own 2 experts and the 3 shared ones, nothing else.
        assert layer.task_gates.weights[0].shape[-1] == 2 + 3
        last = j == len(levels) - 1
        if last:
            assert layer.shared_gate is None
        else:  # the shared gate spans every expert of the level: 3 tasks x 2 + 3 shared
            assert layer.shared_gate.weights[0].shape[-1] == 3 * 2 + 3
    sparse, dense = _inputs(5)
    gates = model.gate_weights(sparse, dense)
    assert set(gates) == {f"L{j}.task{k}" for j in range(3) for k in range(3)} | {"L0.shared", "L1.shared"}
    for w in gates.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_task_gate_ignores_other_tasks_experts():
    """Changing task 1's experts leaves task 0's output untouched at level 0 of CGC."""
    model = build_model(
        "cgc", {"num_task_experts": 2, "num_shared_experts": 1, "expert_dims": [6]}, VOCABS, NUM_DENSE, 3
    )
    sparse, dense = _inputs(6)
    x = model.input(sparse, dense)
    before, _ = model.body.extract(x)
    with torch.no_grad():
        model.body.levels[0].experts.weights[0][2:4].add_(1.0)  # task 1's two experts
    after, _ = model.body.extract(x)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_deeper_levels_read_previous_level_outputs_not_raw_input():
    model = build_model(
        "ple",
        {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 1, "expert_dims": [6], "tower_dims": [4]},
        VOCABS,
        NUM_DENSE,
        2,
    )
    raw_dim = model.input.out_dim
    level1 = model.body.levels[1]
    assert raw_dim != 6
    assert level1.experts.weights[0].shape[1] == 6
    assert level1.task_gates.weights[0].shape[1] == 6
    # Functionally: level 1 sees x only through level 0's outputs.
    x = model.input(*_inputs(4))
    seen = {}
    level1.register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    model.body.extract(x)
    task_in, shared_in = seen["args"][:2]
    first_task, first_shared, _ = model.body.levels[0](x, x)
    torch.testing.assert_close(task_in, first_task)
    torch.testing.assert_close(shared_in, first_shared)


def _all_models(num_tasks=3):
    overrides = {
        "ple": {"num_levels": 3, "num_task_experts": 2, "num_shared_experts": 3, "expert_dims": [6]},
        "cgc": {"num_task_experts": 2, "num_shared_experts": 3, "expert_dims": [6]},
        "mmoe": {"num_experts": 3, "expert_dims": [6]},
        "omoe": {"num_experts": 3, "expert_dims": [6]},
    }
    for name in MODELS:
        params = {"tower_dims": [4], **overrides.get(name, {})}
        if name in ("single", "shared_bottom"):
            params["bottom_dims"] = [6]
        yield name, build_model(name, params, VOCABS, NUM_DENSE, num_tasks)


@pytest.mark.parametrize("batch", [1, 8])
def test_every_parameter_gets_a_gradient(batch):
    for name, model in _all_models():
        sparse, dense = _inputs(batch)
        logits = model(sparse, dense)
        assert logits.shape == (batch, 3), name
        assert torch.isfinite(logits).all(), name
        logits.pow(2).sum().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{name}: {pname} has no gradient"
            if pname != "input.embedding.weight":  # only the looked-up rows get a gradient
                assert p.grad.abs().sum() > 0, f"{name}: {pname} has a zero gradient"


def test_experts_do_not_start_identical():
    model = _unequal_ple()
    w = model.body.levels[0].experts.weights[0]
    for i in range(1, w.shape[0]):
        assert not torch.equal(w[0], w[i])


def test_parallel_mlp_equals_independent_mlps():
    """Batched experts give the same outputs and gradients as separate nn.Linear stacks."""
    torch.manual_seed(0)
    bank = ParallelMLP(3, 5, [4, 2])
    singles = []
    for e in range(3):
        layers = []
        for w, b in zip(bank.weights, bank.biases, strict=True):
            lin = torch.nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                lin.weight.copy_(w[e].T)
                lin.bias.copy_(b[e])
            layers += [lin, torch.nn.ReLU()]
        singles.append(torch.nn.Sequential(*layers))
    x = torch.randn(7, 5)
    batched = bank(x)
    separate = torch.stack([net(x) for net in singles])
    torch.testing.assert_close(batched, separate)
    batched.sum().backward()
    separate.sum().backward()
    for e in range(3):
        torch.testing.assert_close(bank.weights[0].grad[e], singles[e][0].weight.grad.T)
        torch.testing.assert_close(bank.biases[1].grad[e], singles[e][2].bias.grad)
    # Per-network inputs (E, B, d) route each network its own rows.
    xs = torch.randn(3, 7, 5)
    torch.testing.assert_close(bank(xs), torch.stack([net(xs[e]) for e, net in enumerate(singles)]))


def test_extraction_layer_rejects_empty_level():
    with pytest.raises(ValueError, match="at least one expert"):
        ExtractionLayer(
            num_tasks=2, in_dim=3, num_task_experts=0, num_shared_experts=0, expert_dims=[2], shared_gate=False
        )


def test_model_config_errors():
    with pytest.raises(ValueError, match="Unknown model `plee`. Did you mean `ple`"):
        model_config("plee")
    with pytest.raises(ValueError, match="Unknown key `num_expert`.*Did you mean `num_experts`"):
        model_config("mmoe", {"num_expert": 3})
    with pytest.raises(ValueError, match="levels\\[1\\].*Did you mean `expert_dims`"):
        model_config("ple", {"levels": [{"expert_dims": [3]}, {"expert_dim": [3]}]})
    with pytest.raises(ValueError, match="Expected `tower_dims` to hold positive integers"):
        model_config("ple", {"tower_dims": [0]})


def test_per_level_expert_counts_and_widths():
    params = {
        "levels": [
            {"num_task_experts": 2, "num_shared_experts": 1, "expert_dims": [9]},
            {"num_task_experts": 1, "num_shared_experts": 3, "expert_dims": [8, 6]},
            {"num_task_experts": 2, "num_shared_experts": 2, "expert_dims": [5]},
        ],
        "tower_dims": [3],
    }
    model = build_model("ple", params, VOCABS, NUM_DENSE, 3)
    shapes = [layer.experts.weights[-1].shape for layer in model.body.levels]
    assert shapes == [(3 * 2 + 1, model.input.out_dim, 9), (3 + 3, 8, 6), (3 * 2 + 2, 6, 5)]
    assert model(*_inputs(2)).shape == (2, 3)


def _column_models(name, num_tasks=3):
    params = {"bottom_dims": [8, 6], "tower_dims": [4]}
    return build_model(name, params, VOCABS, NUM_DENSE, num_tasks)


@pytest.mark.parametrize("name", ["cross_stitch", "sluice"])
def test_stitch_weights_are_learnable_near_identity_and_mix_every_column(name):
    model = _column_models(name)
    mixers = model.body.stitches if name == "cross_stitch" else model.body.alphas
    for alpha in mixers:
        assert alpha.requires_grad
        n = alpha.shape[0]
        assert n == (3 if name == "cross_stitch" else 3 * 2)
        torch.testing.assert_close(alpha.diagonal(), torch.full((n,), 0.9))
        assert (alpha - torch.diag(alpha.diagonal())).abs().max() <= 0.1 + 1e-6
        assert (alpha > 0).all()  # every column feeds every other
    sparse, dense = _inputs(5)
    model(sparse, dense).sum().backward()
    for alpha in mixers:
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    # Perturbing task 2's first-layer column changes what every task's tower receives.
    seen = []
    model.body.towers.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    model(sparse, dense)
    with torch.no_grad():
        model.body.layers[0].weights[0][2].add_(0.5)
    model(sparse, dense)
    before, after = seen
    assert ((after - before).flatten(1).abs().amax(1) > 0).all()


def test_sluice_skip_weights_read_every_layer():
    model = _column_models("sluice")
    assert model.body.betas.shape == (3, 2)
    assert model.body.towers.mlp.weights[0].shape[1] == 8 + 6  # tower reads the concatenated layers
    model(*_inputs(4)).sum().backward()
    assert model.body.betas.grad.abs().min() > 0


def test_ml_mmoe_gates_read_the_raw_input():
    model = build_model("ml_mmoe", {"num_experts": 3, "expert_dims": [6], "tower_dims": [4]}, VOCABS, NUM_DENSE, 2)
    body = model.body
    raw_dim = model.input.out_dim
    assert body.level1.task_gates.weights[0].shape == (3, raw_dim, 3)
    assert body.task_gates.weights[0].shape == (2, raw_dim, 3)
    seen = []
    body.task_gates.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    body.level1.task_gates.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = model.input(*_inputs(5))
    _, gates = body.extract(x)
    assert len(seen) == 2 and all(torch.equal(s, x) for s in seen)
    assert set(gates) == {"L0.expert0", "L0.expert1", "L0.expert2", "L1.task0", "L1.task1"}
    # The second level's experts read level-1 mixtures, not x.
    assert body.experts2.weights[0].shape == (3, 6, 6)


def test_asymmetric_sharing_feeds_source_bottom_into_the_others():
    model = build_model("asymmetric", {"bottom_dims": [6], "tower_dims": [4], "source_task": 1}, VOCABS, NUM_DENSE, 3)
    body = model.body
    assert body.others.weights[0].shape[1] == model.input.out_dim + 6
    sparse, dense = _inputs(5)
    before = model(sparse, dense).detach()
    with torch.no_grad():
        body.source.weights[0].add_(0.3)  # the source task's bottom
    after_source = model(sparse, dense).detach()
    assert ((after_source - before).abs().amax(0) > 0).all()  # every task moves
    with torch.no_grad():
        body.others.weights[0].add_(0.3)  # the other tasks' bottoms
    after_others = model(sparse, dense).detach()
    torch.testing.assert_close(after_others[:, 1], after_source[:, 1])  # the source task is untouched
    assert not torch.allclose(after_others[:, 0], after_source[:, 0])
    with pytest.raises(ValueError, match="source_task"):
        build_model("asymmetric", {"source_task": 3}, VOCABS, NUM_DENSE, 3)


def test_customized_sharing_concatenates_shared_and_specific_bottoms():
    model = build_model("customized", {"bottom_dims": [6], "tower_dims": [4]}, VOCABS, NUM_DENSE, 3)
    assert model.body.towers.mlp.weights[0].shape == (3, 12, 4)
    sparse, dense = _inputs(5)
    before = model(sparse, dense).detach()
    with torch.no_grad():
        model.body.specific.weights[0][0].add_(0.3)  # task 0's own bottom
    after = model(sparse, dense).detach()
    assert not torch.allclose(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1:], before[:, 1:])


def test_gate_expert_names_match_gate_widths():
    for name, model in _all_models():
        sparse, dense = _inputs(4)
        weights = model.gate_weights(sparse, dense)
        names = model.gate_experts()
        assert set(weights) == set(names), name
        for gate, w in weights.items():
            assert w.shape == (4, len(names[gate])), (name, gate)
            torch.testing.assert_close(w.sum(-1), torch.ones(4))
    ple = _unequal_ple()
    names = ple.gate_experts()
    assert names["L1.task2"] == ["L1.task2.0", "L1.task2.1", "L1.shared0", "L1.shared1", "L1.shared2"]
    assert len(names["L0.shared"]) == 3 * 2 + 3


def test_gate_mix_function_equals_plain_sums_with_exact_gradients():
    """The hand-written backward of the gate mixing is checked against autograd's numerical gradient, and
    its forward against the plain sums that inference and export use."""
    from plerec.models.layers import _GateMix, gate_mix

    g = torch.Generator().manual_seed(0)
    selection = ((0, 1, 4), (2, 3, 4), (0, 2, 3))  # two tasks: own + shared experts; a third gate
    weights = torch.rand(3, 5, 3, generator=g, dtype=torch.float64).requires_grad_()
    outputs = torch.randn(5, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, o: _GateMix.apply(w, o, selection), (weights, outputs))
    # an expert that no gate of the call reads (here 4) gets a zero gradient, not stale memory
    unread = ((0, 1), (2, 3), (3, 0))
    assert torch.autograd.gradcheck(lambda w, o: _GateMix.apply(w, o, unread), (weights[:, :, :2], outputs))
    _GateMix.apply(weights[:, :, :2], outputs, unread).sum().backward()
    assert outputs.grad[4].abs().max() == 0 and outputs.grad[:4].abs().min() > 0
    outputs.grad = weights.grad = None
    with torch.no_grad():
        plain = gate_mix(weights, outputs, selection)
    expected = torch.stack(
        [sum(weights[k, :, j, None] * outputs[e] for j, e in enumerate(s)) for k, s in enumerate(selection)]
    )
    torch.testing.assert_close(gate_mix(weights, outputs, selection), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)


def test_ple_trains_under_bfloat16_autocast_on_cpu():
    model = build_model("ple", {"expert_dims": [8], "tower_dims": [4], "num_levels": 2}, VOCABS, NUM_DENSE, 2)
    sparse, dense = _inputs(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(sparse, dense).float()
    logits.sum().backward()
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.dtype == p.dtype == torch.float32 for p in model.parameters())


def _layouts():
    """Every PLE level layout of 1-3 levels with one task expert and 0-2 shared experts per level."""
    import itertools

    kinds = [(1, s) for s in (0, 1, 2)]
    for n in (1, 2, 3):
        yield from itertools.product(kinds, repeat=n)


def test_every_ple_layout_that_validates_builds_and_runs_forward_and_backward():
    refused = []
    for layout in _layouts():
        levels = [{"num_task_experts": t, "num_shared_experts": s, "expert_dims": [4]} for t, s in layout]
        try:
            config = model_config("ple", {"levels": levels, "tower_dims": [3], "embedding_dim": 2})
        except ValueError as err:
            assert re.search(r"level \d to have shared experts, because level \d has some", str(err)), err
            refused.append(layout)
            continue
        model = build_model("ple", config, VOCABS, NUM_DENSE, 2)
        logits = model(*_inputs(5))  # a layout that passes validation must run: no error at forward time
        logits.sum().backward()
        assert logits.shape == (5, 2) and torch.isfinite(logits).all(), layout
        assert all(p.grad is not None for p in model.parameters()), layout
    # Exactly the layouts with a level j >= 1 without shared experts before a level with some are refused.
    expected = [
        layout
        for layout in _layouts()
        if any(layout[j][1] == 0 and layout[j + 1][1] > 0 for j in range(1, len(layout) - 1))
    ]
    assert refused == expected and ((1, 1), (1, 0), (1, 1)) in refused
    assert ((1, 0), (1, 1)) not in refused  # level 0's shared gate reads the input itself


def test_the_refused_ple_layout_names_its_level():
    levels = [{"num_task_experts": 1, "num_shared_experts": s} for s in (1, 0, 1)]
    with pytest.raises(ValueError, match=r"level 1 to have shared experts, because level 2 has some"):
        model_config("ple", {"levels": levels})


@pytest.mark.parametrize(
    ("name", "params", "vocabs", "message"),
    [
        ("ple", {"embedding_dim": 8}, [2**31, 1], r"at most 2147483648 embedding rows in all"),
        ("single", {"embedding_dim": 1}, [2**30 + 1], r"rows in all.* for each of 2 tasks"),
        ("ple", {"embedding_dim": 4096}, [2**21], r"at most 4294967296 parameters, but ple .* has \d+ \(32\.0 GiB\)"),
        ("mmoe", {"num_experts": 1024, "expert_dims": [65536, 65536]}, [10], r"at most 4294967296 parameters"),
    ],
)
def test_models_too_large_are_refused_before_anything_is_allocated(name, params, vocabs, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, params, vocabs, NUM_DENSE, 2)


def test_state_shapes_are_those_of_the_built_model():
    from plerec.models.family import state_shapes

    for name in MODELS:
        config = model_config(name, {"embedding_dim": 2, "tower_dims": [3]})
        shapes = state_shapes(name, config, VOCABS, NUM_DENSE, 2)
        state = build_model(name, config, VOCABS, NUM_DENSE, 2).state_dict()
        assert shapes == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_init_he_draws_every_dense_layer_from_n_0_2_over_fan_in(name):
    """[model] dense_init = "he": each ParallelMLP weight N(0, 2 / fan_in), biases 0; the default is untouched
    (the same weights as before the option existed: nn.Linear's uniform, bounded by 1/√fan_in)."""
    torch.manual_seed(0)
    uniform = build_model(name, {"embedding_dim": 4, "tower_dims": [32]}, [7, 5], 3, 2)
    torch.manual_seed(0)
    he = build_model(name, {"embedding_dim": 4, "tower_dims": [32], "dense_init": "he"}, [7, 5], 3, 2)
    banks = [(a, b) for a, b in zip(uniform.modules(), he.modules(), strict=True) if isinstance(a, ParallelMLP)]
    assert banks
    weights = [w for _, bank in banks for w in bank.weights]
    pooled = torch.cat([(w / (2.0 / w.shape[1]) ** 0.5).flatten() for w in weights])  # N(0, 1) if He
    assert abs(pooled.mean().item()) < 0.1 and abs(pooled.std().item() - 1) < 0.1
    assert all(torch.count_nonzero(b) == 0 for _, bank in banks for b in (bank.biases or ()))
    for bank, _ in banks:
        for w in bank.weights:
            assert w.abs().max() <= 1 / w.shape[1] ** 0.5 + 1e-7  # the uniform default's bound


def test_dense_init_must_be_known():
    with pytest.raises(ValueError, match="Expected `dense_init` to be one of uniform, he, but got 'xavier'"):
        model_config("ple", {"dense_init": "xavier"})
