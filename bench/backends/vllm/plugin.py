"""vLLM's `vllm.general_plugins` entry point: registers the out-of-tree DiffLlama.

vLLM calls `register` in every process it starts (the front end, the engine core, each worker),
so a checkpoint whose config names `DiffLlamaForCausalLM` loads on vLLM wherever diffbench is
installed. The class is given as a string: vLLM imports it only when such a model loads.
"""

from __future__ import annotations

ARCHITECTURE = "DiffLlamaForCausalLM"


def register() -> None:
    """Register DiffLlamaForCausalLM with vLLM's model registry (unless something already has)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "diffbench.backends.vllm.diffllama:DiffLlamaForCausalLM"
        )
