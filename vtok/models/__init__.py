"""Model architectures (no distributed code: vtok.parallel wraps them from the outside)."""
