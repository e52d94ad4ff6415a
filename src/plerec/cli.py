"""The `plerec` command. The only module that prints or exits: library errors become one line and exit 2."""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from plerec import __version__, jsonio


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as err:
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        print(f"plerec: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plerec: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plerec", description="Multi-task ranking models: PLE, CGC, MMoE, …")
    parser.add_argument("--version", action="version", version=f"plerec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write the MMoE/PLE synthetic two-task data set as Parquet")
    p.add_argument("--out", required=True, type=Path, help="Parquet file to write")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--correlation", type=float, default=0.5, help="p = cos(w1, w2), in [-1, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=512, help="input dimension d")
    p.add_argument("--num-sines", type=int, default=10, help="number of sine waves m")
    p.add_argument("--scale", type=float, default=1.0, help="scale c of the task weights")
    p.add_argument("--noise", type=float, default=0.1, help="standard deviation of the label noise")
    p.add_argument("--binary", action="store_true", help="also write thresholded binary labels y1_binary, y2_binary")
    p.add_argument("--threshold", default="median", help="'median' or a number (for --binary)")
    p.add_argument(
        "--history",
        action="store_true",
        help="write the click/purchase data set with user histories instead (plerec.data.synth_history)",
    )
    p.add_argument("--users", type=int, help="with --history: number of users (default 2000)")
    p.add_argument("--items", type=int, help="with --history: number of items (default 5000)")
    p.add_argument("--categories", type=int, help="with --history: number of item categories (default 50)")
    p.add_argument("--max-history", type=int, help="with --history: longest history (default 50)")
    p.set_defaults(run=_synth)

    p = sub.add_parser("models", help="list the models and their hyperparameters")
    p.set_defaults(run=_models)

    p = sub.add_parser("train", help="train the experiment's model; writes metrics.json and best.pt to --out")
    p.add_argument("experiment", type=Path, help="experiment TOML file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set train.lr=3e-4 --set model.name=mmoe (repeatable)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides train.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (last.pt); starts afresh if there is none",
    )
    p.set_defaults(run=_train)

    p = sub.add_parser("prepare", help="one pass over the training data: vocabularies and statistics to --out")
    p.add_argument("experiment", type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for encoder.json ([data] prepared reads it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split of the experiment's data")
    p.add_argument("experiment", type=Path)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, help="where to write the metrics JSON (default: next to the checkpoint)")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("compare", help="every model for every seed on identical splits, with MTL gains and plots")
    p.add_argument("experiment", type=Path)
    p.add_argument(
        "--models",
        default="single,shared_bottom,omoe,mmoe,cgc,ple",
        help="comma-separated registry names; the single-task baseline is always trained",
    )
    p.add_argument(
        "--balancing",
        help="comma-separated [train] balancing methods to train every model with, e.g. fixed,uncertainty,pcgrad; "
        "a run of a method other than fixed is named MODEL+METHOD (default: the experiment's own method)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (the experiment's seed, +1, …)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seesaw", help="the two tasks of the seesaw chart, e.g. ctr,cvr (default: the first two)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_compare)

    p = sub.add_parser("sweep", help="the comparison over task correlations on synthetic data (paper Fig. 7)")
    p.add_argument("experiment", type=Path, help="an experiment whose [data] path was written by `plerec synth`")
    p.add_argument("--correlations", default="0,0.2,0.4,0.6,0.8,1", help="comma-separated values in [-1, 1]")
    p.add_argument("--models", default="single,shared_bottom,mmoe,cgc,ple")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("export", help="a checkpoint as ONNX or TorchScript, with a JSON sidecar for encoding raw rows")
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `plerec train` (best.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, type=Path, help="model file to write; the sidecar goes to OUT.json")
    p.set_defaults(run=_export)

    p = sub.add_parser("rank", help="score a candidate table, fuse the tasks by Eq. 1 and rank the items per user")
    p.add_argument("experiment", type=Path, help="experiment TOML: task rank_weight and the [rank] section")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path, help="candidate table (CSV, gzipped CSV or Parquet)")
    p.add_argument("--out", required=True, type=Path, help="ranked table to write (.csv, .csv.gz or .parquet)")
    p.add_argument("--top-k", type=int, help="keep the k best items per user (default: [rank] top_k; 0 keeps all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=_rank)

    p = sub.add_parser("serve", help="an HTTP JSON service: /score, /rank and /health")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument(
        "--experiment", type=Path, help="take task rank_weight and [rank] from this file (default: the checkpoint's)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on start)")
    p.add_argument("--max-rows", type=int, default=10_000, help="largest number of rows one request may send")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="largest request body (default 8 MiB)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a client may take to send headers, and body")
    p.add_argument("--max-connections", type=int, default=512, help="open connections; more are answered 503")
    p.add_argument("--token-file", type=Path, help="require `Authorization: Bearer TOKEN` (else $PLEREC_SERVE_TOKEN)")
    p.add_argument("--docs", action="store_true", help="serve the OpenAPI schema at /openapi.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--workers", type=int, default=1, help="server processes on one port, each loading the checkpoint")
    p.add_argument(
        "--batch-window",
        type=float,
        default=0.0,
        metavar="MS",
        help="score requests arriving within MS ms in one forward pass (0: off)",
    )
    p.add_argument("--max-batch-rows", type=int, default=4096, help="rows of one micro-batch, about")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="what runs the forward pass")
    p.set_defaults(run=_serve)

    p = sub.add_parser("demo", help="the main job: synthetic data, five models, per-task metrics and MTL gains")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--rows", type=int, default=40_000)
    p.add_argument("--correlation", type=float, default=0.2, help="task correlation p of the synthetic data")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_demo)
    return parser


