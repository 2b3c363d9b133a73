"""The `diffbench` command line: run, list, report, plot, compare, runs, judge, serve, datasets."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from diffbench import judge, serve, sources  # light: heavy imports wait for the command
from diffbench.api import ARROWS, declared_metrics
from diffbench.errors import DiffbenchError
from diffbench.runconfig import DEFAULT_SUITE as DEFAULT_SUITE  # what `run` runs by default
from diffbench.runconfig import build_run

log = logging.getLogger("diffbench")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"diffbench: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> Path:
    """argparse type: a path, refusing an empty one (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _text(text: str) -> str:
    """argparse type: a non-empty string (an empty one would quietly mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text.strip()


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `diffbench` argument parser with every subcommand."""
    p = _Parser(prog="diffbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run tasks on models; writes a run directory under results/")
    r.add_argument(
        "--tasks",
        help="comma-separated task names (default: the default suite, every task family of the "
        "paper sized for the shipped pair: diffbench/suites/default.yaml)",
    )
    r.add_argument(
        "--models",
        help="LABEL=SPEC[,LABEL=SPEC...]; SPEC is a folder, hub id, "
        "built-in name, or prefixed hf:/vllm:",
    )
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="a task option; lists are comma-separated (repeatable)")  # fmt: skip
    r.add_argument("--model-args", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                   help="backend options of one model (repeatable)")  # fmt: skip
    r.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="run each model once per value of backend option KEY, labelled LABEL@KEY=V "
        "(e.g. logit_bits=16,8,6,4)",
    )
    r.add_argument(
        "--sweep-tasks",
        metavar="TASK,...",
        help="run the --sweep variants on these tasks only; the run's other tasks run on the "
        "unswept models",
    )
    r.add_argument("--config", type=_path, help="a YAML file with tasks, models, options")
    r.add_argument(
        "--output",
        type=_path,
        help="run directory: new, empty, or a run to resume (default: named from the run)",
    )
    r.add_argument("--seed", type=int, help="seed of every random draw (default 1234)")
    r.add_argument("--limit", type=_positive_int, help="at most N samples per setting (smoke runs)")
    r.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    r.add_argument("--dry-run", action="store_true", help="print the plan; load no weights")
    r.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub.add_parser("list", help="tasks with their options and metrics, and built-in models")
    rep = sub.add_parser(
        "report",
        help="write report.md and report.html of a run directory, or one merging several runs",
    )
    rep.add_argument("run_dirs", type=_path, nargs="+", metavar="RUN_DIR")
    rep.add_argument(
        "--output",
        type=_path,
        help="folder of the report (default: the run directory itself; for several runs "
        "results/report__<hash>)",
    )
    rep.add_argument(
        "--reference", type=_text, help="model the others are compared with (default: the first)"
    )
    pl = sub.add_parser("plot", help="redraw the figures of a run directory")
    pl.add_argument("run_dir", type=_path)
    cmp = sub.add_parser(
        "compare",
        help="compare a candidate run with a baseline run (or two models of one run); "
        "a CI gate with --fail-on",
    )
    cmp.add_argument("baseline", type=_path, metavar="BASELINE_DIR")
    cmp.add_argument("candidate", type=_path, nargs="?", metavar="CANDIDATE_DIR")
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
        help="a change beyond tolerance only counts when the paired test is significant "
        "after multiplicity control (--adjust)",
    )
    cmp.add_argument(
        "--adjust",
        choices=("bh", "holm", "none"),
        default="bh",
        help="multiplicity control over every tested row: Benjamini-Hochberg (false discovery "
        "rate, default), Holm (family-wise error) or none",
    )
    cmp.add_argument(
        "--fail-on",
        metavar="regression[,missing]",
        help="exit 1 when a row regresses (and/or a baseline row is missing)",
    )
    cmp.add_argument("--format", choices=("text", "md", "json", "junit"), default="text")
    cmp.add_argument(
        "--output",
        type=_path,
        help="write the table to this file, not stdout (its folder must exist)",
    )
    sub.add_parser(
        "lm-eval",
        help="lm-eval's own command line, with --model diffbench (any diffbench model and "
        "backend option as --model_args model=SPEC,KEY=VALUE,...)",
        add_help=False,
    )
    runs = sub.add_parser("runs", help="list run directories (tasks, models, date)")
    runs.add_argument("--root", type=_path, default=Path("results"), help="default: results/")
    judge.add_command(sub, _path)
    serve.add_command(sub)
    sources.add_command(sub)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    plan = build_run(args)
    _quiet_libraries()
    from diffbench import plan as plans
    from diffbench import report, runner

    if args.dry_run:
        return plans.dry_run(plan)
    run_dir = runner.run(plan)
    if not runner.main_rank():  # under torchrun, rank 0 alone writes the report
        return 0
    if not args.no_report:
        path, figures = report.write_with_figures(run_dir)
        log.info("wrote %s and %d figure files", path, len(figures))
    print(run_dir)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from diffbench import registry
    from diffbench.config import describe_options
    from diffbench.models import BUILTINS, DEFAULT_MODELS

    for name in sorted(registry.available()):
        task = registry.load(name)
        print(f"{name}: {task.description}")
        listed = [
            f"{m.name} {ARROWS[m.better]} ({m.kind}, per {m.unit})" for m in declared_metrics(task)
        ]
        print(f"  metrics: {', '.join(listed)}")
        if task.presets:
            print(f"  presets: {', '.join(task.presets)}")
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


