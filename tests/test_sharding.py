"""Data-parallel runs: ranks under torchrun (gloo, CPU) score shares of the items into their own
files, rank 0 merges them, and the result is the one-process run's, byte for byte."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from diffbench.api import ChoiceRequest, GenerateRequest, Item
from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec
from diffbench.runner import Ranks, _check_rank_device, shard
from diffbench.store import RunStore

RUN = [
    "run",
    "--tasks",
    "niah,icl",
    "--models",
    "tiny-base,tiny-diff",
    "--set",
    "niah.lengths=256",
    "--set",
    "niah.samples=1",
    "--set",
    "icl.shots=1,2",
    "--set",
    "icl.draws=1",
    "--set",
    "icl.test_size=4",
    "--limit",
    "3",
    "--no-report",
]
FILES = [(t, m) for t in ("niah", "icl") for m in ("tiny-base", "tiny-diff")]


def torchrun(cwd: Path, nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node N -m diffbench.cli ARGS` (a free port, offline)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", "diffbench.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def sample_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run in one plain process."""
    cwd = tmp_path_factory.mktemp("one")
    res = run_cli(cwd, *RUN, "--output", "run")
    assert res.returncode == 0, res.stderr
    return cwd / "run"


@pytest.mark.slow
def test_two_ranks_give_the_one_process_metrics_byte_for_byte(reference, tmp_path):
    res = torchrun(tmp_path, 2, *RUN, "--output", "run")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run"
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    for task, model in FILES:
        assert re.search(rf"{task}/{model} rank 1/2: 0/[1-9]\d* already scored", res.stderr)
        ours = [json.loads(x) for x in sample_lines(out / "samples" / task / f"{model}.jsonl")]
        ref = [json.loads(x) for x in sample_lines(reference / "samples" / task / f"{model}.jsonl")]
        # Rank 0 merged every rank's file into the model's one file, each sample once.
        assert sorted(ours, key=lambda s: s["id"]) == sorted(ref, key=lambda s: s["id"])
    assert not list(out.glob("samples/*/rank*")), "rank folders left after the merge"
    assert res.stdout.strip().splitlines() == ["run"]  # rank 0 alone reports


def stopped_run(reference: Path, where: Path) -> dict[tuple[str, str], int]:
    """A copy of `reference` as a 2-rank run killed mid-way leaves it: rank files not merged,
    rank 1's last line torn, samples missing, one line already merged and still in a rank file.
    Returns how many samples each (task, model) lacks."""
    shutil.copytree(reference, where)
    (where / "metrics.csv").unlink()
    store = RunStore(where)
    missing = {}
    for task, model in FILES:
        main = store.samples_file(task, model)
        lines = sample_lines(main)
        main.write_text("".join(lines[:2]))
        rest = lines[2:]
        rank0, rank1 = rest[0::2], rest[1::2]
        store.rank_file(task, model, 0).parent.mkdir(parents=True, exist_ok=True)
        store.rank_file(task, model, 0).write_text(lines[1] + "".join(rank0[:-1]))
        store.rank_file(task, model, 1).parent.mkdir(parents=True, exist_ok=True)
        store.rank_file(task, model, 1).write_text("".join(rank1[:-2]) + rank1[-2][:25])
        missing[(task, model)] = 3
    return missing


def scored_now(stderr: str, task: str, model: str) -> int:
    """Samples the ranks of a run said they had left to score for (task, model)."""
    found = re.findall(rf"{task}/{model}(?: rank \d+/\d+)?: (\d+)/(\d+) already scored", stderr)
    assert found, stderr
    return sum(int(total) - int(done) for done, total in found)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 1])