# flag: (argparse dest, config field) of the flags that belong to one generator only
_HISTORY_FLAGS = {
    "--users": ("users", "num_users"),
    "--items": ("items", "num_items"),
    "--categories": ("categories", "num_categories"),
    "--max-history": ("max_history", "max_history"),
}
_MMOE_FLAGS = {
    "--correlation": ("correlation", "correlation"),
    "--dim": ("dim", "dim"),
    "--num-sines": ("num_sines", "num_sines"),
    "--scale": ("scale", "scale"),
    "--noise": ("noise", "noise_std"),
    "--binary": ("binary", "binary"),
    "--threshold": ("threshold", "threshold"),
}


def _synth(args) -> int:
    from plerec.data.synth import SynthConfig, write_parquet

    if args.history:
        return _synth_history(args)
    given = [flag for flag, (dest, _) in _HISTORY_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"Expected {', '.join(given)} only with --history, but got no --history")
    threshold: str | float = args.threshold
    if threshold != "median":
        try:
            threshold = float(threshold)
        except ValueError:
            raise ValueError(f"Expected --threshold to be 'median' or a number, but got {args.threshold!r}") from None
    config = SynthConfig(
        rows=args.rows,
        correlation=args.correlation,
        dim=args.dim,
        scale=args.scale,
        num_sines=args.num_sines,
        noise_std=args.noise,
        binary=args.binary,
        threshold=threshold,
        seed=args.seed,
    )
    path = write_parquet(config, args.out)
    print(f"wrote {config.rows} rows (correlation {config.correlation}, d={config.dim}) to {path}")
    return 0


def _synth_history(args) -> int:
    from plerec.data.synth import SynthConfig
    from plerec.data.synth_history import HistoryConfig, write_parquet

    # The MMoE generator's flags mean nothing here; one set to another value than its default is a mistake.
    mmoe = SynthConfig()
    given = [flag for flag, (dest, field) in _MMOE_FLAGS.items() if getattr(args, dest) != getattr(mmoe, field)]
    if given:
        allowed = ", ".join(["--out", "--rows", "--seed", *_HISTORY_FLAGS])
        raise ValueError(f"Expected only {allowed} with --history, but got {', '.join(given)} (MMoE generator flags)")
    sizes = {field: getattr(args, dest) for dest, field in _HISTORY_FLAGS.values() if getattr(args, dest) is not None}
    config = HistoryConfig(rows=args.rows, seed=args.seed, **sizes)
    path = write_parquet(config, args.out)
    print(
        f"wrote {config.rows} rows ({config.num_users} users, {config.num_items} items, "
        f"{config.num_categories} categories, histories of 0..{config.max_history}) to {path}"
    )
    return 0


def _models(args) -> int:
    from plerec.models import MODELS

    for name, spec in MODELS.items():
        print(f"{name}: {spec.summary}")
        for f in fields(spec.config):
            value = f.default if f.default_factory is MISSING else f.default_factory()
            print(f"    {f.name} = {_toml_value(value)}")
    return 0


