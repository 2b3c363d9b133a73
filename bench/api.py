"""The typed seams of diffbench: requests, responses, the backend and task protocols.

Data flows one way: a task turns its config into requests, a backend answers them, the task
scores each answer into a sample record and aggregates records into metric rows, and reports
read only the store. Nothing here imports torch: tasks never see a tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, runtime_checkable

import pandas as pd
from diffbench.errors import DiffbenchError

if TYPE_CHECKING:
    from diffbench.models import ModelSpec

# One scored sample as stored in samples/<task>/<model>.jsonl: JSON-serialisable values only.
Sample: TypeAlias = dict[str, Any]

# Sample keys the harness itself reads. `score`: the value that metrics listed in a task's
# `sample_mean_metrics` average. `cluster` (optional): samples that share a value measure the same
# test example (several demonstration draws or orders of one ICL query, say); statistics then
# resample and test whole clusters, since such samples are not independent. Without it every
# sample is its own cluster. `input_sha256`: the identity of the request's inputs, written by the
# runner; two runs pair a sample only where these agree. `chance` (optional): the score a uniform
# guess would expect on the sample (1 / choices for a pick among choices); reports set a row's
# estimate against it.
SCORE_KEY = "score"
CLUSTER_KEY = "cluster"
INPUT_KEY = "input_sha256"
CHANCE_KEY = "chance"

# metrics.csv's fixed columns, in order; a task's setting keys follow them.
METRIC_COLUMNS = ("task", "metric", "model", "value", "n", "stderr")
# A row's setting value that stands for every value of that setting (NIAH's depth="all", ICL's
# draw="all"); an empty cell is a setting the row's task does not have.
ALL = "all"
WILDCARDS = frozenset({ALL, ""})
# In a headline selector: the largest value that setting takes among a run's rows.
LARGEST = "@max"


def stderr_of_mean(values: Sequence[float] | pd.Series) -> float:
    """Standard error of the mean of independent `values` (NaN for fewer than two)."""
    x = pd.Series(values, dtype=float).dropna()
    return float(x.std(ddof=1) / len(x) ** 0.5) if len(x) > 1 else float("nan")


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy generation from a fully rendered prompt until a stop string or a token budget."""

    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChoiceRequest:
    """Log-likelihoods of several continuations after one prompt.

    The context is `prefix + query`; each choice is scored as a continuation of it, tokenized
    as lm-eval does: the context's trailing whitespace moves to the front of the choice, the whole
    text `context + choice` is encoded at once and split after the context's own tokens. So a
    model sees the tokens a natural prompt has, however the text was cut into parts. Requests
    that share `prefix` share the KV cache of the longest token prefix their contexts really have
    in common, so a long prefix (a haystack, a block of demonstrations) is encoded once for every
    query and every choice that follows it.

    `method` says what the caller needs: `full`, every choice's log-likelihood; `best`, only the
    most likely choice (exact, but other choices' scores may be left unknown); `greedy`, greedy
    decoding constrained to the choices' token sequences (the Bertsch et al. protocol). `end` is
    what follows a complete choice in the prompt format (a separator such as "\n"; empty: the
    end-of-sequence token): where one choice is a prefix of another, greedy decoding stops at the
    shorter one when this text's first token is likelier than every continuation.
    """

    prefix: str
    query: str
    choices: tuple[str, ...]
    method: Literal["full", "best", "greedy"] = "full"
    end: str = ""


@dataclass(frozen=True)
class RollingRequest:
    """Log-probability of every token of a text (lm-eval's `loglikelihood_rolling`).

    The text is encoded alone; its first token is predicted from the BOS token (the EOS token
    where the model has no BOS). A text longer than the model's context is scored in windows of
    the context's length: each window after the first predicts the next `stride` tokens (0: a
    whole window, so windows are disjoint, as in lm-eval) from the tokens before them.
    """

    text: str
    stride: int = 0


# The activation types an ActivationRequest may ask for.
ACTIVATION_TYPES = ("attention_logits", "hidden_states")


@dataclass(frozen=True)
class ActivationRequest:
    """Statistics of a model's internal activations over one text (the outlier probe).

    The backend encodes `text` (no truncation: the task sizes it) and summarises, per layer, each
    activation type asked for: `attention_logits` (pre-softmax QK^T x scale at causal positions;
    for a DIFF model the two maps together, map "both", and each alone, maps "1" and "2") and
    `hidden_states` (each decoder layer's output). Nothing of size L x L leaves the backend.
    """

    text: str
    activations: tuple[str, ...] = ("attention_logits", "hidden_states")
    top_k: int = 100


