"""Generators that run on a frozen tokenizer's codes."""
from vtok.models.generators.gpt import GPT, GPTConfig
from vtok.models.generators.sampling import filter_logits, guidance_at, sample_logits

__all__ = ["GPT", "GPTConfig", "filter_logits", "guidance_at", "sample_logits"]