def _toml_value(value) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return jsonio.dumps(value)
    return str(value)


def _train(args) -> int:
    from plerec.config import load_experiment
    from plerec.distributed import barrier, init_distributed, shutdown
    from plerec.train import fit, prepare_data

    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]
    exp = load_experiment(args.experiment, overrides)
    if args.quiet:
        exp = _quiet(exp)
    ctx = init_distributed(exp.train.device)  # under torchrun: join the process group
    try:
        talk = ctx.is_main and not args.quiet
        log = (lambda msg: print(msg, file=sys.stderr)) if talk else None
        data = prepare_data(exp, encoder=_resumed_encoder(args.out) if args.resume else None)
        if talk:
            _describe_data(exp, data)
            if ctx.enabled:
                print(
                    f"distributed: {ctx.world_size} ranks, {exp.train.batch_size // ctx.world_size} rows "
                    f"per rank and step, device {ctx.device}",
                    file=sys.stderr,
                )
        result = fit(exp, data, out_dir=args.out, log=log, ctx=ctx, resume=args.resume)
        if ctx.is_main:
            print(_metrics_table({exp.model_name: result.metrics.get("test", result.metrics["valid"])}, exp))
            best = (  # the single-task baseline selects each task's epoch on its own
                "best epochs " + ", ".join(f"{t} {e}" for t, e in result.best_epochs.items())
                if result.best_epochs
                else f"best epoch {result.best_epoch}"
            )
            print(f"{best}; wrote {args.out / 'metrics.json'} and {args.out / 'best.pt'}")
        barrier(ctx)  # every rank done before any tears the process group down (not on errors: it could hang)
    finally:
        shutdown(ctx)
    return 0


def _resumed_encoder(out: Path):
    """The vocabularies of the run being resumed (no pass over the data to fit them again)."""
    from plerec.checkpoint import STATE_FORMAT, read_checkpoint
    from plerec.train import LAST

    path = out / LAST
    if not path.exists():
        return None
    checkpoint = read_checkpoint(path)  # every key and the model's size checked, nothing allocated yet
    if checkpoint.payload["format"] != STATE_FORMAT:
        raise ValueError(f"Expected {path} to be a plerec training state ({STATE_FORMAT}), but it is not")
    return checkpoint.encoder


def _prepare(args) -> int:
    from plerec.config import load_experiment
    from plerec.data.fitter import fit_encoder_chunked
    from plerec.data.stream import save_encoder
    from plerec.train import prepare_data

    exp = load_experiment(args.experiment, args.overrides)
    if exp.data.train:  # separate files: one chunked pass over train, nothing else read
        encoder = fit_encoder_chunked(exp, exp.data.train, exp.data.csv)
    else:  # one file cut by fractions: the split decides which rows are training rows
        encoder = prepare_data(exp).encoder
    path = save_encoder(encoder, args.out)
    print(
        f"{len(encoder.categorical)} categorical features ({sum(encoder.vocab_sizes)} ids), "
        f"{len(encoder.dense_names)} dense features; wrote {path}"
    )
    print(f"reuse it with --set data.prepared={args.out}")
    return 0


