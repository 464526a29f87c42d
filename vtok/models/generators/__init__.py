"""Generators that run on a frozen tokenizer's codes."""
from vtok.models.generators.gpt import GPT, GPTConfig, count_params
from vtok.models.generators.sampling import filter_logits, guidance_at, sample_logits

__all__ = ["GPT", "GPTConfig", "count_params", "filter_logits", "guidance_at", "sample_logits"]
