"""lm-eval's three verbs over any diffbench backend: the `LM` adapter and the request mapping.

lm-eval sends one (context, continuation) pair per `loglikelihood` instance; a multiple-choice
document sends one per choice, all with the same context. Pairs that share a context become one
`ChoiceRequest` (method `full`), so the backend encodes the context once and scores the choices as
a token trie; consecutive contexts are cut into blocks whose common text is the request's
`prefix`, so the backend keeps the KV cache of the tokens they share (a block of few-shot
demonstrations) and encodes it once per block. The context + continuation split is lm-eval's
own (`_encode_pair`: trailing whitespace moves to the continuation, the whole text is encoded at
once and split after the context's tokens), which ChoiceRequest documents; BOS is added where the
tokenizer adds one, as lm-eval's HF model does.

`generate_until` becomes a `GenerateRequest` (greedy, `until` as stop strings, `max_gen_toks`
as the budget) and `loglikelihood_rolling` a `RollingRequest` (the BOS token, or EOS, predicts
the first token; windows of the model's context, as lm-eval's). Nothing here imports torch: the
backend does, when `DiffbenchLM` loads one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os.path import commonpath
from typing import Any

from diffbench.api import (
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    Request,
    Response,
    RollingRequest,
    TokenLogprobs,
)
from diffbench.errors import DiffbenchError
from lm_eval.api.model import LM

log = logging.getLogger("diffbench")

# Contexts per block of choice requests that share one prefix text: the backend encodes a block's
# common tokens once, and the runner stores a block's samples together (resume granularity).
BLOCK = 64
# lm-eval's default generation budget (HFLM's `max_gen_toks`).
MAX_GEN_TOKS = 256
# Request kinds by lm-eval request type.
KINDS: dict[str, type] = {
    "loglikelihood": ChoiceRequest,
    "loglikelihood_rolling": RollingRequest,
    "generate_until": GenerateRequest,
}


def block_prefixes(contexts: Sequence[str], block: int = BLOCK) -> list[str]:
    """Each context's `prefix`: the text common to its block of `block` consecutive contexts.

    A prefix only tells the backend (and the runner) which requests to encode together; the
    backend shares exactly the tokens their contexts have in common, whatever the split. Where a
    block's common text equals the previous block's, it is cut one character shorter, so the
    runner still sees two runs of shared text and stores each block's samples as it finishes.
    """
    out: list[str] = []
    previous: str | None = None
    for start in range(0, len(contexts), block):
        part = contexts[start : start + block]
        common = commonpath(list(part))
        if common and common == previous:
            common = common[:-1]
        previous = common
        out += [common] * len(part)
    return out


def choice_request(prefix: str, context: str, continuations: Sequence[str]) -> ChoiceRequest:
    """Every continuation's log-likelihood after one context, as one choice request."""
    if not context.startswith(prefix):
        raise ValueError("a choice request's prefix must begin its context")
    return ChoiceRequest(
        prefix=prefix,
        query=context[len(prefix) :],
        choices=tuple(continuations),
        method="full",
    )


def generate_request(context: str, gen_kwargs: Mapping[str, Any]) -> GenerateRequest:
    """lm-eval's generation arguments as a greedy generation request."""
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
        log.warning("lm-eval asked for sampling; diffbench backends decode greedily")
    budget = int(gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS))
    return GenerateRequest(prompt=context, max_new_tokens=budget, stop=tuple(until))


def lm_eval_result(request: Request, response: Response, index: int = 0) -> Any:
    """What lm-eval's own model returns for one instance answered by `response`: (ll, is_greedy)
    for choice `index`, a string for a generation, a float for a rolling log-likelihood.

    `is_greedy` is False: diffbench's choice scores do not say whether each continuation token was
    the model's argmax (lm-eval's `acc` of `loglikelihood`-type tasks such as lambada needs it)."""
    if isinstance(response, ChoiceScores):
        ll = response.logprobs[index]
        if ll is None:
            raise RuntimeError("a full choice request came back without every choice's score")
        return (float(ll), False)
    if isinstance(response, Generation):
        return response.text
    if isinstance(response, TokenLogprobs):
        return float(sum(response.logprobs))
    raise TypeError(f"no lm-eval result for {type(response).__name__}")


@dataclass(frozen=True)
class Planned:
    """Requests for a list of lm-eval instances of one verb, and where each instance's answer is:
    `slots[i]` = (request index, choice index) of instance i."""

    requests: list[Request]
    slots: list[tuple[int, int]]


