"""DiffLlama (Differential Transformer attention) as an out-of-tree vLLM model.

transformers' DiffLlama splits the H query heads, the Hkv key heads and the Hkv value heads of
size d in halves: query head h < H/2 gives the first softmax map, head h + H/2 the second, and
both maps weigh the same value, the pair of value heads (k, k + Hkv/2) joined to size 2d, where
k is the key head of query head h. The pair's output `(A1 - lambda * A2) V`, normalised per pair
(RMS over 2d) and scaled by 1 - lambda_init, feeds o_proj in pair order.

vLLM's attention keeps one head size for K and V, so both maps run in *one* attention call of
head size 2d over Hkv/2 packed key/value heads: packed head k holds keys [K_k ; K_{k+Hkv/2}] and
values [V_k ; V_{k+Hkv/2}]; a first-map query is padded to [q ; 0] and a second-map query to
[0 ; q], so each sees only its own key half while both read the whole 2d value. The softmax
scale stays d^-0.5. The paged KV cache holds exactly what transformers' cache holds (Hkv heads
of K and of V, size d), and only the query side pays for the padding (2x the QK^T products).

Weights load from transformers' own safetensors: q/k/v rows are permuted at load time so that
each packed group's heads are contiguous, and vLLM's tensor-parallel sharding (contiguous) then
gives each rank whole Q/K head pairs; tensor_parallel_size must divide Hkv/2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from diffbench.backends.vllm.projections import llama_projections
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType


def lambda_init_fn(layer_idx: int) -> float:
    """transformers' DiffLlama lambda_init for a 0-based layer index."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def head_orders(n_heads: int, n_kv_heads: int) -> tuple[list[int], list[int]]:
    """Checkpoint head indices in the order this model stores them: queries grouped per packed
    key/value head (its g first-map heads, then its g second-map heads), keys and values as
    adjacent pairs (k, k + Hkv/2)."""
    half, g = n_kv_heads // 2, n_heads // n_kv_heads
    q_order = [
        h
        for k in range(half)
        for h in (
            *range(k * g, (k + 1) * g),
            *range(n_heads // 2 + k * g, n_heads // 2 + (k + 1) * g),
        )
    ]
    kv_order = [j for k in range(half) for j in (k, k + half)]
    return q_order, kv_order


class DiffLlamaAttention(nn.Module):
    """Differential attention on vLLM's layers; the constructor takes LlamaAttention's
    arguments, so vLLM's LlamaDecoderLayer builds it."""

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
        layer_idx = extract_layer_index(prefix)
        tp = get_tensor_model_parallel_world_size()
        if num_kv_heads % 2 or num_heads % num_kv_heads:
            raise ValueError(
                f"DiffLlama needs an even num_key_value_heads dividing num_attention_heads, got "
                f"{num_kv_heads} and {num_heads}"
            )
        if (num_kv_heads // 2) % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_key_value_heads / 2 = "
                f"{num_kv_heads // 2}: each rank holds whole DIFF head pairs"
            )
        d = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.head_dim = d
        self.num_heads = num_heads // tp
        self.num_kv_heads = num_kv_heads // tp
        self.group = num_heads // num_kv_heads
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.lambda_init = lambda_init_fn(layer_idx)
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))

        self.qkv_proj, self.o_proj, self.rotary_emb = llama_projections(
            config, hidden_size, d, num_heads, num_kv_heads, num_heads,
            max_position_embeddings, quant_config, bias, bias_o_proj, prefix,
        )  # fmt: skip
        self.attn = Attention(
            self.num_heads,
            2 * d,
            d**-0.5,
            num_kv_heads=self.num_kv_heads // 2,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
        )
        # Replicated on every rank; loaded from the checkpoint.
        self.lambda_q1 = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.lambda_k1 = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.lambda_q2 = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.lambda_k2 = nn.Parameter(torch.zeros(d), requires_grad=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        d, g = self.head_dim, self.group
        n_pack = self.num_kv_heads // 2
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        n = q.shape[0]
        q = q.reshape(n, n_pack, 2, g, d)
        zeros = q.new_zeros(n, n_pack, g, d)
        padded = torch.stack(
            (torch.cat((q[:, :, 0], zeros), dim=-1), torch.cat((zeros, q[:, :, 1]), dim=-1)), dim=2
        )
        out = self.attn(padded.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1))
        out = out.view(n, n_pack, 2, g, 2 * d)
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dtype=torch.float32))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dtype=torch.float32))
        lambda_full = (lambda_1 - lambda_2 + self.lambda_init).to(out.dtype)
        diff = (out[:, :, 0] - lambda_full * out[:, :, 1]).float()
        diff = diff * torch.rsqrt(diff.pow(2).mean(-1, keepdim=True) + self.eps)
        diff = ((1 - self.lambda_init) * diff).to(out.dtype)
        output, _ = self.o_proj(diff.reshape(n, -1))
        return output


class DiffLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer (the two RMSNorms and the SwiGLU MLP) with DIFF attention."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: object = None) -> None:
        super().__init__(
            vllm_config=vllm_config,
            prefix=prefix,
            config=config,
            attn_layer_type=DiffLlamaAttention,
        )


class DiffLlamaForCausalLM(LlamaForCausalLM):
    """transformers' DiffLlamaForCausalLM on vLLM: paged KV cache, tensor and pipeline
    parallelism, the same safetensors."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DiffLlamaDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        config = self.config
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        q_order, kv_order = head_orders(n_heads, n_kv)

        def permuted() -> Iterable[tuple[str, torch.Tensor]]:
            for name, w in weights:
                proj = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
                if ".self_attn." in name and proj in ("q_proj", "k_proj", "v_proj"):
                    order = q_order if proj == "q_proj" else kv_order
                    w = w.reshape(len(order), -1, *w.shape[1:])[order].reshape(w.shape)
                yield name, w

        return super().load_weights(permuted())