@dataclass(frozen=True)
class AttentionRequest:
    """Where the attention of a prompt's last token (the one that produces the answer) goes.

    `spans` are character ranges [start, end) of `prompt`; the backend returns, per layer, the
    attention mass (averaged over heads) that falls on the tokens overlapping each span.
    """

    prompt: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ThroughputRequest:
    """Time a forward over `n_tokens` tokens (prefill) and `new_tokens` greedy decode steps,
    `repeats` timed times, on a synthetic token sequence. `warmup` untimed runs come first the
    first time a loaded backend times this (n_tokens, new_tokens): a warm-up is paid once per
    model and shape, whichever request asks first, and again after a reload (a resumed run)."""

    n_tokens: int
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1


Request: TypeAlias = (
    GenerateRequest
    | ChoiceRequest
    | RollingRequest
    | ActivationRequest
    | AttentionRequest
    | ThroughputRequest
)


def shared_text(request: Request) -> str | None:
    """The text a request shares with its neighbours in a batch (a choice request's prefix): the
    runner never cuts a batch inside a run of requests that share one. An empty prefix shares
    nothing (else every prefix-less request would join one unbounded batch)."""
    return request.prefix or None if isinstance(request, ChoiceRequest) else None


@dataclass(frozen=True)
class ChoiceScores:
    """The chosen choice, and each choice's summed log-probability (None where not computed)."""

    logprobs: tuple[float | None, ...]
    n_tokens: tuple[int, ...]
    chosen: int  # the choice the request's method picked


@dataclass(frozen=True)
class Generation:
    """A greedy continuation, cut at the first stop string."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int


@dataclass(frozen=True)
class TokenLogprobs:
    """Each token of a text with the log-probability the model gave it."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


# |x| histograms of the activation probe: bin b holds values in [2^(b/H), 2^((b+1)/H)) with
# H = HIST_BINS_PER_OCTAVE, so a quantile read from it is within a relative error of
# 2^(1/H) - 1 (1.1% for H = 64); exact zeros go to bin ZERO_BIN.
HIST_BINS_PER_OCTAVE = 64
ZERO_BIN = -(10**6)


@dataclass(frozen=True)
class ActivationSummary:
    """Mergeable statistics of one activation type in one layer (and one DIFF map)."""

    activation: str  # attention_logits | hidden_states
    layer: int
    map: str  # "" (hidden states; a Llama's logits), or "both", "1", "2" for a DIFF model's logits
    count: int
    # Sums of x, x^2, x^3, x^4 over the values (float64): mean, variance and kurtosis merge.
    moments: tuple[float, float, float, float]
    top: tuple[float, ...]  # the largest |x|, descending, at most the request's top_k
    histogram: tuple[tuple[int, int], ...]  # (bin of |x|, count), bins as HIST_BINS_PER_OCTAVE


@dataclass(frozen=True)
class ActivationStats:
    n_tokens: int
    summaries: tuple[ActivationSummary, ...]


def merge_summaries(
    parts: Sequence[ActivationSummary], layer: int | None = None, map: str | None = None
) -> ActivationSummary:
    """One summary of the values of all `parts` (of one activation type): counts, moments and
    histograms add, the top values merge (as many as the longest part kept). `layer` and `map`
    label the result (default: the first part's); use -1 for a summary over all layers."""
    if not parts:
        raise ValueError("merge_summaries needs at least one summary")
    first = parts[0]
    k = max(len(p.top) for p in parts)
    hist: dict[int, int] = {}
    for p in parts:
        for b, c in p.histogram:
            hist[b] = hist.get(b, 0) + c
    return ActivationSummary(
        activation=first.activation,
        layer=first.layer if layer is None else layer,
        map=first.map if map is None else map,
        count=sum(p.count for p in parts),
        moments=(
            sum(p.moments[0] for p in parts),
            sum(p.moments[1] for p in parts),
            sum(p.moments[2] for p in parts),
            sum(p.moments[3] for p in parts),
        ),
        top=tuple(sorted((v for p in parts for v in p.top), reverse=True)[:k]),
        histogram=tuple(sorted(hist.items())),
    )


def summary_quantile(summary: ActivationSummary, q: float) -> float:
    """The q-quantile of |x| read from the histogram: the value of rank floor(q * (count - 1))
    (q = 0.5: the lower median, as `torch.median`), as its bin's geometric centre, so within a
    relative error of 2^(1 / (2 * HIST_BINS_PER_OCTAVE)) - 1 (0.54%) of the exact value."""
    if summary.count == 0:
        return float("nan")
    rank = int(q * (summary.count - 1))
    seen = 0
    for b, c in sorted(summary.histogram):
        seen += c
        if seen > rank:
            return 0.0 if b == ZERO_BIN else 2.0 ** ((b + 0.5) / HIST_BINS_PER_OCTAVE)
    return summary.top[0] if summary.top else float("nan")


def summary_kurtosis(summary: ActivationSummary) -> float:
    """Pearson kurtosis of x (3 for a normal distribution) from the summary's moment sums."""
    n = summary.count
    if n == 0:
        return float("nan")
    s1, s2, s3, s4 = (m / n for m in summary.moments)
    var = s2 - s1 * s1
    if var <= 0:
        return float("nan")
    m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1**4
    return m4 / (var * var)


