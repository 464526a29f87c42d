"""Conditions of the class- or text-conditional generator tasks (``gpt``, ``dit``): read from batches
for training, and the rows of the sample grids drawn during training."""
from __future__ import annotations

from typing import Any

import torch

from vtok.config import RecipeError
from vtok.models.api import Condition


class ConditionSource:
    """``condition`` "class": ``cls`` labels (checked against ``num_classes``); "text": the T5
    ``text_emb`` (B, L, D) + ``text_mask`` (B, L) fields. Grids: ``eval_classes`` classes, or the
    first ``eval_classes`` captions this rank trained on, x ``eval_per_class`` samples each."""

    def __init__(self, condition: str, num_classes: int, eval_classes: int, eval_per_class: int):
        self.condition, self.num_classes = condition, num_classes
        self.eval_classes, self.eval_per_class = eval_classes, eval_per_class
        self._grid_text: tuple[torch.Tensor, torch.Tensor] | None = None

    def from_batch(self, batch: dict[str, Any]) -> Condition:
        """The batch's condition (text runs keep their first captions for the grids)."""
        if self.condition == "text":
            text, mask = batch["text_emb"].float(), batch["text_mask"].bool()
            if self._grid_text is None:
                n = self.eval_classes
                self._grid_text = (text[:n].detach().clone(), mask[:n].detach().clone())
            return Condition(text=text, text_mask=mask)
        labels = batch["cls"]
        if labels.numel() and not labels.is_meta and int(labels.max()) >= self.num_classes:
            raise RecipeError(f"class id {int(labels.max())} in the data >= model.num_classes="
                              f"{self.num_classes}; raise model.num_classes")
        return Condition(labels=labels)

    def for_grid(self, device: torch.device) -> Condition | None:
        """Grid rows x eval_per_class; None before a text run has seen a batch."""
        per = self.eval_per_class
        if self.condition == "text":
            if self._grid_text is None:
                return None
            text, mask = self._grid_text
            return Condition(text=text.repeat_interleave(per, 0), text_mask=mask.repeat_interleave(per, 0)).to(device)
        n = min(self.eval_classes, self.num_classes)
        return Condition(labels=torch.arange(n, device=device).repeat_interleave(per))
