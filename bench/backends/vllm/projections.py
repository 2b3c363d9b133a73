"""The layers DIFF V1 and V2 share with vLLM's LlamaAttention: the fused QKV projection, the output
projection and Llama's rotary embedding, built from vLLM's own parallel layers."""

from __future__ import annotations

from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope


def llama_projections(
    config: object,
    hidden_size: int,
    head_dim: int,
    n_query: int,
    n_kv: int,
    n_out: int,
    max_position_embeddings: int,
    quant_config: QuantizationConfig | None,
    bias: bool,
    bias_o_proj: bool,
    prefix: str,
) -> tuple[QKVParallelLinear, RowParallelLinear, nn.Module]:
    """`qkv_proj` (n_query query and n_kv key/value heads of head_dim), `o_proj` (from n_out
    heads back to hidden_size) and the rotary embedding (neox style, as transformers' Llama)."""
    qkv_proj = QKVParallelLinear(
        hidden_size=hidden_size,
        head_size=head_dim,
        total_num_heads=n_query,
        total_num_kv_heads=n_kv,
        bias=bias,
        quant_config=quant_config,
        prefix=f"{prefix}.qkv_proj",
    )
    o_proj = RowParallelLinear(
        input_size=n_out * head_dim,
        output_size=hidden_size,
        bias=bias_o_proj,
        quant_config=quant_config,
        prefix=f"{prefix}.o_proj",
    )
    rotary_emb = get_rope(
        head_dim,
        max_position=max_position_embeddings,
        rope_parameters=getattr(config, "rope_parameters", None),
        is_neox_style=True,
    )
    return qkv_proj, o_proj, rotary_emb
