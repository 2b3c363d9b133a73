"""The token trie of a request's choices, and the three ways of searching it.

Choices that share leading tokens share trie nodes, so each distinct (context, token prefix) is
computed once. A node is *expanded* when the model's next-token log-probabilities after its path
are known; that gives its children their scores (summed log-probabilities from the context).

- `full`: expand every internal node (one pass); every choice gets its exact log-likelihood.
- `best`: best-first with pruning. Log-probabilities are <= 0, so a path's score only falls as
  it grows: once some complete choice scores s, no node scoring below s needs expanding. The
  argmax is exact; most of a large label set is never computed past its first token.
- `greedy`: greedy decoding restricted to the choices' token sequences (Bertsch et al. 2024).
  Where one choice ends and another continues (" The" and " The old bridge"), stopping is a
  decision like any other: it is scored as the model's probability of the choice's *end token*
  (what follows a complete choice: a separator or end-of-sequence), against each continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Method = Literal["full", "best", "greedy"]
ROOT = 0


@dataclass
class Node:
    token: int
    parent: int
    depth: int
    children: dict[int, int] = field(default_factory=dict)  # token -> node index
    ends: list[int] = field(default_factory=list)  # choices that end here
    score: float | None = None
    # Where a choice ends here and others continue: the token that ends it, and the score of
    # taking it (set when the node is expanded).
    end_token: int | None = None
    end_score: float | None = None


class ChoiceTrie:
    """Choices' token sequences as a trie; parents always precede their children in `nodes`."""

    def __init__(
        self, choices: list[list[int]], end_tokens: Sequence[int | None] | None = None
    ) -> None:
        """`end_tokens[c]`: the token that ends choice c, needed only where another choice
        continues it and the search is `greedy`."""
        self.nodes = [Node(token=-1, parent=-1, depth=0, score=0.0)]
        self.end_of: list[int] = []
        # (choice, position) of the first choice whose path runs through each node.
        self.via: dict[int, tuple[int, int]] = {}
        self.expanded: set[int] = set()
        for ci, tokens in enumerate(choices):
            cur = ROOT
            for pos, tok in enumerate(tokens):
                nxt = self.nodes[cur].children.get(tok)
                if nxt is None:
                    nxt = len(self.nodes)
                    self.nodes.append(Node(tok, cur, self.nodes[cur].depth + 1))
                    self.nodes[cur].children[tok] = nxt
                    self.via[nxt] = (ci, pos)
                cur = nxt
            self.nodes[cur].ends.append(ci)
            self.end_of.append(cur)
        if end_tokens is not None:
            for ci, end in enumerate(self.end_of):
                node = self.nodes[end]
                if node.children and node.end_token is None:
                    node.end_token = end_tokens[ci]

    def wanted(self, i: int) -> list[int]:
        """Tokens whose log-probabilities after node i's path its expansion needs."""
        node = self.nodes[i]
        extra = [node.end_token] if node.end_token is not None else []
        return [*node.children, *(t for t in extra if t not in node.children)]

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to `i` (the root itself excluded)."""
        out = []
        while i != ROOT:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def expand(self, i: int, next_logprob: Mapping[int, float]) -> None:
        """Record node i's next-token log-probabilities (token -> logprob for its children)."""
        node = self.nodes[i]
        assert node.score is not None, "a node is expanded only after its parent"
        for tok, child in node.children.items():
            self.nodes[child].score = node.score + next_logprob[tok]
        if node.end_token is not None:
            node.end_score = node.score + next_logprob[node.end_token]
        self.expanded.add(i)

    def choice_scores(self) -> list[float | None]:
        """Each choice's summed log-probability, None where the search never reached its end."""
        return [self.nodes[e].score for e in self.end_of]

    def _argmax_known(self) -> int:
        scores = self.choice_scores()
        known = [(s, -i) for i, s in enumerate(scores) if s is not None]
        return -max(known)[1]

    def search(self, method: Method, expand: Callable[[list[int]], None]) -> int:
        """Run `method`, calling `expand(nodes)` to compute nodes' next-token log-probabilities
        (which must call `self.expand` for each, in increasing index order); return the chosen
        choice. The root must already be expanded."""
        nodes = self.nodes
        if method == "full":
            internal = [i for i in range(1, len(nodes)) if nodes[i].children]
            if internal:
                expand(internal)
            return self._argmax_known()
        if method == "best":
            while True:
                done = [s for s in self.choice_scores() if s is not None]
                bar = max(done) if done else float("-inf")
                frontier = [
                    i
                    for i in range(1, len(nodes))
                    if i not in self.expanded
                    and nodes[i].children
                    and nodes[i].score is not None
                    and nodes[i].score > bar  # type: ignore[operator]
                ]
                if not frontier:
                    return self._argmax_known()
                expand(frontier)
        cur = ROOT
        while nodes[cur].children:
            if cur not in self.expanded:
                expand([cur])
            options = [(nodes[c].score, -c) for c in nodes[cur].children.values()]
            if nodes[cur].ends:
                if nodes[cur].end_score is None:
                    raise ValueError(
                        "greedy search over choices that extend one another needs "
                        "each such choice's end token"
                    )
                options.append((nodes[cur].end_score, 1))  # ending wins a tie: it is shorter
            best = max(options)
            if best[1] == 1:
                break
            cur = -best[1]
        return nodes[cur].ends[0]


def search_pair_passes(
    choices: list[list[int]],
    end_tokens: Sequence[int | None],
    per_token: list[list[float]],
    end_lp: list[float | None],
    method: Method,
) -> tuple[list[float | None], int]:
    """`method` over log-probabilities already computed one (context, choice) pair at a time, the
    backends' reference scoring: `per_token[k]` is choice k's per-token log-probabilities,
    `end_lp[k]` its end token's after it. Returns each choice's score (every choice's exact sum
    under `full`, as a reference must report them; the search's own scores otherwise) and the
    chosen choice."""
    trie = ChoiceTrie(choices, end_tokens)

    def expand(nodes: list[int]) -> None:
        # A child's next-token log-probability, read off the pass through a choice below it.
        for i in nodes:
            node = trie.nodes[i]
            lps = {t: per_token[trie.via[c][0]][trie.via[c][1]] for t, c in node.children.items()}
            if node.end_token is not None:
                lps.setdefault(node.end_token, end_lp[node.ends[0]])  # type: ignore[arg-type]
            trie.expand(i, lps)

    expand([ROOT])
    chosen = trie.search(method, expand)
    if method == "full":
        return [sum(t) for t in per_token], chosen
    return trie.choice_scores(), chosen
