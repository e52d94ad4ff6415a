"""Summaries of the worker results: results.json records, the markdown table, the targets, scaling."""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics

PLEREC = "plerec"
PLEREC_COMPILE = "plerec-compile"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running plerec's own trainer in the benchmark: the settings worker.py gives it beyond the
    benchmark's architecture, and what the report says of it (`label`: the targets' headings; `note`: what the
    protocol paragraph adds after the settings)."""

    label: str
    note: str = ""
    batch_norm: tuple[str, ...] = ()  # [model] batch_norm
    bf16: bool = False  # [train] bf16 = true: bfloat16 autocast
    compile: bool = False  # [train] compile = true, Inductor's cache in DIR/work/inductor (cold, then warm)

    def settings(self) -> list[str]:
        """The experiment keys that set this variant apart from the default, as the report writes them."""
        return [
            *([f"`[model] batch_norm = {json.dumps(list(self.batch_norm))}`"] if self.batch_norm else []),
            *(["`[train] bf16 = true`"] if self.bf16 else []),
            *(["`[train] compile = true`"] if self.compile else []),
        ]


_GE = ("gates", "experts")
# plerec's variants, the default first; every table of the report lists them in this order
PLEREC_VARIANTS = {
    PLEREC: Variant("fp32, as the peers"),
    PLEREC_COMPILE: Variant(
        "fp32, compiled body; the compile time counts in the training time",
        ", Inductor's cache in DIR/work/inductor (the first run of a configuration compiles from a cold cache, the "
        "repeats from a warm one)",
        compile=True,
    ),
    "plerec-bf16": Variant("bfloat16 autocast", " (bfloat16 autocast)", bf16=True),
    "plerec-bn": Variant(
        "fp32, a BatchNorm at every place: torch-rechub's architecture",
        ", torch-rechub's architecture (a BatchNorm after every layer its MLPs build: the gates' logits, the "
        "experts' layers, the towers' hidden layers)",
        batch_norm=("gates", "experts", "towers"),
    ),
    "plerec-bn-ge": Variant(
        "fp32, a BatchNorm after the gates' and the experts' layers", " (no BatchNorm in the towers)", batch_norm=_GE
    ),
    "plerec-bf16-bn-ge": Variant(
        "bfloat16 autocast, a BatchNorm after the gates' and the experts' layers", batch_norm=_GE, bf16=True
    ),
}
PEERS = ("torch-rechub", "deepctr-torch")  # the peers' own trainers
MiB = 2**20
SIMD_FLAGS = ("sse4", "avx", "amx", "fma", "f16c", "asimd", "sve")  # the CPU flags that matter for torch's kernels
SEQUENCE_TRAIN_GOAL = 2.0  # the sequence case: plerec's training >= 2 x the faster peer's
PLAIN_LOOP = "plerec+plain-loop"  # plerec's model in the loop of the X+plerec-batching variants (dense gradients)
AUC_TOLERANCE = 0.002  # "equal" AUC, as the main targets count it


def summarise(library: str, model: str, batch_size: int, runs: list[dict]) -> dict:
    """One results.json record: medians (with min and max) over the runs; AUC and peak RSS from the full
    epoch (the only run that trains on, and holds, all the rows), or from the first run without one."""
    ok = [r for r in runs if "error" not in r]
    record: dict = {"library": library, "model": model, "batch_size": batch_size}
    if not ok:
        record.update(
            train_samples_per_s=None,
            infer_samples_per_s=None,
            peak_rss_bytes=None,
            auc={},
            errors=[r.get("error") for r in runs],
        )
        return record
    ref = next((r for r in ok if r["kind"] == "full"), ok[0])
    seeds = [r for r in ok if r["kind"] == "full" and r["auc"].keys() == ref["auc"].keys()] or [ref]
    train = [r["train_samples_per_s"] for r in ok]
    infer = [r["infer_samples_per_s"] for r in ok]
    record.update(
        train_samples_per_s=statistics.median(train),
        infer_samples_per_s=statistics.median(infer),
        peak_rss_bytes=ref["peak_rss_bytes"],
        auc={t: statistics.fmean(r["auc"][t] for r in seeds) for t in ref["auc"]},
        auc_seeds=[r["seed"] for r in seeds],
        **({"auc_sd": {t: statistics.stdev(r["auc"][t] for r in seeds) for t in ref["auc"]}} if len(seeds) > 1 else {}),
        train_samples_per_s_min=min(train),
        train_samples_per_s_max=max(train),
        infer_samples_per_s_min=min(infer),
        infer_samples_per_s_max=max(infer),
        runs=len(ok),
        auc_and_rss_from=f"{ref['kind']} run, {ref['train_rows']:,} training rows",
        per_run=[
            {
                "kind": r["kind"],
                "seed": r["seed"],
                "train_rows": r["train_rows"],
                "train_seconds": r["train_seconds"],
                "train_samples_per_s": r["train_samples_per_s"],
                "infer_samples_per_s": r["infer_samples_per_s"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "auc": r["auc"],
                "load_average_start_end": r.get("load_average_start_end"),
                **({"compiled": r["plerec_compiled"]} if r.get("plerec_compiled") else {}),
            }
            for r in ok
        ],
    )
    if len(ok) < len(runs):
        record["errors"] = [r["error"] for r in runs if "error" in r]
    return record


def _find(records: list[dict], library: str, model: str, batch_size: int) -> dict | None:
    for r in records:
        if r["library"] == library and r["model"] == model and r["batch_size"] == batch_size:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def _num(x: float | None) -> str:
    return f"{x:,.0f}" if x else "—"


def _spread(record: dict, key: str) -> str:
    """median [min–max]"""
    return f"{_num(record[key])} [{_num(record[key + '_min'])}–{_num(record[key + '_max'])}]"


def _auc(record: dict, task: str) -> str:
    """The test AUC: one full epoch's, or the mean ± sd over the seeds' full epochs (n in brackets)."""
    value = record["auc"].get(task)
    if value is None:
        return "—"
    sd = record.get("auc_sd", {}).get(task)
    return f"{value:.4f}" if sd is None else f"{value:.4f} ± {sd:.4f} (n={len(record['auc_seeds'])})"


def _gap(ours: dict, peer: dict, task: str) -> str:
    """plerec's AUC less the peer's, with the standard error of that difference of means where both have seeds."""
    gap = ours["auc"][task] - peer["auc"][task]
    sds = [(r.get("auc_sd", {}).get(task), len(r.get("auc_seeds", []))) for r in (ours, peer)]
    if any(sd is None for sd, _ in sds):
        return f"{gap:+.4f}"
    return f"{gap:+.4f} ± {sum(sd**2 / n for sd, n in sds) ** 0.5:.4f}"


def _steady(run: dict, compile_seconds: float | None) -> float | None:
    """A compiled run's training rate without its compile time (None where nothing was compiled)."""
    return run["train_rows"] / (run["train_seconds"] - compile_seconds) if compile_seconds is not None else None


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "—"