@dataclass(frozen=True)
class AttentionMass:
    """Per layer, per requested span: the positive and the negative mass of the last token's
    attention map, each summed over the span's tokens and averaged over heads. A Transformer's
    map is its softmax (negative mass 0); a DIFF model's the differential map of each head pair,
    normalised as the backend documents, whose entries can be negative."""

    masses: tuple[tuple[float, ...], ...]  # [layer][span]: sum of max(map, 0)
    n_prompt_tokens: int
    # [layer][span]: sum of max(-map, 0), a magnitude (>= 0); empty from a backend that reports
    # signed masses only.
    negative: tuple[tuple[float, ...], ...] = ()
    # Layers whose map could not be normalised as documented (a DIFF layer with lambda >= 1),
    # one line each.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Throughput:
    """Each timed repeat's prefill and decode rates, the peak memory of the timed work (the
    model's own: models loaded beside it do not count), and when the timing began."""

    prefill_tokens_per_s: tuple[float, ...]
    decode_tokens_per_s: tuple[float, ...]
    peak_memory_bytes: int
    device: str
    # Unix time (seconds) at which the first timed repeat began: orders the timings of several
    # models, across processes too (a resumed run).
    timed_at: float


Response: TypeAlias = (
    Generation | ChoiceScores | TokenLogprobs | ActivationStats | AttentionMass | Throughput
)

# The one dispatch table: each request kind and the backend method that answers a batch of it.
# A new kind is a dataclass above, a row here, and one method per backend that answers it.
VERBS: dict[type, str] = {
    GenerateRequest: "generate",
    ChoiceRequest: "score_choices",
    RollingRequest: "rolling_logprobs",
    ActivationRequest: "activation_stats",
    AttentionRequest: "attention_mass",
    ThroughputRequest: "throughput",
}


@dataclass(frozen=True)
class ModelInfo:
    """What a run records about a model: enough to tell two checkpoints apart."""

    label: str
    spec: str
    backend: str
    path: str
    architecture: str
    n_parameters: int
    dtype: str
    max_context: int
    has_chat_template: bool
    fingerprint: str  # sha256 of the weight files and of the tokenizer files, or a hub commit


class TokenizerView(Protocol):
    """The part of a model a task may see: its tokenizer, for budgeting and prompt rendering."""

    @property
    def max_context(self) -> int: ...

    @property
    def has_chat_template(self) -> bool: ...

    def count(self, text: str) -> int:
        """Number of tokens `text` encodes to, without special tokens."""
        ...

    def char_offset(self, text: str, n_tokens: int) -> int:
        """Character index where the first `n_tokens` tokens of `text` end."""
        ...

    def render(self, user: str, answer_prefix: str = "", chat: bool = True) -> str:
        """The prompt a model sees: `user` in its chat template (when `chat` and it has one)."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """Token count of a rendered prompt as the backend will encode it (special tokens too)."""
        ...

    def encode(self, prompt: str) -> list[int]:
        """A rendered prompt's token ids as the backend will encode it (special tokens too)."""
        ...


class Backend(ABC):
    """A loaded model that answers requests; it never knows which task asked.

    The contract a type checker holds every backend to: the class methods `check` (refuse a spec
    that cannot load, loading nothing) and `load`, the tokenizer view, `close`, and one method
    per request kind of VERBS, typed by its request and its response. A backend overrides the
    verbs it answers; the others keep the refusals below, and `answers` tells them apart, so a
    run that needs a verb a backend lacks is refused before any model loads.
    """

    info: ModelInfo

    @classmethod
    @abstractmethod
    def check(cls, spec: ModelSpec) -> None:
        """Refuse (DiffbenchError) a spec whose weights or options cannot load; load nothing."""

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec) -> Backend:
        """The loaded backend for a model spec."""

    @classmethod
    def tokenizer_only(cls, spec: ModelSpec) -> TokenizerView:
        """The tokenizer view the loaded model would have, loading no weights (`--dry-run`)."""
        raise DiffbenchError(
            f"the {spec.backend} backend cannot plan a run without loading {spec.label!r}"
        )

    @abstractmethod
    def tokenizer_view(self) -> TokenizerView:
        """The model's tokenizer as tasks see it."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (its memory, its engine)."""

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """One greedy continuation per request, in order."""
        raise self._unanswered(GenerateRequest)

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScores]:
        """Each request's choice scores and chosen choice, in order."""
        raise self._unanswered(ChoiceRequest)

    def rolling_logprobs(self, requests: Sequence[RollingRequest]) -> list[TokenLogprobs]:
        """Every token's log-probability of each request's text, in order."""
        raise self._unanswered(RollingRequest)

    def activation_stats(self, requests: Sequence[ActivationRequest]) -> list[ActivationStats]:
        """Each text's per-layer activation summaries, in order."""
        raise self._unanswered(ActivationRequest)

    def attention_mass(self, requests: Sequence[AttentionRequest]) -> list[AttentionMass]:
        """Each prompt's per-layer attention mass on its spans, in order."""
        raise self._unanswered(AttentionRequest)

    def throughput(self, requests: Sequence[ThroughputRequest]) -> list[Throughput]:
        """Each request's timed prefill and decode rates, in order."""
        raise self._unanswered(ThroughputRequest)

    def _unanswered(self, kind: type) -> DiffbenchError:
        return DiffbenchError(
            f"model {self.info.label!r} ({self.info.backend} backend) cannot answer "
            f"{kind.__name__} (no {VERBS[kind]} method)"
        )


