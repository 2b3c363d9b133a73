"""Reports: report.md and a self-contained report.html that renders in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from conftest import rename_tasks, run_cli
from diffbench import report
from diffbench.api import CLUSTER_KEY
from diffbench.results import load_runs
from test_cli_errors import assert_one_line_error
from test_stats import cached_run, shared_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def default_grid_run(basetemp: Path) -> Path:
    """`diffbench run --tasks niah,icl` on the shipped pair, 2 samples per setting and NIAH depths
    0 and 100 only: every summary row of the default run (its ICL grid; NIAH's summary averages
    over depth). Made once per test session."""
    sets = ("--set", "niah.depths=0,100")
    return cached_run(basetemp, "default-grid", "--tasks", "niah,icl", "--limit", "2", *sets)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    """The shared default-grid run; never edited."""
    return default_grid_run(tmp_path_factory.getbasetemp())


def summary_rows(md: str) -> list[list[str]]:
    """The cells of report.md's summary table, one list per row."""
    table = md.split("## Summary\n")[1].split("\nn/units: ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


@pytest.fixture(scope="module")
def workdir(tiny_pair, tmp_path_factory) -> Path:
    """A working directory whose results/first is a copy of the shared real run (with report)."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(
        shared_run(tiny_pair, tmp_path_factory.getbasetemp()), root / "results" / "first"
    )
    return root


def test_run_writes_markdown_with_summary_intervals_and_provenance(workdir):
    md = (workdir / "results" / "first" / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections == ["## Summary", "## niah", "## Provenance"]
    head = "| task | metric | setting | n/units | method | diff | base | twin | base − diff | "
    assert head + "twin − diff |" in md
    summary = md.split("## niah")[0]
    # value [low, high], and "(at chance)" where the interval holds 1 / choices (score mode)
    assert re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]( \(at chance\))? \|", summary)
    assert re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] p=", summary)
    assert "McNemar" in summary
    assert "DiffLlamaForCausalLM" in md and "LlamaForCausalLM" in md


def test_plot_draws_every_figure_in_png_and_pdf(workdir):
    figures = workdir / "results" / "first" / "figures"
    stems = {p.stem for p in figures.glob("*.png")}
    assert {"diffbench_differences", "niah_bars_score", "niah_heatmap_score_n1r1"} <= stems
    assert stems == {p.stem for p in figures.glob("*.pdf")}


@pytest.mark.slow  # headless Chromium
def test_html_report_renders_in_chromium_with_every_image_loaded(workdir):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "headless Chromium is missing: run `make chromium`"
    run = workdir / "results" / "first"
    page_file = run / "report.html"
    text = page_file.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", text), "report.html links a file"
    n_figures = len(list((run / "figures").glob("*.png")))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
            )
            headings = page.evaluate(
                "Array.from(document.querySelectorAll('h2'), h => h.innerText)"
            )
            first_table = page.evaluate("document.querySelector('table').innerText")
        finally:
            browser.close()
    assert problems == []
    assert requests == [page_file.as_uri()]  # nothing fetched but the page itself
    assert len(images) == n_figures
    assert all(complete and width > 0 for _, complete, width in images), images
    assert headings == ["Summary", "niah", "Provenance"]
    assert "base − diff" in first_table


def test_report_merges_several_runs_and_runs_lists_them(workdir):
    second = workdir / "results" / "second"
    if not second.exists():
        shutil.copytree(workdir / "results" / "first", second)
    res = run_cli(workdir, "report", "results/first", "results/second", "--output", "merged")
    assert res.returncode == 0, res.stderr
    md = (workdir / "merged" / "report.md").read_text()
    assert "| diff@first | base@first | twin@first | diff@second | base@second |" in md
    assert "base@second − diff@first" in md
    assert (workdir / "merged" / "report.html").stat().st_size > 10_000
    assert (workdir / "merged" / "figures" / "diffbench_differences.png").exists()
    listed = run_cli(workdir, "runs")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("results/first", "niah", "diff,base,twin"),
        ("results/second", "niah", "diff,base,twin"),
    ]


def test_merging_runs_with_no_rows_in_common_fails(workdir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(workdir / "results" / "first", other)
    metrics = pd.read_csv(other / "metrics.csv", dtype=str, keep_default_na=False)
    metrics.assign(length="8192").to_csv(other / "metrics.csv", index=False)
    res = run_cli(tmp_path, "report", str(workdir / "results" / "first"), str(other))
    assert_one_line_error(res, "no rows in common")


def test_report_resamples_clusters_and_says_which_test_it_used(workdir, tmp_path):
    run = tmp_path / "clustered"
    shutil.copytree(workdir / "results" / "first", run)
    for path in (run / "samples" / "niah").glob("*.jsonl"):
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        # Synthetic clusters: one haystack sample index at every depth counts as one example.
        for s in samples:
            s[CLUSTER_KEY] = re.search(r"-s(\d+)", s["id"]).group(1)  # type: ignore[union-attr]
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    res = run_cli(tmp_path, "report", str(run))
    assert res.returncode == 0, res.stderr
    summary = (run / "report.md").read_text().split("## niah")[0]
    # Per depth every cluster holds one sample (McNemar); the depth=all rows pool 5 depths.
    assert "Tests used (differences per test): McNemar's exact test: 10; " in summary
    assert "sign-flip test over units: 2." in summary
    twin = [row.split(" | ")[-1] for row in summary.splitlines() if row.startswith("| niah")]
    assert twin and all(c.startswith("+0.000 [-") and " p=1 " in c for c in twin)


def test_the_default_runs_summary_leads_with_the_papers_rows_and_fits_one_screen(grid_run):
    md = (grid_run / "report.md").read_text()
    rows = summary_rows(md)
    metrics = pd.read_csv(grid_run / "metrics.csv", dtype=str, keep_default_na=False)
    shots = sorted({int(k) for k in metrics.loc[metrics["task"] == "icl", "shots"]})
    icl = "dataset=synthetic, arrangement=random"
    # In the run's task order (niah,icl), each at the run's largest setting. NIAH: accuracy per
    # mode over depths at the largest length (Table 2); ICL: accuracy over draws and orders
    # (Fig. 6) and the best-worst margin (Fig. 7), at the largest shot count.
    expected = [
        ("niah", "accuracy ↑", f"mode={mode}, length=1024, needles=1, queries=1")
        for mode in ("generate", "score")
    ]
    expected += [
        ("icl", metric, f"{icl}, shots={max(shots)}") for metric in ("accuracy ↑", "margin ↓")
    ]
    assert [tuple(r[:3]) for r in rows] == expected
    # Every row of metrics.csv stays in its task's section.
    for task in ("icl", "niah"):
        section = md.split(f"\n## {task}\n")[1].split("\n## ")[0]
        shown = [line for line in section.splitlines() if line.startswith("| ")][1:]
        measured = metrics[metrics["task"] == task].drop(columns=["model", "value", "n", "stderr"])
        assert len(shown) == len(measured.drop_duplicates())
    assert (
        "Summary rows: accuracy averaged over draw and order, at the largest shots; margin at the "
        "largest shots." in md
    )


@pytest.mark.slow  # headless Chromium
def test_the_html_summary_is_built_from_cells_and_fits_one_screen(grid_run):
    from playwright.sync_api import sync_playwright

    page_file = grid_run / "report.html"
    n_rows = len(summary_rows((grid_run / "report.md").read_text()))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            headings = page.evaluate(
                "Array.from(document.querySelectorAll('h2'), h => h.innerText)"
            )
            summary = page.evaluate(
                """() => {
                    const t = document.querySelector('#summary + .wide table');
                    const rows = Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => [
                        c.childNodes[0].textContent,
                        c.querySelector('.ci') ? c.querySelector('.ci').textContent : null]));
                    return {height: t.getBoundingClientRect().height, rows: rows};
                }"""
            )
        finally:
            browser.close()
    assert requests == [page_file.as_uri()]
    assert headings == ["The paper in miniature", "Summary", "niah", "icl", "Provenance"]
    assert len(summary["rows"]) == n_rows
    assert summary["height"] < 900  # the summary table fits one screen
    margin = next(r for r in summary["rows"] if r[1][0] == "margin ↓")
    # A difference cell: its number in the cell, nothing else; interval and p-value in small print.
    niah = [r for r in summary["rows"] if r[0][0] == "niah"]
    for number, detail in (r[-1] for r in niah):
        assert re.fullmatch(r"[+-]\d\.\d{3}( [▲▼])?", number), number
        assert detail is not None and re.fullmatch(
            r"\[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] p=\S+ adj\. \S+( \(\d+ units: p≥\S+\))?", detail
        )
    # A margin over orders is a statistic: no interval, no test, and the cell says so.
    assert margin[-1][1] == "(no test: a statistic, not a mean over samples)"


def test_model_panels_share_their_axes_and_seed_axes_count_in_integers(grid_run):
    from diffbench.render.figures import figures as declared_figures

    results = load_runs([grid_run])
    metrics = results.metrics
    figures = {
        **declared_figures(results.info("icl"), metrics),
        **declared_figures(results.info("niah"), metrics),
    }
    try:
        seeds = figures["icl_seeds_synthetic_random"]
        base, diff = seeds.axes[:2]
        assert base.get_shared_y_axes().joined(base, diff)
        assert base.get_ylim() == diff.get_ylim()
        seeds.canvas.draw()
        for ax in (base, diff):
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert labels and all(re.fullmatch(r"[−-]?\d+", t) for t in labels), labels
        shots = figures["icl_shots_synthetic_random"]
        shots.canvas.draw()
        counts = sorted({int(k) for k in metrics.loc[metrics["task"] == "icl", "shots"]})
        assert [t.get_text() for t in shots.axes[0].get_xticklabels()] == [str(k) for k in counts]
        heat = figures["niah_heatmap_score_n1r1"]
        left, right = heat.axes[:2]
        assert left.get_shared_y_axes().joined(left, right)
        assert left.get_shared_x_axes().joined(left, right)
    finally:
        plt.close("all")


def sweep_suite_run(basetemp: Path) -> Path:
    """The default suite in small: NIAH's attention rows on the shipped pair (two lengths, depths
    0 and 100, N/R 1/1 and 2/2), and zeroshot under a logit_bits sweep of 16 and 4 scoped to it
    (--sweep-tasks). Made once per test session."""
    pair = ("--models", "tiny-base=tiny-base,tiny-diff=tiny-diff")
    sets = [
        *("--set", "niah.mode=attention", "--set", "niah.lengths=192,256"),
        *("--set", "niah.depths=0,100", "--set", "niah.needles=1/1,2/2", "--set", "niah.samples=2"),
        *("--set", "zeroshot.samples=2", "--set", "zeroshot.formats=needle"),
        *("--set", "zeroshot.facts=1,2"),
    ]
    sweep = ("--sweep", "logit_bits=16,4", "--sweep-tasks", "zeroshot")
    return cached_run(basetemp, "sweep-suite", "--tasks", "niah,zeroshot", *pair, *sweep, *sets)


@pytest.fixture(scope="module")
def sweep_suite(tmp_path_factory) -> Path:
    """The shared small-suite run with a sweep; never edited."""
    return sweep_suite_run(tmp_path_factory.getbasetemp())


def summary_head(md: str) -> list[str]:
    """The header cells of report.md's summary table."""
    table = md.split("## Summary\n")[1]
    line = next(line for line in table.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_the_summary_keeps_headline_rows_at_the_runs_largest_setting_averaged_over_depth(
    sweep_suite,
):
    md = (sweep_suite / "report.md").read_text()
    rows = summary_rows(md)
    assert max(Counter(r[0] for r in rows).values()) <= 12
    # NIAH's attention rows: the depth=all row of each, not one per depth, at the largest length
    # and N/R only; every row stays in the task's section.
    largest = "mode=attention, length=256, needles=2, queries=2"
    assert [tuple(r[:3]) for r in rows if r[0] == "niah"] == [
        ("niah", "attention_answer ↑", largest),
        ("niah", "attention_noise ↓", largest),
    ]
    section = md.split("\n## niah\n")[1].split("\n## ")[0]
    assert section.count("| attention_answer ↑ | mode=attention, length=192, depth=0, ") == 2
    assert (
        "Summary rows: attention_answer averaged over depth, at the largest length, needles and "
        "queries;" in md
    )


def test_the_summary_gives_each_swept_value_a_row_compared_at_that_value(sweep_suite):
    md = (sweep_suite / "report.md").read_text()
    # A column per model (its variants share it) and the swept value's own column: 9, not the
    # 5 + 6 model columns and 5 differences that every label as a column would give.
    assert summary_head(md) == [
        "task", "metric", "setting", "logit_bits", "n/units", "method",
        "tiny-base", "tiny-diff", "tiny-diff − tiny-base",
    ]  # fmt: skip
    zeroshot = [r for r in summary_rows(md) if r[0] == "zeroshot"]
    assert [(r[2], r[3]) for r in zeroshot] == [("facts=2", "16"), ("facts=2", "4")]
    assert [r[3] for r in summary_rows(md) if r[0] == "niah"] == ["—", "—"]
    # The summary's lines: diff's variant against base's at the same value, never another; the
    # reference's own variant against its first value only (the task's sweep table).
    built = report.build(load_runs([sweep_suite]))
    (line,) = [ln for ln in built.summary if ln.task == "zeroshot"]
    assert line.against == {
        "tiny-diff@logit_bits=16": "tiny-base@logit_bits=16",
        "tiny-diff@logit_bits=4": "tiny-base@logit_bits=4",
    }
    assert line.sweep_against == {
        "tiny-base@logit_bits=4": "tiny-base@logit_bits=16",
        "tiny-diff@logit_bits=4": "tiny-diff@logit_bits=16",
    }
    for row, bits in zip(zeroshot, ("16", "4"), strict=True):
        delta = line.differences[f"tiny-diff@logit_bits={bits}"].delta
        assert row[-1].startswith(f"{delta:+.3f} ")


# ---- figures as data: a report needs no task plugin ------------------------------------------

# Task names no plugin provides, in the same alphabetical order as the originals (run.json's
# configuration is printed with sorted keys).
RENAMED = {"icl": "renamed_a", "niah": "renamed_b"}


def plant_changes(run: Path) -> None:
    """tiny-diff's ICL rows at one shot 0.2 higher: a candidate with improvements and
    regressions for compare."""
    metrics = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    rows = (
        (metrics["task"] == "icl") & (metrics["model"] == "tiny-diff") & (metrics["shots"] == "1")
    )
    metrics.loc[rows, "value"] = [f"{float(v) + 0.2:.10g}" for v in metrics.loc[rows, "value"]]
    metrics.to_csv(run / "metrics.csv", index=False)


def undo_names(text: str) -> str:
    for old, new in RENAMED.items():
        text = text.replace(new, old)
    return text


def test_figure_specs_round_trip_through_run_json(grid_run):
    from diffbench import registry
    from diffbench.api import TaskInfo

    for task in ("niah", "icl", "nll", "outliers", "throughput", "hallucination", "zeroshot"):
        info = TaskInfo.of(registry.load(task))
        assert info.figures is not None
        assert TaskInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    recorded = json.loads((grid_run / "run.json").read_text())["task_info"]
    assert [f["kind"] for f in recorded["niah"]["figures"]] == ["heatmap", "bars", "line"]
    assert [f["kind"] for f in recorded["icl"]["figures"]] == ["line", "spread"]


def test_a_run_whose_tasks_no_plugin_provides_reports_and_compares_as_the_original(
    grid_run, tmp_path
):
    runs = {}
    for side in ("original", "renamed"):
        for role in ("baseline", "candidate"):
            run = shutil.copytree(grid_run, tmp_path / side / role / "run")
            shutil.rmtree(run / "figures")
            if role == "candidate":
                plant_changes(run)
            if side == "renamed":
                rename_tasks(run, RENAMED)
            runs[side, role] = run
    for side in ("original", "renamed"):
        res = run_cli(tmp_path, "report", str(runs[side, "baseline"]))
        assert res.returncode == 0, res.stderr
    renamed = runs["renamed", "baseline"]
    texts = {
        side: (runs[side, "baseline"] / "report.md").read_text().replace(str(tmp_path / side), "")
        for side in ("original", "renamed")
    }
    assert undo_names(texts["renamed"]) == texts["original"]
    drawn = {side: sorted(p.name for p in (runs[side, "baseline"] / "figures").iterdir())
             for side in ("original", "renamed")}  # fmt: skip
    assert [undo_names(name) for name in drawn["renamed"]] == drawn["original"]
    assert any(name.startswith("renamed_b_heatmap_") for name in drawn["renamed"])
    # `plot` redraws the same files, with no plugin either.
    res = run_cli(tmp_path, "plot", str(renamed))
    assert res.returncode == 0, res.stderr
    assert sorted(Path(line).name for line in res.stdout.splitlines()) == drawn["renamed"]
    verdicts = {}
    for side in ("original", "renamed"):
        out = tmp_path / f"{side}.json"
        args = ["compare", str(runs[side, "baseline"]), str(runs[side, "candidate"])]
        res = run_cli(tmp_path, *args, "--format", "json", "--output", str(out))
        assert res.returncode == 0, res.stderr
        changes = json.loads(out.read_text())["changes"]
        verdicts[side] = [{**c, "task": undo_names(c["task"])} for c in changes]
    assert verdicts["renamed"] == verdicts["original"]
    assert {"improvement", "regression"} <= {c["status"] for c in verdicts["original"]}


def test_a_run_recorded_before_figure_specs_draws_its_sweep_figures_only_and_warns(
    grid_run, tmp_path
):
    run = shutil.copytree(grid_run, tmp_path / "old" / "run")
    shutil.rmtree(run / "figures")
    record = json.loads((run / "run.json").read_text())
    for info in record["task_info"].values():
        del info["figures"]
    (run / "run.json").write_text(json.dumps(record, indent=2))
    res = run_cli(tmp_path, "report", str(run))
    assert res.returncode == 0, res.stderr
    for task in ("niah", "icl"):
        assert f"no figures of task '{task}': its run.json records no figure specs" in res.stderr
    # The differences figure needs no task's specs; nothing else is drawn (no sweep here).
    assert {p.name for p in (run / "figures").glob("*.png")} == {"diffbench_differences.png"}
    assert "## niah" in (run / "report.md").read_text()


def test_the_model_table_says_whether_each_models_chat_template_was_applied(workdir):
    from diffbench.render.report import chat_template

    md = (workdir / "results" / "first" / "report.md").read_text()
    assert "| chat template |" in md
    assert chat_template(False, {}) == "none"
    assert chat_template(True, {}) == "applied"
    assert chat_template(True, {"chat_template": "false"}) == "off"
