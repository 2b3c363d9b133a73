"""DIFF V2 (`diffbench.modeling.diff_v2`): parity with a plain-torch implementation of its
formulas written here, loading by path in a fresh process, and the probes' view of it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffbench.api import ActivationRequest, AttentionRequest
from diffbench.backends import probes
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget, encode_prompt
from diffbench.modeling.diff_v2 import DiffV2Config, DiffV2ForCausalLM
from diffbench.tasks import haystack
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_probes import check_summary, eager_last_row, eager_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

# h = 4 output heads (8 query heads), h_kv = 2: each KV head serves two pairs.
GQA = dict(
    vocab_size=512,  # the tiny tokenizer's, so a saved folder can carry it
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def gqa_model() -> DiffV2ForCausalLM:
    torch.manual_seed(0)
    model = DiffV2ForCausalLM(DiffV2Config(**GQA)).eval()
    with torch.no_grad():  # lambda away from 0.5 and varying per token, so its use is tested
        for layer in model.model.layers:
            layer.self_attn.lambda_proj.weight.normal_(0, 0.5)
    return model


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout: x (B, H, L, d), positions (B, L)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None, :, None].float() * inv  # (B, 1, L, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def plain_diff_v2(
    model: DiffV2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Logits from the formulas alone: the model supplies only its weights."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    b, n = ids.shape
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = sd["model.embed_tokens.weight"][ids]
    # Query i attends key j iff j <= i and key j is a real token.
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & mask[:, None, :].bool()
    allowed |= torch.eye(n, dtype=torch.bool)  # a padding query (ignored) sees itself, not NaN
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (a @ sd[p + "self_attn.q_proj.weight"].T).view(b, n, 2 * h, d).transpose(1, 2)
        k = (a @ sd[p + "self_attn.k_proj.weight"].T).view(b, n, hkv, d).transpose(1, 2)
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(b, n, hkv, d).transpose(1, 2)
        theta = cfg.rope_parameters["rope_theta"]
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        group = 2 * h // hkv  # query head j reads KV head j // group
        out = []
        lam = torch.sigmoid(a @ sd[p + "self_attn.lambda_proj.weight"].T)  # (B, L, h)
        for head in range(h):
            maps = []
            for j in (2 * head, 2 * head + 1):
                s = q[:, j] @ k[:, j // group].transpose(1, 2) / math.sqrt(d)
                s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
                maps.append(s @ v[:, j // group])
            out.append(maps[0] - lam[..., head : head + 1] * maps[1])
        attn = torch.cat(out, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + attn
        m = rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = torch.nn.functional.silu(m @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("implementation", ["sdpa", "eager", probes.ATTENTION])
def test_diff_v2_equals_its_formulas_with_gqa_and_a_left_padded_batch(gqa_model, implementation):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, GQA["vocab_size"], (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # the second row left-padded by 4
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gqa_model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            got = gqa_model(ids, attention_mask=mask, position_ids=pos).logits
    finally:
        gqa_model.set_attn_implementation("sdpa")
    want = plain_diff_v2(gqa_model, ids, mask, pos)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=2e-5), (got[real] - want[real]).abs().max()
    # The padded row's real tokens are the same sequence run alone.
    with torch.no_grad():
        alone = gqa_model(ids[1:, 4:]).logits[0]
    assert torch.allclose(got[1, 4:], alone, atol=2e-5)


def test_lambda_is_per_token_and_head_and_changes_the_output(gqa_model):
    ids = torch.arange(4, 14)[None]
    attn = gqa_model.model.layers[0].self_attn
    seen = []
    handle = attn.lambda_sigmoid.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            base = gqa_model(ids).logits
    finally:
        handle.remove()
    (lam,) = seen
    assert lam.shape == (1, 10, GQA["num_attention_heads"])
    assert float(lam.std(dim=1).min()) > 1e-3 and float(lam.std(dim=2).min()) > 1e-3
    with torch.no_grad():
        attn.lambda_proj.weight.mul_(2)
        try:
            assert not torch.allclose(gqa_model(ids).logits, base, atol=1e-4)
        finally:
            attn.lambda_proj.weight.div_(2)


def test_a_config_that_splits_a_pair_across_kv_groups_is_refused():
    with pytest.raises(StrictDataclassClassValidationError, match="must divide"):
        DiffV2Config(**{**GQA, "num_key_value_heads": 3})


LOAD = """
import json, sys, torch
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget
path = sys.argv[1]
b = HFBackend("v2", path, LoadTarget(path), HFOptions())
with torch.no_grad():
    logits = b.model(torch.tensor([list(range(4, 20))])).logits
