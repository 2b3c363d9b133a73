"""The vLLM backend: `vllm:` model specs through vLLM's offline engine.

Prompts are tokenized by the shared contract of bench/backends/tokens.py (`encode_prompt`,
`encode_choices`), as the HF backend tokenizes them, and handed to vLLM as token ids, so both
backends see the same tokens. Automatic prefix caching is
on: a haystack or a block of demonstrations shared by many requests is computed once.

Choice scoring never asks for prompt log-probabilities: vLLM skips its prefix cache for any
request that does (`skip_reading_prefix_cache`), which would recompute the whole context for
every choice. Instead each node of a request's choice trie (bench/backends/trie.py) is one
one-token generation request, `context + the node's path`, asking with `logprob_token_ids` for
exactly the next-token log-probabilities the node needs; those requests read the cached context,
so a choice costs its own few tokens. The searches of all requests in a batch run in lockstep,
one engine call per round. Rolling log-probabilities do need every position: they use prompt
log-probabilities. Probes that need attention internals (activations, attention mass) and
throughput stay on the HF backend: this one does not override those verbs of `api.Backend`, so
the runner refuses them before a run (niah's `mode=attention` included).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffbench.modeling  # noqa: F401  (DIFF V2's config for AutoConfig, read before vLLM starts)
from diffbench.api import (
    Backend,
    ChoiceRequest,
    ChoiceScores,
    GenerateRequest,
    Generation,
    ModelInfo,
    RollingRequest,
    TokenLogprobs,
)
from diffbench.backends.tokens import (
    EncodedChoices,
    HFTokenizerView,
    check_fits,
    common_prefix,
    encode_choices,
    encode_prompt,
    fingerprint,
    plan_rolling,
)
from diffbench.backends.trie import ROOT, ChoiceTrie, Method, search_pair_passes
from diffbench.config import model_options
from diffbench.errors import DiffbenchError
from diffbench.models import LoadTarget, ModelSpec, resolve_target
from transformers import AutoConfig, AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

# vLLM returns log-probabilities of at most this many named tokens per request
# (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS); a node that needs more is asked in chunks.
TOKEN_IDS_MAX = 128


@dataclass(frozen=True)
class VLLMOptions:
    """Model options settable with `--model-args LABEL:KEY=VALUE`."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int = 0  # 0: the model config's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True: no CUDA graphs / torch.compile (faster start)
    distributed_executor_backend: str = ""  # "": vLLM's choice; mp | ray (ray: several nodes)
    chat_template: bool = True  # use the model's chat template when it has one
    trust_remote_code: bool = False
    prefix_cache: bool = True  # False: score every (context, choice) with prompt log-probs
    seed: int = 0


def coerce_options(label: str, raw: Mapping[str, Any]) -> VLLMOptions:
    """vLLM backend options from raw strings or YAML values, refusing unknown keys and bad
    values."""
    opts: VLLMOptions = model_options(VLLMOptions, raw, label, "vllm")
    if opts.tensor_parallel_size < 1 or opts.pipeline_parallel_size < 1:
        raise DiffbenchError(f"{label}: tensor and pipeline parallel sizes must be at least 1")
    if opts.max_model_len < 0:
        raise DiffbenchError(f"{label}:max_model_len must be 0 (the model's own) or positive")
    if not 0 < opts.gpu_memory_utilization <= 1:
        raise DiffbenchError(f"{label}:gpu_memory_utilization must be in (0, 1]")
    if opts.distributed_executor_backend not in ("", "mp", "ray", "uni"):
        raise DiffbenchError(f"{label}:distributed_executor_backend must be empty, mp, ray or uni")
    return opts


