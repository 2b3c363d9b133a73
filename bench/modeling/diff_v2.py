"""DIFF V2 (Differential Transformer V2) as a transformers model, registered with the Auto classes.

The attention of one layer, with h output heads, h_kv key/value heads and head size d:
- `q_proj` makes 2h query heads; `k_proj` and `v_proj` keep h_kv heads. One ordinary attention
  call over the 2h query heads (grouped-query sharing, through transformers' attention-function
  registry, so every kernel transformers has runs it, and so do diffbench's probes). Query heads
  2i and 2i+1 fall in the same GQA group (2h / h_kv is even), so a pair shares its keys and values.
- lambda = sigmoid(W_lambda x): one value per token per output head (`lambda_proj`, no bias,
  then `lambda_sigmoid`, a module of its own so a forward hook can read lambda as the model used
  it).
- out_i = attn_{2i} - lambda_i * attn_{2i+1}, then `o_proj` from h * d back to the model width.
  No per-head RMSNorm, no (1 - lambda_init) factor, no exponential re-parameterisation.
The rest of the block is Llama's (pre-RMSNorm, SwiGLU, RoPE), by subclassing transformers' Llama.

The checkpoint is a folder of config.json (`model_type: "diff_v2"`, Llama's fields, where
`num_attention_heads` counts output heads) and safetensors with Llama's tensor names plus
`self_attn.lambda_proj.weight` (h x hidden) per layer, `q_proj` being (2h * d) x hidden with its
output rows ordered head by head (head 2i then 2i+1). docs/diff-v2.md has the conversion rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

MODEL_TYPE = "diff_v2"


@strict
class DiffV2Config(LlamaConfig):
    """Llama's configuration; `num_attention_heads` is the number of output heads h (the query
    projection makes 2h), `num_key_value_heads` must divide it."""

    model_type = MODEL_TYPE

    def validate_architecture(self) -> None:
        """Refuse head counts that would split a pair across GQA groups."""
        super().validate_architecture()
        if self.num_attention_heads % (self.num_key_value_heads or self.num_attention_heads):
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}) so that query heads 2i and "
                "2i+1 share a key/value head"
            )


class DiffV2Attention(nn.Module):
    """Differential attention V2: 2h query heads in one attention call, out_i = attn_{2i} -
    lambda_i attn_{2i+1} with lambda = sigmoid(W_lambda x) per token and head."""

    def __init__(self, config: DiffV2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # Set by the config's __post_init__ (typed optional there).
        self.head_dim = int(config.head_dim or config.hidden_size // config.num_attention_heads)
        self.num_heads = config.num_attention_heads
        n_kv = int(config.num_key_value_heads or self.num_heads)
        self.num_key_value_groups = 2 * self.num_heads // n_kv
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        width, kv = config.hidden_size, n_kv * self.head_dim
        self.q_proj = nn.Linear(width, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, kv, bias=bias)
        self.v_proj = nn.Linear(width, kv, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=bias)
        self.lambda_proj = nn.Linear(width, self.num_heads, bias=False)
        self.lambda_sigmoid = nn.Sigmoid()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, width) -> (B, L, width), and the attention weights of the 2h heads if the
        kernel returns them."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        # Before the attention call, so a probe reading lambda has it when the call arrives.
        lam = self.lambda_sigmoid(self.lambda_proj(hidden_states))  # (B, L, h)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        # out: (B, L, 2h, d); heads 2i and 2i+1 are a pair.
        out = out[:, :, 0::2] - lam.unsqueeze(-1).to(out.dtype) * out[:, :, 1::2]
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class DiffV2DecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with DIFF V2 attention."""

    def __init__(self, config: DiffV2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.self_attn = DiffV2Attention(config, layer_idx)  # type: ignore[assignment]


_RECORDED = {"hidden_states": DiffV2DecoderLayer, "attentions": DiffV2Attention}


class DiffV2Model(LlamaModel):
    """Llama's decoder stack with DIFF V2 layers."""

    config_class = DiffV2Config
    _no_split_modules = ["DiffV2DecoderLayer"]  # noqa: RUF012 (transformers' own type)
    _can_record_outputs = _RECORDED

    def __init__(self, config: DiffV2Config) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            DiffV2DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.post_init()


class DiffV2ForCausalLM(LlamaForCausalLM):
    """DIFF V2 with a language-modelling head (Llama's)."""

    config_class = DiffV2Config
    _no_split_modules = ["DiffV2DecoderLayer"]  # noqa: RUF012 (transformers' own type)
    _can_record_outputs = _RECORDED

    def __init__(self, config: DiffV2Config) -> None:
        super().__init__(config)
        self.model = DiffV2Model(config)
        self.post_init()


def register() -> None:
    """Make AutoConfig, AutoModel and AutoModelForCausalLM know `model_type: diff_v2`."""
    AutoConfig.register(MODEL_TYPE, DiffV2Config, exist_ok=True)
    AutoModel.register(DiffV2Config, DiffV2Model, exist_ok=True)
    AutoModelForCausalLM.register(DiffV2Config, DiffV2ForCausalLM, exist_ok=True)


register()

__all__ = [
    "MODEL_TYPE",
    "DiffV2Attention",
    "DiffV2Config",
    "DiffV2ForCausalLM",
    "DiffV2Model",
    "register",
]
