"""The run report (report/run.py) and the comparison pictures: sections, embedded images, errors, a real
browser rendering the page, and what each picture must show (integer epochs, seeds apart, labelled scales)."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.ticker import MaxNLocator
from PIL import Image
from tiny_experiments import experiment, write_table

import plerec.train as train_module
from plerec.compare import Run, write_comparison
from plerec.config import experiment_from_dict
from plerec.report.plots import (
    curves_figure,
    expert_label,
    experts_figure,
    gate_label,
    run_curves_figure,
)
from plerec.report.run import write_run_report
from plerec.train import PreparedData, fit, prepare_data


def _experiment(path, model: dict, epochs: int = 3):
    return experiment(path, model={"tower_dims": [4], "embedding_dim": 2, **model}, seed=7, epochs=epochs)


class _Page(HTMLParser):
    """The headings, images, details rows and notes of a page; every URL it would fetch."""

    def __init__(self, text: str):
        super().__init__()
        self.h2, self.images, self.details, self.notes, self.urls, self.scripts = [], [], {}, [], [], 0
        self._in, self._row = None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("alt"), attrs["src"]))
        if tag == "script":
            self.scripts += 1
        self.urls += [v for k, v in attrs.items() if k in ("href", "src") and not v.startswith("data:")]
        if tag in ("h2", "th", "td") or (tag == "div" and attrs.get("class") == "note"):
            self._in = tag if tag != "div" else "note"

    def handle_endtag(self, tag):
        if tag == "tr" and len(self._row) == 2:
            self.details.setdefault(self._row[0], self._row[1])
        if tag == "tr":
            self._row = []
        self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self.h2.append(data)
        elif self._in in ("th", "td"):
            self._row.append(data)
        elif self._in == "note":
            self.notes.append(data)


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    assert image.format == "PNG" and image.width > 100 and image.height > 100
    return image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_table(root / "log.csv", 400)
    exp = _experiment(root / "log.csv", {"name": "ple", "num_levels": 2, "expert_dims": [4]})
    data = prepare_data(exp)
    result = fit(exp, data, out_dir=root / "run")
    return SimpleNamespace(root=root, exp=exp, data=data, result=result, run=root / "run")


SECTIONS = [
    "Training curves",
    "Reliability of the predicted probabilities (test split)",
    "Expert utilisation (test split)",
    "Hyperparameters (the resolved experiment)",
]


def test_run_report_with_the_model_in_memory_and_from_the_folder_alone(trained):
    in_memory = write_run_report(trained.run, model=trained.result.model, data=trained.data, exp=trained.exp)
    assert in_memory == trained.run / "report.html"
    from_folder = write_run_report(trained.run, out=trained.root / "again.html")
    pages = [_Page(p.read_text()) for p in (in_memory, from_folder)]
    for page in pages:
        assert page.h2 == ["Metrics", *SECTIONS]
        assert [alt for alt, _ in page.images] == SECTIONS[:3]
        for _, src in page.images:
            _png(src)
        assert page.urls == [] and page.scripts == 0  # self-contained: nothing fetched, nothing run
        assert page.details["data size"] == "train 240 · valid 80 · test 80 rows"
        assert page.details["seed"] == "7"
        assert page.details["model"].startswith("ple, ") and page.details["model"].endswith(" parameters")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", page.details["report written"])
        assert page.details["best epoch"] == f"{trained.result.best_epoch} of 3 run (3 planned)"
        assert page.notes == []
        assert "num_levels=2" in page.details["model keys"] and "batch_size=64" in page.details["training"]
    # the metrics table: the test split's values as metrics.json holds them
    test_auc = json.loads((trained.run / "metrics.json").read_text())["splits"]["test"]["click"]["auc"]
    for path in (in_memory, from_folder):
        assert "<td>click</td><td>auc</td><td>" in path.read_text()
        assert f"{test_auc:.4f}" in path.read_text()
    assert "num_levels = 2" in in_memory.read_text()  # the hyperparameters


def test_single_task_run_report_has_each_tasks_best_epoch_and_no_experts(trained):
    exp = _experiment(trained.root / "log.csv", {"name": "single", "bottom_dims": [4]}, epochs=2)
    fit(exp, trained.data, out_dir=trained.root / "single")
    page = _Page(write_run_report(trained.root / "single").read_text())
    assert page.h2 == ["Metrics", SECTIONS[0], SECTIONS[1], SECTIONS[3]]  # no gates
    assert "(each task its own)" in page.details["best epoch"]
    assert page.details["selected by"] == "each task its own: valid click auc, valid watch mse"


def test_streamed_data_says_what_the_page_leaves_out(trained, tmp_path):
    parquet = tmp_path / "test.parquet"
    pd.read_csv(trained.root / "log.csv").head(50).to_parquet(parquet)
    streamed = PreparedData(trained.data.encoder, {}, {"valid": str(parquet), "test": str(parquet)})
    out = write_run_report(
        trained.run, model=trained.result.model, data=streamed, exp=trained.exp, out=tmp_path / "r.html"
    )
    page = _Page(out.read_text())
    assert page.h2 == ["Metrics", SECTIONS[0], SECTIONS[3]]
    assert page.details["data size"] == "valid 50 · test 50 rows"
    assert any("streamed" in n and "left out" in n for n in page.notes)


def test_data_that_cannot_be_read_again_leaves_its_sections_out(trained, tmp_path, monkeypatch):
    def moved(*_args, **_kwargs):
        raise FileNotFoundError(f"{trained.root / 'log.csv'} does not exist")

    monkeypatch.setattr(train_module, "prepare_data", moved)
    page = _Page(write_run_report(trained.run, out=tmp_path / "r.html").read_text())
    assert page.h2 == ["Metrics", SECTIONS[0], SECTIONS[3]] and page.details["data size"] == "not read"
    assert any("could not be read again" in n and "log.csv does not exist" in n for n in page.notes)


def test_a_run_still_training_reports_its_best_epoch_so_far(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    (run / "metrics.json").unlink()
    page = _Page(write_run_report(run, model=trained.result.model, data=trained.data, exp=trained.exp).read_text())
    assert any("metrics.json is missing" in n for n in page.notes)
    assert "not finished" in page.details["trained"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "best.pt").unlink(), r"best\.pt \(the run's best checkpoint\).*does not exist"),
        (lambda run: (run / "history.json").unlink(), r"history\.json \(the per-epoch history.*does not exist"),
        (lambda run: (run / "history.json").write_text("{not json"), r"history\.json to be JSON"),
        (lambda run: (run / "history.json").write_text('{"epochs": []}'), r"best_epoch, epochs, but best_epoch"),
        (lambda run: (run / "history.json").write_text('{"best_epoch": 1, "epochs": [3]}'), r"non-empty list"),
        (lambda run: (run / "metrics.json").write_text("[]"), r"metrics\.json.*splits"),
    ],
)
def test_a_damaged_run_folder_names_the_file_and_what_was_expected(trained, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    damage(run)
    with pytest.raises(ValueError, match=message):
        write_run_report(run)


def test_a_path_that_is_no_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        write_run_report(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# A real browser: the page renders, its images load, nothing is logged as an error.

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="Debian's chromium and chromium-driver absent")
def test_the_page_renders_in_headless_chromium_with_every_image(trained, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) not installed")
    from selenium.webdriver.chrome.service import Service

    page = write_run_report(trained.run, model=trained.result.model, data=trained.data, exp=trained.exp)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # Debian's build: nothing downloaded
    for flag in (
        "--headless=new",
        "--no-sandbox",  # as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # no usage report: the network may be closed
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert [alt for alt, *_ in images] == SECTIONS[:3]
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in images), images
    assert errors == []
    screenshot = Image.open(shot)
    assert screenshot.format == "PNG" and screenshot.size[0] >= 1000
    darkest, lightest = screenshot.convert("L").getextrema()
    assert lightest - darkest > 100  # not a blank page


def test_chromium_screenshot_without_a_driver(trained, tmp_path):
    """Chromium's own --screenshot, the fallback where no WebDriver is installed."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium absent (apt-get install chromium)")
    page = write_run_report(trained.run, model=trained.result.model, data=trained.data, exp=trained.exp)
    shot = tmp_path / "shot.png"
    flags = "--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking "
    flags += "--disable-component-update --disable-sync --hide-scrollbars --window-size=1280,1600"
    subprocess.run(
        [CHROMIUM, *flags.split(), f"--user-data-dir={tmp_path / 'p'}", f"--screenshot={shot}", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert Image.open(shot).format == "PNG" and shot.stat().st_size > 20_000


# ---------------------------------------------------------------------------------------------
# The comparison pictures


def _history(values, monitor_dict: bool = False):
    return [
        {
            "epoch": e + 1,
            "train_loss": {"click": 1.0 - 0.1 * e},
            "valid": {"click": {"auc": v, "n": 10}},
            "monitor": {"click": v} if monitor_dict else v,
        }
        for e, v in enumerate(values)
    ]


def _runs():
    return [
        SimpleNamespace(model=model, seed=seed, history=_history([0.6, 0.65 + seed / 100, 0.7], model == "single"))
        for model in ("single", "mmoe", "ple")
        for seed in (0, 1)
    ]


def _integer_ticks(ax) -> None:
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_xlabel() == "epoch"


def test_comparison_curves_have_integer_epochs_the_monitor_named_and_seeds_apart():
    monitor = "valid mean skill of click auc, watch mse"
    fig = curves_figure(_runs(), monitor, {"click": "valid click auc"})
    joint, single = fig.axes
    for ax in (joint, single):
        _integer_ticks(ax)
    assert joint.get_ylabel() == f"{monitor} (↑)" and single.get_ylabel() == "valid click auc (↑)"
    lines = joint.get_lines()
    assert len(lines) == 4  # mmoe and ple, two seeds each; the single-task baseline has its own panel
    by = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(by) == 4  # colour tells the model, line style the seed
    assert len({line.get_linestyle() for line in lines}) == 2
    assert [t.get_text() for t in joint.get_legend().get_texts()] == ["mmoe", "ple", "seed 0", "seed 1"]


def _expert_rows():
    rows = []
    for seed, (a, b) in ((0, (0.2, 0.8)), (1, (0.4, 0.6))):
        rows += [
            {"model": "ple", "seed": seed, "gate": "L0.click", "expert": "L0.click.0", "mean": a, "std": 0.1},
            {"model": "ple", "seed": seed, "gate": "L0.click", "expert": "L0.shared0", "mean": b, "std": 0.1},
            {"model": "ple", "seed": seed, "gate": "L1.click", "expert": "L1.shared0", "mean": 1.0, "std": 0.0},
        ]
    return rows


def test_expert_utilisation_over_seeds_shows_mean_and_spread_with_a_labelled_colour_bar():
    fig = experts_figure(_expert_rows())
    heat, bar = fig.axes
    assert bar.get_ylabel() == "mean gate weight"
    assert [t.get_text() for t in heat.get_yticklabels()] == ["level 1: click gate", "level 2: click gate"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["click expert 0", "shared expert 0"]
    cells = sorted(t.get_text() for t in heat.texts)
    sd = np.std([0.2, 0.4], ddof=1)  # over the two seeds
    assert cells == sorted([f"0.30\n±{sd:.2f}", f"0.70\n±{sd:.2f}", "1.00\n±0.00"])
    assert "over 2 seeds" in heat.get_title()
    one_seed = experts_figure([r for r in _expert_rows() if r["seed"] == 0]).axes[0]
    assert "one seed" in one_seed.get_title() and "0.20\n±0.10" in [t.get_text() for t in one_seed.texts]


@pytest.mark.parametrize(
    "name, label",
    [("L0.click.1", "click expert 1"), ("L2.shared0", "shared expert 0"), ("cvr.tower", "cvr tower")],
)
def test_expert_labels(name, label):
    assert expert_label(name) == label


@pytest.mark.parametrize(
    "name, levels, label",
    [
        ("L1.watch", 2, "level 2: watch gate"),
        ("L0.click", 1, "click gate"),
        ("L0.gate", 1, "gate"),
        ("L0.expert3", 2, "level 1: expert 3 gate"),
        ("cvr.ait", 1, "cvr ait gate"),
    ],
)
def test_gate_labels(name, levels, label):
    assert gate_label(name, levels) == label


def test_run_curves_mark_each_tasks_best_epoch():
    history = _history([0.6, 0.7, 0.65], monitor_dict=True)
    fig = run_curves_figure(history, {"click": 2})
    loss, auc = [ax for ax in fig.axes if ax.axison]
    for ax in (loss, auc):
        _integer_ticks(ax)
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [2]
    assert auc.get_title() == "click: valid auc (↑)"


def test_comparison_report_records_data_size_hyperparameters_and_date(tmp_path):
    exp = experiment_from_dict(
        {
            "data": {"path": "log.csv"},
            "features": {"numeric": ["a"]},
            "tasks": [{"name": "click", "kind": "binary", "label": "click"}],
            "model": {"name": "ple", "expert_dims": [4]},
        }
    )
    metrics = {"test": {"click": {"auc": 0.7, "logloss": 0.6, "n": 80}}, "valid": {"click": {"auc": 0.7, "n": 80}}}
    history = [{**h, "valid_rows": 80} for h in _history([0.6, 0.7])]
    runs = [
        Run(model=m, seed=s, metrics=metrics, history=history if m == "ple" else _history([0.6, 0.7], True), experts=[])
        for m in ("single", "ple")
        for s in (0, 1)
    ]
    write_comparison(runs, exp, tmp_path)
    page = _Page((tmp_path / "report.html").read_text())
    assert page.details["data size"] == "train not recorded · valid 80 · test not recorded rows"
    assert page.details["seeds"] == "0, 1" and page.details["models"] == "single, ple"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", page.details["written"])
    assert page.h2[-1].startswith("Hyperparameters") and 'name = "ple"' in (tmp_path / "report.html").read_text()
    for _, src in page.images:
        _png(src)
