"""The machine's ceiling for one model: matrix-multiply FLOPs per sample over the achievable fp32 GEMM rate.

FLOPs per sample: every linear layer of the architecture (experts, gates, towers) costs 2·in·out
multiply-adds forward; the backward pass costs twice that (the gradient with respect to the layer's
input and with respect to its weight), so one training sample costs 3 × the forward FLOPs. Embedding
lookups, their gradient scatter, biases, activations, softmax, the gate mixing, the loss and the
optimizer step are not counted: the ceiling is what the matrix multiplies alone would allow.

Achievable rate: each of those GEMMs is timed with torch.mm at the benchmark's batch size on the
layer's own shapes — forward (B × in) @ (in × out), input gradient (B × out) @ (out × in), weight
gradient (in × B) @ (B × out) — in fp32 with the benchmark's thread count; each call is timed alone
and the fastest kept. The same GEMMs are timed in bfloat16 too (what `[train] bf16` autocast runs them in):
the ceiling of the bf16 variants.
The ceiling in samples per second is B divided by the summed time of all GEMMs of one batch, which is
the same as (FLOPs per sample) / (FLOP-weighted achievable rate).
"""

from __future__ import annotations

import json
import sys
import time

import torch


def linear_layers(model: str, arch: dict, in_dim: int, num_tasks: int) -> list[tuple[str, int, int, int]]:
    """(name, count, in, out) for every linear layer of the model."""
    dims = arch["expert_dims"]
    layers: list[tuple[str, int, int, int]] = []

    def experts(prefix: str, count: int, d: int) -> int:
        for i, h in enumerate(dims):
            layers.append((f"{prefix}.expert{i}", count, d, h))
            d = h
        return d

    if model == "ple":
        p = arch["ple"]
        d = in_dim
        for level in range(p["num_levels"]):
            count = num_tasks * p["num_task_experts"] + p["num_shared_experts"]
            out = experts(f"L{level}", count, d)
            layers.append((f"L{level}.task_gates", num_tasks, d, p["num_task_experts"] + p["num_shared_experts"]))
            if level < p["num_levels"] - 1:  # the last level has no shared gate
                layers.append((f"L{level}.shared_gate", 1, d, count))
            d = out
    elif model == "mmoe":
        n = arch["mmoe"]["num_experts"]
        d = experts("L0", n, in_dim)
        layers.append(("L0.task_gates", num_tasks, in_dim, n))
    else:
        raise ValueError(f"Expected model 'ple' or 'mmoe', but got {model!r}")
    for i, h in enumerate([*arch["tower_dims"], 1]):
        layers.append((f"tower{i}", num_tasks, d, h))
        d = h
    return layers


def time_mm(a: torch.Tensor, b: torch.Tensor, budget_seconds: float = 0.3, min_calls: int = 30) -> float:
    """Seconds per torch.mm(a, b): the fastest of many single-call timings.

    Each call is timed on its own, so a call during which the OS preempted one of the GEMM's threads
    (other processes on a small machine) does not spoil the others; the fastest call is the rate the
    hardware achieves on these shapes, which makes the ceiling high and plerec's fraction of it
    conservative.
    """
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    for _ in range(5):
        torch.mm(a, b, out=out)
    times = []
    deadline = time.perf_counter() + budget_seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return min(times)


def ceiling(model: str, arch: dict, in_dim: int, num_tasks: int, batch_size: int) -> dict:
    layers = linear_layers(model, arch, in_dim, num_tasks)
    fwd_flops = sum(2 * count * i * o for _, count, i, o in layers)  # per sample
    gen = torch.Generator().manual_seed(0)
    timed: dict[torch.dtype, dict[tuple[int, int], dict[str, float]]] = {torch.float32: {}, torch.bfloat16: {}}
    for _, _, i, o in layers:
        if (i, o) in timed[torch.float32]:
            continue
        x = torch.randn(batch_size, i, generator=gen)
        w = torch.randn(i, o, generator=gen)
        g = torch.randn(batch_size, o, generator=gen)
        for dtype, times in timed.items():
            xd, wd, gd = x.to(dtype), w.to(dtype), g.to(dtype)
            times[(i, o)] = {
                "forward": time_mm(xd, wd),  # (B, in) @ (in, out)
                "input_grad": time_mm(gd, wd.t().contiguous()),  # (B, out) @ (out, in)
                "weight_grad": time_mm(xd.t().contiguous(), gd),  # (in, B) @ (B, out)
            }
    batch_seconds, bf16_seconds = (
        sum(count * sum(timed[dtype][(i, o)].values()) for _, count, i, o in layers)
        for dtype in (torch.float32, torch.bfloat16)
    )
    fwd_seconds = sum(count * timed[torch.float32][(i, o)]["forward"] for _, count, i, o in layers)
    train_flops = 3 * fwd_flops
    return {
        "model": model,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "in_dim": in_dim,
        "layers": [{"name": n, "count": c, "in": i, "out": o} for n, c, i, o in layers],
        "forward_flops_per_sample": fwd_flops,
        "train_flops_per_sample": train_flops,
        "achievable_gflops": train_flops * batch_size / batch_seconds / 1e9,
        "forward_shapes_gflops": fwd_flops * batch_size / fwd_seconds / 1e9,
        "ceiling_samples_per_s": batch_size / batch_seconds,
        "gemm_seconds": {f"{i}x{o}": t for (i, o), t in timed[torch.float32].items()},
        # the same GEMMs in bfloat16 (what autocast runs them in): the ceiling of the bf16 variants
        "achievable_gflops_bf16": train_flops * batch_size / bf16_seconds / 1e9,
        "ceiling_samples_per_s_bf16": batch_size / bf16_seconds,
        "gemm_seconds_bf16": {f"{i}x{o}": t for (i, o), t in timed[torch.bfloat16].items()},
    }


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(spec["threads"])
    results = [ceiling(m, spec["arch"], spec["in_dim"], spec["num_tasks"], spec["batch_size"]) for m in spec["models"]]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=2)
