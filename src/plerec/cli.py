"""The `plerec` command. The only module that prints or exits: library errors become one line and exit 2."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from plerec import __version__, jsonio


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    distributed = sys.modules.get("plerec.distributed")  # imported by the commands that may join a group
    if distributed is not None and distributed.joined():
        # A rank under torchrun ends without the interpreter's teardown, which gloo's threads can abort.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as err:
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        if (getattr(args, "error_format", None) or getattr(args, "log_format", None)) == "json":
            print(jsonio.dumps({"event": "error", "text": message}), file=sys.stderr)
        else:
            print(f"plerec: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plerec: interrupted", file=sys.stderr)
        return 130


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (none shown for flags, empty lists or no default), and the
    epilog's examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if isinstance(default, list) and not default:
            return text
        return f"{text} (default: %(default)s)"


def _command(sub, name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with examples that run as written (tests/test_cli_help.py parses them)."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=_Help)


def _add_finished_only(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: the tables from the runs already finished in --out (an unfinished one is an error)",
    )


def _add_overrides(p: argparse.ArgumentParser, text: str = "") -> None:
    text = text or (
        "override a key of the experiment, e.g. --set train.lr=3e-4 --set model.name=mmoe (repeatable); "
        "another model.name drops the [model] keys that do not apply to it"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _add_watch(p: argparse.ArgumentParser, *, directory: bool) -> None:
    """--log-format, --tensorboard, --mlflow and --mlflow-uri: shorthands for their [train] keys."""
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="stderr as lines for people (text) or one JSON object per line (json); sets train.log_format "
        "(default: the experiment's, text unless it says otherwise)",
    )
    if directory:
        p.add_argument(
            "--tensorboard",
            nargs="?",
            const="",
            metavar="DIR",
            help="write TensorBoard event files, to DIR or else OUT/tensorboard; sets train.tensorboard "
            "(and train.tensorboard_dir). Put it after the experiment file",
        )
    else:
        p.add_argument(
            "--tensorboard",
            action="store_true",
            help="write TensorBoard event files to each run's folder/tensorboard; sets train.tensorboard",
        )
    p.add_argument("--mlflow", action="store_true", help="log to an MLflow run; sets train.mlflow")
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow tracking URI (implies --mlflow); sets train.mlflow_uri (default: a local store, OUT/mlruns)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plerec",
        description="Multi-task ranking models: PLE, CGC, MMoE, …",
        epilog="example:\n  plerec demo --out runs/demo\n\n`plerec COMMAND --help` shows a command's options.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"plerec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="the command to run:")

    p = _command(
        sub,
        "synth",
        "write the MMoE/PLE synthetic two-task data set as Parquet",
        "plerec synth --out data.parquet --rows 100000 --correlation 0.5 --seed 0",
        "plerec synth --history --out history.parquet --users 500 --items 2000",
    )
    p.add_argument("--out", required=True, type=Path, help="Parquet file to write")
    p.add_argument("--rows", type=int, default=100_000, help="number of rows")
    p.add_argument("--correlation", type=float, default=0.5, help="p = cos(w1, w2), in [-1, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed")
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

    p = _command(sub, "models", "list the models and their hyperparameters", "plerec models")
    p.set_defaults(run=_models)

    p = _command(
        sub,
        "train",
        "train the experiment's model; writes metrics.json, history.json and best.pt to --out",
        "plerec train examples/census_income.toml --out runs/ple --set train.lr=3e-4",
        "plerec train examples/census_income.toml --out runs/mmoe --set model.name=mmoe --log-format json",
        "plerec train examples/census_income.toml --out runs/ple --resume --tensorboard",
    )
    p.add_argument("experiment", type=Path, help="experiment TOML file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_overrides(p)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="sets train.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (last.pt); starts afresh if there is none",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="do not write OUT/report.html at the end (`plerec report OUT` writes it later)",
    )
    _add_watch(p, directory=True)
    p.set_defaults(run=_train)

    p = _command(
        sub,
        "prepare",
        "one pass over the training data: vocabularies and statistics to --out",
        "plerec prepare examples/ali_ccp.toml --out runs/prep",
    )
    p.add_argument("experiment", type=Path, help="experiment TOML file")
    p.add_argument("--out", required=True, type=Path, help="folder for encoder.json ([data] prepared reads it)")
    _add_overrides(p)
    p.set_defaults(run=_prepare)

    p = _command(
        sub,
        "evaluate",
        "evaluate a checkpoint on a split of the experiment's data",
        "plerec evaluate runs/ple/experiment.toml --checkpoint runs/ple/best.pt --split test",
    )
    p.add_argument(
        "experiment", type=Path, help="experiment TOML file; the run's own experiment.toml (next to best.pt) fits"
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a best.pt written by `plerec train` or `compare`")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="the split to score")
    _add_overrides(p)
    p.add_argument("--out", type=Path, help="where to write the metrics JSON (default: next to the checkpoint)")
    p.set_defaults(run=_evaluate)

    p = _command(
        sub,
        "compare",
        "every model for every seed on identical splits, with MTL gains and plots",
        "plerec compare examples/census_income.toml --out runs/cmp --models mmoe,cgc,ple --seeds 3",
    )
    p.add_argument("experiment", type=Path, help="experiment TOML file")
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
    p.add_argument("--out", required=True, type=Path, help="output folder; each run goes to OUT/runs/MODEL/seedS")
    _add_finished_only(p)
    p.add_argument("--seesaw", help="the two tasks of the seesaw chart, e.g. ctr,cvr (default: the first two)")
    _add_overrides(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    _add_watch(p, directory=False)
    p.set_defaults(run=_compare)

    p = _command(
        sub,
        "sweep",
        "the comparison over task correlations on synthetic data (paper Fig. 7)",
        "plerec sweep examples/synthetic_sweep.toml --out runs/sweep --correlations 0,0.5,1 --seeds 2",
    )
    p.add_argument("experiment", type=Path, help="an experiment whose [data] path was written by `plerec synth`")
    p.add_argument("--correlations", default="0,0.2,0.4,0.6,0.8,1", help="comma-separated values in [-1, 1]")
    p.add_argument("--models", default="single,shared_bottom,mmoe,cgc,ple", help="comma-separated registry names")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per model and correlation")
    p.add_argument("--out", required=True, type=Path, help="output folder; one comparison folder per correlation")
    _add_finished_only(p)
    _add_overrides(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    _add_watch(p, directory=False)
    p.set_defaults(run=_sweep)

    p = _command(
        sub,
        "export",
        "a checkpoint as ONNX or TorchScript, with a JSON sidecar for encoding raw rows",
        "plerec export runs/ple/best.pt --format onnx --out model.onnx",
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `plerec train` (best.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="the file format to write")
    p.add_argument("--out", required=True, type=Path, help="model file to write; the sidecar goes to OUT.json")
    p.set_defaults(run=_export)

    p = _command(
        sub,
        "rank",
        "score a candidate table, fuse the tasks by Eq. 1 and rank the items per user",
        "plerec rank examples/ali_ccp.toml --checkpoint runs/ple/best.pt --input candidates.csv --out ranked.csv "
        "--top-k 10",
    )
    p.add_argument("experiment", type=Path, help="experiment TOML: task rank_weight and the [rank] section")
    p.add_argument("--checkpoint", required=True, type=Path, help="a best.pt written by `plerec train`")
    p.add_argument("--input", required=True, type=Path, help="candidate table (CSV, gzipped CSV or Parquet)")
    p.add_argument("--out", required=True, type=Path, help="ranked table to write (.csv, .csv.gz or .parquet)")
    p.add_argument("--top-k", type=int, help="keep the k best items per user (default: [rank] top_k; 0 keeps all)")
    _add_overrides(p)
    p.set_defaults(run=_rank)

    p = _command(
        sub,
        "serve",
        "an HTTP JSON service: /score, /rank and /health",
        "plerec serve --checkpoint runs/ple/best.pt --port 8080 --workers 2",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a best.pt written by `plerec train`")
    p.add_argument(
        "--experiment", type=Path, help="take task rank_weight and [rank] from this file (default: the checkpoint's)"
    )
    _add_overrides(p, "override a key of --experiment, e.g. --set rank.top_k=10 (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; the default serves this machine only")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on start)")
    p.add_argument("--max-rows", type=int, default=10_000, help="largest number of rows one request may send")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="largest request body, in bytes")
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

    p = _command(
        sub,
        "demo",
        "the main job: synthetic data, five models, per-task metrics and MTL gains",
        "plerec demo --out runs/demo --rows 20000 --epochs 6 --seeds 2",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--rows", type=int, default=40_000, help="rows of synthetic data")
    p.add_argument("--correlation", type=float, default=0.2, help="task correlation p of the synthetic data")
    p.add_argument("--epochs", type=int, default=12, help="training epochs of every run")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per model")
    p.add_argument("--seed", type=int, default=0, help="the first seed, and the data's")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    p.set_defaults(run=_demo)

    p = _command(
        sub,
        "report",
        "one training run's page: curves, metrics, calibration and expert utilisation, as one HTML file",
        "plerec report runs/ple",
        "plerec report runs/ple --out ple-report.html",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `plerec train` (its --out)")
    p.add_argument("--out", type=Path, help="the HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(run=_report)
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
    from plerec.distributed import barrier, init_distributed, shutdown
    from plerec.observe import ReportObserver
    from plerec.report.run import write_run_report
    from plerec.train import fit, prepare_data

    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else []), *_watch_overrides(args)]
    exp, notes = _load(args, overrides)
    if args.quiet:
        exp = _quiet(exp)
    ctx = init_distributed(exp.train.device)  # under torchrun: join the process group
    try:
        say = _stderr(exp.train.log_format)
        if ctx.is_main:
            for note in notes:
                say(note)
        talk = ctx.is_main and not args.quiet
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if talk else None  # fit makes it JSON if asked
        data = prepare_data(exp, encoder=_resumed_encoder(args.out) if args.resume else None)
        if talk:
            _describe_data(exp, data, say)
            if ctx.enabled:
                _describe_ranks(exp, ctx, say)
        observers = [] if args.no_report else [ReportObserver()]  # first: MLflow, after it, logs the page
        result = fit(exp, data, out_dir=args.out, log=log, ctx=ctx, resume=args.resume, observers=observers)
        if ctx.is_main:
            if observers and exp.model_name == "single":  # its tasks' fits have theirs; the stacked model too
                write_run_report(args.out, model=result.model, data=data, exp=exp)
            print(_metrics_table({exp.model_name: result.metrics.get("test", result.metrics["valid"])}, exp))
            best = (  # the single-task baseline selects each task's epoch on its own
                "best epochs " + ", ".join(f"{t} {e}" for t, e in result.best_epochs.items())
                if result.best_epochs
                else f"best epoch {result.best_epoch}"
            )
            written = ["metrics.json", "best.pt", *([] if args.no_report else ["report.html"])]
            print(f"{best}; wrote {', '.join(str(args.out / name) for name in written)}")
        barrier(ctx)  # every rank done before any tears the process group down (not on errors: it could hang)
    except KeyboardInterrupt:
        if ctx.is_main:
            _interrupted(args, exp, ctx)
        return 130
    finally:
        shutdown(ctx)
    return 0


def _load(args, overrides: list[str]):
    """The experiment of `args.experiment` with `overrides`, and the notes loading it made (dropped [model]
    keys). Errors from here on are written in the experiment's log format."""
    from plerec.config import load_experiment

    notes: list[str] = []
    exp = load_experiment(args.experiment, overrides, notes)
    args.error_format = exp.train.log_format
    return exp, notes


