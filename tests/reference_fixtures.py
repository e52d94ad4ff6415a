"""Golden routing fixtures for MMoE, CGC and PLE, built in the tests from the papers' equations.

Plain numpy in float64, written from DESIGN.md §2 (Ma et al., KDD 2018; Tang et al., RecSys 2020,
Eq. 2-6) and independent of plerec. The arrays follow ../shared/reference/README.md key for key, so a
test reads these and the shared .npz files the same way; `expected_outputs` also recomputes the
shared files' outputs from their weights, which checks the two references against each other.
"""

import numpy as np

# The three configurations of the README's table: (task experts per task, shared experts, widths).
CONFIGS: dict[str, dict] = {
    "mmoe": {
        "num_tasks": 2,
        "batch": 7,
        "input_dim": 11,
        "levels": [{"num_task_experts": 0, "num_shared_experts": 4, "expert_dims": [6]}],
    },
    "cgc": {
        "num_tasks": 3,
        "batch": 7,
        "input_dim": 11,
        "levels": [{"num_task_experts": 2, "num_shared_experts": 3, "expert_dims": [8, 5]}],
    },
    "ple": {
        "num_tasks": 3,
        "batch": 7,
        "input_dim": 11,
        "levels": [
            {"num_task_experts": 2, "num_shared_experts": 1, "expert_dims": [9]},
            {"num_task_experts": 1, "num_shared_experts": 3, "expert_dims": [8, 6]},
            {"num_task_experts": 2, "num_shared_experts": 2, "expert_dims": [5]},
        ],
    },
}


def _check(cfg: dict) -> None:
    levels = cfg["levels"]
    for j in range(len(levels) - 1):
        if levels[j + 1]["num_shared_experts"] == 0:
            raise ValueError(f"Expected level {j + 1} to have shared experts (they read level {j}'s shared gate)")


def _experts(cfg: dict, j: int) -> tuple[list[list[str]], list[str]]:
    """Level j's expert names: per task (task 0's, task 1's, ...), then the shared ones."""
    lv = cfg["levels"][j]
    tasks = [[f"L{j}.task{k}.expert{i}" for i in range(lv["num_task_experts"])] for k in range(cfg["num_tasks"])]
    return tasks, [f"L{j}.shared.expert{i}" for i in range(lv["num_shared_experts"])]


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """The input x and every weight of the extraction layers, stored (in, out); gate biases are zero."""
    _check(cfg)
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((cfg["batch"], cfg["input_dim"]))}
    d = cfg["input_dim"]  # every stream entering level j has the same width: level j-1's expert width
    for j, lv in enumerate(cfg["levels"]):
        tasks, shared = _experts(cfg, j)
        for name in [n for names in tasks for n in names] + shared:
            d_in = d
            for l_, h in enumerate(lv["expert_dims"]):
                # Unit-scale pre-activations of both signs, so every ReLU cuts something off; nonzero
                # biases, so a bias that is not loaded shows.
                arrays[f"{name}.W{l_}"] = rng.uniform(-1.0, 1.0, (d_in, h)) * np.sqrt(3.0 / d_in)
                arrays[f"{name}.b{l_}"] = rng.uniform(-0.3, 0.3, h)
                d_in = h
        # Gate logits of scale ~2: softmax weights far from uniform, yet no expert's weight near 0 or 1.
        m_task = lv["num_task_experts"] + lv["num_shared_experts"]
        for k in range(cfg["num_tasks"]):
            arrays[f"L{j}.task{k}.gate.W"] = rng.standard_normal((d, m_task)) * 2.0 / np.sqrt(d)
            arrays[f"L{j}.task{k}.gate.b"] = np.zeros(m_task)
        if j < len(cfg["levels"]) - 1:
            m_all = cfg["num_tasks"] * lv["num_task_experts"] + lv["num_shared_experts"]
            arrays[f"L{j}.shared.gate.W"] = rng.standard_normal((d, m_all)) * 2.0 / np.sqrt(d)
            arrays[f"L{j}.shared.gate.b"] = np.zeros(m_all)
        d = lv["expert_dims"][-1]
    return arrays


def expected_outputs(cfg: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the equations give for these weights: each tower's input and each gate's softmax weights."""
    _check(cfg)
    num_tasks, last = cfg["num_tasks"], len(cfg["levels"]) - 1

    def expert(name: str, h: np.ndarray, depth: int) -> np.ndarray:
        for l_ in range(depth):  # every layer affine then ReLU, the last one included
            h = np.maximum(h @ arrays[f"{name}.W{l_}"] + arrays[f"{name}.b{l_}"], 0.0)
        return h

    def gate(prefix: str, selector: np.ndarray, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # Eq. 3-4: g(x) = w(x) · S(x), w(x) = softmax(W x); columns of W in the order of `outputs`.
        logits = selector @ arrays[f"{prefix}.gate.W"] + arrays[f"{prefix}.gate.b"]  # (B, E)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        stacked = np.stack(outputs)  # (E, B, H)
        return np.einsum("be,ebh->bh", w, stacked), w

    out: dict[str, np.ndarray] = {}
    task_in = [arrays["x"]] * num_tasks  # g^{k,0} = x
    shared_in = arrays["x"]  # g^{s,0} = x
    for j, lv in enumerate(cfg["levels"]):
        depth = len(lv["expert_dims"])
        tasks, shared = _experts(cfg, j)
        task_out = [[expert(n, task_in[k], depth) for n in tasks[k]] for k in range(num_tasks)]
        shared_out = [expert(n, shared_in, depth) for n in shared]
        next_task_in = []
        for k in range(num_tasks):
            # Task k's gate reads task k's stream and mixes only its own experts and the shared ones.
            g, w = gate(f"L{j}.task{k}", task_in[k], task_out[k] + shared_out)
            out[f"gate.L{j}.task{k}"] = w
            next_task_in.append(g)
        if j < last:
            # The shared gate reads the shared stream and mixes every expert of the level (Eq. 6).
            every = [o for outputs in task_out for o in outputs] + shared_out
            shared_in, out[f"gate.L{j}.shared"] = gate(f"L{j}.shared", shared_in, every)
        task_in = next_task_in
    for k in range(num_tasks):
        out[f"out.task{k}"] = task_in[k]
    return out


def build_fixture(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights for `cfg` and the outputs the equations give for them: the README's arrays."""
    arrays = random_weights(cfg, seed)
    return {**arrays, **expected_outputs(cfg, arrays)}
