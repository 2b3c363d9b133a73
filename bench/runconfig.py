"""One run's configuration, built from the command line and a YAML suite, checked before anything
loads: tasks, models and their options, `--set`, `--sweep`, seed, limit, and the run directory
(named from the suite or the tasks, the models and the run's identity when `--output` is not
given).

Task and backend options themselves are typed in `diffbench.config`; this module gathers them
into a `RunConfig` and refuses a run that cannot start.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffbench.config import coerce, expand_sweep, parse_sets, parse_sweep
from diffbench.errors import DiffbenchError
from diffbench.models import (
    DEFAULT_MODELS,
    ModelSpec,
    check_label,
    parse_model_args,
    parse_models,
)

if TYPE_CHECKING:
    from diffbench.plan import Plan, RunConfig

CONFIG_KEYS = ("tasks", "models", "options", "seed", "limit", "output", "sweep", "sweep_tasks")
# What `diffbench run` runs without --tasks or --config: every task family of the paper, sized so
# that the shipped pair gives a signal on each within minutes on a CPU.
SUITES = Path(__file__).parent / "suites"
DEFAULT_SUITE = SUITES / "default.yaml"


def suite_path(path: Path) -> Path:
    """`--config`'s file: a path, or the name of a shipped suite (`paper`: suites/paper.yaml)."""
    named = SUITES / f"{path}.yaml"
    return named if not path.exists() and path.parent == Path() and named.is_file() else path


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line: the problem and where it is."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def _load_suite(path: Path) -> dict[str, Any]:
    """The mapping of a YAML run file (a suite), its keys checked against CONFIG_KEYS."""
    import yaml

    if path.is_dir():
        raise DiffbenchError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        shipped = sorted(p.stem for p in SUITES.glob("*.yaml"))
        raise DiffbenchError(
            f"config file {path} does not exist (shipped suites, by name: {', '.join(shipped)})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DiffbenchError(f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise DiffbenchError(
            f"config file {path} is not valid YAML: {_yaml_problem(err)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DiffbenchError(
            f"config file {path} must hold a mapping with keys {', '.join(CONFIG_KEYS)}, "
            f"not a {type(data).__name__}"
        )
    unknown = sorted(str(k) for k in set(data) - set(CONFIG_KEYS))
    if unknown:
        raise DiffbenchError(
            f"unknown keys in {path}: {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}"
        )
    return {k: v for k, v in data.items() if v is not None}


def _task_names(value: Any, what: str) -> list[str]:
    """Task names from a comma-separated string or a YAML list; each named once."""
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        names = value
    else:
        names = []
    names = [t.strip() for t in names]
    if not names or any(not t for t in names) or len(set(names)) != len(names):
        raise DiffbenchError(f"malformed {what} {value!r}: expected task names, each once")
    return names