def _load(values: list[float] | None) -> str:
    return f"{values[0]:.2f}" if values else "—"


def comparison_markdown(records: list[dict], ceiling: dict, context: dict) -> str:
    data, versions, m = context["data"], context["versions"], context["machine"]
    rows = data["rows"]
    sequence = context.get("case") == "sequence"
    simd = [f for f in m.get("cpu_flags", []) if f.startswith(SIMD_FLAGS)]
    lines = [
        "# plerec speed benchmark" + (": the sequence case" if sequence else ""),
        "",
        f"{context['date']} · {m['cpu']}{f' ({family})' if (family := m.get('cpu_family_model')) else ''} "
        f"(flags: {' '.join(simd) or '—'}) · {m['cores']} cores, "
        f"{context['threads']} torch threads · "
        f"plerec {versions['plerec']}, torch {versions['torch']}, torch-rechub {versions['torch-rechub']}, "
        f"deepctr-torch {versions['deepctr-torch']}, Python {versions['python']} · "
        f"wall time {_minutes(context.get('wall_seconds'))} · load average before/after "
        f"{_load(context.get('load_average_before'))} / {_load(context.get('load_average_after'))} · plerec source "
        f"sha256 {context['plerec_source_sha256']}, train defaults "
        + ", ".join(
            f"{k} = {v}"
            for k, v in (context.get("plerec_train_config") or {}).items()
            if k in ("sparse_embeddings", "bf16", "device", "eval_batch_size")
        ),
        "",
        f"Data: {rows['train']:,} training, {rows['valid']:,} validation and {rows['test']:,} test rows; "
        f"{len(data['categorical'])} categorical fields ({data['total_ids']:,} ids), {len(data['numeric'])} numeric; "
        f"positive rates (train) click {data['positive_rate']['train']['click']:.3f}, "
        f"conversion {data['positive_rate']['train']['conversion']:.3f}; AUC of the hidden model itself on the test "
        f"split: click {data['oracle_test_auc']['click']:.4f}, conversion {data['oracle_test_auc']['conversion']:.4f}.",
        "",
        *history_lines(data),
        "Protocol: every number comes from its own process. A configuration runs "
        f"{context['repeats']} times: once one epoch over all {rows['train']:,} training rows (libraries: "
        f"{', '.join(context['full_epoch_libraries'])}), then on the first {context['short_rows']:,} rows. "
        "Each library trains through its own fit call (validation data given); train samples/s = training rows / "
        "the training time as plerec's `train_seconds` defines it: the epoch's steps, without the validation pass "
        "(torch-rechub: `MTLTrainer.train_one_epoch` inside `fit`; DeepCTR-Torch: `fit` less its `evaluate`); "
        "median [min–max] over the runs. Inference: the whole test split at the same batch size with the "
        "library's predict call, median over the runs. "
        + (
            "AUC (test) and peak RSS of the process: from the full-epoch run. "
            if context.get("auc_seeds", 1) <= 1
            else f"The full epoch also runs with {context['auc_seeds'] - 1} more seeds (model initialisation and "
            "batch order; the same data), each counted among the runs: test AUC is the mean ± sd over the "
            f"{context['auc_seeds']} seeds' full epochs (n = their number), a gap's ± the standard error of the "
            "difference of two means; peak RSS from the first full epoch. "
        )
        + (
            ""
            if sequence
            else "`X+plerec-batching`: the peer's model class trained on plerec's encoded tensors and plerec's "
            f"batch source by a plain loop; `{PLAIN_LOOP}`: plerec's model in that loop, with dense embedding "
            "gradients and torch.optim.Adam over every parameter. "
        )
        + "".join(
            f"`{lib}`: plerec with {' and '.join(v.settings())}{v.note}. "
            for lib, v in PLEREC_VARIANTS.items()
            if lib != PLEREC and any(r["library"] == lib for r in records)
        )
        + "Ratios are plerec ÷ that row, same model and batch size, same invocation.",
        "",
    ]
    models = sorted({r["model"] for r in records}, key=["ple", "mmoe"].index)
    sizes = sorted({r["batch_size"] for r in records})
    for model in models:
        for bs in sizes:
            ours = _find(records, PLEREC, model, bs)
            lines += [
                f"## {model.upper()}, batch size {bs}",
                "",
                "| library | train samples/s | plerec ÷ | infer samples/s | plerec ÷ | peak RSS MiB | plerec ÷ "
                "| AUC click | AUC conversion |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in records:
                if r["model"] != model or r["batch_size"] != bs:
                    continue
                if r["train_samples_per_s"] is None:
                    lines.append(f"| {r['library']} | failed: {'; '.join(map(str, r.get('errors', [])))} |||||||| ")
                    continue
                train, infer = _spread(r, "train_samples_per_s"), _spread(r, "infer_samples_per_s")
                mark = "" if "full" in r["auc_and_rss_from"] else " ¹"
                auc = [f"{_auc(r, t)}{mark}" for t in ("click", "conversion")]
                own = ours if ours and ours.get("train_samples_per_s") else {}
                ratios = {
                    k: _ratio(own.get(k), r[k])
                    for k in ("train_samples_per_s", "infer_samples_per_s", "peak_rss_bytes")
                }
                lines.append(
                    f"| {r['library']} | {train} | {ratios['train_samples_per_s']} "
                    f"| {infer} | {ratios['infer_samples_per_s']} "
                    f"| {r['peak_rss_bytes'] / MiB:,.0f}{mark} | {ratios['peak_rss_bytes']} "
                    f"| {auc[0]} | {auc[1]} |"
                )
            lines.append("")
    if any("full" not in r.get("auc_and_rss_from", "full") for r in records):
        lines += [f"¹ from a short run ({context['short_rows']:,} training rows): not comparable with the others.", ""]

    lines += ceiling_markdown(records, ceiling)
    lines += compile_markdown(records)
    if sequence:
        lines += sequence_markdown(records)
        for model in models:
            for bs in sizes:
                lines += runs_markdown(records, model, bs)
    else:
        lines += targets_markdown(records, ceiling)
        lines += runs_markdown(records)
    return "\n".join(lines) + "\n"


def compile_markdown(records: list[dict]) -> list[str]:
    """plerec-compile run by run: the compile time (the full run compiles from a cold cache, the repeats read
    it warm), the compiled step against the eager plerec's, and training samples/s with and without the
    compile time."""
    compiled = [r for r in records if r["library"] == PLEREC_COMPILE and r.get("per_run")]
    if not compiled:
        return []
    lines = [
        "## Compiled training (plerec-compile: `[train] compile = true`)",
        "",
        "Inductor's cache starts empty in each benchmark folder (`work/inductor`): the full-epoch run compiles "
        "cold, the repeats warm. Compile seconds: the first compiled step, whole (with `compile = true` plerec "
        "times no eager step to subtract). Compiled step: median of up to 20 steps after it. Train samples/s: "
        "training rows over the "
        "training time (compile included), and over the training time less the compile seconds (the steady "
        "rate); the eager plerec's median beside it.",
        "",
        "| model | batch | run | rows | compile s | compiled step ms | train samples/s | without the compile "
        "| plerec (eager) median |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in compiled:
        eager = _find(records, PLEREC, r["model"], r["batch_size"]) or {}
        for k, run in enumerate(r["per_run"]):
            c = run.get("compiled") or {}
            seconds = c.get("compile_seconds")
            steady = _steady(run, seconds)
            step = f"{c['compiled_step'] * 1e3:.2f}" if c.get("compiled_step") else "—"
            lines.append(
                f"| {r['model'].upper()} | {r['batch_size']} | {run['kind']} {'(cold)' if k == 0 else '(warm)'} "
                f"| {run['train_rows']:,} | {f'{seconds:.1f}' if seconds is not None else '—'} | {step} "
                f"| {_num(run['train_samples_per_s'])} | {_num(steady)} | {_num(eager.get('train_samples_per_s'))} |"
            )
    return lines + [""]


def history_lines(data: dict) -> list[str]:
    """The sequence case's list field, as datagen.py describes it in meta.json."""
    lines = []
    for name, h in data.get("lists", {}).items():
        lines += [
            f"Sequence case: the list field `{name}` (Parquet list<int64>, ids of `{h['field']}`, oldest first, up to "
            f"{h['max_length']}; mean length {h['mean_length']:.1f}, {h['empty_share']:.0%} empty, the row's "
            f"`{h['field']}` in its history in {h['item_in_history_share']:.1%} of the rows; its click-logit term "
            f"has std {h['term_std']:.2f}), mean-pooled over `{h['field']}`'s embedding table by every library: "
            f'plerec `[features.lists.{name}] share = "{h["field"]}", pooling = "mean"`, torch-rechub '
            f'`SequenceFeature(pooling="mean", shared_with="{h["field"]}")`, DeepCTR-Torch '
            f'`VarLenSparseFeat(SparseFeat(embedding_name="{h["field"]}"), combiner="mean", length_name=...)`.',
            "",
        ]
    return lines


def sequence_markdown(records: list[dict]) -> list[str]:
    """The sequence case's comparison: plerec against the better peer on each measure, per model and batch
    size; the target is training >= 2 x the faster peer's at equal (within AUC_TOLERANCE) or better AUC."""
    lines = [
        "## Sequence case: plerec against the better peer",
        "",
        f"For each measure the better of the peers' own trainers on it (faster, smaller, more accurate). Target: "
        f"training ≥ {SEQUENCE_TRAIN_GOAL:g} × the faster peer's at equal or better test AUC (equal: within "
        f"{AUC_TOLERANCE} of the best peer's, as the main targets count it). Medians; the best runs (least "
        "disturbed by the machine) in brackets.",
        "",
        "| model | batch | measure | plerec | better peer | value | plerec ÷ peer | verdict |",
        "|---|---:|---|---:|---|---:|---:|---|",
    ]
    models = sorted({r["model"] for r in records}, key=["ple", "mmoe"].index)
    sizes = sorted({r["batch_size"] for r in records})
    for model, bs, ours_lib in itertools.product(models, sizes, PLEREC_VARIANTS):
        ours = _find(records, ours_lib, model, bs)
        label = model.upper() + ("" if ours_lib == PLEREC else f" ({ours_lib})")
        if ours_lib != PLEREC and not ours:
            continue
        peers = [p for p in (_find(records, lib, model, bs) for lib in PEERS) if p and p["train_samples_per_s"]]
        if not ours or not ours["train_samples_per_s"] or not peers:
            lines.append(f"| {label} | {bs} | — | {ours_lib}: failed or missing |||||")
            continue
        for key, what in (("train_samples_per_s", "train samples/s"), ("infer_samples_per_s", "infer samples/s")):
            peer = max(peers, key=lambda p: p[key])
            ratio, best = ours[key] / peer[key], ours[key + "_max"] / peer[key + "_max"]
            verdict = ""
            if key == "train_samples_per_s":
                verdict = "pass" if ratio >= SEQUENCE_TRAIN_GOAL else "FAIL"
                verdict += f" ({ratio / SEQUENCE_TRAIN_GOAL:.2f}× of the goal)"
            lines.append(
                f"| {label} | {bs} | {what} | {_num(ours[key])} | {peer['library']} | {_num(peer[key])} "
                f"| {ratio:.2f}× [{best:.2f}×] | {verdict} |"
            )
        peer = min(peers, key=lambda p: p["peak_rss_bytes"])
        lines.append(
            f"| {label} | {bs} | peak RSS MiB | {ours['peak_rss_bytes'] / MiB:,.0f} | {peer['library']} "
            f"| {peer['peak_rss_bytes'] / MiB:,.0f} | {ours['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}× | |"
        )
        for task in ours["auc"]:
            peer = max((p for p in peers if task in p["auc"]), key=lambda p: p["auc"][task])
            gap = ours["auc"][task] - peer["auc"][task]
            verdict = "pass" if gap >= -AUC_TOLERANCE else "FAIL"
            lines.append(
                f"| {label} | {bs} | AUC {task} | {_auc(ours, task)} | {peer['library']} "
                f"| {_auc(peer, task)} | {_gap(ours, peer, task)} | {verdict} |"
            )
    return lines + [""]


def _ceiling(c: dict, variant: Variant) -> tuple[str, float | None, float | None]:
    """(precision, ceiling samples/s, achievable GFLOP/s) of one model's ceiling record for a variant: the
    bfloat16 GEMMs' for a bf16 variant, fp32 otherwise and for runs from before the bf16 ceiling was measured."""
    suffix = "_bf16" if variant.bf16 and "ceiling_samples_per_s_bf16" in c else ""
    return ("bf16" if suffix else "fp32"), c.get(f"ceiling_samples_per_s{suffix}"), c.get(f"achievable_gflops{suffix}")


def ceiling_markdown(records: list[dict], ceiling: dict) -> list[str]:
    lines = [
        "## Compute ceiling (batch size 1024)",
        "",
        "FLOPs per training sample = 3 × Σ 2·in·out over the linear layers (experts, gates, towers); "
        "embeddings, elementwise ops, gate mixing, loss and optimizer are not counted. Achievable rate: "
        "torch.mm timed on each layer's forward, input-gradient and weight-gradient shapes at "
        "batch 1024, fastest call, FLOP-weighted: in fp32 for the fp32 variants, in bfloat16 (what autocast "
        "runs them in) for the bf16 ones.",
        "",
        "| model | precision | MFLOP per sample | achievable GFLOP/s | ceiling samples/s | plerec train samples/s "
        "| fraction |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, c in ceiling["all_models"].items():
        for lib, variant in PLEREC_VARIANTS.items():
            ours = _find(records, lib, model, 1024)
            if lib != PLEREC and not ours:
                continue
            precision, limit, rate = _ceiling(c, variant)
            value = ours["train_samples_per_s"] if ours else None
            frac = f"{value / limit:.0%}" if value else "—"
            lines.append(
                f"| {model.upper()} ({lib}) | {precision} "
                f"| {c['train_flops_per_sample'] / 1e6:.2f} | {rate:.1f} | {limit:,.0f} | {_num(value)} | {frac} |"
            )
    return lines + [""]


def targets(
    records: list[dict], ceiling: dict, stat: str = "", ours_lib: str = PLEREC
) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, margin, passed) for the issue's targets: PLE at batch size 1024.

    `stat` "" compares the medians; "_max" the best run of each configuration, which a busy machine
    disturbs least (other processes only ever slow a run down)."""
    model, bs = "ple", 1024

    def get(lib: str, key: str):
        r = _find(records, lib, model, bs)
        return r.get(key) if r else None

    train, infer = f"train_samples_per_s{stat}", f"infer_samples_per_s{stat}"
    ours = get(ours_lib, train)
    out: list[tuple[str, str, str, bool | None]] = []

    def add(name: str, value: float | None, goal: float, measured: str, higher: bool = True) -> None:
        if value is None:
            out.append((name, measured, "—", None))
            return
        ok = value >= goal if higher else value <= goal
        out.append((name, measured, f"{value / goal:.2f}× of the goal", ok))

    dense = get(PLAIN_LOOP, train)  # plerec's model in the peers' plain loop: dense gradients, torch's Adam
    for name, goal, mine, rivals in (
        ("train ≥ 2.5 × the faster of the peers' own trainers", 2.5, ours, PEERS),
        (
            "train ≥ 1.8 × torch-rechub's PLE fed by the fastest loop",
            1.8,
            ours,
            ("torch-rechub", "torch-rechub+plerec-batching"),
        ),
        (
            "dense step: plerec's model ≥ 1.5 × the peers' models in the same loop",
            1.5,
            dense,
            tuple(f"{peer}+plerec-batching" for peer in PEERS),
        ),
    ):
        rates = [v for v in (get(lib, train) for lib in rivals) if v]
        best = max(rates) if rates else None
        add(name, mine / best if mine and best else None, goal, f"{mine / best:.2f}×" if mine and best else "—")
    # a bf16 variant against the ceiling of bfloat16 GEMMs (where the run measured it), the others fp32
    precision, c, _ = _ceiling(ceiling["all_models"].get(model, {}), PLEREC_VARIANTS[ours_lib])
    add(
        f"train ≥ 50 % of the compute ceiling ({precision})",
        ours / c if ours and c else None,
        0.5,
        f"{ours / c:.0%}" if ours and c else "—",
    )
    mine = _find(records, ours_lib, model, bs) or {"auc": {}}
    for task in ("click", "conversion"):
        peers = [
            r
            for r in records
            if r["model"] == model
            and r["batch_size"] == bs
            and not r["library"].startswith(PLEREC)
            and task in r.get("auc", {})
            and "full" in r.get("auc_and_rss_from", "")
        ]
        best = max(peers, key=lambda r: r["auc"][task]) if peers else None
        name = f"test AUC {task} within 0.002 of the best peer"
        if task not in mine["auc"] or best is None:
            out.append((name, "—", "—", None))
        else:
            gap = mine["auc"][task] - best["auc"][task]
            measured = f"{_auc(mine, task)} vs {_auc(best, task)}"
            out.append((name, measured, _gap(mine, best, task), gap >= -AUC_TOLERANCE))
    rss, peer_rss = get(ours_lib, "peak_rss_bytes"), get("torch-rechub", "peak_rss_bytes")
    add(
        "peak RSS ≤ ½ torch-rechub's",
        rss / peer_rss if rss and peer_rss else None,
        0.5,
        f"{rss / peer_rss:.2f}× ({rss / MiB:,.0f} vs {peer_rss / MiB:,.0f} MiB)" if rss and peer_rss else "—",
        higher=False,
    )
    ours_inf, peer_inf = get(ours_lib, infer), get("torch-rechub", infer)
    add(
        "inference ≥ 2 × torch-rechub's",
        ours_inf / peer_inf if ours_inf and peer_inf else None,
        2.0,
        f"{ours_inf / peer_inf:.2f}×" if ours_inf and peer_inf else "—",
    )
    return out


def targets_markdown(records: list[dict], ceiling: dict) -> list[str]:
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("pass" if ok else "FAIL")

    lines = []
    for ours, variant in PLEREC_VARIANTS.items():
        if not _find(records, ours, "ple", 1024):
            continue
        lines += [
            f"## Targets (PLE, batch size 1024): {ours} ({variant.label})",
            "",
            "On the medians (the protocol), and on each configuration's best run (throughput only; a busy "
            "machine only ever slows a run down, so the best run is the least disturbed one).",
            "",
            "| target | medians | margin | verdict | best runs | margin | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for (name, measured, margin, ok), (_, best, best_margin, best_ok) in zip(
            targets(records, ceiling, ours_lib=ours), targets(records, ceiling, "_max", ours_lib=ours), strict=True
        ):
            lines.append(
                f"| {name} | {measured} | {margin} | {verdict(ok)} | {best} | {best_margin} | {verdict(best_ok)} |"
            )
        lines.append("")
    return lines


def runs_markdown(records: list[dict], model: str = "ple", batch_size: int = 1024) -> list[str]:
    """Every run of one model and batch size: its seed, its test AUC per task (tasks in name order; full-epoch
    runs only), and the machine's load average when it started and ended."""
    lines = [
        f"## Every run ({model.upper()}, batch size {batch_size})",
        "",
        "| library | run | seed | training rows | train samples/s | infer samples/s | test AUC "
        "| load average start → end |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if r["model"] != model or r["batch_size"] != batch_size:
            continue
        for run in r.get("per_run", []):
            load = run.get("load_average_start_end")
            shown = f"{load[0]:.1f} → {load[1]:.1f}" if load else "—"
            auc = run.get("auc") or {}
            aucs = " / ".join(f"{auc[t]:.4f}" for t in sorted(auc)) if run["kind"] == "full" and auc else "—"
            lines.append(
                f"| {r['library']} | {run['kind']} | {run.get('seed', '—')} | {run['train_rows']:,} "
                f"| {_num(run['train_samples_per_s'])} | {_num(run['infer_samples_per_s'])} | {aucs} | {shown} |"
            )
    return lines + [""]


def scaling_markdown(results: list[dict], context: dict) -> str:
    m = context["machine"]
    lines = [
        "# plerec training time against data size",
        "",
        f"{context['date']} · {m['cpu']} · {m['cores']} cores, {context['threads']} torch threads · "
        f"plerec {context['versions']['plerec']}, torch {context['versions']['torch']}",
        "",
        "PLE (2 levels, experts [256, 128], towers [64], embeddings 16), batch size 1024, one epoch, plerec's `fit` "
        "(training time as its `train_seconds`: the steps, without the validation pass) on the first N rows of one "
        "generated stream; each size in its own process, its vocabularies fitted on its own rows. "
        'plerec: its defaults (`compile = "auto"`, which may compile; then its compile seconds are shown). '
        "plerec-compile: `[train] compile = true`, Inductor's cache empty at the first size (cold) and kept for "
        "the next (warm). Compile seconds are in the training time; the steady rate leaves them out.",
        "",
        "| library | training rows | ids in vocabularies | train seconds | samples/s | seconds per 1M rows "
        "| vs the smallest size | compile s | steady samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    firsts: dict[str, float] = {}
    for r in results:
        lib = r.get("library", PLEREC)
        if "error" in r:
            lines.append(f"| {lib} | {r['train_file']} | failed: {r['error']} |||||||")
            continue
        per_row = r["train_seconds"] / r["train_rows"]
        base = firsts.setdefault(lib, per_row)
        ids = f"{r['vocab_ids']:,}" if r.get("vocab_ids") else "—"
        compiled = r.get("plerec_compiled") or {}
        seconds = compiled.get("compile_seconds") if compiled.get("compiled") else None
        steady = _steady(r, seconds)
        lines.append(
            f"| {lib} | {r['train_rows']:,} | {ids} | {r['train_seconds']:.1f} | {r['train_samples_per_s']:,.0f} "
            f"| {per_row * 1e6:.1f} | {per_row / base:.2f}× | {f'{seconds:.1f}' if seconds is not None else '—'} "
            f"| {_num(steady)} |"
        )
    lines += ["", "Linear growth means the last column stays near 1.00×.", ""]
    return "\n".join(lines)
