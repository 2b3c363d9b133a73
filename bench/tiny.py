"""Tiny matched Llama / DiffLlama checkpoints: a trained BPE tokenizer and paired configs.

Used by the test suite (random-init pairs) and by scripts/train_pair.py (the shipped pair).
The matching rule follows the paper: same layers, width, head dimension and parameter count.
transformers' DiffLlama counts `num_attention_heads` as the *baseline's* heads and pairs Q/K head
i with head i + H/2 (V heads concatenated), so giving both configs the same head count, head dim
and KV heads yields identical projection shapes: the DIFF model has H/2 differential heads of
value width 2d, and 4 * head_dim extra lambda parameters per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


def save_random_pair(
    out_dir: Path, texts: Iterable[str], seed: int = 0, **config_kwargs: int
) -> dict[str, Path]:
    """Random-init Llama and DiffLlama checkpoints sharing one tokenizer; returns their folders."""
    import torch

    tokenizer = train_tokenizer(texts, vocab_size=512)
    base_cfg, diff_cfg = matched_configs(tokenizer, **config_kwargs)
    paths = {}
    for name, cls, cfg in (
        ("tiny-base", LlamaForCausalLM, base_cfg),
        ("tiny-diff", DiffLlamaForCausalLM, diff_cfg),
    ):
        torch.manual_seed(seed)
        model = cls(cfg)
        path = out_dir / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
