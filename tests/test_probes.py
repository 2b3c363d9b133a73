"""Probes inside the HF backend, on real tiny Llama, DiffLlama and DIFF V2 checkpoints: activation
statistics against an independent eager computation, logit quantization, attention allocation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffbench.api import (
    HIST_BINS_PER_OCTAVE,
    ActivationRequest,
    ActivationSummary,
    AttentionRequest,
    ChoiceRequest,
    GenerateRequest,
    RollingRequest,
    ThroughputRequest,
    merge_summaries,
    summary_kurtosis,
    summary_quantile,
)
from diffbench.backends import probes
from diffbench.backends.hf import HFBackend, HFOptions, LoadTarget, coerce_options, encode_prompt
from diffbench.errors import DiffbenchError
from diffbench.tasks import haystack
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SHIPPED = Path(probes.__file__).resolve().parents[1] / "models"
# The api's histogram quantile: the geometric centre of a bin of width 2^(1/H).
QUANTILE_BOUND = 2 ** (0.5 / HIST_BINS_PER_OCTAVE) - 1


def backend(path: Path, **options: object) -> HFBackend:
    return HFBackend("m", str(path), LoadTarget(str(path)), HFOptions(**options))  # type: ignore[arg-type]


def text(seed: int, chars: int) -> str:
    return haystack.procedural_text(seed, chars)


def eager_logits(b: HFBackend, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, QK^T x scale at causal positions (H, n) computed here from the layer's own
    projections and rotary embedding: the model's attention function never runs."""
    model = b.model
    x = torch.tensor([ids])
    out = []
    with torch.inference_mode():
        hidden = model(x, output_hidden_states=True).hidden_states
        pos = torch.arange(len(ids))[None]
        cos, sin = model.model.rotary_emb(hidden[0], pos)
        causal = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(hidden[i])
            shape = (1, len(ids), -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA (DIFF V2: 2h queries)
            logits = (q @ k.transpose(2, 3))[0] * attn.head_dim**-0.5
            out.append(logits[:, causal])
    return out


def stats_of(values: torch.Tensor, top_k: int) -> tuple[int, torch.Tensor, list[float]]:
    x = values.reshape(-1).double()
    moments = [float((x**p).sum()) for p in (1, 2, 3, 4)]
    return x.numel(), torch.topk(values.reshape(-1).abs(), top_k).values, moments


def check_summary(s: ActivationSummary, values: torch.Tensor, top_k: int) -> None:
    n, top, moments = stats_of(values, top_k)
    assert s.count == n
    assert torch.allclose(torch.tensor(s.top), top, rtol=1e-5, atol=1e-5)
    for got, want in zip(s.moments, moments, strict=True):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-3), (got, want)
    median = float(values.reshape(-1).abs().median())
    assert abs(summary_quantile(s, 0.5) - median) <= QUANTILE_BOUND * median * 1.01 + 1e-6


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff"])
def test_probe_logits_equal_an_independent_eager_qk_scale_in_every_layer(
    tiny_pair, arch, monkeypatch
):
    monkeypatch.setattr(probes, "BLOCK_ELEMENTS", 20_000)  # ~10 query blocks per layer
    b = backend(tiny_pair[arch])
    t = text(1, 500)
    ids = encode_prompt(b.tokenizer, t)
    (stats,) = b.activation_stats([ActivationRequest(t, ("attention_logits",), top_k=50)])
    assert stats.n_tokens == len(ids)
    by_key = {(s.layer, s.map): s for s in stats.summaries}
    for layer, logits in enumerate(eager_logits(b, ids)):
        h = logits.shape[0]
        if arch == "tiny-base":
            assert set(m for (i, m) in by_key if i == layer) == {""}
            check_summary(by_key[layer, ""], logits, 50)
        else:  # DiffLlama pairs Q/K head i with head i + H/2: map 1 is the first half
            check_summary(by_key[layer, "both"], logits, 50)
            check_summary(by_key[layer, "1"], logits[: h // 2], 50)
            check_summary(by_key[layer, "2"], logits[h // 2 :], 50)


def test_hidden_state_statistics_are_each_decoder_layers_output(tiny_pair):
    b = backend(tiny_pair["tiny-base"])
    t = text(2, 300)
    ids = encode_prompt(b.tokenizer, t)
    (stats,) = b.activation_stats([ActivationRequest(t, ("hidden_states",), top_k=20)])
    assert [s.activation for s in stats.summaries] == ["hidden_states"] * 2
    with torch.inference_mode():
        hidden = b.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    check_summary(stats.summaries[0], hidden[1][0], 20)  # the last entry is after the final norm


def test_streaming_top_k_equals_torch_topk_and_the_histogram_median_is_within_its_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.exp(2 * torch.randn(200_000, generator=gen))
    x[::97] = 0.0
    acc = probes.Accumulator(100, torch.device("cpu"))
    for block in x.split(7919):
        acc.add(block)
    s = acc.summary("hidden_states", 0, "")
    assert torch.equal(torch.tensor(s.top), torch.topk(x.abs(), 100).values)
    for q in (0.1, 0.5, 0.9):
        exact = float(torch.quantile(x.abs().double(), q, interpolation="lower"))
        assert abs(summary_quantile(s, q) - exact) <= QUANTILE_BOUND * exact
    median = float(x.abs().median())
    assert abs(summary_quantile(s, 0.5) - median) <= QUANTILE_BOUND * median
    # Merged halves are the whole; kurtosis from the moment sums equals the direct one.
    half = probes.Accumulator(100, torch.device("cpu"))
    half.add(x[:100_000])
    rest = probes.Accumulator(100, torch.device("cpu"))
    rest.add(x[100_000:])
    merged = merge_summaries([half.summary("h", 0, ""), rest.summary("h", 0, "")], layer=-1)
    assert merged.count == s.count and merged.top == s.top and merged.histogram == s.histogram
    d = x.double() - x.double().mean()
    kurt = float((d**4).mean() / (d**2).mean() ** 2)
    assert math.isclose(summary_kurtosis(merged), kurt, rel_tol=1e-6)


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff", "tiny-diff2"])
def test_a_padded_batch_gives_each_text_the_statistics_it_has_alone(tiny_pair, arch):
    b = backend(tiny_pair[arch])
    long, short = ActivationRequest(text(3, 600)), ActivationRequest(text(4, 200))
    batched = b.activation_stats([short, long])
    (alone,) = b.activation_stats([short])
    assert batched[0].n_tokens == alone.n_tokens < batched[1].n_tokens
    assert len(batched[0].summaries) == len(alone.summaries)
    for x, y in zip(batched[0].summaries, alone.summaries, strict=True):
        assert (x.activation, x.layer, x.map, x.count) == (y.activation, y.layer, y.map, y.count)
        assert torch.allclose(torch.tensor(x.top), torch.tensor(y.top), rtol=1e-5, atol=1e-5)
        assert math.isclose(summary_quantile(x, 0.5), summary_quantile(y, 0.5), rel_tol=0.03)


def scores(b: HFBackend) -> tuple[list, list, list]:
    demos = text(5, 300)
    choice = [
        ChoiceRequest(demos, "\nQuestion: which?\nAnswer:", (" red", " green apple", " 42")),
        ChoiceRequest(demos, " And then", (" it rained.", " 7")),
    ]
    gen = [GenerateRequest(text(6, 200), 6)]
    roll = [RollingRequest(text(8, 400))]
    return (
        [c.logprobs for c in b.score_choices(choice)],
        [g.text for g in b.generate(gen)],
        [r.logprobs for r in b.rolling_logprobs(roll)],
    )


@pytest.mark.parametrize("arch", ["tiny-base", "tiny-diff", "tiny-diff2"])
def test_logit_bits_16_leaves_every_score_bit_identical_and_4_bits_change_them(tiny_pair, arch):
    plain = scores(backend(tiny_pair[arch]))
    assert scores(backend(tiny_pair[arch], logit_bits=16)) == plain
    four = backend(tiny_pair[arch], logit_bits=4)
    assert four.model.config._attn_implementation == probes.ATTENTION
    quantized = scores(four)
    assert quantized[0] != plain[0] and quantized[2] != plain[2]
    if arch == "tiny-base":
        head = scores(backend(tiny_pair[arch], logit_bits=4, logit_quant="head"))
        assert head[2] != quantized[2]


def test_quantized_logits_do_not_depend_on_prefix_caching(tiny_pair):
    # The scale is per query token, and a token's logits depend on its prefix only.
    demos = text(9, 500)
    reqs = [
        ChoiceRequest(demos, "\nQuestion: which?\nAnswer:", (" red", " green apple", " 42")),
        ChoiceRequest(demos, "\nQuestion: what?\nAnswer:", (" blue", " 7")),
    ]
    shared = backend(tiny_pair["tiny-base"], logit_bits=6).score_choices(reqs)
    naive = backend(tiny_pair["tiny-base"], logit_bits=6, prefix_cache=False).score_choices(reqs)
    for s, n in zip(shared, naive, strict=True):
        for x, y in zip(s.logprobs, n.logprobs, strict=True):
            assert x is not None and y is not None and abs(x - y) < 1e-3


def test_the_probe_attention_without_quantization_matches_eager(tiny_pair, monkeypatch):
    monkeypatch.setattr(probes, "BLOCK_ELEMENTS", 2000)
    ids = torch.tensor([encode_prompt(backend(tiny_pair["tiny-diff"]).tokenizer, text(10, 300))])
    eager = backend(tiny_pair["tiny-diff"], attn_implementation="eager")
    probed = backend(tiny_pair["tiny-diff"], attn_implementation=probes.ATTENTION)
    with torch.inference_mode():
        want, got = eager.model(ids).logits, probed.model(ids).logits
    assert torch.allclose(want, got, atol=1e-4)


def eager_last_row(b: HFBackend, ids: list[int]) -> list[torch.Tensor]:
    eager = b.model
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = eager(torch.tensor([ids]), output_attentions=True).attentions
    eager.set_attn_implementation("sdpa")
    return [a[0, :, -1, :] for a in attentions]  # (H, keys) per layer


def test_allocation_masses_of_a_llama_lie_in_0_1_and_sum_with_the_rest_to_1(tiny_pair):
    b = backend(tiny_pair["tiny-base"])
    prompt = text(11, 400)
    cut = prompt.index(" ", 150)
    spans = ((0, cut), (cut, len(prompt)))  # every character; only BOS is outside
    (mass,) = b.attention_mass([AttentionRequest(prompt, spans)])
    ids = encode_prompt(b.tokenizer, prompt)
    assert mass.n_prompt_tokens == len(ids) and len(mass.masses) == 2
    for layer, row in enumerate(eager_last_row(b, ids)):
        assert all(0 <= m <= 1 for m in mass.masses[layer])
        bos = float(row[:, 0].mean())
        # A token straddling the cut counts in both spans: at most one token's share too much.
        total = sum(mass.masses[layer]) + bos
        assert 1 - 1e-5 <= total <= 1 + float(row.mean(0).max()) + 1e-5
    (alone,) = b.attention_mass([AttentionRequest(prompt, ((0, len(prompt)),))])
    for layer, row in enumerate(eager_last_row(b, ids)):
        assert math.isclose(alone.masses[layer][0] + float(row[:, 0].mean()), 1, abs_tol=1e-5)


def layer_lambda(attn: torch.nn.Module) -> float:
    """DiffLlamaAttention's lambda, computed here from its parameters."""
    with torch.no_grad():
        return float(
            torch.exp((attn.lambda_q1 * attn.lambda_k1).sum())
            - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum())
            + attn.lambda_init
        )


def test_diff_allocation_is_the_differential_maps_positive_and_negative_mass(tiny_pair):
    b = backend(tiny_pair["tiny-diff"])
    prompt = text(12, 300)
    ids = encode_prompt(b.tokenizer, prompt)
    span = (10, 120)
    (mass,) = b.attention_mass([AttentionRequest(prompt, (span, (0, len(prompt))))])
    enc = b.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(0, 0)] + [tuple(o) for o in enc["offset_mapping"]]
    inside = torch.tensor([s < span[1] and e > span[0] for s, e in offsets])
    assert mass.warnings == () and len(mass.negative) == len(mass.masses)
    for layer, row in enumerate(eager_last_row(b, ids)):
        lam = layer_lambda(b.model.model.layers[layer].self_attn)
        h = row.shape[0]
        diff = (row[: h // 2] - lam * row[h // 2 :]) / (1 - lam)  # (H/2, keys)
        pos, neg = diff.clamp(min=0).mean(0), (-diff).clamp(min=0).mean(0)
        assert math.isclose(mass.masses[layer][0], float(pos[inside].sum()), abs_tol=1e-5)
        assert math.isclose(mass.negative[layer][0], float(neg[inside].sum()), abs_tol=1e-5)
        assert math.isclose(mass.masses[layer][1], float(pos[1:].sum()), abs_tol=1e-5)
        assert math.isclose(mass.negative[layer][1], float(neg[1:].sum()), abs_tol=1e-5)


def test_diff_positive_minus_negative_mass_over_the_prompt_is_1_per_layer():
    # The shipped (trained) tiny-diff over-subtracts: its maps have real negative mass, where a
    # random-init one's two softmaxes are nearly equal and its maps barely dip below 0.
    b = backend(SHIPPED / "tiny-diff")
    prompt = text(13, 1500)
    ids = encode_prompt(b.tokenizer, prompt)
    (mass,) = b.attention_mass([AttentionRequest(prompt, ((0, len(prompt)),))])
    assert all(row[0] > 0.1 for row in mass.negative)
    for layer, row in enumerate(eager_last_row(b, ids)):
        positive, negative = mass.masses[layer][0], mass.negative[layer][0]
        assert 0 <= positive <= 1 + 2 * negative + 1e-6 and negative >= 0
        lam = layer_lambda(b.model.model.layers[layer].self_attn)
        h = row.shape[0]
        bos = float(((row[: h // 2, 0] - lam * row[h // 2 :, 0]) / (1 - lam)).mean())
        # BOS covers no character, so it is in no span: its share is added back.
        assert math.isclose(positive - negative + bos, 1, abs_tol=1e-4)


def test_a_llama_has_no_negative_attention_mass(tiny_pair):
    b = backend(tiny_pair["tiny-base"])
    prompt = text(14, 300)
    (mass,) = b.attention_mass([AttentionRequest(prompt, ((0, 90), (0, len(prompt))))])
    assert len(mass.negative) == len(mass.masses) == b.model.config.num_hidden_layers
    assert all(x == 0 for row in mass.negative for x in row)
    assert mass.warnings == ()


@pytest.fixture(scope="module")
def diff_lambda_above_1(tiny_pair, tmp_path_factory) -> Path:
    """A random tiny DiffLlama whose layer 0 has lambda about 7.6 (layer 1 keeps its own)."""
    path = tmp_path_factory.mktemp("lambda") / "tiny-diff-lambda"
    tok = AutoTokenizer.from_pretrained(tiny_pair["tiny-diff"])
    torch.manual_seed(0)
    config = DiffLlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = DiffLlamaForCausalLM(config)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.lambda_q1.fill_(0.5)  # exp(8 x 0.25) = 7.39
        attn.lambda_k1.fill_(0.5)
        attn.lambda_q2.zero_()  # exp(0) = 1
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_diff_layer_with_lambda_at_least_1_is_left_unnormalised_with_a_warning(
    diff_lambda_above_1,
):
    b = backend(diff_lambda_above_1)
    lam = layer_lambda(b.model.model.layers[0].self_attn)
    assert lam >= 1 and layer_lambda(b.model.model.layers[1].self_attn) < 1
    prompt = text(15, 300)
    ids = encode_prompt(b.tokenizer, prompt)
    (mass,) = b.attention_mass([AttentionRequest(prompt, ((0, len(prompt)),))])
    (warning,) = mass.warnings
    assert warning.startswith("layer 0: lambda = ") and ">= 1" in warning
    assert all(math.isfinite(x) for rows in (mass.masses, mass.negative) for r in rows for x in r)
    row = eager_last_row(b, ids)[0]
    h = row.shape[0]
    raw = row[: h // 2] - lam * row[h // 2 :]  # not divided by 1 - lambda
    assert math.isclose(mass.masses[0][0], float(raw.clamp(min=0).mean(0)[1:].sum()), abs_tol=1e-4)
    assert math.isclose(
        mass.negative[0][0], float((-raw).clamp(min=0).mean(0)[1:].sum()), abs_tol=1e-4
    )


def test_throughput_reports_each_repeat_and_a_peak_memory(tiny_pair):
    b = backend(tiny_pair["tiny-base"])
    (t,) = b.throughput([ThroughputRequest(64, new_tokens=4, repeats=2, warmup=1)])
    assert len(t.prefill_tokens_per_s) == len(t.decode_tokens_per_s) == 2
    assert all(r > 0 for r in t.prefill_tokens_per_s + t.decode_tokens_per_s)
    assert t.peak_memory_bytes > 0 and t.device.startswith("cpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logit_bits": "0"}, "logit_bits must be an integer from 2 to 16"),
        ({"logit_bits": "-4"}, "logit_bits must be an integer from 2 to 16"),
        ({"logit_bits": "17"}, "logit_bits must be an integer from 2 to 16"),
        ({"logit_quant": "row"}, "m:logit_quant must be one of tensor, head"),
    ],
)
def test_bad_logit_options_fail_in_one_line(options, message):
    with pytest.raises(DiffbenchError, match=message) as err:
        coerce_options("m", options)
    assert "\n" not in str(err.value)


def test_an_unknown_activation_type_fails_in_one_line(tiny_pair):
    b = backend(tiny_pair["tiny-base"])
    with pytest.raises(DiffbenchError, match="unknown activation type 'mlp_outputs'"):
        b.activation_stats([ActivationRequest("some text", ("hidden_states", "mlp_outputs"))])


@pytest.fixture(scope="module")
def tiny_bloom(tiny_pair, tmp_path_factory) -> Path:
    """A random tiny Bloom: a family whose attention does not go through the registry."""
    path = tmp_path_factory.mktemp("bloom") / "tiny-bloom"
    tok = AutoTokenizer.from_pretrained(tiny_pair["tiny-base"])
    torch.manual_seed(0)
    BloomForCausalLM(
        BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=2)
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_family_outside_the_attention_registry_is_refused_in_one_line(tiny_bloom):
    with pytest.raises(DiffbenchError, match="attention registry") as err:
        backend(tiny_bloom, logit_bits=8)
    assert "\n" not in str(err.value)
    b = backend(tiny_bloom, attn_implementation="eager")
    with pytest.raises(DiffbenchError, match="attention registry"):
        b.activation_stats([ActivationRequest("some text")])
    with pytest.raises(DiffbenchError, match="attention registry"):
        b.attention_mass([AttentionRequest("some text", ((0, 4),))])
