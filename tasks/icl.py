"""Many-shot in-context learning with demonstration-order permutation (paper §3.4-3.5).

Protocol: ../shared/paper-protocols.md section 2 (Bertsch et al. 2024). For each shot count,
`draws` demonstration sets are sampled; each is laid out in every arrangement (random, alternating
by class, grouped by class) under `orders` order seeds; every test example is answered after it.
The answer is restricted to the label set: by default the most likely label (exact), or greedy
decoding constrained to the labels' token sequences. All test examples of one prompt share its
demonstrations as one cached prefix, so the demonstrations are encoded once per prompt.

No demonstration pool holds a test example's text (`icl_datasets`). The samples of one test
example at one shot count (every draw, arrangement and order) share a cluster: they measure the
same example, so the `accuracy` stderr over draws and orders is a cluster-robust one over test
examples, and statistics resample whole clusters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from diffbench.api import (
    ALL,
    CHANCE_KEY,
    CLUSTER_KEY,
    LARGEST,
    SCORE_KEY,
    ChoiceRequest,
    ChoiceScores,
    FigureSpec,
    Headline,
    Item,
    Metric,
    PaperRef,
    Response,
    Sample,
    TokenizerView,
    aggregate_means,
)
from diffbench.errors import DiffbenchError
from diffbench.tasks import icl_datasets
from diffbench.tasks.icl_datasets import Example, IclDataset

ARRANGEMENTS = ("random", "alternating", "grouped")
SETTING_KEYS = ("dataset", "arrangement", "shots", "draw", "order")


@dataclass(frozen=True)
class IclConfig:
    """Options of the icl task; the defaults run in a minute or two per small model on a CPU."""

    dataset: str = "synthetic"  # synthetic | trec | trec-fine | banking77 | clinic150 | a path
    test_file: str = ""  # a separate test file for a local dataset
    text_field: str = "text"
    label_field: str = "label"
    shots: tuple[int, ...] = ()  # empty: 1, 2, 4, ... up to max_shots or the context limit
    max_shots: int = 32
    draws: int = 2  # demonstration draws per shot count
    orders: int = 1  # order seeds per arrangement
    arrangements: tuple[str, ...] = ("random",)
    test_size: int = 24
    classes: int = 0  # 0: every class; N: a seeded subset of N classes (e.g. 6, TREC's count)
    answer: Literal["likelihood", "constrained"] = "likelihood"
    separator: str = "\n\n"
    preset: str = ""

    def __post_init__(self) -> None:
        bad = sorted(set(self.arrangements) - set(ARRANGEMENTS))
        if bad or not self.arrangements:
            raise ValueError(f"arrangements must be among {', '.join(ARRANGEMENTS)}: {bad}")
        if any(k < 1 for k in self.shots) or self.max_shots < 1:
            raise ValueError("shots must be positive")
        if self.draws < 1 or self.orders < 1 or self.test_size < 1:
            raise ValueError("draws, orders and test_size must be >= 1")
        if self.classes < 0:
            raise ValueError("classes must be >= 0 (0: every class)")


PRESETS: dict[str, dict[str, Any]] = {
    # Bertsch et al.: 250 test examples, 10 draws per shot count, up to the context limit.
    "paper": {"test_size": 250, "draws": 10, "max_shots": 4096, "answer": "constrained"},
    # Figure 7: the same demonstrations under 10 random orders and about 30 alternating ones.
    "paper-order": {
        "arrangements": ("random", "alternating"), "orders": 10, "draws": 1, "test_size": 250,
    },
}  # fmt: skip


def format_example(ds: IclDataset, ex: Example) -> str:
    """One demonstration in the dataset's prompt format."""
    return f"{ds.input_name}: {ex.text}\n{ds.label_name}: {ex.label}"


def arrange(demos: list[Example], arrangement: str, rng: random.Random) -> list[Example]:
    """The same demonstrations re-ordered: random, alternating by class, or grouped by class."""
    if arrangement == "random":
        out = list(demos)
        rng.shuffle(out)
        return out
    by_class: dict[str, list[Example]] = {}
    for ex in demos:
        by_class.setdefault(ex.label, []).append(ex)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for members in by_class.values():
        rng.shuffle(members)
    if arrangement == "grouped":
        return [ex for c in classes for ex in by_class[c]]
    out = []  # alternating: round-robin over classes until every class is exhausted
    while any(by_class[c] for c in classes):
        out.extend(by_class[c].pop(0) for c in classes if by_class[c])
    return out