def _check_run_dir(path: Path) -> None:
    """Refuse a path that is not a run directory (before any heavy import)."""
    if not path.exists():
        raise DiffbenchError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise DiffbenchError(f"{path} is a file, not a diffbench run directory")
    if not (path / "run.json").is_file():
        raise DiffbenchError(f"{path} is not a diffbench run directory (no run.json)")


def _check_output_folder(path: Path) -> None:
    """Refuse an output folder that is a file or lies in a folder that does not exist."""
    if path.exists() and not path.is_dir():
        raise DiffbenchError(f"--output {path} is a file; give a folder for the report")
    if not path.exists() and not path.parent.is_dir():
        raise DiffbenchError(f"--output {path}: {path.parent} is not an existing folder")


def _check_output_file(path: Path) -> None:
    """Refuse an output file that is a folder or lies in a folder that does not exist."""
    if path.is_dir():
        raise DiffbenchError(f"--output {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise DiffbenchError(f"--output {path}: {path.parent} is not an existing folder")


def _cmd_report(args: argparse.Namespace) -> int:
    seen: set[Path] = set()
    for run_dir in args.run_dirs:
        _check_run_dir(run_dir)
        if run_dir.resolve() in seen:
            raise DiffbenchError(f"run directory {run_dir} is given twice")
        seen.add(run_dir.resolve())
    if args.output is not None:
        _check_output_folder(args.output)
    from diffbench import report

    for path in report.write_any(args.run_dirs, args.output, args.reference):
        print(path)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    _check_run_dir(args.run_dir)
    from diffbench import report

    for path in report.plot(args.run_dir):
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    fail_on = [x.strip() for x in (args.fail_on or "").split(",") if x.strip()]
    if args.fail_on is not None and not fail_on:
        raise DiffbenchError(f"malformed --fail-on {args.fail_on!r}: expected regression,missing")
    labels: list[str] = []
    if args.models is not None:
        if args.candidate is not None:
            raise DiffbenchError("--models compares two models of ONE run; give one directory")
        if args.map:
            raise DiffbenchError("--map applies to two runs, not to --models")
        labels = [x.strip() for x in args.models.split(",")]
        if len(labels) != 2 or not all(labels):
            raise DiffbenchError(f"malformed --models {args.models!r}: expected BASELINE,CANDIDATE")
    elif args.candidate is None:
        raise DiffbenchError("compare needs BASELINE_DIR CANDIDATE_DIR, or one DIR --models A,B")
    for run_dir in (args.baseline, args.candidate):
        if run_dir is not None:
            _check_run_dir(run_dir)
    if args.output is not None:
        _check_output_file(args.output)
    from diffbench import gate
    from diffbench.render.gate import RENDERERS
    from diffbench.store import write_atomic

    gate_args = {
        "tolerance": gate.parse_tolerance(args.tolerance),
        "require_significance": args.require_significance,
        "fail_on": fail_on,
        "adjustment": gate.ADJUST_CHOICES[args.adjust],
    }
    if labels:
        result = gate.compare_models(args.baseline, labels[0], labels[1], **gate_args)
    else:
        assert args.candidate is not None  # checked with the arguments above
        result = gate.compare_runs(
            args.baseline, args.candidate, gate.parse_map(args.map), **gate_args
        )
    text = RENDERERS[args.format](result)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    if result.failed:
        causes = (f"{result.count(s)} {s}" for s in result.failing if result.count(s))
        log.warning("comparison failed on %s", ", ".join(causes))
        return 1
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise DiffbenchError(f"{args.root} is not a directory; run something first or pass --root")
    from diffbench.results import list_runs

    found = list_runs(args.root)
    if not found:
        print(f"no runs under {args.root}")
        return 0
    table = [["run", "tasks", "models", "started", "finished"]]
    table += [[str(r.path), ",".join(r.tasks), ",".join(r.models), r.started, r.finished or "—"]
              for r in found]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    _quiet_libraries()
    return serve.run_command(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {  # lm-eval: main hands it on
    "run": _cmd_run,
    "list": _cmd_list,
    "report": _cmd_report,
    "plot": _cmd_plot,
    "compare": _cmd_compare,
    "runs": _cmd_runs,
    "judge": judge.run_command,
    "datasets": sources.run_command,
    "serve": _cmd_serve,
}


def _quiet_libraries() -> None:
    """Keep transformers' load bars and advice out of diffbench's own output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffbench` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every further argument is lm-eval's own
        from diffbench.lm_eval import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("diffbench: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    log.propagate = False
    try:
        return COMMANDS[args.command](args)
    except DiffbenchError as err:
        # One line, whatever the message: a file name or a library's text may hold line breaks.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"diffbench: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "diffbench: interrupted; scored samples are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:  # main() called again in one process (tests, notebooks) logs once, to today's stderr
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
