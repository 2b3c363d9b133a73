"""The backend contract: a typed ABC, the shared tokenization module, request kinds that follow a
task's config, and a backend plugin that is one module plus an entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest
from diffbench import api
from diffbench.api import (
    VERBS,
    AttentionRequest,
    Backend,
    ChoiceRequest,
    GenerateRequest,
    Generation,
    answers,
    request_kinds,
)
from diffbench.backends.hf import HFBackend
from diffbench.config import build_config
from diffbench.tasks.niah import TASK as NIAH
from test_cli_errors import assert_one_line_error

# A backend plugin as a third party would ship it: one module subclassing api.Backend that
# answers generation only (it echoes the first 7-digit number of the prompt, so NIAH's needles are
# found), with a character-level tokenizer. `load` leaves a mark, so a test can tell whether
# anything was loaded.
PLUGIN = '''
import os
import re
from pathlib import Path

from diffbench.api import Backend, Generation, ModelInfo
from diffbench.errors import DiffbenchError


class Chars:
    """One token per character."""

    max_context = 100_000
    has_chat_template = False

    def count(self, text):
        return len(text)

    def char_offset(self, text, n_tokens):
        return max(0, min(n_tokens, len(text)))

    def render(self, user, answer_prefix="", chat=True):
        return f"{user}\\n{answer_prefix}"

    def prompt_tokens(self, prompt):
        return len(prompt)


class EchoBackend(Backend):
    def __init__(self, label, spec):
        self.info = ModelInfo(label, spec, "echo", "", "Echo", 0, "none", 100_000, False, "echo")

    @classmethod
    def check(cls, spec):
        if spec.options:
            raise DiffbenchError(f"the echo backend takes no options, got {sorted(spec.options)}")

    @classmethod
    def load(cls, spec):
        Path(os.environ["ECHO_LOADED"]).write_text(spec.label)
        return cls(spec.label, spec.spec)

    def tokenizer_view(self):
        return Chars()

    def close(self):
        pass

    def generate(self, requests):
        out = []
        for r in requests:
            found = re.findall(r"\\b\\d{7}\\b", r.prompt)
            out.append(Generation(found[0] if found else "", len(r.prompt), 1))
        return out
'''


@pytest.fixture
def echo_plugin(tmp_path) -> Path:
    """The echo backend installed through a real entry point (a dist-info on PYTHONPATH)."""
    site = tmp_path / "site"
    dist = site / "echobackend-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "echo_backend.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echobackend\nVersion: 0.1\n")
    entry = "[diffbench.backends]\necho = echo_backend:EchoBackend\n"
    (dist / "entry_points.txt").write_text(entry)
    return site


def run_with_echo(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "ECHO_LOADED": str(cwd / "loaded"),
    }
    return subprocess.run(
        [sys.executable, "-m", "diffbench.cli", "run", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


SMALL_NIAH = ["--set", "niah.lengths=256", "--set", "niah.depths=0,100", "--set", "niah.samples=2"]


def test_an_entry_point_backend_that_answers_generate_runs_a_task_end_to_end(echo_plugin, tmp_path):
    out = tmp_path / "out"
    res = run_with_echo(
        echo_plugin, tmp_path, "--tasks", "niah", "--set", "niah.mode=generate", *SMALL_NIAH,
        "--models", "e=echo:anything", "--output", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    samples = [json.loads(line) for line in (out / "samples/niah/e.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2  # depths x samples
    assert all(s["score"] == 1 for s in samples)  # the echo finds every needle
    record = json.loads((out / "run.json").read_text())
    assert "echo" in json.dumps(record)
    assert (tmp_path / "loaded").read_text() == "e"


def test_a_task_mode_the_backend_cannot_answer_is_refused_before_any_model_loads(
    echo_plugin, tmp_path
):
    out = tmp_path / "out"
    res = run_with_echo(
        echo_plugin, tmp_path, "--tasks", "niah", "--set", "niah.mode=score", *SMALL_NIAH,
        "--models", "e=echo:anything", "--output", str(out),
    )  # fmt: skip
    assert_one_line_error(res, "model 'e' (echo backend) cannot answer ChoiceRequest", "niah")
    assert not out.exists()
    assert not (tmp_path / "loaded").exists()


def test_tokens_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, diffbench.backends.tokens\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_backend_without_load_or_check_cannot_be_instantiated():
    class Partial(Backend):
        def tokenizer_view(self):  # type: ignore[override]
            raise NotImplementedError

        def close(self) -> None:
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


def test_answers_tells_the_verbs_a_backend_overrides_from_the_contracts_refusals():
    assert all(answers(HFBackend, kind) for kind in VERBS)

    class GenerateOnly(Backend):
        info = api.ModelInfo("g", "g", "g", "", "", 0, "", 16, False, "")

        @classmethod
        def check(cls, spec: typing.Any) -> None:
            pass

        @classmethod
        def load(cls, spec: typing.Any) -> GenerateOnly:
            return cls()

        def tokenizer_view(self) -> typing.Any:
            return None

        def close(self) -> None:
            pass

        def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
            return [Generation("x", 1, 1) for _ in requests]

    backend = GenerateOnly()
    assert [k for k in VERBS if answers(GenerateOnly, k)] == [GenerateRequest]
    assert [k for k in VERBS if answers(backend, k)] == [GenerateRequest]
    assert api.respond(backend, [GenerateRequest("p", 4)]) == [Generation("x", 1, 1)]
    with pytest.raises(Exception, match="cannot answer ChoiceRequest"):
        api.respond(backend, [ChoiceRequest("a", "b", ("c",))])

    class DuckTyped:  # a plugin that predates the ABC: a method of the verb's name is enough
        def generate(self, requests):
            return []

    assert answers(DuckTyped, GenerateRequest) and not answers(DuckTyped, ChoiceRequest)


def test_every_verb_is_typed_by_its_request_and_its_response():
    responses = {
        "generate": api.Generation,
        "score_choices": api.ChoiceScores,
        "rolling_logprobs": api.TokenLogprobs,
        "activation_stats": api.ActivationStats,
        "attention_mass": api.AttentionMass,
        "throughput": api.Throughput,
    }
    assert sorted(VERBS.values()) == sorted(responses)
    for kind, verb in VERBS.items():
        hints = typing.get_type_hints(getattr(Backend, verb), vars(api))
        assert hints["requests"] == Sequence[kind]
        assert hints["return"] == list[responses[verb]]


@pytest.mark.parametrize(
    ("mode", "kinds"),
    [
        ("generate", {GenerateRequest}),
        ("score", {ChoiceRequest}),
        ("both", {GenerateRequest, ChoiceRequest}),
        ("attention", {AttentionRequest}),
        ("all", {GenerateRequest, ChoiceRequest, AttentionRequest}),
    ],
)
def test_niah_request_kinds_follow_its_mode(mode, kinds):
    config = build_config("niah", NIAH.config_type, NIAH.presets, {"mode": mode})
    assert set(request_kinds(NIAH, config)) == kinds


def test_a_plugin_with_a_plain_request_kinds_tuple_is_still_read():
    class Legacy:
        request_kinds = (GenerateRequest,)

    assert request_kinds(Legacy(), None) == (GenerateRequest,)  # type: ignore[arg-type]