def _n_parameters(root: Path) -> int:
    """Parameter count from the safetensors headers (the weights live in vLLM's workers)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                total += math.prod(fh.get_slice(key).get_shape())
    return total


class VLLMBackend(Backend):
    """A model on vLLM's offline engine, answering generation, choice scoring and rolling
    log-probability requests."""

    def __init__(self, label: str, spec: str, target: LoadTarget, options: VLLMOptions) -> None:
        if target.gguf_file:
            raise DiffbenchError(
                f"model {label!r}: the vllm backend loads checkpoint folders, not GGUF files; "
                "use the hf backend for this one"
            )
        self.options = options
        kwargs: dict[str, Any] = {}
        if options.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = options.distributed_executor_backend
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                target.path, trust_remote_code=options.trust_remote_code
            )
            config = AutoConfig.from_pretrained(
                target.path, trust_remote_code=options.trust_remote_code
            )
            config_max = int(getattr(config, "max_position_embeddings", 0) or 0)
            max_context = options.max_model_len or config_max or 2048
            # One slot beyond the context: vLLM returns a position's next-token log-probability
            # only by sampling a token there, and a full-context window (rolling log-probs, a
            # choice that fills the context) must still give its last one. That slot is sampled,
            # never run through the model: requests are checked against max_context.
            if max_context <= config_max < max_context + 1:
                os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
            self.llm = LLM(
                model=target.path,
                dtype=options.dtype,
                tensor_parallel_size=options.tensor_parallel_size,
                pipeline_parallel_size=options.pipeline_parallel_size,
                gpu_memory_utilization=options.gpu_memory_utilization,
                enforce_eager=options.enforce_eager,
                enable_prefix_caching=True,
                trust_remote_code=options.trust_remote_code,
                seed=options.seed,
                max_logprobs=TOKEN_IDS_MAX,
                generation_config="vllm",  # sampling is ours: greedy, no model defaults
                max_model_len=max_context + 1,
                **kwargs,
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DiffbenchError(f"cannot load model {label!r} from {spec!r}: {first}") from err
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_config = self.llm.llm_engine.model_config
        root = Path(target.path)
        architectures = getattr(config, "architectures", None) or ["?"]
        self.info = ModelInfo(
            label=label,
            spec=spec,
            backend="vllm",
            path=target.path,
            architecture=str(architectures[0]),
            n_parameters=_n_parameters(root) if root.is_dir() else 0,
            dtype=str(model_config.dtype).removeprefix("torch."),
            max_context=max_context,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            fingerprint=fingerprint(target),
        )
        self._view = HFTokenizerView(self.tokenizer, max_context, options.chat_template)

    @classmethod
    def check(cls, spec: ModelSpec) -> None:
        """Refuse a spec whose weights cannot be found or whose options are bad, loading
        nothing."""
        coerce_options(spec.label, spec.options)
        target = resolve_target(spec)
        if target.gguf_file:
            raise DiffbenchError(
                f"model {spec.label!r}: the vllm backend loads checkpoint folders, not GGUF "
                "files; use the hf backend for this one"
            )

    @classmethod
    def load(cls, spec: ModelSpec) -> VLLMBackend:
        """The backend for a `vllm:` model spec."""
        return cls(
            spec.label, spec.spec, resolve_target(spec), coerce_options(spec.label, spec.options)
        )

    def tokenizer_view(self) -> HFTokenizerView:
        return self._view

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
        """One engine call: vLLM batches and schedules the requests itself."""
        if not prompts:
            return []
        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )

    # ---- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        encoded = [encode_prompt(self.tokenizer, r.prompt) for r in requests]
        for ids, r in zip(encoded, requests, strict=True):
            check_fits(self.info, len(ids) + r.max_new_tokens, "a generation request")
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=r.max_new_tokens,
                stop=list(r.stop) or None,
                skip_special_tokens=True,
            )
            for r in requests
        ]
        gens = []
        for out, ids, r in zip(self._run(encoded, params), encoded, requests, strict=True):
            o = out.outputs[0]
            text = str(o.text)
            cut = min((text.find(s) for s in r.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            gens.append(
                Generation(text=text, n_prompt_tokens=len(ids), n_new_tokens=len(o.token_ids))
            )
        return gens

    # ---- rolling log-probabilities ---------------------------------------------------------

    def rolling_logprobs(self, requests: Sequence[RollingRequest]) -> list[TokenLogprobs]:
        """Every token's log-probability in windows of the context's length, as the HF backend
        computes them (see RollingRequest). A window of w tokens is one request: its prompt
        log-probabilities give the targets inside it, and the token after it is read as the
        next-token log-probability of its last position."""
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        spans: list[tuple[int, int, int]] = []  # (request, first target, n targets)
        plans = [plan_rolling(self.tokenizer, self.info, r) for r in requests]
        for k, plan in enumerate(plans):
            for w in plan.windows:
                prompts.append(plan.seq[w.start : w.end])
                params.append(
                    SamplingParams(
                        temperature=0.0,
                        max_tokens=1,
                        prompt_logprobs=0,
                        logprob_token_ids=[plan.seq[w.end]],
                        detokenize=False,
                    )
                )
                spans.append((k, w.end - w.n_new, w.n_new))
        per_request: list[list[float]] = [[] for _ in requests]
        for out, prompt, (k, done, n_new) in zip(
            self._run(prompts, params), prompts, spans, strict=True
        ):
            seq = plans[k].seq
            inside = [
                out.prompt_logprobs[j][prompt[j]].logprob
                for j in range(len(prompt) - n_new + 1, len(prompt))
            ]
            last = out.outputs[0].logprobs[0][seq[done + n_new]].logprob
            per_request[k] += [*inside, last]
        outs = []
        for plan, logprobs in zip(plans, per_request, strict=True):
            if not all(math.isfinite(x) for x in logprobs):
                raise DiffbenchError(f"model {self.info.label!r} gave non-finite log-probabilities")
            outs.append(TokenLogprobs(tuple(plan.ids), tuple(float(x) for x in logprobs)))
        return outs

    # ---- choice scoring --------------------------------------------------------------------

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScores]:
        for r in requests:
            if not r.choices:
                raise DiffbenchError("a choice request has no choices")
        encoded = [encode_choices(self.tokenizer, r) for r in requests]
        for e in encoded:
            longest = max(len(c) for c in e.choices)
            check_fits(self.info, len(e.context) + longest, "a scoring request")
        if not self.options.prefix_cache:
            return self._score_naive(encoded, [r.method for r in requests])
        tries = [ChoiceTrie(e.choices, e.end_tokens) for e in encoded]
        # The longest token prefix each group of requests shares (a haystack, demonstrations) is
        # computed first and alone, so every request after it finds it in the prefix cache.
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.prefix, []).append(i)
        warm = []
        for members in groups.values():
            n = common_prefix([encoded[i].context for i in members])
            if len(members) > 1 and n > 0:
                warm.append(encoded[members[0]].context[:n])
        self._run(
            warm, [SamplingParams(temperature=0.0, max_tokens=1, detokenize=False) for _ in warm]
        )
        self._expand([(t, e.context, [ROOT]) for t, e in zip(tries, encoded, strict=True)])
        chosen = self._search_all(tries, [e.context for e in encoded], [r.method for r in requests])
        out = []
        for t, e, c in zip(tries, encoded, chosen, strict=True):
            logprobs = t.choice_scores()
            if any(x is not None and not math.isfinite(x) for x in logprobs):
                raise DiffbenchError(f"model {self.info.label!r} gave non-finite log-likelihoods")
            out.append(ChoiceScores(tuple(logprobs), tuple(len(x) for x in e.choices), c))
        return out

    def _expand(self, jobs: list[tuple[ChoiceTrie, list[int], list[int]]]) -> None:
        """Expand trie nodes (trie, context, nodes), all in one engine call: one request per node
        and chunk of at most TOKEN_IDS_MAX wanted tokens."""
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        where: list[tuple[int, int]] = []  # (job, node)
        for j, (trie, context, nodes) in enumerate(jobs):
            for i in nodes:
                path = [trie.nodes[a].token for a in trie.path(i)]
                wanted = trie.wanted(i)
                for s in range(0, len(wanted), TOKEN_IDS_MAX):
                    prompts.append(context + path)
                    params.append(
                        SamplingParams(
                            temperature=0.0,
                            max_tokens=1,
                            logprob_token_ids=wanted[s : s + TOKEN_IDS_MAX],
                            detokenize=False,
                        )
                    )
                    where.append((j, i))
        found: dict[tuple[int, int], dict[int, float]] = {}
        for out, key in zip(self._run(prompts, params), where, strict=True):
            lps = out.outputs[0].logprobs[0]
            found.setdefault(key, {}).update({t: float(lp.logprob) for t, lp in lps.items()})
        for j, (trie, _, nodes) in enumerate(jobs):
            for i in sorted(nodes):  # parents first: a node's score comes from its parent
                trie.expand(i, found[(j, i)])

    def _search_all(
        self, tries: list[ChoiceTrie], contexts: list[list[int]], methods: list[Method]
    ) -> list[int]:
        """Run every trie's search (each in a thread that only waits) in lockstep: each round
        gathers the nodes all unfinished searches ask for and expands them in one engine call."""
        n = len(tries)
        cond = threading.Condition()
        asks: dict[int, list[int]] = {}
        finished = [False] * n
        chosen = [0] * n
        errors: list[BaseException] = []
        failed: list[BaseException] = []

        def search(k: int) -> None:
            def expand(nodes: list[int]) -> None:
                with cond:
                    asks[k] = nodes
                    cond.notify_all()
                    cond.wait_for(lambda: k not in asks or bool(failed))
                    if failed:
                        raise RuntimeError("the engine call of this round failed")

            try:
                chosen[k] = tries[k].search(methods[k], expand)
            except BaseException as err:
                errors.append(err)
            finally:
                with cond:
                    finished[k] = True
                    cond.notify_all()

        threads = [threading.Thread(target=search, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        while True:
            with cond:
                cond.wait_for(lambda: all(finished[k] or k in asks for k in range(n)))
                if all(finished):
                    break
                batch = dict(asks)
            try:
                self._expand([(tries[k], contexts[k], nodes) for k, nodes in batch.items()])
            except BaseException as err:
                with cond:
                    failed.append(err)
                    cond.notify_all()
                for t in threads:
                    t.join()
                raise
            with cond:
                for k in batch:
                    del asks[k]
                cond.notify_all()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return chosen

    def _score_naive(
        self, encoded: list[EncodedChoices], methods: list[Method]
    ) -> list[ChoiceScores]:
        """Reference scoring: one request per (context, choice) pair with prompt
        log-probabilities, which vLLM computes without its prefix cache. Every choice's exact
        log-likelihood; `greedy` over choices that extend one another needs the end tokens'
        scores too, so it asks for those as well."""
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        for e in encoded:
            for c, end in zip(e.choices, e.end_tokens, strict=True):
                prompts.append(e.context + c)
                params.append(
                    SamplingParams(
                        temperature=0.0,
                        max_tokens=1,
                        prompt_logprobs=0,
                        logprob_token_ids=[end] if end is not None else None,
                        detokenize=False,
                    )
                )
        outs = iter(self._run(prompts, params))
        results = []
        for e, method in zip(encoded, methods, strict=True):
            per_token: list[list[float]] = []
            end_lp: list[float | None] = []
            for c, end in zip(e.choices, e.end_tokens, strict=True):
                out = next(outs)
                n = len(e.context)
                per_token.append([out.prompt_logprobs[n + j][t].logprob for j, t in enumerate(c)])
                end_lp.append(out.outputs[0].logprobs[0][end].logprob if end is not None else None)
            logprobs, chosen = search_pair_passes(
                e.choices, e.end_tokens, per_token, end_lp, method
            )
            results.append(ChoiceScores(tuple(logprobs), tuple(len(c) for c in e.choices), chosen))
        return results
