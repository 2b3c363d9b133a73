"""Task configs from defaults, presets, a YAML file and `--set TASK.KEY=VALUE`, type-checked."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from diffbench.errors import DiffbenchError
from diffbench.models import ModelSpec

PRESET_KEY = "preset"
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is tuple:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def option_types(config_type: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a task config dataclass."""
    hints = typing.get_type_hints(config_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_type)}


def describe_options(config_type: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of every option, for `diffbench list`."""
    types_ = option_types(config_type)
    default = config_type()
    return [(n, _type_name(t), getattr(default, n)) for n, t in types_.items()]


def coerce(name: str, value: Any, tp: Any) -> Any:
    """`value` (a CLI string or a YAML value) as type `tp`, or a DiffbenchError naming `name`."""
    origin = get_origin(tp)
    if origin is tuple:
        inner = get_args(tp)[0]
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        items = [i.strip() if isinstance(i, str) else i for i in items]
        if any(i == "" for i in items):
            raise DiffbenchError(f"{name} has an empty list item in {value!r}")
        return tuple(coerce(name, i, inner) for i in items)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise DiffbenchError(f"{name} must be one of {', '.join(map(str, allowed))}: {value!r}")
        return value
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        raise TypeError(f"unsupported option type {tp} for {name}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise DiffbenchError(f"{name} expects true/false, got {value!r}")
    if tp in (int, float):
        # int(2.5) would quietly be 2, and int(True) 1: a YAML value must already be the number.
        whole = not isinstance(value, float) or value.is_integer()
        if isinstance(value, bool | list | dict) or (tp is int and not whole):
            raise DiffbenchError(f"{name} expects {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError, OverflowError):
            raise DiffbenchError(f"{name} expects {tp.__name__}, got {value!r}") from None
    if isinstance(value, list | dict):
        raise DiffbenchError(f"{name} expects {_type_name(tp)}, got {value!r}")
    return str(value)


def parse_sets(items: list[str], task_names: list[str]) -> dict[str, dict[str, str]]:
    """`--set TASK.KEY=VALUE` entries as task -> {key: raw value}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        task, dot, key = lhs.strip().partition(".")
        if not eq or not dot or not key:
            raise DiffbenchError(f"malformed --set {item!r}: expected TASK.KEY=VALUE")
        if task not in task_names:
            raise DiffbenchError(
                f"--set {item!r} names task {task!r}, which is not in this run's tasks "
                f"({', '.join(task_names)})"
            )
        out.setdefault(task, {})[key] = value
    return out


def build_config(
    task_name: str,
    config_type: type,
    presets: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
) -> Any:
    """A task config: defaults, then the named preset, then the overrides; unknown keys refused."""
    types_ = option_types(config_type)
    values: dict[str, Any] = {}
    preset = overrides.get(PRESET_KEY)
    if preset:
        if preset not in presets:
            raise DiffbenchError(
                f"unknown {task_name} preset {preset!r}; known: {', '.join(presets) or 'none'}"
            )
        values.update(presets[preset])
    for key, value in overrides.items():
        if key not in types_:
            raise DiffbenchError(f"unknown option {task_name}.{key}; known: {', '.join(types_)}")
        values[key] = coerce(f"{task_name}.{key}", value, types_[key])
    try:
        return config_type(**values)
    except ValueError as err:
        raise DiffbenchError(f"{task_name}: {err}") from None


def config_dict(config: Any) -> dict[str, Any]:
    """A task config as JSON-ready values (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


# ---- --sweep KEY=V1,V2,...: one model becomes a variant per value ---------------------------

SWEEP_SEP = "@"  # a variant's label: LABEL@KEY=VALUE (model labels themselves cannot hold '@')


@dataclass(frozen=True)
class Sweep:
    """A backend option and the values each model of a run is run under."""

    key: str
    values: tuple[str, ...]
    # Tasks only the variants run; the others run on the unswept models (empty: every task
    # runs on the variants alone).
    tasks: tuple[str, ...] = ()


def parse_sweep(text: Any, where: str = "--sweep") -> Sweep:
    """`KEY=V1,V2,...` (or a YAML mapping {KEY: [V1, V2, ...]}) as a Sweep; a DiffbenchError
    for a missing key, an empty or repeated value."""
    if isinstance(text, dict) and len(text) == 1:
        key, raw = next(iter(text.items()))
        values = raw if isinstance(raw, list) else str(raw).split(",")
    elif isinstance(text, str):
        key, eq, rest = text.partition("=")
        if not eq:
            raise DiffbenchError(f"malformed {where} {text!r}: expected KEY=V1,V2,...")
        values = rest.split(",")
    else:
        raise DiffbenchError(
            f"malformed {where} {text!r}: expected KEY=V1,V2,... or {{KEY: [V1, V2, ...]}}"
        )
    key = str(key).strip()
    if any(isinstance(v, list | dict) or v is None for v in values):
        raise DiffbenchError(f"malformed {where} {text!r}: values must be scalars")
    texts = [str(v).lower() if isinstance(v, bool) else str(v).strip() for v in values]
    if not _KEY_RE.match(key):
        raise DiffbenchError(f"malformed {where} {text!r}: KEY must be a backend option name")
    if not texts or any(not v for v in texts):
        raise DiffbenchError(f"malformed {where} {text!r}: every value must be non-empty")
    if len(set(texts)) != len(texts):
        raise DiffbenchError(f"malformed {where} {text!r}: a value is repeated")
    return Sweep(key, tuple(texts))


def variant_label(label: str, key: str, value: str) -> str:
    """The label of a model's variant under one value of a swept option."""
    return f"{label}{SWEEP_SEP}{key}={value}"


def split_variant(label: str) -> tuple[str, str, str] | None:
    """(base label, key, value) of a sweep variant's label, else None.

    A report merging runs appends `@<run>` to labels that clash; that tail stays with the base,
    so each run's variants still form one line of a sweep figure.
    """
    base, sep, rest = label.partition(SWEEP_SEP)
    if not sep:
        return None
    part, sep2, tail = rest.partition(SWEEP_SEP)
    key, eq, value = part.partition("=")
    if not eq or not _KEY_RE.match(key) or not value:
        return None
    return (f"{base}{sep2}{tail}", key, value)


def expand_sweep(
    models: Sequence[ModelSpec], sweep: Sweep, run_tasks: Sequence[str] = ()
) -> tuple[ModelSpec, ...]:
    """Each model as one variant per swept value, labelled LABEL@KEY=VALUE, its backend options
    carrying KEY=VALUE (the backend checks the key and the value, as for --model-args).

    A sweep scoped to some of the run's tasks (`sweep.tasks`) keeps each unswept model for the
    other tasks of `run_tasks`, and its variants run the scoped tasks only.
    """
    if sweep.tasks:
        unknown = [t for t in sweep.tasks if t not in run_tasks]
        if unknown:
            raise DiffbenchError(
                f"sweep tasks {', '.join(unknown)} are not tasks of this run "
                f"({', '.join(run_tasks)})"
            )
    rest = tuple(t for t in run_tasks if t not in sweep.tasks) if sweep.tasks else ()
    out = []
    for spec in models:
        if rest:
            out.append(ModelSpec(spec.label, spec.spec, spec.options, rest))
        if sweep.key in spec.options:
            raise DiffbenchError(
                f"--sweep {sweep.key} and the model options of {spec.label!r} both set "
                f"{sweep.key}; give it in one place"
            )
        for value in sweep.values:
            label = variant_label(spec.label, sweep.key, value)
            options = {**spec.options, sweep.key: value}
            out.append(ModelSpec(label, spec.spec, options, tuple(sweep.tasks)))
    return tuple(out)


def model_options(options_type: type, raw: Mapping[str, Any], label: str, backend: str = "") -> Any:
    """A backend's options dataclass from raw strings or YAML values, typed by its annotations,
    refusing unknown keys (`backend` names the backend in that message) and mistyped values."""
    known = option_types(options_type)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            which = f" ({backend} backend)" if backend else ""
            raise DiffbenchError(
                f"unknown model option {key!r} for {label!r}{which}; known: {', '.join(known)}"
            )
        values[key] = coerce(f"{label}:{key}", value, known[key])
    return options_type(**values)
