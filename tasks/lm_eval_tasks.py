"""Any lm-eval task (or group) as a diffbench task: `diffbench run --tasks lm-eval:NAME`.

lm-eval builds the requests from its own task definition (prompt, few-shot examples, choices,
generation arguments); each document becomes one diffbench request (its choices as one choice
request, its generation, or its rolling log-likelihood) that the runner sends to any backend; the
answer goes back through lm-eval's own filters and `process_results`, so each document's metrics
(acc, acc_norm, exact_match, ...) are lm-eval's, and the metric rows are lm-eval's aggregations
with lm-eval's standard errors. Each document's first mean-aggregated metric is its `score`, so
paired intervals, McNemar's test, the report and `diffbench compare` work as on any task.

Options: `include_path` (a folder of task YAMLs, searched with lm-eval's own and with the offline
tasks shipped in `lm_eval_local/`; `--set lm-eval.include_path=DIR` gives it to every lm-eval
task of a run), `num_fewshot` (-1: the task's own), `limit` (documents per subtask,
0: all), `bootstrap_iters` (lm-eval's, for metrics without a closed-form stderr). The run's seed
is lm-eval's few-shot seed (both default to 1234).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from diffbench.api import (
    ALL,
    CHANCE_KEY,
    SCORE_KEY,
    Better,
    ChoiceRequest,
    FigureSpec,
    GenerateRequest,
    Headline,
    Item,
    Metric,
    MetricKind,
    Request,
    Response,
    RollingRequest,
    Sample,
    TokenizerView,
    aggregate_means,
)
from diffbench.errors import DiffbenchError
from diffbench.registry import TaskFamily

# Nothing here imports lm-eval (nor diffbench.lm_eval, which does) at module level: the registry
# imports this module to ask `FAMILY.installed()` where lm-eval may be missing.

PREFIX = "lm-eval:"
# The sample field holding each document's lm-eval metric values.
SAMPLE_FIELD = "lm_eval"
# lm-eval metrics that score a document 0 or 1.
BINARY_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em"})
SETTING_KEYS = ("subtask",)
# diffbench request kind by lm-eval output type.
KIND_OF_OUTPUT = {
    "multiple_choice": ChoiceRequest,
    "loglikelihood": ChoiceRequest,
    "loglikelihood_rolling": RollingRequest,
    "generate_until": GenerateRequest,
}


@dataclass(frozen=True)
class LmEvalConfig:
    """Options of an lm-eval task run through diffbench: plain data; the task derives lm-eval's
    definition from them (`definition`)."""

    include_path: str = ""  # a folder of lm-eval task YAMLs (searched before lm-eval's own)
    num_fewshot: int = -1  # -1: the task's own setting
    limit: int = 0  # documents per subtask (0: all)
    bootstrap_iters: int = 100000  # lm-eval's default
    preset: str = ""

    def __post_init__(self) -> None:
        if self.include_path and not Path(self.include_path).expanduser().is_dir():
            raise ValueError(f"include_path {self.include_path} is not an existing folder")
        if self.num_fewshot < -1 or self.limit < 0 or self.bootstrap_iters < 0:
            raise ValueError("num_fewshot (-1: the task's), limit and bootstrap_iters must be >= 0")


def metric_name(metric: str, filter_key: str) -> str:
    """A metric's name in metrics.csv: lm-eval's, with a filter other than `none` after ':'."""
    return metric if filter_key == "none" else f"{metric}:{filter_key}"


def jsonable(value: Any) -> Any:
    """A per-document metric value as JSON (tuples as lists, numpy scalars as numbers)."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _restored(value: Any) -> Any:
    """A stored metric value as lm-eval's aggregation expects it (lists back to tuples)."""
    return tuple(_restored(v) for v in value) if isinstance(value, list) else value


# The offline lm-eval tasks shipped with diffbench: always searched, after the user's folder.
SHIPPED = Path(__file__).with_name("lm_eval_local")


@functools.cache
def task_manager(include_path: str, defaults: bool) -> Any:
    """lm-eval's index of task YAMLs: the shipped ones, `include_path`'s, and with `defaults`
    lm-eval's own (thousands of files: slow to index)."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED), *([include_path] if include_path else [])]
    return TaskManager(include_path=paths, include_defaults=defaults)


@dataclass(frozen=True)
class MetricRow:
    """One metric of one subtask: its name in metrics.csv, lm-eval's name and aggregation."""

    subtask: str
    name: str
    lm_metric: str
    aggregation: Callable[[list[Any]], Any] | None