def test_stopped_two_rank_run_resumes_with_any_world_size(reference, tmp_path, nproc):
    stopped = tmp_path / "run"
    missing = stopped_run(reference, stopped)
    # The stopped run's samples count before anything is scored: each rank scores only what is
    # missing from its share, whatever the new world size.
    readable = RunStore(stopped).samples("niah")
    assert len(readable) == 2 * 10 - missing[("niah", "tiny-base")] - missing[("niah", "tiny-diff")]

    if nproc == 1:
        res = run_cli(tmp_path, *RUN, "--output", "run")
    else:
        res = torchrun(tmp_path, nproc, *RUN, "--output", "run")
    assert res.returncode == 0, res.stderr
    assert "resuming the run" in res.stderr and "merged" in res.stderr
    for task, model in FILES:
        assert scored_now(res.stderr, task, model) == missing[(task, model)]
        ids = [
            json.loads(x)["id"] for x in sample_lines(stopped / "samples" / task / f"{model}.jsonl")
        ]
        ref = [
            json.loads(x)["id"]
            for x in sample_lines(reference / "samples" / task / f"{model}.jsonl")
        ]
        assert len(ids) == len(set(ids)) and set(ids) == set(ref)  # none lost, none twice
    assert (stopped / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert not list(stopped.glob("samples/*/rank*"))
    assert json.loads((stopped / "run.json").read_text())["world_size"] == nproc


def test_reader_takes_rank_files_after_the_model_file(tmp_path):
    store = RunStore(tmp_path)
    base = {"task": "niah", "model": "m"}
    store.samples_file("niah", "m").parent.mkdir(parents=True, exist_ok=True)
    store.samples_file("niah", "m").write_text(
        json.dumps({**base, "id": "a", "score": 0}) + "\n" + json.dumps({**base, "id": "b"}) + "\n"
    )
    for rank, line in ((1, {"id": "c"}), (0, {"id": "a", "score": 1})):
        store.rank_file("niah", "m", rank).parent.mkdir(parents=True, exist_ok=True)
        store.rank_file("niah", "m", rank).write_text(json.dumps({**base, **line}) + "\n{tor")
    frame = store.samples("niah").set_index("id")
    assert sorted(frame.index) == ["a", "b", "c"]
    assert frame.loc["a", "score"] == 1  # the rank file's line is the newer one
    assert set(store.scored_inputs("niah", "m")) == {"a", "b", "c"}

    assert store.merge_ranks() == 2
    assert store.merge_ranks() == 0
    assert [json.loads(x)["id"] for x in sample_lines(store.samples_file("niah", "m"))] == [
        "a",
        "b",
        "a",
        "c",
    ]
    assert not list(tmp_path.glob("samples/niah/rank*"))
    assert store.samples("niah").set_index("id").loc["a", "score"] == 1


def test_shard_deals_items_one_by_one_and_keeps_a_shared_prefix_on_one_rank():
    def choice(prefix: str, i: int) -> Item:
        return Item(f"{prefix}{i}", ChoiceRequest(prefix, f"q{i}", ("x", "y")), {})

    gen = [Item(f"g{i}", GenerateRequest(f"p{i}", 4), {}) for i in range(3)]
    items = [*gen, choice("A", 0), choice("A", 1), choice("B", 0), choice("B", 1), choice("A", 2)]
    shares = [[it.id for it in shard(items, Ranks(r, 2, r))] for r in (0, 1)]
    assert shares == [["g0", "g2", "B0", "B1"], ["g1", "A0", "A1", "A2"]]
    assert shard(items, Ranks()) == items
    three = [it.id for r in range(3) for it in shard(items, Ranks(r, 3, r))]
    assert sorted(three) == sorted(it.id for it in items)


def test_bad_rank_environment_and_a_pinned_gpu_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DiffbenchError, match="not a rank of a group"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(DiffbenchError, match="RANK='one' is not an integer"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "1")
    assert Ranks.from_env() == Ranks(1, 2, 1)
    with pytest.raises(DiffbenchError, match="device=cuda:0 puts every rank on one GPU"):
        _check_rank_device(ModelSpec("m", "tiny-base", {"device": "cuda:0"}))
    _check_rank_device(ModelSpec("m", "tiny-base", {"device": "cuda"}))