def answers(backend: Any, kind: type) -> bool:
    """Whether a backend (instance or class) answers request `kind`: it overrides the verb
    `VERBS[kind]` of `Backend` (a plugin that does not subclass `Backend`: it has a method of
    that name)."""
    method = getattr(backend, VERBS[kind], None)
    if not callable(method):
        return False
    return getattr(method, "__func__", method) is not getattr(Backend, VERBS[kind])


def respond(backend: Backend, requests: Sequence[Request]) -> list[Response]:
    """The backend's responses to a batch of requests of one kind, by the VERBS table."""
    kinds = {type(r) for r in requests}
    if len(kinds) != 1:
        raise ValueError(f"a batch holds one request kind, got {sorted(k.__name__ for k in kinds)}")
    responses: list[Response] = getattr(backend, VERBS[kinds.pop()])(requests)
    return responses


def request_kinds(task: Task, config: Any) -> tuple[type, ...]:
    """The request kinds a task's items use under `config`: its `request_kinds(config)`, or a
    plugin's plain `request_kinds` tuple (kinds that never depend on the config)."""
    kinds = task.request_kinds
    return tuple(kinds(config) if callable(kinds) else kinds)


@dataclass(frozen=True)
class Item:
    """One unit of work of a task: a stable id, its request, and what scoring needs to know."""

    id: str
    request: Request
    # Setting keys (e.g. length, depth) and values; they become metrics.csv columns.
    setting: Mapping[str, Any]
    # Target and inputs' identity, kept with the sample record; must be JSON-serialisable.
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptionSpec:
    """A task option as `diffbench list` shows it."""

    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class Headline:
    """Rows a task's report summary leads with: one metric, with the settings in `where` fixed
    (to a value, to ALL, or to LARGEST); each value of the other settings is one summary row."""

    metric: str
    where: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperRef:
    """The paper's own numbers for one of its tables, shown beside a run's (the report's
    "paper in miniature"). The run's rows: `metric` with the settings in `where` fixed as in
    `Headline.where`; each row is labelled by its values of `by` joined with "/" (empty: one row,
    key ""), or with `variant_key` by the value of that swept backend option (model labels
    LABEL@KEY=VALUE; the columns are then the base labels). `transformer` and `diff` map a row
    key to the paper's number as text ("0.85"; a key left out: no number)."""

    source: str  # "Table 2", "Figure 8"
    title: str
    metric: str
    where: Mapping[str, str] = field(default_factory=dict)
    by: tuple[str, ...] = ()
    variant_key: str = ""
    transformer: Mapping[str, str] = field(default_factory=dict)
    diff: Mapping[str, str] = field(default_factory=dict)
    note: str = ""  # one line: the paper's conditions ("4K context; 3B models")

    def to_json(self) -> dict[str, Any]:
        """The record as run.json stores it."""
        return {
            "source": self.source,
            "title": self.title,
            "metric": self.metric,
            "where": dict(self.where),
            "by": list(self.by),
            "variant_key": self.variant_key,
            "transformer": dict(self.transformer),
            "diff": dict(self.diff),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PaperRef:
        """The record read back from run.json."""
        return cls(
            str(data["source"]),
            str(data.get("title", "")),
            str(data["metric"]),
            {str(k): str(v) for k, v in data.get("where", {}).items()},
            tuple(str(k) for k in data.get("by", ())),
            str(data.get("variant_key", "")),
            {str(k): str(v) for k, v in data.get("transformer", {}).items()},
            {str(k): str(v) for k, v in data.get("diff", {}).items()},
            str(data.get("note", "")),
        )


# Which way a metric is better; "none": neither (a median's level, a count).
Better: TypeAlias = Literal["higher", "lower", "none"]
# What a metric's value is: "proportion", the mean over samples of a score in [0, 1] (accuracy, a
# share of needles found); "mean", the mean over samples of an unbounded value (a mass, an NLL, a
# rate); "statistic", anything else (a top-1, a kurtosis, a best-worst margin), which reports show
# with no interval or test unless its samples give one.
MetricKind: TypeAlias = Literal["proportion", "mean", "statistic"]
BETTER = ("higher", "lower", "none")
# How tables mark each direction beside a metric's name.
ARROWS = {"higher": "↑", "lower": "↓", "none": "·"}
METRIC_KINDS = ("proportion", "mean", "statistic")


@dataclass(frozen=True)
class Metric:
    """One metric a task emits, declared once: its direction, what its value is a mean of, and
    its unit of independence.

    A "proportion" or "mean" row is the mean of its samples' `key` field (where `by` names a
    setting, that field maps the setting's value to the sample's value: NLL per position bucket).
    Samples sharing a `cluster` are one independent `unit` ("haystack draw", "test example",
    "document", "sequence"); intervals and paired tests resample and test whole units.
    """

    name: str
    better: Better = "higher"
    kind: MetricKind = "proportion"
    key: str = SCORE_KEY
    by: str = ""
    unit: str = "sample"
    note: str = ""  # for a statistic: what it is computed over, and why it gets no test
    # A metric reports derive from this one when they are built: each model's value over the
    # report's reference model's, minus 1 (throughput's -0.09 is the paper's "-9%").
    relative: str = ""

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"metric {self.name}: better must be one of {BETTER}")
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"metric {self.name}: kind must be one of {METRIC_KINDS}")

    @property
    def sample_mean(self) -> bool:
        """Whether the row's value is a mean over its samples."""
        return self.kind != "statistic"

    def to_json(self) -> dict[str, Any]:
        """The declaration as run.json stores it."""
        return {
            "name": self.name,
            "better": self.better,
            "kind": self.kind,
            "key": self.key,
            "by": self.by,
            "unit": self.unit,
            "note": self.note,
            "relative": self.relative,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metric:
        """The declaration read back from run.json."""
        return cls(
            str(data["name"]),
            data.get("better", "higher"),
            data.get("kind", "statistic"),
            str(data.get("key", SCORE_KEY)),
            str(data.get("by", "")),
            str(data.get("unit", "sample")),
            str(data.get("note", "")),
            str(data.get("relative", "")),
        )


def declared_metrics(task: Any, config: Any = None) -> tuple[Metric, ...]:
    """A plugin's metric declarations under its built `config` (None: its default config). A
    plugin written before `Metric` (names in `metrics`, with `lower_is_better` and
    `sample_mean_metrics` sets) is read as "mean" and "statistic" metrics."""
    out = []
    lower = frozenset(getattr(task, "lower_is_better", ()))
    means = frozenset(getattr(task, "sample_mean_metrics", ()))
    for m in under_config(task, "metrics", config):
        if isinstance(m, Metric):
            out.append(m)
        else:
            better: Better = "lower" if m in lower else "higher"
            out.append(Metric(str(m), better, "mean" if m in means else "statistic"))
    return tuple(out)


def under_config(task: Any, attribute: str, config: Any = None) -> Any:
    """A task's `metrics` or `headline`: a plain attribute (every built-in task), or a method of
    the task's built config (an lm-eval task's follow the definition its config names); None
    stands for the task's default config."""
    declared = getattr(task, attribute)
    if not callable(declared):
        return declared
    return declared(task.config_type() if config is None else config)


def setting_text(value: object) -> str:
    """A setting value as metrics.csv spells it: numbers in shortest form (256, 0, 12.5)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return f"{float(value):g}"
    text = str(value)
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _number(value: Any) -> float:
    """A sample's value as a float (booleans as 0 or 1, numeric text parsed); NaN where it is
    not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def sample_values(samples: pd.DataFrame, metric: Metric) -> pd.Series:
    """Each sample's value of `metric`: its `key` field (`a.b`: key b of the mapping in field
    a), a float or NaN; for a metric with `by`, the mapping from that setting's values to the
    sample's value, kept whole (None where a sample has none)."""
    head, _, rest = metric.key.partition(".")
    if head not in samples.columns:
        return pd.Series(None if metric.by else float("nan"), index=samples.index, dtype=object)
    column = samples[head]
    if rest:
        column = column.map(lambda v: v.get(rest) if isinstance(v, dict) else None)
    if metric.by:
        return column.map(lambda v: v if isinstance(v, dict) else None)
    return column.map(_number).astype(float)


AllWeight: TypeAlias = Literal["cells", "samples"]


def aggregate_means(
    task: str,
    samples: pd.DataFrame,
    metrics: Iterable[Metric],
    by: Sequence[str] = (),
    over: Sequence[str] = (),
    *,
    weigh: AllWeight = "cells",
    cluster: str = "",
) -> pd.DataFrame:
    """Metric rows (METRIC_COLUMNS, then the settings) of sample-mean `metrics`, read from each
    sample's value (`sample_values`): the mean, n and stderr of every cell, a model and a value
    of each `by` setting (and of a metric's own `by` setting, its mapping's keys); and where
    `over` names some of the `by` settings, a row per model and value of the other settings in
    which each of them is ALL.

    An ALL row's value is the mean of its cells' values (`weigh="cells"`: each cell weighs the
    same, as the paper averages over depths) or of its samples (`"samples"`); its n counts the
    samples; its stderr is over the samples, or over the mean of each value of the sample column
    `cluster` (samples of one cluster are one independent unit). In cell rows the `over`
    settings are written as text (`setting_text`), their column holding ALL too. A metric that
    no sample has a value for gets no rows.
    """
    if not set(over) <= set(by):
        raise ValueError(f"aggregate_means: over {list(over)} must be among by {list(by)}")
    if weigh not in ("cells", "samples"):
        raise ValueError("aggregate_means: weigh is 'cells' or 'samples'")
    keys = ["model", *by]
    rest = [k for k in keys if k not in over]
    frames = []
    for metric in metrics:
        values = sample_values(samples, metric)
        data = samples[[*keys, *([cluster] if cluster else [])]].copy()
        cell_keys = keys
        if metric.by:
            pairs = values.map(lambda m: list(m.items()) if isinstance(m, dict) else [])
            data = data.assign(_pair=pairs).explode("_pair").dropna(subset=["_pair"])
            data[metric.by] = data["_pair"].map(lambda p: p[0])
            data["_value"] = data["_pair"].map(lambda p: _number(p[1])).astype(float)
            data = data.drop(columns="_pair")
            cell_keys = [*keys, metric.by]
        else:
            data["_value"] = values
        if data.empty or data["_value"].isna().all():
            continue
        grouped = data.groupby(cell_keys, sort=True)["_value"]
        cells = grouped.agg(value="mean", n="count", stderr=stderr_of_mean).reset_index()
        parts = [cells]
        if over:
            if weigh == "cells":
                overall = (
                    cells.groupby(rest, sort=True)
                    .agg(value=("value", "mean"), n=("n", "sum"))
                    .reset_index()
                )
            else:
                overall = (
                    data.groupby(rest, sort=True)["_value"]
                    .agg(value="mean", n="count")
                    .reset_index()
                )
            if cluster:
                per_cluster = data.groupby([*rest, cluster], sort=True)["_value"].mean()
                se = per_cluster.groupby(level=rest, sort=True).agg(stderr_of_mean)
            else:
                se = data.groupby(rest, sort=True)["_value"].agg(stderr_of_mean)
            overall = overall.merge(se.reset_index(name="stderr"), on=rest)
            for k in over:
                cells[k] = cells[k].map(setting_text)
                overall[k] = ALL
            parts.append(overall)
        frame = pd.concat(parts, ignore_index=True)
        frame["metric"] = metric.name
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*METRIC_COLUMNS, *by])
    out = pd.concat(frames, ignore_index=True)
    out["task"] = task
    settings = [c for c in out.columns if c not in METRIC_COLUMNS]
    return out[[*METRIC_COLUMNS, *settings]]


