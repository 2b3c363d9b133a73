"""DIFF V2 (bench/modeling/diff_v2.py) as an out-of-tree vLLM model.

With h output heads, h_kv key/value heads and head size d, `q_proj` makes 2h query heads and one
ordinary attention call runs them over the h_kv key/value heads (grouped-query sharing: 2h / h_kv
is even, so query heads 2i and 2i+1 read the same key/value head). Per token and output head,
lambda_i = sigmoid(lambda_proj(x))_i and out_i = attn_{2i} - lambda_i * attn_{2i+1}; `o_proj`
takes the h outputs back to the model width. The rest of the block is Llama's.

That is vLLM's own `Attention` with num_heads = 2h and num_kv_heads = h_kv: no custom kernel, one
attention and one paged KV cache per layer (the same h_kv heads transformers' cache holds), and
prefix caching, continuous batching and tensor parallelism apply as to Llama.

Weights are transformers' safetensors, loaded by vLLM's Llama loader: `q_proj` ((2h * d) x hidden,
head by head), `k_proj` and `v_proj` stack into `qkv_proj` as Llama's do, and
`self_attn.lambda_proj.weight` (h x hidden) loads by its own name. Tensor parallelism splits the
2h query heads, the h lambda rows and o_proj's h * d input columns contiguously, so each rank
holds whole pairs with their lambdas: tensor_parallel_size must divide h.
"""

from __future__ import annotations

import torch
from diffbench.backends.vllm.projections import llama_projections
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.v1.attention.backend import AttentionType


class DiffV2Attention(nn.Module):
    """DIFF V2 attention on vLLM's layers; the constructor takes LlamaAttention's arguments
    (num_heads: the h output heads), so vLLM's LlamaDecoderLayer builds it."""

    def __init__(
        self,
        config: object,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"DIFF V2 needs num_key_value_heads ({num_kv_heads}) dividing "
                f"num_attention_heads ({num_heads}), so that query heads 2i and 2i+1 share a "
                "key/value head"
            )
        if num_heads % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_attention_heads = {num_heads}: each "
                "rank holds whole DIFF V2 head pairs"
            )
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_key_value_heads = {num_kv_heads} "
                "(or be a multiple of it)"
            )
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp} must be a multiple of num_key_value_heads = "
                f"{num_kv_heads} (or divide it)"
            )
        # transformers' Llama config always sets head_dim (hidden / h when unset).
        d = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.head_dim = d
        self.num_heads = num_heads // tp  # output heads on this rank
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.q_size = 2 * self.num_heads * d
        self.kv_size = self.num_kv_heads * d

        # 2h query heads; o_proj from the h output heads.
        self.qkv_proj, self.o_proj, self.rotary_emb = llama_projections(
            config, hidden_size, d, 2 * num_heads, num_kv_heads, num_heads,
            max_position_embeddings, quant_config, bias, bias_o_proj, prefix,
        )  # fmt: skip
        self.lambda_proj = ColumnParallelLinear(
            input_size=hidden_size,
            output_size=num_heads,
            bias=False,
            gather_output=False,
            quant_config=quant_config,
            prefix=f"{prefix}.lambda_proj",
        )
        self.attn = Attention(
            2 * self.num_heads,
            d,
            d**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        lam, _ = self.lambda_proj(hidden_states)
        lam = torch.sigmoid(lam)  # (n, h on this rank)
        out = self.attn(q, k, v)  # (n, 2h * d): heads 2i and 2i+1 are a pair
        n = out.shape[0]
        out = out.view(n, self.num_heads, 2, self.head_dim)
        diff = out[:, :, 0] - lam.unsqueeze(-1).to(out.dtype) * out[:, :, 1]
        output, _ = self.o_proj(diff.reshape(n, -1))
        return output


class DiffV2DecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer (the two RMSNorms and the SwiGLU MLP) with DIFF V2
    attention."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: object = None) -> None:
        super().__init__(
            vllm_config=vllm_config,
            prefix=prefix,
            config=config,
            attn_layer_type=DiffV2Attention,
        )


class DiffV2ForCausalLM(LlamaForCausalLM):
    """diffbench's transformers DiffV2ForCausalLM on vLLM: paged KV cache, tensor and pipeline
    parallelism, the same safetensors (loaded by vLLM's Llama loader, `lambda_proj` by name)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DiffV2DecoderLayer)