def label_choices(labels: tuple[str, ...]) -> tuple[str, ...]:
    """Labels as continuations of "<label name>:". Where one label is a prefix of another,
    constrained decoding tells them apart by the request's `end` (the separator that follows a
    label in the prompt, as Bertsch et al. do), not by changing the labels."""
    return tuple(" " + lab for lab in labels)


def _shot_counts(cfg: IclConfig) -> list[int]:
    if cfg.shots:
        return sorted(set(cfg.shots))
    counts, k = [], 1
    while k <= cfg.max_shots:
        counts.append(k)
        k *= 2
    return counts


ORDERS = "over the demonstration orders of a draw (each a mean over test examples); no test"


class IclTask:
    """The many-shot ICL task plugin."""

    name = "icl"
    description = "Many-shot in-context classification vs number of demonstrations and order"
    config_type = IclConfig
    presets = PRESETS
    # A test example read under several demonstration draws and orders is one unit.
    metrics = (
        Metric("accuracy", unit="test example"),
        Metric("accuracy_std", "lower", "statistic", unit="test example", note=ORDERS),
        Metric("accuracy_min", "higher", "statistic", unit="test example", note=ORDERS),
        Metric("accuracy_max", "higher", "statistic", unit="test example", note=ORDERS),
        Metric("margin", "lower", "statistic", unit="test example", note=ORDERS),
    )
    setting_keys = SETTING_KEYS
    # The paper's Figures 6 and 7: accuracy per shot count, and the best-worst order margin at
    # the largest shot count.
    headline = (
        Headline("accuracy", {"draw": ALL, "order": ALL}),
        Headline("margin", {"shots": LARGEST}),
    )
    # The paper's numbers beside the run's (report.md's first section).
    paper = (
        PaperRef(
            "Figure 6",
            "Many-shot ICL accuracy by number of demonstrations",
            "accuracy",
            {"arrangement": "random", "draw": ALL, "order": ALL},
            by=("shots",),
            note="curves only; DIFF +5.2 to +21.6 points over Transformer by dataset (TREC, "
            "TREC-fine, Banking-77, Clinic-150), up to 64K context",
        ),
        PaperRef(
            "Figure 7",
            "Order robustness: best - worst accuracy over demonstration orders",
            "margin",
            {"shots": LARGEST},
            by=("arrangement",),
            transformer={"random": "0.190", "alternating": "0.567"},
            diff={"random": "0.040", "alternating": "0.134"},
            note="TREC, points as fractions (19.0 = 0.190); random, Transformer vs DIFF: TREC-fine "
            "0.240/0.090, Banking-77 0.130/0.090, Clinic-150 0.120/0.060; the run: over its "
            "prompts (draws x orders) at its largest shot count",
        ),
    )

    # The paper's Figure 6 (accuracy vs demonstrations, the range over orders shaded) and
    # Figure 7 (the accuracy of each prompt at the largest shot count, and its best-worst margin).
    figures = (
        FigureSpec(
            "line",
            ("accuracy",),
            ("shots",),
            "shots_{dataset.stem}_{arrangement}",
            "{dataset.stem}, {arrangement} order",
            per=("dataset", "arrangement"),
            where={"draw": ALL, "order": ALL},
            errors="none",
            shade=("accuracy_min", "accuracy_max"),
            x_label="number of demonstrations",
            y_label="accuracy",
            log_x=True,
            limits=(0.0, 1.0),
        ),
        FigureSpec(
            "spread",
            ("accuracy",),
            ("draw", "order"),
            "seeds_{dataset.stem}_{arrangement}",
            "{dataset.stem}, {arrangement} order, {shots} shots",
            per=("dataset", "arrangement"),
            where={"shots": LARGEST},
            x_label="seed (draw x order)",
        ),
    )

    def request_kinds(self, config: IclConfig) -> tuple[type, ...]:
        """The request kinds its items use, whatever the config."""
        return (ChoiceRequest,)

    def sources(self, config: IclConfig) -> tuple[str, ...]:
        """The hub datasets (bench/sources.py) its items read."""
        return (config.dataset,) if config.dataset in icl_datasets.HUB else ()

    def items(self, config: IclConfig, tokenizer: TokenizerView, seed: int) -> list[Item]:
        """Every (shots, draw, arrangement, order, test example) request for one model."""
        ds = icl_datasets.load(
            config.dataset, config.test_file, config.text_field, config.label_field,
            config.test_size, seed, config.classes,
        )  # fmt: skip
        test_rng = random.Random(f"icl|{seed}|test")
        test = list(ds.test)
        test = test_rng.sample(test, min(config.test_size, len(test)))
        choices = label_choices(ds.labels)
        longest_query = max(
            tokenizer.count(f"{ds.input_name}: {ex.text}\n{ds.label_name}:") for ex in test
        ) + max(tokenizer.count(c) for c in choices)  # fmt: skip
        out: list[Item] = []
        for k in _shot_counts(config):
            if k > len(ds.train):
                if not config.shots:
                    break
                raise DiffbenchError(
                    f"icl: {k} shots asked for, but dataset {ds.name!r} has only "
                    f"{len(ds.train)} demonstration examples"
                )
            draws = [
                (d, self._prompts(config, ds, random.Random(f"icl|{seed}|k{k}|d{d}").sample(
                    list(ds.train), k), k, d, seed))
                for d in range(config.draws)
            ]  # fmt: skip
            need = longest_query + max(
                tokenizer.prompt_tokens(p) for _, prompts in draws for p, _, _ in prompts
            )
            if need > tokenizer.max_context:
                if config.shots:
                    raise DiffbenchError(
                        f"icl: {k} shots need {need} tokens, beyond the model's maximum "
                        f"context of {tokenizer.max_context}; lower --set icl.shots"
                    )
                break  # the automatic sweep stops where prompts stop fitting
            for d, prompts in draws:
                for prefix, arrangement, o in prompts:
                    setting = {"dataset": ds.name, "arrangement": arrangement, "shots": k,
                               "draw": d, "order": o}  # fmt: skip
                    for t, ex in enumerate(test):
                        request = ChoiceRequest(
                            prefix=prefix,
                            query=f"{ds.input_name}: {ex.text}\n{ds.label_name}:",
                            choices=choices,
                            method="best" if config.answer == "likelihood" else "greedy",
                            end=config.separator,
                        )
                        meta = {"text": ex.text, "target": ex.label, "test_index": t,
                                "target_index": ds.labels.index(ex.label),
                                CLUSTER_KEY: f"k{k}-t{t}", **ds.dropped.as_meta()}  # fmt: skip
                        item_id = f"k{k}-d{d}-{arrangement}-o{o}-t{t}"
                        out.append(Item(item_id, request, setting, meta))
        return out

    @staticmethod
    def _prompts(
        cfg: IclConfig, ds: IclDataset, demos: list[Example], k: int, d: int, seed: int
    ) -> list[tuple[str, str, int]]:
        out = []
        for arrangement in cfg.arrangements:
            for o in range(cfg.orders):
                rng = random.Random(f"icl|{seed}|k{k}|d{d}|{arrangement}|o{o}")
                ordered = arrange(demos, arrangement, rng)
                text = cfg.separator.join(format_example(ds, ex) for ex in ordered)
                out.append((text + cfg.separator, arrangement, o))
        return out

    def score(self, config: IclConfig, item: Item, response: Response) -> Sample:
        """Exact match of the chosen label."""
        assert isinstance(response, ChoiceScores)
        request = item.request
        assert isinstance(request, ChoiceRequest)
        return {
            "output": request.choices[response.chosen].strip(),
            "logprob": response.logprobs[response.chosen],
            SCORE_KEY: float(response.chosen == item.meta["target_index"]),
            CHANCE_KEY: 1 / len(request.choices),
        }

    def aggregate(self, config: IclConfig, samples: pd.DataFrame) -> pd.DataFrame:
        """Accuracy per prompt (draw x order), and its mean, spread and margin over prompts.

        The mean's stderr is cluster-robust: the spread over test examples of each example's
        mean score across the prompts, over the square root of the number of examples. The
        spread of prompt accuracies alone would be 0 whenever the draws happen to agree.
        """
        # Samples stored before the cluster key existed still carry their test example's index.
        cluster = CLUSTER_KEY if CLUSTER_KEY in samples.columns else "test_index"
        accuracy = [m for m in self.metrics if m.name == "accuracy"]
        frame = aggregate_means(
            self.name, samples, accuracy, SETTING_KEYS, over=("draw", "order"), cluster=cluster
        )
        keys = ["model", "dataset", "arrangement", "shots"]
        prompts = frame[frame["draw"] != ALL]
        rows = []
        for key, group in prompts.groupby(keys, sort=True):
            accs = group["value"].to_numpy()
            spread = float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan")
            base = {"task": self.name, **dict(zip(keys, key, strict=True)), "draw": ALL,
                    "order": ALL, "n": len(accs)}  # fmt: skip
            rows += [
                {**base, "metric": "accuracy_std", "value": spread},
                {**base, "metric": "accuracy_min", "value": float(accs.min())},
                {**base, "metric": "accuracy_max", "value": float(accs.max())},
                {**base, "metric": "margin", "value": float(accs.max() - accs.min())},
            ]
        return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)


TASK = IclTask()