# The kinds of figure a task may declare; `diffbench.render.figures` draws each one.
FigureKind: TypeAlias = Literal["line", "bars", "heatmap", "spread"]
FIGURE_KINDS = ("line", "bars", "heatmap", "spread")
# How a line figure shows each row's 95% interval (value +- 1.96 stderr).
FigureErrors: TypeAlias = Literal["bars", "band", "none"]
FIGURE_ERRORS = ("bars", "band", "none")


@dataclass(frozen=True)
class FigureSpec:
    """One figure a task declares, drawn from its metrics.csv rows alone: run.json records it,
    so a report draws it with no plugin installed.

    Its rows: the task's rows of `metrics` whose settings match `where` (a value, ALL, or
    LARGEST: the largest value among each figure's rows, as in `Headline.where`). One figure per
    combination of the `per` settings (a setting that varies among the rows and has no place in
    the spec is added to them); its file is `<task>_<stem>`, `stem` and `title` formatted with
    the figure's setting values: `{length}`, or `{dataset.stem}` (a path's file name without its
    suffix), and `{task}`. A row whose `x` setting is a wildcard is left out of the axis.

    Kinds:
    - "line": each model's value against the `x` setting (by value where every value is a
      number), a line per model and per value of `style` (dashed, dotted); a panel per value of
      `panels`, or per metric when there are several; 95% intervals from the rows' stderr as
      `errors` says, and a band between the values of the two `shade` metrics.
    - "bars": a group of bars per combination of the `x` settings (labelled by the values that
      vary, joined with "/"), a bar per model, with 95% intervals.
    - "heatmap": the metric over `x` (columns) by `y` (rows), a panel per model, the panels
      sharing axes and colour scale (green is better); a row of `y` = ALL is drawn last, under a
      rule, as "mean".
    - "spread": the metric of every combination of the `x` settings (each one prompt, draw or
      order), in order, a panel per model on one y scale, the best and the worst dashed and the
      margin between them written (the paper's Figure 7).
    """

    kind: FigureKind
    metrics: tuple[str, ...]
    x: tuple[str, ...]
    stem: str
    title: str = ""
    y: str = ""  # heatmap rows
    panels: str = ""
    per: tuple[str, ...] = ()
    where: Mapping[str, str] = field(default_factory=dict)
    style: str = ""
    errors: FigureErrors = "bars"
    shade: tuple[str, ...] = ()  # (low metric, high metric)
    x_label: str = ""
    y_label: str = ""  # the value's axis; a heatmap's `y` setting
    log_x: bool = False
    log_y: bool = False
    limits: tuple[float, ...] = ()  # (low, high) of the value's axis or colour scale
    share_y: bool = True

    def __post_init__(self) -> None:
        where = f"figure {self.stem!r}"
        if self.kind not in FIGURE_KINDS:
            raise ValueError(f"{where}: kind must be one of {FIGURE_KINDS}, not {self.kind!r}")
        if self.errors not in FIGURE_ERRORS:
            raise ValueError(f"{where}: errors must be one of {FIGURE_ERRORS}")
        if not self.metrics or not self.x or not self.stem:
            raise ValueError(f"{where}: needs metrics, x settings and a stem")
        if self.kind in ("line", "heatmap") and len(self.x) != 1:
            raise ValueError(f"{where}: a {self.kind} has one x setting")
        if (self.kind == "heatmap") != bool(self.y):
            raise ValueError(f"{where}: a heatmap, and only a heatmap, has a y setting")
        if len(self.metrics) > 1 and (self.kind not in ("line", "bars") or self.panels):
            raise ValueError(f"{where}: several metrics are a line or bars figure's panels")
        if len(self.shade) not in (0, 2) or len(self.limits) not in (0, 2):
            raise ValueError(f"{where}: shade and limits are pairs (low, high)")

    def to_json(self) -> dict[str, Any]:
        """The spec as run.json stores it."""
        return {
            "kind": self.kind,
            "metrics": list(self.metrics),
            "x": list(self.x),
            "stem": self.stem,
            "title": self.title,
            "y": self.y,
            "panels": self.panels,
            "per": list(self.per),
            "where": dict(self.where),
            "style": self.style,
            "errors": self.errors,
            "shade": list(self.shade),
            "x_label": self.x_label,
            "y_label": self.y_label,
            "log_x": self.log_x,
            "log_y": self.log_y,
            "limits": list(self.limits),
            "share_y": self.share_y,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FigureSpec:
        """The spec read back from run.json."""
        return cls(
            data["kind"],
            tuple(str(m) for m in data["metrics"]),
            tuple(str(k) for k in data["x"]),
            str(data["stem"]),
            str(data.get("title", "")),
            str(data.get("y", "")),
            str(data.get("panels", "")),
            tuple(str(k) for k in data.get("per", ())),
            {str(k): str(v) for k, v in data.get("where", {}).items()},
            str(data.get("style", "")),
            data.get("errors", "bars"),
            tuple(str(m) for m in data.get("shade", ())),
            str(data.get("x_label", "")),
            str(data.get("y_label", "")),
            bool(data.get("log_x", False)),
            bool(data.get("log_y", False)),
            tuple(float(v) for v in data.get("limits", ())),
            bool(data.get("share_y", True)),
        )


@dataclass(frozen=True)
class TaskInfo:
    """What a run directory records about each of its tasks, so that statistics, comparisons and
    reports read a run without the task's plugin installed."""

    name: str
    description: str
    metric_defs: tuple[Metric, ...]
    setting_keys: tuple[str, ...]
    headline: tuple[Headline, ...]
    # The paper's numbers for its tables (a plugin's optional `paper` attribute).
    paper: tuple[PaperRef, ...] = ()
    # The figures a report draws (a plugin's optional `figures` attribute); None: not recorded
    # (a run written before tasks declared their figures, or a plugin that draws its own).
    figures: tuple[FigureSpec, ...] | None = ()

    @classmethod
    def of(cls, task: Task, config: Any = None) -> TaskInfo:
        """A task plugin's self-description under its built `config` (None: its default
        config), which an lm-eval task's metrics and headline depend on."""
        return cls(
            task.name,
            task.description,
            declared_metrics(task, config),
            tuple(task.setting_keys),
            tuple(under_config(task, "headline", config)),
            tuple(getattr(task, "paper", ())),
            _declared_figures(task),
        )

    @property
    def metrics(self) -> tuple[str, ...]:
        """The declared metrics' names."""
        return tuple(m.name for m in self.metric_defs)

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The metrics where lower is better."""
        return frozenset(m.name for m in self.metric_defs if m.better == "lower")

    @property
    def sample_mean_metrics(self) -> frozenset[str]:
        """The metrics whose value is a mean over samples."""
        return frozenset(m.name for m in self.metric_defs if m.sample_mean)

    def metric(self, name: str) -> Metric:
        """The declaration of `name`; an undeclared metric is a statistic with no test."""
        found = next((m for m in self.metric_defs if m.name == name), None)
        return found or Metric(name, kind="statistic", note="not declared by its task")

    def to_json(self) -> dict[str, Any]:
        """The record as run.json stores it (the older per-property lists kept for readers of
        earlier versions)."""
        return {
            "name": self.name,
            "description": self.description,
            "metric_defs": [m.to_json() for m in self.metric_defs],
            "metrics": list(self.metrics),
            "setting_keys": list(self.setting_keys),
            "lower_is_better": sorted(self.lower_is_better),
            "sample_mean_metrics": sorted(self.sample_mean_metrics),
            "headline": [{"metric": h.metric, "where": dict(h.where)} for h in self.headline],
            "paper": [p.to_json() for p in self.paper],
            **({} if self.figures is None else {"figures": [f.to_json() for f in self.figures]}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskInfo:
        """The record read back from run.json (a run before `metric_defs`: from its lists)."""
        if "metric_defs" in data:
            defs = tuple(Metric.from_json(m) for m in data["metric_defs"])
        else:
            lower = frozenset(data.get("lower_is_better", ()))
            means = frozenset(data.get("sample_mean_metrics", ()))
            defs = tuple(
                Metric(
                    str(m),
                    "lower" if m in lower else "higher",
                    "mean" if m in means else "statistic",
                )
                for m in data.get("metrics", ())
            )
        return cls(
            str(data["name"]),
            str(data.get("description", "")),
            defs,
            tuple(data.get("setting_keys", ())),
            tuple(
                Headline(h["metric"], dict(h.get("where", {}))) for h in data.get("headline", ())
            ),
            tuple(PaperRef.from_json(p) for p in data.get("paper", ())),  # older runs: none
            None
            if "figures" not in data  # older runs: not recorded
            else tuple(FigureSpec.from_json(f) for f in data["figures"]),
        )

    def better(self, metric: str) -> Better:
        """Which way `metric` is better ("none": neither)."""
        return self.metric(metric).better

    def higher_is_better(self, metric: str) -> bool:
        """Whether higher is better (also for a metric with no better direction)."""
        return self.better(metric) != "lower"


def _declared_figures(task: Any) -> tuple[FigureSpec, ...] | None:
    """A plugin's figure specs (none declared: no figures); a plugin from before figure specs,
    whose `figures` is a drawing method diffbench no longer calls: None, not recorded."""
    declared = getattr(task, "figures", ())
    return None if callable(declared) else tuple(declared)


@runtime_checkable
class Task(Protocol):
    """A task plugin: config -> items, (item, response) -> sample, samples -> metric rows.

    Everything a reader of a run needs about the task is in these attributes, and the runner
    records them in run.json (`TaskInfo`); nothing reads a run through the plugin.
    """

    # Read-only members (properties here), so that a plugin's narrower types (its config class,
    # a fixed-length tuple) and a method in place of a tuple satisfy the protocol.
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def config_type(self) -> type: ...

    @property
    def presets(self) -> Mapping[str, Mapping[str, Any]]:
        """Named option sets (`--set TASK.preset=NAME`): the paper's settings are one preset
        away."""
        ...

    @property
    def metrics(self) -> tuple[Metric, ...] | Callable[[Any], tuple[Metric, ...]]:
        """Every metric `aggregate` emits, declared once: direction, what it is a mean of, and
        its unit of independence (statistics pair and cluster by it). A tuple, or a method of
        the task's built config where they depend on it (an lm-eval task's definition): read
        it through `declared_metrics(task, config)`."""
        ...

    @property
    def setting_keys(self) -> tuple[str, ...]:
        """Setting columns this task writes into metrics.csv, in display order."""
        ...

    @property
    def headline(self) -> tuple[Headline, ...] | Callable[[Any], tuple[Headline, ...]]:
        """The rows the report's summary leads with (the paper's own tables); the rest stay in
        the task's section. Like `metrics`, a tuple or a method of the config (`under_config`)."""
        ...

    # Optional, so not declared here: `paper: tuple[PaperRef, ...]`, the paper's numbers that the
    # report's first section sets beside the run's, and `figures: tuple[FigureSpec, ...]`, the
    # figures a report draws from the task's rows (`TaskInfo.of` reads both; run.json records
    # them, so neither needs the plugin at report time).

    def request_kinds(self, config: Any) -> tuple[type, ...]:
        """The request kinds its items use under `config`: a model whose backend does not
        answer one of them is refused before any model loads. (A plugin may give a plain tuple
        instead, for kinds that never depend on the config; read it through `request_kinds`.)"""
        ...

    def items(self, config: Any, tokenizer: TokenizerView, seed: int) -> Iterable[Item]: ...

    def score(self, config: Any, item: Item, response: Response) -> Sample: ...

    def aggregate(self, config: Any, samples: pd.DataFrame) -> pd.DataFrame: ...
