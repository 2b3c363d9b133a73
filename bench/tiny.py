"""Tiny matched Llama / DiffLlama / DIFF V2 checkpoints: a BPE tokenizer and matched configs.

Used by the test suite (random-init pairs) and by scripts/train_pair.py (the shipped pair).
The matching rule follows the paper: same layers, width, head dimension and parameter count.
transformers' DiffLlama counts `num_attention_heads` as the *baseline's* heads and pairs Q/K head
i with head i + H/2 (V heads concatenated), so giving both configs the same head count, head dim
and KV heads yields identical projection shapes: the DIFF model has H/2 differential heads of
value width 2d, and 4 * head_dim extra lambda parameters per layer.

DIFF V2 keeps the baseline's h heads of size d as its output heads; its query projection makes 2h
heads and its lambda projection h values per token, (h * d + h) x hidden parameters more per
layer than the baseline's attention. Its MLP gives them back: 3 x hidden parameters per unit of
intermediate size, so the intermediate size shrinks by (h * d + h) / 3, rounded, and the totals
match exactly when that division is exact (the shipped set's 128-wide layers: 256 -> 168).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffbench.modeling.diff_v2 import DiffV2Config, DiffV2ForCausalLM
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, digits split one per token, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    # Single-digit tokens make every 7-digit number exactly 7 tokens, for any model trained here.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def matched_configs(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    head_dim: int = 16,
    intermediate_size: int = 128,
    max_context: int = 2048,
) -> tuple[LlamaConfig, DiffLlamaConfig]:
    """A Llama config and the DiffLlama config matched to it under the paper's rule."""
    shared = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=head_dim,
        max_position_embeddings=max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**shared), DiffLlamaConfig(**shared)


def v2_config(base: LlamaConfig) -> DiffV2Config:
    """The DIFF V2 config matched to a Llama config: the same heads as its output heads, the MLP
    narrowed by the extra query and lambda projections' parameters (module docstring)."""
    h, width = base.num_attention_heads, base.hidden_size
    d = int(base.head_dim or width // h)
    extra = (h * d + h) * width * base.num_hidden_layers
    per_unit = 3 * width * base.num_hidden_layers
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        fields.pop(key, None)
    fields["intermediate_size"] = base.intermediate_size - round(extra / per_unit)
    return DiffV2Config(**fields)


# Each tiny model's class (its config: tiny_configs).
ARCHITECTURES = {
    "tiny-base": LlamaForCausalLM,
    "tiny-diff": DiffLlamaForCausalLM,
    "tiny-diff2": DiffV2ForCausalLM,
}


def tiny_configs(tokenizer: PreTrainedTokenizerFast, **config_kwargs: int) -> dict[str, Any]:
    """The matched configs of tiny-base, tiny-diff and tiny-diff2, by name."""
    base, diff = matched_configs(tokenizer, **config_kwargs)
    return {"tiny-base": base, "tiny-diff": diff, "tiny-diff2": v2_config(base)}


def save_random_pair(
    out_dir: Path, texts: Iterable[str], seed: int = 0, **config_kwargs: int
) -> dict[str, Path]:
    """Random-init Llama, DiffLlama and DIFF V2 checkpoints sharing one tokenizer; returns their
    folders by name (tiny-base, tiny-diff, tiny-diff2)."""
    import torch

    tokenizer = train_tokenizer(texts, vocab_size=512)
    paths = {}
    for name, cfg in tiny_configs(tokenizer, **config_kwargs).items():
        torch.manual_seed(seed)
        model = ARCHITECTURES[name](cfg)
        path = out_dir / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
