"""Generators that run on a frozen tokenizer's codes or latents (GPT: autoregressive; DiT: diffusion)."""
from vtok.models.generators.dit import DiT, DiTConfig
from vtok.models.generators.gpt import GPT, GPTConfig
from vtok.models.generators.sampling import filter_logits, guidance_at, sample_logits

__all__ = ["DiT", "DiTConfig", "GPT", "GPTConfig", "filter_logits", "guidance_at", "sample_logits"]
