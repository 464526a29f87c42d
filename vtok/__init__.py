"""vtok: train visual tokenizers and the generators that run on them."""

__version__ = "0.1.0"