@dataclass(frozen=True)
class Definition:
    """lm-eval's task objects of one task or group (by subtask name, sorted) and the metrics
    diffbench reads off them."""

    subtasks: dict[str, Any]
    table: tuple[MetricRow, ...]

    @property
    def primary(self) -> str | None:
        """The first mean-aggregated metric: each document's `score`."""
        from lm_eval.api.metrics import mean

        return next((r.name for r in self.table if r.aggregation is mean), None)


def metric_table(subtasks: dict[str, Any]) -> tuple[MetricRow, ...]:
    """Every (filter, metric) of every subtask as a metric row."""
    rows = []
    for sub, task in subtasks.items():
        aggregation = task.aggregation()
        for f in task._filters:
            for m in task._metric_fn_list:
                rows.append(MetricRow(sub, metric_name(m, f.name), m, aggregation.get(m)))
    return tuple(rows)


@functools.cache
def definition(name: str, include_path: str, num_fewshot: int) -> Definition:
    """lm-eval's definition of task or group `name` under these options (built once per process;
    an unknown or unloadable task: DiffbenchError)."""
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    path = str(Path(include_path).expanduser()) if include_path else ""
    # A folder's own index is quick; lm-eval's full index (thousands of YAMLs) only when needed.
    manager = task_manager(path, False)
    if name not in manager.all_tasks:
        manager = task_manager(path, True)
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        where = f" in {path} or lm-eval's own tasks" if path else ""
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DiffbenchError(f"unknown lm-eval task {name!r}{where}{hint}")
    try:
        loaded = manager.load([name])["tasks"]
    except Exception as err:  # a dataset that cannot be read or reached, a broken YAML
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffbenchError(f"lm-eval cannot load task {name!r}: {first}") from None
    for task in loaded.values():
        own = task.get_config("num_fewshot")
        if num_fewshot >= 0 and own != 0:  # lm-eval keeps a task's explicit 0, as its CLI does
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif own is None:
            task.set_config(key="num_fewshot", value=0)
        if task.OUTPUT_TYPE not in KIND_OF_OUTPUT:
            raise DiffbenchError(
                f"lm-eval task {task.task_name}: output type {task.OUTPUT_TYPE} is not supported"
            )
    subtasks = dict(sorted(loaded.items()))
    return Definition(subtasks, metric_table(subtasks))


@functools.cache
def documents(name: str, include_path: str, num_fewshot: int, subtask: str) -> Sequence[Any]:
    """A subtask's evaluation documents, indexed by lm-eval's doc_id (lm-eval reprocesses them on
    every `eval_docs` read, so they are read once)."""
    return definition(name, include_path, num_fewshot).subtasks[subtask].eval_docs


def declared(found: Definition) -> tuple[Metric, ...]:
    """A mean-aggregated metric is a mean over documents of the value each sample records under
    `lm_eval` (a proportion where lm-eval scores a document 0 or 1); any other aggregation
    (perplexity, corpus BLEU) is a statistic."""
    from lm_eval.api.metrics import mean

    out: dict[str, Metric] = {}
    for row in found.table:
        if row.name in out:
            continue
        higher = found.subtasks[row.subtask].higher_is_better().get(row.lm_metric)
        better: Better = "lower" if higher is False else "higher"
        if row.aggregation is mean:
            kind: MetricKind = "proportion" if row.lm_metric in BINARY_METRICS else "mean"
            out[row.name] = Metric(
                row.name, better, kind, f"{SAMPLE_FIELD}.{row.name}", unit="document"
            )
        else:
            note = "lm-eval's corpus-level aggregation; shown without a test"
            out[row.name] = Metric(row.name, better, "statistic", unit="document", note=note)
    return tuple(out.values())


def headline_of(found: Definition) -> tuple[Headline, ...]:
    """The primary metric, over every subtask where there are several."""
    if not found.primary:
        return ()
    where = {"subtask": ALL} if len(found.subtasks) > 1 else {}
    return (Headline(found.primary, where),)


