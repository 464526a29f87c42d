"""Shared transformer pieces: attention via scaled_dot_product_attention, MLPs, blocks."""
from vtok.models.layers.transformer import Attention, Block, Mlp

__all__ = ["Attention", "Block", "Mlp"]
