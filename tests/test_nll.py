"""The nll task: per-token NLL by log-spaced position bucket over long texts, on the tiny pair."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from diffbench.models import ModelSpec
from diffbench.runner import RunConfig, run
from diffbench.tasks.nll import bucket_edges


def test_bucket_edges_are_log_spaced_and_cover_every_position():
    edges = bucket_edges(512, 8)
    assert edges[0] == 0 and edges[-1] == 512
    assert all(b > a for a, b in itertools.pairwise(edges))
    widths = np.diff(edges)
    assert widths[0] < widths[-1]  # the first tokens get buckets of their own


def test_nll_run_gives_bucket_rows_a_paired_score_and_the_figure(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(
        " ".join(f"The river {i % 7} meets the old bridge near town." for i in range(400))
    )
    cfg = RunConfig(
        tasks=("nll",),
        models=(ModelSpec("tiny-base", "tiny-base"), ModelSpec("tiny-diff", "tiny-diff")),
        task_options={
            "nll": {"length": "128", "sequences": "3", "buckets": "4", "text": str(text)}
        },
        output=tmp_path / "run",
    )
    out = run(cfg)
    metrics = pd.read_csv(out / "metrics.csv", dtype={"position": str})
    overall = metrics[metrics["metric"] == "nll"]
    assert set(overall["model"]) == {"tiny-base", "tiny-diff"} and (overall["n"] == 3).all()
    by_pos = metrics[(metrics["metric"] == "nll_at") & (metrics["model"] == "tiny-base")]
    assert list(by_pos["position"].astype(int).sort_values()) == bucket_edges(128, 4)[1:]
    assert (by_pos["value"] > 0).all() and (by_pos["stderr"] >= 0).all()
    samples = [
        json.loads(x) for x in (out / "samples/nll/tiny-base.jsonl").read_text().splitlines()
    ]
    assert all(s["n_tokens"] == 128 for s in samples)
    assert overall[overall["model"] == "tiny-base"]["value"].iloc[0] == pytest.approx(
        np.mean([s["score"] for s in samples])
    )
    from diffbench.api import TaskInfo
    from diffbench.render.figures import figures
    from diffbench.tasks.nll import TASK

    assert figures(TaskInfo.of(TASK), metrics)  # its declared figure, drawn from the rows alone