def _load_noting(args):
    """The experiment with `args.overrides`; its notes on stderr."""
    exp, notes = _load(args, args.overrides)
    for note in notes:
        _stderr(exp.train.log_format)(note)
    return exp


def _watch_overrides(args) -> list[str]:
    """--log-format, --tensorboard, --mlflow and --mlflow-uri as `--set` overrides of their [train] keys."""
    found = [f"train.log_format={args.log_format}"] if args.log_format else []
    if args.tensorboard is True or isinstance(args.tensorboard, str):  # a flag, or nargs="?" with or without DIR
        found.append("train.tensorboard=true")
        if isinstance(args.tensorboard, str) and args.tensorboard:  # the folder as meant where the command ran
            found.append(f"train.tensorboard_dir={_toml_string(str(Path(args.tensorboard).absolute()))}")
    if args.mlflow or args.mlflow_uri:
        found.append("train.mlflow=true")
    if args.mlflow_uri:
        found.append(f"train.mlflow_uri={_toml_string(args.mlflow_uri)}")
    return found


def _toml_string(text: str) -> str:
    """`text` as a TOML string, so that an override reads it as written (not as a number, date or list)."""
    import tomli_w

    return tomli_w.dumps({"v": text}).removeprefix("v = ").rstrip("\n")


def _stderr(log_format: str):
    """A line writer for stderr: text as it is, or (json) every line as one JSON object."""
    if log_format == "json":
        from plerec.observe import json_log

        return json_log()
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _interrupted(args, exp, ctx) -> None:
    """Ctrl-C: say so, and how to continue from the last checkpoint if one was written."""
    from plerec.single_task import task_folder
    from plerec.train import LAST

    held = [args.out / LAST]
    if exp.model_name == "single" and len(exp.tasks) > 1:  # one run per task, each with its own last.pt
        held = [task_folder(args.out, t.name) / LAST for t in exp.tasks]
    saved = [path for path in held if path.exists()]
    command = _resume_command(args, ctx) if saved else None
    if command:
        text = f"plerec: interrupted; the last checkpoint is in {args.out}. Resume with: {command}"
    else:
        text = f"plerec: interrupted before the first checkpoint: nothing was saved yet in {args.out}"
    if exp.train.log_format == "json":
        record = {"event": "interrupted", "text": text, "checkpoints": [str(p) for p in saved], "resume": command}
        print(jsonio.dumps(record), file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def _resume_command(args, ctx) -> str:
    """The command line that continues this run: the same experiment, overrides and flags, and --resume."""
    parts = ["plerec", "train", str(args.experiment), "--out", str(args.out)]
    for item in args.overrides:
        parts += ["--set", item]
    if args.device:
        parts += ["--device", args.device]
    if args.quiet:
        parts.append("--quiet")
    if args.log_format:
        parts += ["--log-format", args.log_format]
    if isinstance(args.tensorboard, str):
        parts += ["--tensorboard", *([args.tensorboard] if args.tensorboard else [])]
    if args.mlflow:
        parts.append("--mlflow")
    if args.mlflow_uri:
        parts += ["--mlflow-uri", args.mlflow_uri]
    command = shlex.join([*parts, "--resume"])
    if ctx.enabled:  # under torchrun: the same number of processes again
        command = f"torchrun --nproc-per-node {ctx.world_size} -m {command}"
    return command


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
    from plerec.data.fitter import fit_encoder_chunked
    from plerec.data.stream import save_encoder
    from plerec.train import prepare_data

    exp = _load_noting(args)
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
    from plerec.config import experiment_to_dict, key_defaults
    from plerec.train import evaluate_split, load_checkpoint, prepare_data, write_json

    exp = _load_noting(args)
    model, encoder, trained = load_checkpoint(args.checkpoint)
    # What decides the inputs, the outputs and the weights' shapes; loss weights do not matter here.
    scored = ("name", "kind", "label", "condition", "space")
    saved, now = experiment_to_dict(trained), experiment_to_dict(exp)
    for side in (saved, now):
        side["tasks"] = [{k: v for k, v in t.items() if k in scored} for t in side["tasks"]]
        for init in ("dense_init", "embedding_init_std"):  # how the weights began: the checkpoint's replace them
            side["model"].pop(init, None)
    defaults = key_defaults()
    differ = [
        d
        for part in ("features", "tasks", "model")
        for d in differences(saved[part], now[part], part, defaults.get(part))
    ]
    if differ:
        raise ValueError(_mismatch(args, trained.model_name, exp.model_name, differ))
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


def _mismatch(args, trained: str, named: str, differ: list[str]) -> str:
    """The checkpoint fits another experiment: name the file it was trained with (`plerec train` and every
    run of `plerec compare`, OUT/runs/MODEL/seedS, write experiment.toml next to best.pt)."""
    what = (
        f"The checkpoint {args.checkpoint} holds a `{trained}` model, but {args.experiment} describes `{named}`"
        if trained != named
        else f"The checkpoint {args.checkpoint} was made for another schema or model than {args.experiment} describes"
    )
    own = args.checkpoint.parent / "experiment.toml"
    fix = ""
    if own.is_file() and own.resolve() != args.experiment.resolve():
        fix = (
            f". Evaluate it with the experiment it was trained with, {own}: "
            f"{shlex.join(['plerec', 'evaluate', str(own), '--checkpoint', str(args.checkpoint)])}"
        )
    return f"{what}{fix}. Differences (checkpoint -> experiment): {'; '.join(differ)}"


def _split_of(exp) -> tuple[list[float], int]:
    """What decides which rows of a single data file land in which split."""
    return list(exp.data.split), exp.seed if exp.data.split_seed is None else exp.data.split_seed


def _compare(args) -> int:
    from plerec.compare import check_seesaw_tasks, compare, parse_balancing, parse_models, write_comparison

    exp, notes = _load(
        args, [*args.overrides, *(["train.progress=false"] if args.quiet else []), *_watch_overrides(args)]
    )
    say = _stderr(exp.train.log_format)
    for note in notes:
        say(note)
    models = parse_models(args.models)
    balancing = parse_balancing(args.balancing) if args.balancing is not None else None
    seesaw = args.seesaw.split(",") if args.seesaw else None
    check_seesaw_tasks(exp, seesaw)  # fail before training, not after
    log = None if args.quiet else say
    runs = compare(exp, models, args.seeds, args.out, log=log, balancing=balancing, finished_only=args.finished_only)
    write_comparison(runs, exp, args.out, seesaw)
    print((args.out / "summary.md").read_text())
    print(f"wrote {args.out}/results.csv, summary.md, report.html, seesaw.png, experts.csv, experts.png, curves.png")
    return 0


def _sweep(args) -> int:
    from plerec.compare import sweep

    exp, notes = _load(
        args, [*args.overrides, *(["train.progress=false"] if args.quiet else []), *_watch_overrides(args)]
    )
    say = _stderr(exp.train.log_format)
    for note in notes:
        say(note)
    try:
        correlations = [float(v) for v in args.correlations.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Expected --correlations to be numbers like 0,0.5,1, but got {args.correlations!r}") from None
    log = None if args.quiet else say
    sweep(exp, correlations, args.models, args.seeds, args.out, log=log, finished_only=args.finished_only)
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
    from plerec.data.table import read_table
    from plerec.rank import Scorer, write_ranked

    exp = _load_noting(args)
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
    from plerec.config import MAX_THREADS
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
    exp = _load_noting(args) if args.experiment else None
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


def _report(args) -> int:
    from plerec.report.run import write_run_report

    path = write_run_report(args.run_dir, out=args.out)
    print(f"wrote {path}")
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


def _describe_ranks(exp, ctx, say) -> None:
    rows = exp.train.batch_size // ctx.world_size
    if exp.train.log_format == "json":
        record = {"event": "distributed", "ranks": ctx.world_size, "rows_per_rank": rows, "device": str(ctx.device)}
        say(jsonio.dumps(record))
    else:
        say(f"distributed: {ctx.world_size} ranks, {rows} rows per rank and step, device {ctx.device}")


def _describe_data(exp, data, say) -> None:
    """What was read: rows per split, features, each task's rows (one JSON object in json mode)."""
    enc = data.encoder
    tasks = []
    if "train" in data.splits:  # streamed: the rows are counted as they are read
        train = data.splits["train"]
        for k, task in enumerate(exp.tasks):
            mask = train.label_mask[:, k]
            n = int(mask.sum())
            rate = float(train.labels[mask, k].float().mean()) if task.kind == "binary" and n else None
            tasks.append({"name": task.name, "kind": task.kind, "training_rows": n, "positive_rate": rate})
    if exp.train.log_format == "json":
        record = {
            "event": "data",
            "rows": {name: len(table) for name, table in data.splits.items()},
            "streamed": {name: str(path) for name, path in data.streams.items()},
            "features": {
                "categorical": len(enc.categorical),
                "numeric": len(enc.numeric),
                "missing_indicators": len(enc.indicators),
                "lists": enc.lists,
            },
            "inferred": enc.inferred,
            "tasks": tasks,
        }
        say(jsonio.dumps(record, default=str))
        return
    sizes = [f"{name} {len(table)}" for name, table in data.splits.items()]
    sizes += [f"{name} streamed from {path}" for name, path in data.streams.items()]
    say(f"rows: {', '.join(sizes)}")
    lists = "".join(
        f", list {name} ({spec['pooling']} of the last {spec['max_length']}"
        + (f", {spec['share']}'s table" if spec["share"] else "")
        + ")"
        for name, spec in enc.lists.items()
    )
    say(
        f"features: {len(enc.categorical)} categorical, {len(enc.numeric)} numeric"
        f" (+{len(enc.indicators)} missing indicators){lists}"
    )
    if enc.inferred:
        say(f"inferred feature types: {', '.join(f'{c}={k}' for c, k in enc.inferred.items())}")
    for task in tasks:
        rate = "" if task["positive_rate"] is None else f", positive rate {task['positive_rate']:.4f}"
        say(f"task {task['name']} ({task['kind']}): {task['training_rows']} training rows in its space{rate}")


def _metrics_table(results: dict[str, dict], exp, gains: dict | None = None) -> str:
    from plerec.report import metrics_table

    return metrics_table(results, exp.task_kinds, gains)


if __name__ == "__main__":
    raise SystemExit(main())
