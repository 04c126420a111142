"""The connector between the vision tower and the language model.

The paper (LLaVA, 2023) maps each CLIP patch feature into the LLM's embedding space with one Linear layer;
LLaVA-1.5 replaced it with a two-layer MLP with GELU ("mlp2x_gelu"), which noticeably improved results.
Module layouts match the original release, so its weights load by key prefix alone:
  linear:     mm_projector.weight / .bias
  mlp2x_gelu: mm_projector.0.* (Linear), mm_projector.1 (GELU, no weights), mm_projector.2.* (Linear)
"""
import torch.nn as nn

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(name: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if name == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if name == "mlp2x_gelu":
        # exact (erf) GELU, as in the original release and transformers' projector_hidden_act "gelu"
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"unknown projector type {name!r}; known: {', '.join(PROJECTORS)}")
