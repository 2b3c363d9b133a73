"""`diffbench serve` on loopback, called through the official openai client, and the llm judge
end to end against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import run_cli
from diffbench.judge import EndpointJudge, JudgeInput


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(model: str, cwd: Path, name: str) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffbench.cli",
            "serve",
            model,
            "--port",
            str(port),
            "--name",
            name,
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
    deadline = time.time() + 300
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shipped tiny-base behind `diffbench serve` on a free loopback port."""
    yield from _serve("tiny-base", tmp_path_factory.mktemp("serve"), "tiny-base")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_models_lists_the_served_model(served: str) -> None:
    assert [m.id for m in _client(served).models.list()] == ["tiny-base"]


@pytest.mark.slow
def test_chat_and_completions_answer_through_the_openai_client(served: str) -> None:
    client = _client(served)
    chat = client.chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": "The town of"}], max_tokens=4
    )
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 4
    done = client.completions.create(model="tiny-base", prompt="The town of", max_tokens=3)
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens <= 3


@pytest.mark.slow
def test_bad_requests_get_the_openai_error_shape_and_a_4xx(served: str) -> None:
    client = _client(served)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="tiny-base", messages=[])
    assert empty.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(
            model="tiny-base", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=2
        )
    assert long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-base", prompt="x", max_tokens=0)


DOC = "The town of Velderby lies on the river Aldra. It was founded in 1702 by Otto Melquist."


@pytest.mark.slow
def test_llm_judge_end_to_end_and_a_rerun_never_calls_again(served: str, tmp_path: Path) -> None:
    items = [
        JudgeInput(f"r{i}", DOC, out, "Who founded Velderby?", "Otto Melquist")
        for i, out in enumerate(("Otto Melquist.", "Karl Brandt."))
    ]
    cache = tmp_path / "cache.jsonl"
    first = EndpointJudge(served, "tiny-base", cache=cache, max_tokens=8)
    verdicts = first.judge(items)
    assert first.calls == 2 and len(verdicts) == 2
    again = EndpointJudge(served, "tiny-base", cache=cache, max_tokens=8)
    assert [v.raw for v in again.judge(items)] == [v.raw for v in verdicts]
    assert again.calls == 0


@pytest.mark.slow
def test_judge_command_keeps_judged_rows_when_the_endpoint_goes_down(tmp_path: Path) -> None:
    rows = [
        {"id": f"r{i}", "document": DOC, "output": out}
        for i, out in enumerate(("Otto Melquist founded it.", "It lies on the Aldra."))
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = [
        "judge",
        str(src),
        "--judge",
        "llm",
        "--model",
        "tiny-base",
        "--output",
        str(out),
        "--cache",
        str(tmp_path / "cache.jsonl"),
        "--retries",
        "1",
        "--max-tokens",
        "8",
    ]
    server = _serve("tiny-base", tmp_path, "tiny-base")
    url = next(server)
    try:
        res = run_cli(tmp_path, *args, "--base-url", url)
    finally:
        server.close()
    assert res.returncode == 0, res.stderr
    assert "newly judged: 2" in res.stdout
    src.write_text(
        src.read_text() + json.dumps({"id": "r2", "document": DOC, "output": "x"}) + "\n"
    )
    down = run_cli(tmp_path, *args, "--base-url", url)
    assert down.returncode == 2
    errors = [line for line in down.stderr.splitlines() if line.startswith("diffbench: error:")]
    assert len(errors) == 1 and "failed after 2 tries" in errors[0], down.stderr
    assert "Traceback" not in down.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1"]


@pytest.mark.models
def test_llm_judge_through_smollm2_served(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct is far too small to judge well: this checks the plumbing only."""
    server = _serve("smollm2", tmp_path, "smollm2")
    url = next(server)
    try:
        judge = EndpointJudge(url, "smollm2", cache=tmp_path / "c.jsonl", max_tokens=128)
        verdicts = judge.judge(
            [JudgeInput("a", DOC, "Otto Melquist.", "Who founded it?", "Otto Melquist")]
        )
    finally:
        server.close()
    assert judge.calls == 1 and verdicts[0].raw.strip()
