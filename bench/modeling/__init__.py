"""Model code transformers lacks (DIFF V2), registered with its Auto classes on import."""

from diffbench.modeling import diff_v2 as diff_v2