def plan_loglikelihood(pairs: Sequence[tuple[str, str]]) -> Planned:
    """(context, continuation) pairs grouped by context into choice requests; contexts sorted so
    that those sharing text (demonstrations) are neighbours and share a block's cache."""
    for context, _ in pairs:
        if not context:
            raise DiffbenchError(
                "an lm-eval loglikelihood request has an empty context; diffbench scores "
                "continuations of a context (use loglikelihood_rolling for whole texts)"
            )
    by_context: dict[str, list[str]] = {}
    for context, continuation in pairs:
        conts = by_context.setdefault(context, [])
        if continuation not in conts:
            conts.append(continuation)
    contexts = sorted(by_context)
    prefixes = block_prefixes(contexts)
    requests: list[Request] = [
        choice_request(p, c, by_context[c]) for p, c in zip(prefixes, contexts, strict=True)
    ]
    where = {c: i for i, c in enumerate(contexts)}
    slots = [(where[c], by_context[c].index(cont)) for c, cont in pairs]
    return Planned(requests, slots)


def answer(backend: Any, requests: Sequence[Request], chunk: int = BLOCK) -> list[Response]:
    """Requests of one kind answered by the backend's verb for it, in order, in chunks that
    never cut a run of choice requests sharing a prefix (the backend shares its cache within one
    call)."""
    from diffbench.api import VERBS, shared_text

    if not requests:
        return []
    verb = getattr(backend, VERBS[type(requests[0])])
    out: list[Response] = []
    start = 0
    while start < len(requests):
        end = min(start + chunk, len(requests))
        shared = shared_text(requests[end - 1])
        while end < len(requests) and shared and shared_text(requests[end]) == shared:
            end += 1
        out += verb(list(requests[start:end]))
        start = end
    return out


class DiffbenchLM(LM):
    """lm-eval's `LM` over a diffbench backend: `--model diffbench --model_args model=SPEC,...`.

    `model` is any diffbench model spec (built-in name, folder, .gguf, hub id, `hf:`/`vllm:`
    prefix); `label` names it (default `diffbench`); every other model argument is a backend
    option, passed through unchanged (`dtype`, `batch_size`, `prefix_cache`, `logit_bits`, ...).
    """

    def __init__(self, model: str = "tiny-diff", label: str = "diffbench", **options: Any) -> None:
        super().__init__()
        from diffbench.models import ModelSpec, check_spec, load_backend

        spec = ModelSpec(label, str(model), dict(options))
        check_spec(spec)
        self.backend = load_backend(spec)

    @classmethod
    def from_backend(cls, backend: Any) -> DiffbenchLM:
        """An adapter over a backend that is already loaded."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm.backend = backend
        return lm

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> DiffbenchLM:
        """From `--model_args`. lm-eval's own `--batch_size`/`--device` are not backend options
        (its batch size defaults to 1): give `batch_size=`/`device=` in `--model_args`."""
        from lm_eval.utils import simple_parse_args_string

        return cls(**simple_parse_args_string(arg_string))

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> DiffbenchLM:
        return cls(**arg_dict)

    @property
    def tokenizer_name(self) -> str:
        return str(self.backend.info.spec)

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        planned = plan_loglikelihood([tuple(r.args) for r in requests])
        responses = answer(self.backend, planned.requests)
        return [lm_eval_result(planned.requests[k], responses[k], c) for k, c in planned.slots]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        rolling: list[Request] = [RollingRequest(text=r.args[0]) for r in requests]
        responses = answer(self.backend, rolling, chunk=16)
        return [lm_eval_result(q, r) for q, r in zip(rolling, responses, strict=True)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        gens: list[Request] = [generate_request(r.args[0], r.args[1]) for r in requests]
        responses = answer(self.backend, gens, chunk=16)
        return [lm_eval_result(q, r) for q, r in zip(gens, responses, strict=True)]


def register() -> None:
    """Register `diffbench` as an lm-eval model name (lm-eval 0.4.13 has no plugin entry point:
    its built-in models register when `lm_eval.models` is imported, so ours goes in after)."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if "diffbench" not in model_registry:
        model_registry.register("diffbench")(DiffbenchLM)


def cli_main(argv: Sequence[str]) -> int:
    """`diffbench lm-eval ARGS`: lm-eval's own command line with `--model diffbench` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
