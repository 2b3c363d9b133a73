"""vLLM's `vllm.general_plugins` entry point: registers the out-of-tree DiffLlama and DIFF V2.

vLLM calls `register` in every process it starts (the front end, the engine core, each worker),
so a checkpoint whose config names `DiffLlamaForCausalLM` or `DiffV2ForCausalLM` loads on vLLM
wherever diffbench is installed. The classes are given as strings: vLLM imports one only when
such a model loads. DIFF V2's config (`model_type: diff_v2`) is diffbench's own, and vLLM reads
config.json through transformers' AutoConfig: `register` imports `diffbench.modeling`, which
registers it there, in each of those processes.
"""

from __future__ import annotations

# Architecture name (config.json's `architectures`) -> the vLLM model class.
ARCHITECTURES = {
    "DiffLlamaForCausalLM": "diffbench.backends.vllm.diffllama:DiffLlamaForCausalLM",
    "DiffV2ForCausalLM": "diffbench.backends.vllm.diff_v2:DiffV2ForCausalLM",
}


def register() -> None:
    """Make AutoConfig know `diff_v2`, and register DiffLlamaForCausalLM and DiffV2ForCausalLM
    with vLLM's model registry (each unless something already has)."""
    import diffbench.modeling  # noqa: F401  (registers DiffV2Config with AutoConfig)
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