def request_for(
    sub: str, doc_id: int, instances: list[Any], prefix: str
) -> tuple[Request, dict[str, Any]]:
    """One document's lm-eval instances as one diffbench request, and what scoring needs back."""
    from diffbench.lm_eval import choice_request, generate_request

    kinds = {inst.request_type for inst in instances}
    if len(kinds) > 1:
        raise DiffbenchError(
            f"lm-eval task {sub}: document {doc_id} sends several request types "
            f"({', '.join(sorted(kinds))}); diffbench answers one per document"
        )
    kind = kinds.pop()
    if kind == "loglikelihood":
        contexts = {inst.args[0] for inst in instances}
        if len(contexts) > 1:
            raise DiffbenchError(
                f"lm-eval task {sub} scores a document's choices under different contexts "
                "(winogrande-style partial scoring), which a choice request cannot express yet"
            )
        context = instances[0].args[0]
        if not context:
            raise DiffbenchError(f"lm-eval task {sub}: document {doc_id} has an empty context")
        conts = list(dict.fromkeys(inst.args[1] for inst in instances))
        index = [conts.index(inst.args[1]) for inst in instances]
        return choice_request(prefix, context, conts), {"choice_index": index}
    if len(instances) > 1:
        raise DiffbenchError(
            f"lm-eval task {sub}: document {doc_id} sends {len(instances)} {kind} requests; "
            "diffbench answers one per document"
        )
    if kind == "loglikelihood_rolling":
        return RollingRequest(text=instances[0].args[0]), {}
    return generate_request(instances[0].args[0], instances[0].args[1]), {}


