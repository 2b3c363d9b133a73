"""Loading a transformers causal LM: the HF backend's options, their checks, and the loaded
model with the state every job of the backend shares (device, batch size, prefix cache)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diffbench.modeling  # noqa: F401  (registers DIFF V2 with the Auto classes)
import torch
from diffbench.api import ModelInfo
from diffbench.backends import probes
from diffbench.backends.prefix import PrefixCache, end_token_ids
from diffbench.backends.tokens import HFTokenizerView, fingerprint
from diffbench.config import model_options
from diffbench.errors import DiffbenchError
from diffbench.models import LoadTarget
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


@dataclass(frozen=True)
class HFOptions:
    """Model options settable with `--model-args LABEL:KEY=VALUE`."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    attn_implementation: str = "sdpa"  # sdpa | eager | a name registered in the attention registry
    # An int, or auto: on a GPU, batches that start at 64 and halve on out-of-memory; on a CPU,
    # one request at a time from the shared prefix cache (left-padded batches only add work
    # there: every attention call becomes a masked one). Generation with batch size 1 always
    # runs from the prefix cache.
    batch_size: str = "auto"
    max_length: int = 0  # 0: the model config's max_position_embeddings
    chat_template: bool = True  # use the model's chat template when it has one
    trust_remote_code: bool = False
    # One KV cache kept across requests (cropped to the token prefix the next request shares
    # with it), so each distinct prompt token is computed once. False: every (prompt, choice)
    # and every generation prompt gets its own full pass.
    prefix_cache: bool = True
    # Attention-logit quantization (the paper's Figure 8): bits of the absmax grid, 16 = off; the
    # scale per query token over all heads (tensor) or per head. Below 16 the model runs
    # diffbench's registered attention function, whatever attn_implementation says.
    logit_bits: int = 16
    logit_quant: Literal["tensor", "head"] = "tensor"


def hf_fingerprint(target: LoadTarget, options: HFOptions | None = None) -> str:
    """The checkpoint's fingerprint (tokens.fingerprint). Logit quantization changes every
    score, so it is part of the identity: `logits:<bits>bit-<mode>` at the end (absent at 16
    bits, so unquantized fingerprints are what they always were)."""
    if options is not None and options.logit_bits < 16:
        return fingerprint(target, f"logits:{options.logit_bits}bit-{options.logit_quant}")
    return fingerprint(target)


def _resolve_dtype(name: str) -> torch.dtype | str:
    table: dict[str, torch.dtype | str] = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "auto": "auto",
    }
    if name not in table:
        raise DiffbenchError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def resolve_device(name: str) -> torch.device:
    """The torch device an option names (auto: CUDA when there is one); refuses unknown ones."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffbenchError("device cuda was asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise DiffbenchError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def _check_attention(label: str, name: str) -> None:
    """Refuse an attention implementation transformers would refuse only once loading."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name.removeprefix("paged|") in known or name in known or "/" in name:  # "/": a hub kernel
        return
    raise DiffbenchError(
        f"{label}:attn_implementation {name!r} is not a registered attention; "
        f"known: {', '.join(known)}"
    )


def coerce_options(label: str, raw: Mapping[str, Any]) -> HFOptions:
    """HF backend options from raw strings or YAML values, typed by HFOptions' annotations
    (Literal values checked), refusing unknown keys and bad values."""
    opts: HFOptions = model_options(HFOptions, raw, label)
    if opts.batch_size != "auto" and not (opts.batch_size.isdigit() and int(opts.batch_size) > 0):
        raise DiffbenchError(f"{label}:batch_size must be a positive integer or auto")
    if opts.max_length < 0:
        raise DiffbenchError(
            f"{label}:max_length must be 0 (the model's own) or a positive integer"
        )
    # Checked here, not when the model loads: by then the run directory has been written.
    probes.check_quantization(label, opts.logit_bits, opts.logit_quant)
    resolve_device(opts.device)
    _check_attention(label, opts.attn_implementation)
    return opts


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class HFModel:
    """A loaded model with what every job of the backend shares: its tokenizer, device and
    options, its record, the KV cache kept across requests, and the current batch size."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    options: HFOptions
    info: ModelInfo
    view: HFTokenizerView
    prefix: PrefixCache
    end_ids: set[int]  # the tokens that end a greedy generation
    batch_size: int
    # (n_tokens, new_tokens) shapes that throughput has warmed up on this load.
    warm_shapes: set[tuple[int, int]] = field(default_factory=set)

    def with_oom_retry(self, run: Callable[[int], Any]) -> Any:
        """Call `run(batch_size)`, halving the batch on out-of-memory when batch_size is auto."""
        while True:
            try:
                return run(self.batch_size)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if self.options.batch_size != "auto" or not _is_oom(err) or self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the cache and the weights."""
        self.prefix.clear()
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_tokenizer_view(
    label: str, spec: str, target: LoadTarget, options: HFOptions
) -> HFTokenizerView:
    """The tokenizer view a loaded model would have, from its tokenizer and config files alone
    (no weights): what `--dry-run` builds requests with."""
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if target.gguf_file:
        kwargs["gguf_file"] = target.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.path, **kwargs)
        config = AutoConfig.from_pretrained(target.path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffbenchError(
            f"cannot load the tokenizer of {label!r} from {spec!r}: {first}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config_max = int(getattr(config, "max_position_embeddings", 0) or 0)
    return HFTokenizerView(
        tokenizer, options.max_length or config_max or 2048, options.chat_template
    )


def load_model(label: str, spec: str, target: LoadTarget, options: HFOptions) -> HFModel:
    """The model and tokenizer at `target` on the options' device, with probes attached when
    its attention logits are quantized; a clear error when they cannot be loaded."""
    device = resolve_device(options.device)
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if target.gguf_file:
        kwargs["gguf_file"] = target.gguf_file
    quantized = options.logit_bits < 16
    attn = probes.ATTENTION if quantized else options.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            target.path, dtype=_resolve_dtype(options.dtype), attn_implementation=attn, **kwargs
        )
    except (OSError, ValueError, SafetensorError) as err:  # a corrupt weights file too
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffbenchError(f"cannot load model {label!r} from {spec!r}: {first}") from err
    model.to(device).eval()  # type: ignore[arg-type]
    if quantized:
        quant = probes.Quantization(options.logit_bits, options.logit_quant)
        probes.attach(model, quant)
        probes.check_routed(model)  # a family that bypasses the registry: refused
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config_max = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    max_context = options.max_length or config_max or 2048
    if options.batch_size == "auto":
        batch_size = 64 if device.type == "cuda" else 1
    else:
        batch_size = int(options.batch_size)
    architectures = getattr(model.config, "architectures", None) or []
    info = ModelInfo(
        label=label,
        spec=spec,
        backend="hf",
        path=str(Path(target.path) / target.gguf_file) if target.gguf_file else target.path,
        architecture=architectures[0] if architectures else type(model).__name__,
        n_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(model.dtype).removeprefix("torch."),
        max_context=max_context,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        fingerprint=hf_fingerprint(target, options),
    )
    return HFModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        options=options,
        info=info,
        view=HFTokenizerView(tokenizer, max_context, options.chat_template),
        prefix=PrefixCache(model),
        end_ids=end_token_ids(model, tokenizer),
        batch_size=batch_size,
    )
