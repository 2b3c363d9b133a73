"""The transformers backend: any causal LM from a folder, a hub id or a GGUF file.

The class answers every request kind and delegates each to the module that does that job:
hf_load (options, loading, the shared state), hf_generate, hf_score (choices and rolling
log-probabilities), hf_probe (activation statistics, attention allocation) and hf_throughput.
Tokenization is the shared contract of tokens.py. Names that scripts and tests have long imported
from here (the options, the tokenization functions, PeakMemory) are re-exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffbench.api import (
    ActivationRequest,
    ActivationStats,
    AttentionMass,
    AttentionRequest,
    Backend,
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    RollingRequest,
    Throughput,
    ThroughputRequest,
    TokenLogprobs,
)
from diffbench.backends import hf_generate, hf_probe, hf_score, hf_throughput
from diffbench.backends.hf_load import (
    HFModel,
    HFOptions,
    coerce_options,
    load_model,
    load_tokenizer_view,
)
from diffbench.backends.hf_throughput import PeakMemory
from diffbench.backends.prefix import PrefixCache
from diffbench.backends.tokens import (
    EncodedChoices,
    HFTokenizerView,
    encode_choices,
    encode_prompt,
    encode_prompts,
)
from diffbench.models import LoadTarget, ModelSpec, resolve_target
from transformers import PreTrainedTokenizerBase

__all__ = [
    "EncodedChoices",
    "HFBackend",
    "HFOptions",
    "HFTokenizerView",
    "LoadTarget",
    "PeakMemory",
    "coerce_options",
    "encode_choices",
    "encode_prompt",
    "encode_prompts",
]


class HFBackend(Backend):
    """A transformers causal LM answering every request kind."""

    def __init__(self, label: str, spec: str, target: LoadTarget, options: HFOptions) -> None:
        self.loaded: HFModel = load_model(label, spec, target, options)
        self.info = self.loaded.info

    @classmethod
    def check(cls, spec: ModelSpec) -> None:
        """Refuse a spec whose weights cannot be found or whose options are bad, loading
        nothing."""
        coerce_options(spec.label, spec.options)
        resolve_target(spec)

    @classmethod
    def tokenizer_only(cls, spec: ModelSpec) -> HFTokenizerView:
        """The model's tokenizer view from its tokenizer and config files, loading no weights."""
        return load_tokenizer_view(
            spec.label, spec.spec, resolve_target(spec), coerce_options(spec.label, spec.options)
        )

    @classmethod
    def load(cls, spec: ModelSpec) -> HFBackend:
        """The backend for a model spec (`hf:` or no prefix)."""
        return cls(
            spec.label, spec.spec, resolve_target(spec), coerce_options(spec.label, spec.options)
        )

    # The loaded state, as callers (scripts, tests, probes) read it.
    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def options(self) -> HFOptions:
        return self.loaded.options

    @property
    def _prefix(self) -> PrefixCache:
        return self.loaded.prefix

    def tokenizer_view(self) -> HFTokenizerView:
        return self.loaded.view

    def close(self) -> None:
        self.loaded.close()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return hf_generate.generate(self.loaded, requests)

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScores]:
        return hf_score.score_choices(self.loaded, requests)

    def rolling_logprobs(self, requests: Sequence[RollingRequest]) -> list[TokenLogprobs]:
        return hf_score.rolling_logprobs(self.loaded, requests)

    def activation_stats(self, requests: Sequence[ActivationRequest]) -> list[ActivationStats]:
        return hf_probe.activation_stats(self.loaded, requests)

    def attention_mass(self, requests: Sequence[AttentionRequest]) -> list[AttentionMass]:
        return hf_probe.attention_mass(self.loaded, requests)

    def throughput(self, requests: Sequence[ThroughputRequest]) -> list[Throughput]:
        return hf_throughput.throughput(self.loaded, requests)