class LmEvalTask:
    """One lm-eval task or group. It holds its name only: items, score and aggregate derive
    lm-eval's definition from the config they are given (`definition`, built once per process)."""

    presets: dict[str, dict[str, Any]] = {}  # noqa: RUF012
    setting_keys = SETTING_KEYS
    config_type = LmEvalConfig
    # None of its own: its rows are in the report's tables (and a sweep draws the sweep figure).
    figures: tuple[FigureSpec, ...] = ()

    def __init__(self, lm_name: str) -> None:
        self.lm_name = lm_name
        self.name = PREFIX + lm_name
        self.description = f"lm-eval task {lm_name}"

    def definition(self, config: LmEvalConfig) -> Definition:
        """lm-eval's definition of this task under `config` (unknown task: DiffbenchError)."""
        return definition(self.lm_name, config.include_path, config.num_fewshot)

    # ---- what run.json records: methods of the config, whose include_path picks the task's
    # definition (read through `api.declared_metrics` and `api.TaskInfo.of`) ---------------------

    def metrics(self, config: LmEvalConfig) -> tuple[Metric, ...]:
        """Every metric of every subtask of the definition `config` names (see `declared`)."""
        return declared(self.definition(config))

    def headline(self, config: LmEvalConfig) -> tuple[Headline, ...]:
        """The primary metric of the definition `config` names (see `headline_of`)."""
        return headline_of(self.definition(config))

    def request_kinds(self, config: LmEvalConfig) -> tuple[type, ...]:
        """The request kinds of its subtasks' output types."""
        kinds = (KIND_OF_OUTPUT[t.OUTPUT_TYPE] for t in self.definition(config).subtasks.values())
        return tuple(dict.fromkeys(kinds))

    # ---- config -> items -> samples -> rows ----------------------------------------------------

    def items(self, config: LmEvalConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """One item per document of every subtask, built by lm-eval with the run's few-shot seed."""
        from diffbench.lm_eval import block_prefixes

        out: list[Item] = []
        for sub, task in self.definition(config).subtasks.items():
            task.set_fewshot_seed(seed=seed)
            task.build_all_requests(limit=config.limit or None, rank=0, world_size=1)
            by_doc: dict[int, list[Any]] = {}
            for inst in task.instances:
                by_doc.setdefault(inst.doc_id, []).append(inst)
            doc_ids = sorted(by_doc)
            contexts = [by_doc[d][0].args[0] for d in doc_ids]
            prefixes = block_prefixes(contexts)
            for doc_id, prefix in zip(doc_ids, prefixes, strict=True):
                instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
                request, meta = request_for(sub, doc_id, instances, prefix)
                item_id = f"{sub}/{doc_id}"
                out.append(Item(item_id, request, {"subtask": sub}, {"doc_id": doc_id, **meta}))
        return out

    def score(self, config: LmEvalConfig, item: Item, response: Response) -> Sample:
        """lm-eval's filters and `process_results` on the document's answers."""
        from diffbench.lm_eval import lm_eval_result
        from lm_eval.api.instance import Instance

        found = self.definition(config)
        sub, doc_id = str(item.setting["subtask"]), int(item.meta["doc_id"])
        task = found.subtasks[sub]
        doc = documents(self.lm_name, config.include_path, config.num_fewshot, sub)[doc_id]
        index = item.meta.get("choice_index") or [0]
        # Fresh instances of the document's requests, one per answer: filters and
        # `process_results` read only the document and the answers.
        kind = "loglikelihood" if task.OUTPUT_TYPE == "multiple_choice" else task.OUTPUT_TYPE
        repeats = task.config.repeats or 1
        instances = [
            Instance(kind, doc, (), idx, (sub, doc_id, repeats)) for idx in range(len(index))
        ]
        for inst, i in zip(instances, index, strict=True):
            inst.resps = [lm_eval_result(item.request, response, i)] * repeats
        for ensemble in task._filters:
            ensemble.apply(instances)
        metrics: dict[str, Any] = {}
        for key in instances[0].filtered_resps:
            results = task.process_results(doc, [inst.filtered_resps[key] for inst in instances])
            for m, value in results.items():
                metrics[metric_name(m, key)] = jsonable(value)
        primary = found.primary
        score = metrics.get(primary) if primary else None
        sample: Sample = {
            SAMPLE_FIELD: metrics,
            SCORE_KEY: float(score) if isinstance(score, int | float) else None,
        }
        if isinstance(item.request, ChoiceRequest):
            lls = [lm_eval_result(item.request, response, i)[0] for i in index]
            sample["logprobs"] = lls
            sample["prediction"] = max(range(len(lls)), key=lambda k: (lls[k], -k))
            if task.OUTPUT_TYPE == "multiple_choice" and primary in ("acc", "acc_norm"):
                sample[CHANCE_KEY] = 1 / len(index)  # a uniform pick among the choices
        elif isinstance(item.request, GenerateRequest):
            sample["output"] = lm_eval_result(item.request, response)
        else:
            sample["logprob"] = lm_eval_result(item.request, response)
        return sample

    def aggregate(self, config: LmEvalConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """lm-eval's aggregation and stderr of each metric per subtask; with several subtasks, the
        mean-aggregated metrics over every document too (subtask `all`: a size-weighted mean)."""
        from lm_eval.api.metrics import mean, stderr_for_metric

        found = self.definition(config)
        rows = []
        for (model, sub), group in samples.groupby(["model", "subtask"], sort=True):
            records = list(group["lm_eval"])
            for row in found.table:
                if row.subtask != sub:
                    continue
                name = row.name
                values = [_restored(r[name]) for r in records if isinstance(r, dict) and name in r]
                if not values:
                    continue
                agg = row.aggregation or mean
                fn = stderr_for_metric(agg, config.bootstrap_iters)
                stderr = float(fn(values)) if fn and len(values) > 1 else float("nan")
                rows.append(
                    {"model": model, "subtask": sub, "metric": name,
                     "value": float(agg(values)), "n": len(values), "stderr": stderr}
                )  # fmt: skip
        frame = pd.DataFrame(rows).assign(task=self.name)
        if len(found.subtasks) > 1:
            # Each mean-aggregated metric over every document of every subtask.
            pooled = [m for m in declared(found) if m.sample_mean]
            overall = aggregate_means(self.name, samples, pooled).assign(subtask=ALL)
            frame = pd.concat([frame, overall], ignore_index=True)
        return frame


def installed() -> bool:
    """Whether lm-eval is installed (without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


def task_for(lm_name: str) -> LmEvalTask:
    """The diffbench task of lm-eval task or group `lm_name`."""
    if not lm_name.strip():
        raise DiffbenchError("an lm-eval task needs a name: --tasks lm-eval:NAME")
    if not installed():
        raise DiffbenchError(
            "lm-eval tasks need the lm-eval package: pip install 'diffbench[lm-eval]'"
        )
    return LmEvalTask(lm_name.strip())


# `lm-eval:NAME` (the `lm-eval` entry point of `diffbench.task_families`).
FAMILY = TaskFamily(task=task_for, installed=installed)
