"""Does a model of the shipped pair's size learn labels in context? Evaluate checkpoints on
in-context labelling episodes, or train one model from scratch on such episodes alone.

    python scripts/probe_icl.py eval bench/models --json /tmp/icl_probe.json
    python scripts/probe_icl.py train --model tiny-diff --steps 10000 --out /tmp/icl-diff

Episodes (labels drawn afresh per episode, so only the context tells them; chance 1 / classes;
each candidate label scored by its summed log-likelihood after the query):
- `keyed-digits`: `utterance: <city>\\nintent: <4-digit number>`, each key repeated, the query a
  key seen before: binding a key to a number, which the shipped tiny-diff does.
- `keyed-words`: the same with colour-animal or nonsense-word labels.
- `intent-N`: N intents of the icl task's generated set, a fresh utterance as the query: the icl
  task itself, at a small scale.
- `toy-N`: N word categories of the training curriculum (`text: pear plum\\nlabel: zoka`).

`train` builds the `default` preset's model (Llama or DiffLlama, the same seed) and trains it on
a stream of intent (40%), toy (30%) and keyed (30%) episodes of 128 tokens, nothing else,
evaluating every `--every` steps: in-context learning in its easiest setting, with none of the
curriculum's other data to compete for the model's capacity. docs/pair_copy.md has the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffbench.tasks import icl_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_pair as tp

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny-base", "tiny-diff")
# (kind, classes, demonstrations)
EPISODES = (
    ("keyed-digits", 4, 8),
    ("keyed-words", 4, 8),
    ("intent", 2, 6),
    ("intent", 4, 8),
    ("intent", 6, 16),
    ("toy", 2, 6),
    ("toy", 4, 8),
)


def labels_for(kind: str, n: int, rng: random.Random) -> list[str]:
    """n distinct labels: 4-digit numbers for keyed-digits, else colour-animal or nonsense."""
    labels: list[str] = []
    while len(labels) < n:
        if kind == "keyed-digits":
            label = str(rng.randint(1000, 9999))
        else:
            label = tp.colour_animal(rng) if rng.random() < 0.5 else tp.nonsense_word(rng)
        if label not in labels:
            labels.append(label)
    return labels


def episode(kind: str, n: int, demos: int, rng: random.Random) -> tuple[str, list[str], int]:
    """A prompt ending at the query's label cue, its candidate labels and the true one's index."""
    labels = labels_for(kind, n, rng)
    order = [i % n for i in range(demos)]
    rng.shuffle(order)
    target = rng.randrange(n)
    if kind.startswith("keyed"):
        keys = rng.sample(list(tp.CITIES), n)
        shots = [(keys[c], c) for c in order]
        query = keys[target]
        field, label, sep = "utterance", "intent", "\n\n"
    elif kind == "intent":
        intents = rng.sample(list(icl_datasets.INTENTS), n)

        def say(c: int) -> str:
            return icl_datasets._utterance(icl_datasets.INTENTS[intents[c]], rng)

        shots = [(say(c), c) for c in order]
        query = say(target)
        field, label, sep = "utterance", "intent", "\n\n"
    else:
        cats = rng.sample(range(len(tp.CATEGORIES)), n)
        query = rng.choice(tp.CATEGORIES[cats[target]])
        words = {c: [w for w in tp.CATEGORIES[cats[c]] if w != query] for c in range(n)}
        shots = [(" ".join(rng.sample(words[c], rng.randint(1, 3))), c) for c in order]
        field, label, sep = "text", "label", "\n"
    body = sep.join(f"{field}: {text}\n{label}: {labels[c]}" for text, c in shots)
    return f"{body}{sep}{field}: {query}\n{label}:", labels, target


@torch.no_grad()
def accuracy(model: PreTrainedModel, tok: Any, kind: str, n: int, demos: int, count: int) -> float:
    """Share of `count` seeded episodes whose true label has the highest summed log-likelihood."""
    was_training = model.training
    model.eval()
    rng = random.Random(f"probe-icl|{kind}|{n}|{demos}")
    hits = 0
    for _ in range(count):
        prompt, labels, target = episode(kind, n, demos, rng)
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        conts = [tok(" " + lab, add_special_tokens=False)["input_ids"] for lab in labels]
        width = max(map(len, conts))
        batch = torch.tensor([ids + c + [tok.pad_token_id] * (width - len(c)) for c in conts])
        logp = model(batch).logits[:, len(ids) - 1 : -1].float().log_softmax(-1)
        scores = [sum(logp[j, i, t].item() for i, t in enumerate(c)) for j, c in enumerate(conts)]
        hits += max(range(n), key=lambda i: (scores[i], -i)) == target
    model.train(was_training)
    return hits / count


def evaluate(model: PreTrainedModel, tok: Any, count: int) -> dict[str, float]:
    """Accuracy on every episode kind, keyed `kind-classes`."""
    out = {}
    for kind, n, demos in EPISODES:
        name = kind if kind.startswith("keyed") else f"{kind}-{n}"
        out[name] = round(accuracy(model, tok, kind, n, demos, count), 3)
    return out


def cmd_eval(args: argparse.Namespace) -> dict:
    tok = AutoTokenizer.from_pretrained(args.pair / MODELS[0])
    result = {}
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(args.pair / name)
        result[name] = evaluate(model, tok, args.episodes)
        print(name, result[name], flush=True)
    return {"pair": str(args.pair), "episodes": args.episodes, "accuracy": result}


def cmd_train(args: argparse.Namespace) -> dict:
    tok = AutoTokenizer.from_pretrained(REPO / "bench" / "models" / MODELS[0])
    seg = tp.SegmentLengths(tok)
    stage = tp.Stage(args.steps, 128, 16, (3, 4), (3, 4), classification=0.3, intents=0.4,
                     keyed=0.3, documents=0.0)  # fmt: skip
    preset = dataclasses.replace(tp.DEFAULT, stages=(stage,), warmup_steps=100, decay_steps=1000)
    run = tp.build_runs(preset, tok, args.seed)[MODELS.index(args.model)]
    rng = random.Random(args.seed)
    log: list[dict] = []
    labels: list[float] = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids, kinds = tp.make_batch(rng, stage, seg, preset.intent_names)
        loss, _lm, _ans, label = tp.weighted_loss(run.model, ids, kinds)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
        run.scheduler.step()
        if not math.isnan(label):
            labels.append(label)
        if step % args.every == 0 or step == args.steps:
            recent = labels[-200:]
            row = {
                "step": step,
                "label_loss": round(sum(recent) / max(1, len(recent)), 4),
                "seconds": round(time.time() - t0),
                **evaluate(run.model, tok, args.episodes),
            }
            log.append(row)
            print(run.name, row, flush=True)
            run.model.save_pretrained(args.out)
    return {"model": args.model, "steps": args.steps, "seed": args.seed, "log": log}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="evaluate a pair directory (tiny-base/, tiny-diff/)")
    ev.add_argument("pair", type=Path)
    tr = sub.add_parser("train", help="train one model from scratch on ICL episodes alone")
    tr.add_argument("--model", choices=MODELS, required=True)
    tr.add_argument("--steps", type=int, default=10_000)
    tr.add_argument("--every", type=int, default=1000, help="evaluate every this many steps")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", type=Path, required=True, help="where the model is saved")
    for p in (ev, tr):
        p.add_argument("--episodes", type=int, default=40, help="episodes per kind")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = cmd_eval(args) if args.command == "eval" else cmd_train(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