def _yaml_models(value: Any, where: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """YAML `models: {label: spec}` or `{label: {spec: ..., KEY: VALUE}}` as specs and options."""
    if not isinstance(value, dict) or not value:
        raise DiffbenchError(
            f"models in {where} must map labels to specs (label: SPEC, or label: "
            f"{{spec: SPEC, OPTION: VALUE}}), not {value!r}"
        )
    specs: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    for key, entry in value.items():
        label = check_label(str(key), where)
        raw = dict(entry) if isinstance(entry, dict) else {"spec": entry}
        if "spec" not in raw:
            raise DiffbenchError(f"model {label!r} in {where} has no spec")
        spec = raw.pop("spec")
        if not isinstance(spec, str) or not ModelSpec(label, spec).location.strip():
            raise DiffbenchError(
                f"model {label!r} in {where}: spec must be a folder, .gguf file, hub id or "
                f"built-in name, not {spec!r}"
            )
        specs[label] = spec.strip()
        options[label] = {str(k): v for k, v in raw.items()}
    return specs, options


def _yaml_options(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """YAML `options: {task: {key: value}}`, checked to be mappings."""
    if not isinstance(value, dict):
        raise DiffbenchError(
            f"options in {where} must map task names to their options "
            f"(niah: {{samples: 20}}), not {value!r}"
        )
    out: dict[str, dict[str, Any]] = {}
    for task, kv in value.items():
        if kv is not None and not isinstance(kv, dict):
            raise DiffbenchError(
                f"options of {task!r} in {where} must map option names to values, not {kv!r}"
            )
        out[str(task)] = {str(k): v for k, v in (kv or {}).items()}
    return out


def _check_run_output(path: Path, explicit: bool) -> None:
    """Refuse a run directory that is a file, a folder of other things, or has no parent."""
    if path.exists() and not path.is_dir():
        raise DiffbenchError(f"{path} is a file, not a run directory; choose another --output")
    if path.is_dir():
        if (path / "run.json").is_file():
            return  # a resume: the runner checks that it is this run
        if any(not p.name.startswith(".") for p in path.iterdir()):
            raise DiffbenchError(
                f"run directory {path} holds other files and no diffbench run (no run.json); "
                "give --output a new or empty folder"
            )
        return
    if explicit:
        if not path.parent.is_dir():
            raise DiffbenchError(f"--output {path}: {path.parent} is not an existing folder")
        return
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise DiffbenchError(
            f"{ancestor} is a file, not a folder for run directory {path}; choose an --output"
        )


def _swept(
    args: argparse.Namespace,
    data: dict[str, Any],
    where: str,
    models: tuple[ModelSpec, ...],
    tasks: list[str],
) -> tuple[ModelSpec, ...]:
    """The run's models with --sweep (or the YAML's sweep) applied: each model (on the sweep's
    tasks, when --sweep-tasks scopes it) as one variant per value."""
    if args.sweep is not None:
        sweep = parse_sweep(args.sweep, "--sweep")
    elif "sweep" in data:
        sweep = parse_sweep(data["sweep"], f"sweep in {where}")
    else:
        sweep = None
    if args.sweep_tasks is not None:
        scope = tuple(_task_names(args.sweep_tasks, "--sweep-tasks"))
    elif "sweep_tasks" in data and args.sweep is None:
        scope = tuple(_task_names(data["sweep_tasks"], f"sweep_tasks in {where}:"))
    else:
        scope = ()
    if sweep is None:
        if args.sweep_tasks is not None:
            raise DiffbenchError("--sweep-tasks needs --sweep KEY=V1,V2,...")
        return models
    return expand_sweep(models, replace(sweep, tasks=scope), tasks)


def _form(args: argparse.Namespace) -> tuple[RunConfig, str | None]:
    """The run's configuration from the command line and the YAML file, checked for form, and
    the name of the suite its tasks come from (None when --tasks names them).

    Only light modules are imported until the form is known good, so that a malformed command
    fails in a fraction of a second.
    """
    if args.config:
        args.config = suite_path(args.config)
        data, where = _load_suite(args.config), str(args.config)
    elif args.tasks is None:
        data, where = _load_suite(DEFAULT_SUITE), "the default suite"
    else:
        data, where = {}, ""
    suite = (args.config or DEFAULT_SUITE).stem if args.tasks is None else None
    if args.tasks is not None:
        tasks = _task_names(args.tasks, "--tasks")
    elif "tasks" in data:
        tasks = _task_names(data["tasks"], f"tasks in {where}:")
    else:
        tasks = ["niah"]
    specs: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    if "models" in data:
        specs, options = _yaml_models(data["models"], where)
    if args.models is not None:
        specs = parse_models(args.models)
        options = {k: v for k, v in options.items() if k in specs}
    if not specs:
        specs = dict(DEFAULT_MODELS)
    for label, kv in parse_model_args(args.model_args).items():
        if label not in specs:
            raise DiffbenchError(
                f"--model-args names {label!r}, which is not a model of this run "
                f"({', '.join(specs)})"
            )
        options.setdefault(label, {}).update(kv)
    models = tuple(ModelSpec(label, spec, options.get(label, {})) for label, spec in specs.items())
    models = _swept(args, data, where, models, tasks)
    task_options = _yaml_options(data["options"], where) if "options" in data else {}
    from diffbench.registry import expand_options, expand_sets

    task_options = expand_options(task_options, tasks)  # `lm-eval:` options for every lm-eval task
    for task, kv in parse_sets(expand_sets(args.sets, tasks), tasks).items():
        task_options.setdefault(task, {}).update(kv)
    seed = args.seed
    if seed is None:
        seed = coerce(f"seed in {where}", data["seed"], int) if "seed" in data else 1234
    limit = args.limit
    if limit is None and "limit" in data:
        limit = coerce(f"limit in {where}", data["limit"], int)
        if limit < 1:
            raise DiffbenchError(f"limit in {where} must be a positive integer, not {limit}")
    output = args.output
    if output is None and "output" in data:
        if not isinstance(data["output"], str) or not data["output"].strip():
            raise DiffbenchError(f"output in {where} must be a folder path, not {data['output']!r}")
        output = Path(data["output"])
    if output is not None:
        _check_run_output(output, explicit=True)

    from diffbench.plan import RunConfig

    cfg = RunConfig(
        tasks=tuple(tasks),
        models=models,
        task_options=task_options,
        seed=seed,
        limit=limit,
        output=output,
    )
    return cfg, suite


def build_run(args: argparse.Namespace) -> Plan:
    """The plan of `diffbench run ARGS`, refused (before any model loads or any file is written)
    when it cannot start, with its run directory decided."""
    cfg, suite = _form(args)
    from diffbench import plan

    resolved = plan.resolve(cfg, suite, keep_going=bool(getattr(args, "dry_run", False)))
    if cfg.output is None:
        _check_run_output(resolved.output, explicit=False)
    return resolved
