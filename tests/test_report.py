"""Reports: report.md and a self-contained report.html that renders in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from diffbench.api import CLUSTER_KEY
from test_cli_errors import assert_one_line_error
from test_stats import shared_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


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
    assert "| task | metric | setting | n | diff | base | twin | base − diff | twin − diff |" in md
    summary = md.split("## niah")[0]
    assert re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", summary)  # value [low, high]
    assert re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] p=", summary)
    assert "McNemar" in summary
    assert "DiffLlamaForCausalLM" in md and "LlamaForCausalLM" in md


def test_plot_draws_every_figure_in_png_and_pdf(workdir):
    figures = workdir / "results" / "first" / "figures"
    stems = {p.stem for p in figures.glob("*.png")}
    assert {"diffbench_differences", "niah_bars_score", "niah_heatmap_score_n1r1"} <= stems
    assert stems == {p.stem for p in figures.glob("*.pdf")}


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
    assert "sign-flip test over clusters: 2." in summary
    twin = [row.split(" | ")[-1] for row in summary.splitlines() if row.startswith("| niah")]
    assert twin and all(c.startswith("+0.000 [+0.000, +0.000] p=1 |") for c in twin)
