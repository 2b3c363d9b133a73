"""The `diffbench` command line: run, list, report, plot, compare, runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from diffbench.errors import DiffbenchError

log = logging.getLogger("diffbench")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"diffbench: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run tasks on models; writes a run directory under results/")
    r.add_argument("--tasks", help="comma-separated task names (default: niah)")
    r.add_argument(
        "--models",
        help="LABEL=SPEC[,LABEL=SPEC...]; SPEC is a folder, hub id, "
        "built-in name, or prefixed hf:/vllm:",
    )
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="TASK.KEY=VALUE",
        help="a task option; lists are comma-separated (repeatable)",
    )
    r.add_argument(
        "--model-args",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="backend options of one model (repeatable)",
    )
    r.add_argument("--config", type=Path, help="a YAML file with tasks, models, options")
    r.add_argument("--output", type=Path, help="run directory (default: named from the run)")
    r.add_argument("--seed", type=int, help="seed of every random draw (default 1234)")
    r.add_argument("--limit", type=int, help="at most N samples per setting (smoke runs)")
    r.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    r.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub.add_parser("list", help="tasks with their options and metrics, and built-in models")
    rep = sub.add_parser(
        "report",
        help="write report.md and report.html of a run directory, or one merging several runs",
    )
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument(
        "--output",
        type=Path,
        help="folder of the report (default: the run directory itself; for several runs "
        "results/report__<hash>)",
    )
    rep.add_argument("--reference", help="model the others are compared with (default: the first)")
    pl = sub.add_parser("plot", help="redraw the figures of a run directory")
    pl.add_argument("run_dir", type=Path)
    cmp = sub.add_parser(
        "compare",
        help="compare a candidate run with a baseline run (or two models of one run); "
        "a CI gate with --fail-on",
    )
    cmp.add_argument("baseline", type=Path, metavar="BASELINE_DIR")
    cmp.add_argument("candidate", type=Path, nargs="?", metavar="CANDIDATE_DIR")
    cmp.add_argument(
        "--models",
        metavar="A,B",
        help="with one run directory: compare model B (candidate) against model A (baseline)",
    )
    cmp.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="baseline label OLD is the candidate's NEW (repeatable or comma-separated)",
    )
    cmp.add_argument(
        "--tolerance",
        default="0",
        help="absolute change allowed: 0.02, or per metric accuracy=0.05,... (default 0)",
    )
    cmp.add_argument(
        "--require-significance",
        action="store_true",
        help="a change beyond tolerance only counts when the paired test is significant",
    )
    cmp.add_argument(
        "--fail-on",
        default="",
        metavar="regression[,missing]",
        help="exit 1 when a row regresses (and/or a baseline row is missing)",
    )
    cmp.add_argument("--format", choices=("text", "md", "json", "junit"), default="text")
    cmp.add_argument("--output", type=Path, help="write the table to this file, not stdout")
    runs = sub.add_parser("runs", help="list run directories (tasks, models, date)")
    runs.add_argument("--root", type=Path, default=Path("results"), help="default: results/")
    return p


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise DiffbenchError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DiffbenchError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DiffbenchError(f"config file {path} must hold a mapping")
    known = {"tasks", "models", "options", "seed", "limit", "output"}
    unknown = set(data) - known
    if unknown:
        raise DiffbenchError(
            f"unknown keys in {path}: {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    return data


def _run_config(args: argparse.Namespace) -> Any:
    from diffbench.config import parse_sets
    from diffbench.models import DEFAULT_MODELS, ModelSpec, parse_model_args, parse_models
    from diffbench.runner import RunConfig

    data = _load_yaml(args.config) if args.config else {}
    tasks_value = args.tasks or data.get("tasks") or "niah"
    tasks = [
        t.strip() for t in (tasks_value.split(",") if isinstance(tasks_value, str) else tasks_value)
    ]
    if any(not t for t in tasks) or len(set(tasks)) != len(tasks):
        raise DiffbenchError(f"malformed --tasks {tasks_value!r}")
    # Models: YAML `models: {label: spec}` or `{label: {spec: ..., KEY: VALUE}}`.
    specs: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    for label, value in (data.get("models") or {}).items():
        if isinstance(value, dict):
            value = dict(value)
            if "spec" not in value:
                raise DiffbenchError(f"model {label!r} in {args.config} has no spec")
            specs[str(label)] = str(value.pop("spec"))
            options[str(label)] = value
        else:
            specs[str(label)] = str(value)
    if args.models:
        specs = parse_models(args.models)
        options = {k: v for k, v in options.items() if k in specs}
    if not specs:
        specs = dict(DEFAULT_MODELS)
    for label, kv in parse_model_args(args.model_args).items():
        if label not in specs:
            raise DiffbenchError(f"--model-args names {label!r}, which is not a model of this run")
        options.setdefault(label, {}).update(kv)
    task_options: dict[str, dict[str, Any]] = {
        str(t): dict(v or {}) for t, v in (data.get("options") or {}).items()
    }
    for task, kv in parse_sets(args.sets, tasks).items():
        task_options.setdefault(task, {}).update(kv)
    seed = args.seed if args.seed is not None else int(data.get("seed", 1234))
    limit = args.limit if args.limit is not None else data.get("limit")
    if limit is not None and int(limit) < 1:
        raise DiffbenchError("--limit must be a positive integer")
    output = args.output or (Path(data["output"]) if data.get("output") else None)
    return RunConfig(
        tasks=tuple(tasks),
        models=tuple(
            ModelSpec(label, spec, options.get(label, {})) for label, spec in specs.items()
        ),
        task_options=task_options,
        seed=seed,
        limit=int(limit) if limit is not None else None,
        output=output,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from diffbench import report, runner

    cfg = _run_config(args)
    run_dir = runner.run(cfg)
    if not args.no_report:
        figures = report.plot(run_dir)
        path = report.write(run_dir)
        log.info("wrote %s and %d figure files", path, len(figures))
    print(run_dir)
    return 0


def _cmd_list() -> int:
    from diffbench import registry
    from diffbench.config import describe_options
    from diffbench.errors import DiffbenchError
    from diffbench.models import BUILTINS, DEFAULT_MODELS

    for name in sorted(registry.available()):
        task = registry.load(name)
        print(f"{name}: {task.description}")
        print(f"  metrics: {', '.join(task.metrics)}")
        presets = getattr(task, "presets", {})
        if presets:
            print(f"  presets: {', '.join(presets)}")
        print("  options:")
        for opt, typ, default in describe_options(task.config_type):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            print(f"    {opt:<14} {typ:<22} default: {shown}")
    print(f"built-in models (--models NAME; the default is {', '.join(DEFAULT_MODELS)}):")
    for b in BUILTINS.values():
        try:
            b.target()
            state = ""
        except DiffbenchError:
            state = " [not installed]"
        print(f"  {b.name:<10} {b.description}{state}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from diffbench import compare
    from diffbench.store import write_atomic

    gate = {
        "tolerance": compare.parse_tolerance(args.tolerance),
        "require_significance": args.require_significance,
        "fail_on": [x.strip() for x in args.fail_on.split(",") if x.strip()],
    }
    if args.models:
        if args.candidate is not None:
            raise DiffbenchError("--models compares two models of ONE run; give one directory")
        if args.map:
            raise DiffbenchError("--map applies to two runs, not to --models")
        labels = [x.strip() for x in args.models.split(",")]
        if len(labels) != 2 or not all(labels):
            raise DiffbenchError(f"malformed --models {args.models!r}: expected BASELINE,CANDIDATE")
        result = compare.compare_models(args.baseline, labels[0], labels[1], **gate)
    else:
        if args.candidate is None:
            raise DiffbenchError(
                "compare needs BASELINE_DIR CANDIDATE_DIR, or one DIR --models A,B"
            )
        label_map = compare.parse_map(args.map)
        result = compare.compare_runs(args.baseline, args.candidate, label_map, **gate)
    text = compare.RENDERERS[args.format](result)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    if result.failed:
        log.warning(
            "comparison failed: %d regression(s), %d missing row(s)",
            result.count("regression"),
            result.count("missing"),
        )
        return 1
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from diffbench.compare import list_runs

    found = list_runs(args.root)
    if not found:
        print(f"no runs under {args.root}")
        return 0
    table = [["run", "tasks", "models", "started", "finished"]]
    for r in found:
        table.append(
            [str(r.path), ",".join(r.tasks), ",".join(r.models), r.started, r.finished or "—"]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _quiet_libraries() -> None:
    """Keep transformers' load bars and advice out of diffbench's own output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffbench` console script."""
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("diffbench: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        if args.command == "run":
            _quiet_libraries()
            return _cmd_run(args)
        if args.command == "list":
            _quiet_libraries()
            return _cmd_list()
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "runs":
            return _cmd_runs(args)
        from diffbench import report

        if args.command == "report":
            for path in report.write_any(args.run_dirs, args.output, args.reference):
                print(path)
        elif args.command == "plot":
            for path in report.plot(args.run_dir):
                print(path)
        return 0
    except DiffbenchError as err:
        print(f"diffbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "diffbench: interrupted; scored samples are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
