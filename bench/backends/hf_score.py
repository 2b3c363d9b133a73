"""Choice scoring and rolling log-probabilities on the HF backend.

Choices are tokenized as lm-eval does (tokens.encode_choices: context and choice encoded together,
split after the context's tokens), so the model sees a natural prompt's tokens. Scoring then
shares work the way a long-context harness must: the longest token prefix that a group of
requests' contexts have in common (a haystack, demonstrations) is encoded once and kept as a KV
cache; each request's rest of the context extends it, and all of the request's choices are then
scored in *one* forward pass as a token tree (each choice attends to the cached context and to
its own earlier tokens through a 4-D additive mask, with positions restarting after the query),
after which the cache is cropped back to the prefix. No cache is ever copied, and only the
positions that are scored reach the LM head. The query's own pass also carries trie nodes the
search is likely to expand (`lookahead`), so a label search usually needs no pass of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffbench.api import ChoiceRequest, ChoiceScores, RollingRequest, TokenLogprobs
from diffbench.backends.hf_load import HFModel
from diffbench.backends.tokens import (
    EncodedChoices,
    check_fits,
    common_prefix,
    encode_choices,
    plan_rolling,
)
from diffbench.backends.trie import ROOT, ChoiceTrie, Method, search_pair_passes
from diffbench.errors import DiffbenchError

# Most trie nodes that ride along in a query's pass on speculation; more would cost more compute
# than the pass they may save (a CPU pass over a cached context costs about as much as ~30 new
# tokens). Nodes the search surely expands next ride along whatever their number.
LOOKAHEAD_MAX = 32


def lookahead(trie: ChoiceTrie, method: Method) -> list[int]:
    """Internal trie nodes (parents first) whose next-token log-probabilities the query's pass
    computes beside it, held until the search asks for them (so the search, and every score it
    reports, is the same as without them).

    `full` expands every internal node: all of them. `best` expands every first-level internal
    node next unless a one-token choice already bounds it: those, then deeper nodes breadth
    first while the total stays within LOOKAHEAD_MAX. `greedy` expands one node per level: the
    first level only, and only within LOOKAHEAD_MAX."""
    nodes = trie.nodes
    internal = [i for i in range(1, len(nodes)) if nodes[i].children]  # parents first
    first = [i for i in internal if nodes[i].parent == ROOT]
    if method == "full":
        return internal
    if method == "greedy":
        return first if len(first) <= LOOKAHEAD_MAX else []
    # A one-token choice is complete once the root is expanded: it bounds the first level.
    bounded = any(nodes[i].ends for i in nodes[ROOT].children.values())
    sure = [] if bounded else first
    chosen = set(sure)
    for i in internal:
        if len(chosen) >= LOOKAHEAD_MAX:
            break
        if i not in chosen and (nodes[i].parent == ROOT or nodes[i].parent in chosen):
            chosen.add(i)
    return [i for i in internal if i in chosen]


def score_choices(m: HFModel, requests: Sequence[ChoiceRequest]) -> list[ChoiceScores]:
    results: list[ChoiceScores | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        if not r.choices:
            raise DiffbenchError("a choice request has no choices")
        groups.setdefault(r.prefix, []).append(i)
    score = _score_shared if m.options.prefix_cache else _score_naive
    for members in groups.values():
        encoded = [encode_choices(m.tokenizer, requests[i]) for i in members]
        for e in encoded:
            longest = max(len(c) for c in e.choices)
            check_fits(m.info, len(e.context) + longest, "a scoring request")
        methods: list[Method] = [requests[i].method for i in members]
        for i, s in zip(members, score(m, encoded, methods), strict=True):
            results[i] = s
    return [r for r in results if r is not None]


@torch.inference_mode()
def _score_naive(
    m: HFModel, encoded: list[EncodedChoices], methods: list[Method]
) -> list[ChoiceScores]:
    """Reference scoring: one full forward pass per (context, choice) pair, no cache."""
    out = []
    for e, method in zip(encoded, methods, strict=True):
        per_token: list[list[float]] = []
        end_lp: list[float | None] = []
        for c, end in zip(e.choices, e.end_tokens, strict=True):
            ids = torch.tensor([e.context + c], device=m.device)
            logits = m.model(ids, logits_to_keep=len(c) + 1).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(c, device=m.device)
            per_token.append(lp[:-1].gather(1, target[:, None])[:, 0].tolist())
            end_lp.append(float(lp[-1, end]) if end is not None else None)
        logprobs, chosen = search_pair_passes(e.choices, e.end_tokens, per_token, end_lp, method)
        out.append(ChoiceScores(tuple(logprobs), tuple(len(c) for c in e.choices), chosen))
    return out


@torch.inference_mode()
def _score_shared(
    m: HFModel, encoded: list[EncodedChoices], methods: list[Method]
) -> list[ChoiceScores]:
    """The contexts' common token prefix encoded once; each context's rest extends the
    cache, then its choice trie is searched."""
    n_prefix = common_prefix([e.context for e in encoded])
    if n_prefix == 0:  # nothing in common (no BOS): each context is its own prefix
        return [
            _score_shared(m, [e], [method])[0] for e, method in zip(encoded, methods, strict=True)
        ]
    # The prefix's cache comes from the one kept across requests: a generate prompt or an
    # earlier group with the same text (NIAH's two modes, a haystack's depths) computed it.
    cache, prefix_last = m.prefix.extend(encoded[0].context[:n_prefix])
    out = []
    for e, method in zip(encoded, methods, strict=True):
        query, choices = e.context[n_prefix:], e.choices
        trie = ChoiceTrie(choices, e.end_tokens)
        n_context = len(e.context)
        # The query's pass also runs trie nodes the search will likely expand (each seeing the
        # query and its own path), held back until the search asks for them.
        ahead = lookahead(trie, method) if query else []
        held: dict[int, dict[int, float]] = {}
        if query and not ahead:  # a plain causal pass: no mask to build, however long
            step = m.model(
                torch.tensor([query], device=m.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            trie.expand(ROOT, _children_logprobs(step.logits[0, -1], trie, ROOT))
        elif query:
            n_q = len(query)
            row = {i: n_q + k for k, i in enumerate(ahead)}
            visible = [list(range(r + 1)) for r in range(n_q)]
            visible += [[*range(n_q), *(row[a] for a in trie.path(i))] for i in ahead]
            logits = _tree_pass(
                m,
                cache,
                n_prefix,
                query + [trie.nodes[i].token for i in ahead],
                visible,
                [n_prefix + r for r in range(n_q)]
                + [n_context + trie.nodes[i].depth - 1 for i in ahead],
                [n_q - 1] + [row[i] for i in ahead],
            )
            trie.expand(ROOT, _children_logprobs(logits[0], trie, ROOT))
            held = {i: _children_logprobs(logits[1 + k], trie, i) for k, i in enumerate(ahead)}
            cache.crop(n_context - cache.get_seq_length())  # the first tokens' entries
        else:
            trie.expand(ROOT, _children_logprobs(prefix_last, trie, ROOT))

        def expand(
            nodes: list[int], t: ChoiceTrie = trie, n: int = n_context, held: dict = held
        ) -> None:
            for i in sorted(i for i in nodes if i in held):
                t.expand(i, held.pop(i))
            rest = [i for i in nodes if i not in t.expanded]
            if rest:
                _expand_nodes(m, cache, n, t, rest)

        chosen = trie.search(method, expand)
        logprobs = trie.choice_scores()
        if any(x is not None and not math.isfinite(x) for x in logprobs):
            raise DiffbenchError(f"model {m.info.label!r} gave non-finite log-likelihoods")
        out.append(ChoiceScores(tuple(logprobs), tuple(len(c) for c in choices), chosen))
        cache.crop(n_prefix - cache.get_seq_length())  # back to the prefix alone
    return out


def _children_logprobs(logits: torch.Tensor, trie: ChoiceTrie, i: int) -> dict[int, float]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    tokens = trie.wanted(i)
    return dict(zip(tokens, lp[tokens].tolist(), strict=True))


def _expand_nodes(
    m: HFModel, cache: Any, n_context: int, trie: ChoiceTrie, nodes: list[int]
) -> None:
    """One forward pass over the trie paths to `nodes` (a 4-D mask keeps each token to its
    own ancestors), reading next-token log-probabilities at those nodes only."""
    rows = sorted({j for i in nodes for j in trie.path(i)})
    where = {j: r for r, j in enumerate(rows)}
    logits = _tree_pass(
        m,
        cache,
        n_context,
        [trie.nodes[j].token for j in rows],
        [[where[a] for a in trie.path(j)] for j in rows],
        [n_context + trie.nodes[j].depth - 1 for j in rows],
        [where[i] for i in nodes],
    )
    # Parents before children: a node's score must be known before it is expanded.
    for k in sorted(range(len(nodes)), key=lambda k: nodes[k]):
        trie.expand(nodes[k], _children_logprobs(logits[k], trie, nodes[k]))
    cache.crop(n_context - cache.get_seq_length())


def _tree_pass(
    m: HFModel,
    cache: Any,
    n_context: int,
    tokens: list[int],
    visible: list[list[int]],
    positions: list[int],
    keep: list[int],
) -> torch.Tensor:
    """One pass of `tokens` over the cached context: row r attends to the whole context
    and to the new tokens `visible[r]` (itself included); logits at rows `keep` only."""
    n = len(tokens)
    dtype = m.model.dtype
    mask = torch.full((n, n_context + n), torch.finfo(dtype).min, dtype=dtype)
    mask[:, :n_context] = 0
    for r, cols in enumerate(visible):
        mask[r, [n_context + c for c in cols]] = 0
    return m.model(
        torch.tensor([tokens], device=m.device),
        past_key_values=cache,
        attention_mask=mask[None, None].to(m.device),
        position_ids=torch.tensor([positions], device=m.device),
        use_cache=True,
        logits_to_keep=torch.tensor(keep, device=m.device),
    ).logits[0]


@torch.inference_mode()
def rolling_logprobs(m: HFModel, requests: Sequence[RollingRequest]) -> list[TokenLogprobs]:
    """Every token's log-probability, in windows of the context's length (see
    RollingRequest): lm-eval's `loglikelihood_rolling` when the stride is a whole window."""
    out = []
    for r in requests:
        plan = plan_rolling(m.tokenizer, m.info, r)
        seq = plan.seq
        logprobs: list[float] = []
        for w in plan.windows:
            inputs = torch.tensor([seq[w.start : w.end]], device=m.device)
            logits = m.model(inputs, logits_to_keep=w.n_new).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(seq[w.end - w.n_new + 1 : w.end + 1], device=m.device)
            logprobs += lp.gather(1, targets[:, None])[:, 0].tolist()
        if not all(math.isfinite(x) for x in logprobs):
            raise DiffbenchError(f"model {m.info.label!r} gave non-finite log-probabilities")
        out.append(TokenLogprobs(tuple(plan.ids), tuple(logprobs)))
    return out