def _evaluate(args) -> int:
    from plerec.checkpoint import differences
    from plerec.config import experiment_to_dict, key_defaults, load_experiment
    from plerec.train import evaluate_split, load_checkpoint, prepare_data, write_json

    exp = load_experiment(args.experiment, args.overrides)
    model, encoder, trained = load_checkpoint(args.checkpoint)
    # What decides the inputs, the outputs and the weights' shapes; loss weights do not matter here.
    scored = ("name", "kind", "label", "condition", "space")
    saved, now = experiment_to_dict(trained), experiment_to_dict(exp)
    for side in (saved, now):
        side["tasks"] = [{k: v for k, v in t.items() if k in scored} for t in side["tasks"]]
    defaults = key_defaults()
    differ = [
        d
        for part in ("features", "tasks", "model")
        for d in differences(saved[part], now[part], part, defaults.get(part))
    ]
    if differ:
        raise ValueError(
            f"The checkpoint {args.checkpoint} was made for another schema or model than {args.experiment} "
            f"describes (checkpoint -> experiment): {'; '.join(differ)}"
        )
    from_test_file = args.split == "test" and bool(exp.data.test)  # no row of `path` is in it, whatever the split
    if (
        exp.data.path
        and not from_test_file
        and exp.data.path == trained.data.path
        and _split_of(exp) != _split_of(trained)
    ):
        raise ValueError(
            f"{args.experiment} splits {exp.data.path} with fractions and seed {_split_of(exp)}, but "
            f"{args.checkpoint} was trained on the split {_split_of(trained)}: its {args.split} split would "
            "hold training rows. Pass the run's experiment.toml or the same `--set` overrides"
        )
    encoder.group = exp.evaluate.group  # GAUC's groups: this experiment's evaluation setting, not the checkpoint's
    data = prepare_data(exp, encoder=encoder)
    if not data.has(args.split):
        raise ValueError(f"The experiment {args.experiment} has no {args.split} split")
    metrics, _rows = evaluate_split(model, data, args.split, exp)
    # The shape of metrics.json: `splits` as there, so that one reader reads both files.
    record = {
        "model": trained.model_name,
        "seed": trained.seed,
        "split": args.split,
        "tasks": metrics,
        "splits": {args.split: metrics},
    }
    out = args.out or args.checkpoint.with_name(f"metrics-{args.split}.json")
    write_json(out, record)
    print(_metrics_table({trained.model_name: metrics}, exp))
    print(f"wrote {out}")
    return 0


def _split_of(exp) -> tuple[list[float], int]:
    """What decides which rows of a single data file land in which split."""
    return list(exp.data.split), exp.seed if exp.data.split_seed is None else exp.data.split_seed


def _compare(args) -> int:
    from plerec.compare import check_seesaw_tasks, compare, parse_balancing, parse_models, write_comparison
    from plerec.config import load_experiment

    exp = load_experiment(args.experiment, [*args.overrides, *(["train.progress=false"] if args.quiet else [])])
    models = parse_models(args.models)
    balancing = parse_balancing(args.balancing) if args.balancing is not None else None
    seesaw = args.seesaw.split(",") if args.seesaw else None
    check_seesaw_tasks(exp, seesaw)  # fail before training, not after
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    runs = compare(exp, models, args.seeds, args.out, log=log, balancing=balancing)
    write_comparison(runs, exp, args.out, seesaw)
    print((args.out / "summary.md").read_text())
    print(f"wrote {args.out}/results.csv, summary.md, report.html, seesaw.png, experts.csv, experts.png, curves.png")
    return 0