print(json.dumps({"type": type(b.model).__name__, "logits": logits.flatten().tolist()}))
"""


def test_a_saved_v2_folder_loads_back_by_path_in_a_fresh_process_with_identical_logits(
    gqa_model, tiny_pair, tmp_path
):
    gqa_model.save_pretrained(tmp_path / "v2")
    AutoTokenizer.from_pretrained(tiny_pair["tiny-diff2"]).save_pretrained(tmp_path / "v2")
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["model_type"] == "diff_v2" and "auto_map" not in config
    res = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "v2")],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["type"] == "DiffV2ForCausalLM"
    with torch.no_grad():
        want = gqa_model(torch.tensor([list(range(4, 20))])).logits.flatten()
    assert torch.equal(torch.tensor(got["logits"]), want)
    # And through transformers' own Auto class, without trust_remote_code.
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "v2")
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([list(range(4, 20))])).logits.flatten(), want)


# ---- probes ---------------------------------------------------------------------------------


def backend(path: Path, **options: object) -> HFBackend:
    return HFBackend("m", str(path), LoadTarget(str(path)), HFOptions(**options))  # type: ignore[arg-type]


def test_v2_logit_maps_are_the_even_and_the_odd_query_heads(tiny_pair, monkeypatch):
    monkeypatch.setattr(probes, "BLOCK_ELEMENTS", 20_000)
    b = backend(tiny_pair["tiny-diff2"])
    t = haystack.procedural_text(1, 500)
    ids = encode_prompt(b.tokenizer, t)
    (stats,) = b.activation_stats([ActivationRequest(t, ("attention_logits",), top_k=50)])
    by_key = {(s.layer, s.map): s for s in stats.summaries}
    for layer, logits in enumerate(eager_logits(b, ids)):
        assert logits.shape[0] == 2 * b.model.config.num_attention_heads
        check_summary(by_key[layer, "both"], logits, 50)
        check_summary(by_key[layer, "1"], logits[0::2], 50)
        check_summary(by_key[layer, "2"], logits[1::2], 50)


def test_v2_allocation_uses_the_models_own_lambda_per_head(tiny_pair):
    b = backend(tiny_pair["tiny-diff2"])
    prompt = haystack.procedural_text(12, 300)
    ids = encode_prompt(b.tokenizer, prompt)
    (mass,) = b.attention_mass([AttentionRequest(prompt, ((0, len(prompt)),))])
    assert mass.warnings == ()
    lambdas = []
    hooks = [
        layer.self_attn.lambda_sigmoid.register_forward_hook(
            lambda _m, _a, out: lambdas.append(out[0, -1])
        )
        for layer in b.model.model.layers
    ]
    try:
        rows = eager_last_row(b, ids)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, row in enumerate(rows):
        lam = lambdas[layer][:, None]
        diff = (row[0::2] - lam * row[1::2]) / (1 - lam)  # (h, keys), each sums to 1
        assert torch.allclose(diff.sum(-1), torch.ones(diff.shape[0]), atol=1e-5)
        pos, neg = diff.clamp(min=0).mean(0), (-diff).clamp(min=0).mean(0)
        assert math.isclose(mass.masses[layer][0], float(pos[1:].sum()), abs_tol=1e-5)
        assert math.isclose(mass.negative[layer][0], float(neg[1:].sum()), abs_tol=1e-5)


def test_niah_attention_and_outliers_write_rows_for_base_v1_and_v2(tmp_path):
    from conftest import run_cli
    from diffbench.store import RunStore

    models = "base=tiny-base,v1=tiny-diff,v2=tiny-diff2"
    sets = ["--set", "niah.mode=attention", "--set", "niah.lengths=512",
            "--set", "outliers.tokens=1024"]  # fmt: skip
    res = run_cli(tmp_path, "run", "--tasks", "niah,outliers", "--models", models, *sets,
                  "--limit", "1", "--output", "run", "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = RunStore(tmp_path / "run").metrics()
    for task in ("niah", "outliers"):
        assert set(metrics[metrics["task"] == task]["model"]) == {"base", "v1", "v2"}, task
    attention = metrics[(metrics["task"] == "niah") & (metrics["mode"] == "attention")]
    assert set(attention["model"]) == {"base", "v1", "v2"}
    negative = attention[attention["metric"] == "attention_negative"]
    assert set(negative[negative["value"] > 0]["model"]) <= {"v1", "v2"}
    outliers = metrics[metrics["task"] == "outliers"]
    assert {"1", "2"} <= set(outliers[outliers["model"] == "v2"]["map"].astype(str))
