"""Offline jobs that add fields to shards: token codes (captions and text embeddings come later)."""