def _sweep(args) -> int:
    from plerec.compare import sweep
    from plerec.config import load_experiment

    exp = load_experiment(args.experiment, [*args.overrides, *(["train.progress=false"] if args.quiet else [])])
    try:
        correlations = [float(v) for v in args.correlations.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Expected --correlations to be numbers like 0,0.5,1, but got {args.correlations!r}") from None
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    sweep(exp, correlations, args.models, args.seeds, args.out, log=log)
    print((args.out / "sweep.md").read_text())
    print(f"wrote {args.out}/sweep.csv, sweep.md, sweep.png and one comparison folder per correlation")
    return 0


def _export(args) -> int:
    from plerec.export import export_model, input_names
    from plerec.train import load_checkpoint

    model, encoder, exp = load_checkpoint(args.checkpoint)
    path, sidecar = export_model(model, encoder, exp, args.format, args.out)
    outputs = ", ".join(f"{t.name} ({'probability' if t.kind == 'binary' else 'value'})" for t in exp.tasks)
    print(f"wrote {path} (inputs {', '.join(input_names(encoder))}; outputs {outputs}) and {sidecar}")
    return 0


def _rank(args) -> int:
    from plerec.config import load_experiment
    from plerec.data.table import read_table
    from plerec.rank import Scorer, write_ranked

    exp = load_experiment(args.experiment, args.overrides)
    top_k = exp.rank.top_k if args.top_k is None else args.top_k
    if top_k < 0:
        raise ValueError(f"Expected --top-k >= 0 (0 keeps every item), but got {top_k}")
    scorer = Scorer.from_checkpoint(args.checkpoint, exp)
    frame = read_table(args.input, exp.data.csv)
    frame.attrs["source"] = str(args.input)
    ranked = scorer.rank_table(frame, top_k)
    path = write_ranked(ranked, args.out)
    groups = ranked[exp.rank.group].nunique()
    print(f"ranked {len(frame)} candidates of {groups} {exp.rank.group} values; wrote {len(ranked)} rows to {path}")
    return 0


def _serve(args) -> int:
    from plerec.config import MAX_THREADS, load_experiment
    from plerec.rank import Scorer

    try:
        from plerec.serve import Limits, check_exposure, read_token, serve
    except ImportError as err:
        raise ValueError(
            f"plerec serve needs the `serve` extra ({err.name} is missing): pip install 'plerec[serve]'"
        ) from None
    if args.overrides and not args.experiment:
        raise ValueError("Expected --experiment next to --set (overrides apply to an experiment file)")
    if not 0 <= args.port <= 65535:  # the socket layer would take it modulo 2^16
        raise ValueError(f"Expected --port in [0, 65535] (0 picks a free port), but got {args.port}")
    if not 0 <= args.threads <= MAX_THREADS:
        raise ValueError(f"Expected --threads in [0, {MAX_THREADS}] (0 = torch's default), but got {args.threads}")
    limits = Limits(
        max_rows=args.max_rows,
        max_body_bytes=args.max_body_bytes,
        header_timeout=args.timeout,
        body_timeout=args.timeout,
        max_connections=args.max_connections,
    )
    token = read_token(args.token_file)
    check_exposure(args.host, token)  # before the model loads, so a refusal comes at once
    exp = load_experiment(args.experiment, args.overrides) if args.experiment else None
    scorer = Scorer.from_checkpoint(args.checkpoint, exp)

    def announce(host: str, port: int) -> None:
        print(
            f"plerec serving {args.checkpoint} on http://{host}:{port} (/score, /rank, /health, /metrics)", flush=True
        )

    load = functools.partial(Scorer.from_checkpoint, args.checkpoint, exp)  # picklable: workers and SIGHUP reloads
    options = {"limits": limits, "token": token, "docs": args.docs, "threads": args.threads, "workers": args.workers}
    options.update(load=load, batch_window=args.batch_window / 1000, max_batch_rows=args.max_batch_rows)
    options["backend"] = args.backend
    serve(scorer, args.host, args.port, **options, on_ready=announce)
    return 0


def _demo(args) -> int:
    from plerec.demo import run_demo

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    table = run_demo(
        args.out,
        rows=args.rows,
        correlation=args.correlation,
        epochs=args.epochs,
        seeds=args.seeds,
        seed=args.seed,
        log=log,
        progress=not args.quiet,
    )
    print(table)
    return 0


def _quiet(exp):
    from dataclasses import replace

    return replace(exp, train=replace(exp.train, progress=False))


def _describe_data(exp, data) -> None:
    enc = data.encoder
    sizes = [f"{name} {len(table)}" for name, table in data.splits.items()]
    sizes += [f"{name} streamed from {path}" for name, path in data.streams.items()]
    print(f"rows: {', '.join(sizes)}", file=sys.stderr)
    lists = "".join(
        f", list {name} ({spec['pooling']} of the last {spec['max_length']}"
        + (f", {spec['share']}'s table" if spec["share"] else "")
        + ")"
        for name, spec in enc.lists.items()
    )
    print(
        f"features: {len(enc.categorical)} categorical, {len(enc.numeric)} numeric"
        f" (+{len(enc.indicators)} missing indicators){lists}",
        file=sys.stderr,
    )
    if enc.inferred:
        shown = ", ".join(f"{c}={k}" for c, k in enc.inferred.items())
        print(f"inferred feature types: {shown}", file=sys.stderr)
    if "train" not in data.splits:  # streamed: the rows are counted as they are read
        return
    train = data.splits["train"]
    for k, task in enumerate(exp.tasks):
        mask = train.label_mask[:, k]
        n = int(mask.sum())
        positives = float(train.labels[mask, k].float().mean()) if n else 0.0
        rate = f", positive rate {positives:.4f}" if task.kind == "binary" and n else ""
        print(f"task {task.name} ({task.kind}): {n} training rows in its space{rate}", file=sys.stderr)


def _metrics_table(results: dict[str, dict], exp, gains: dict | None = None) -> str:
    from plerec.report import metrics_table

    return metrics_table(results, exp.task_kinds, gains)


if __name__ == "__main__":
    raise SystemExit(main())
