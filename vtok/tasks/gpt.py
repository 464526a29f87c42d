"""Autoregressive generator training (LlamaGen GPT, FQGAN FAR) on code shards.

The code shards come from ``vtok precompute codes``: per sample ``codes`` (k, *grid), or
(2, k, *grid) with ``--flip`` (one of the two is drawn per sample and step, LlamaGen's augmentation),
and ``cls``. The generator is sized from the shards' ``codes.json`` (the tokenizer's ``token_spec``),
so it never imports the tokenizer. Loss: cross-entropy of the next token (FAR: the mean over the k
sub-codes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtok.config import RecipeError
from vtok.data.shards import read_shard_meta
from vtok.models.api import Condition, TokenSpec
from vtok.models.export import load_export
from vtok.models.registry import MODELS, build_model
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")


def find_codes_meta(shards: str, explicit: str = "") -> dict[str, Any]:
    """The ``codes.json`` written beside code shards (``explicit`` path, else the shard directory)."""
    path, meta = read_shard_meta(shards, "codes.json", "codes", "model.codes_meta", explicit)
    if "token_spec" not in meta:
        raise RecipeError(f"{path} was written by an older vtok (no token_spec); re-run `vtok precompute codes`")
    return meta


@register_task("gpt")
class GPTTask(TrainTask):
    export_module = "gpt"
    @dataclass
    class Config:
        arch: str = "gpt-b"  # a generator in vtok.models.registry (gpt-*, far-*)
        codes_meta: str = ""  # codes.json of the code shards (default: beside data.train_shards)
        num_classes: int = 1000
        class_dropout: float = 0.1  # LlamaGen: condition dropout for classifier-free guidance
        token_dropout: float = 0.1
        dropout: float = 0.1
        # every train.eval_every steps: <run_dir>/samples/step_N.png, decoded by codes.json's tokenizer
        eval_classes: int = 16  # the first N classes, one row each
        eval_per_class: int = 8
        eval_guidance: float = 2.0

    @classmethod
    def build_export(cls, cfg: "GPTTask.Config", recipe) -> torch.nn.Module:
        """The generator, sized from the code shards' ``codes.json`` (token grid, vocabularies)."""
        if cfg.arch not in MODELS or MODELS[cfg.arch].kind != "generator":
            known = ", ".join(n for n, e in MODELS.items() if e.kind == "generator")
            raise RecipeError(f"model.arch={cfg.arch!r} is not a registered generator; known: {known}")
        spec = TokenSpec.from_dict(find_codes_meta(recipe.data.train_shards, cfg.codes_meta)["token_spec"])
        if not spec.discrete:
            raise RecipeError(f"model.arch={cfg.arch}: the codes are continuous tokens; the gpt task models "
                              "discrete codes (use a diffusion generator)")
        k, heads = len(spec.vocab_sizes), len(MODELS[cfg.arch].config.vocab_sizes)
        if heads != k:
            raise RecipeError(f"model.arch={cfg.arch} predicts {heads} sub-code(s) per token but the codes "
                              f"have {k}; pick a {'far-*' if k > 1 else 'gpt-*'} size")
        return build_model(cfg.arch, vocab_sizes=spec.vocab_sizes, token_shape=spec.shape[1:],
                           num_classes=cfg.num_classes, class_dropout=cfg.class_dropout,
                           token_dropout=cfg.token_dropout, dropout=cfg.dropout)

    def __init__(self, cfg: "GPTTask.Config", recipe):
        self.cfg = cfg
        self.meta = find_codes_meta(recipe.data.train_shards, cfg.codes_meta)
        self.spec = TokenSpec.from_dict(self.meta["token_spec"])
        model = self.build_export(cfg, recipe)
        self._tokenizer: torch.nn.Module | bool | None = None  # None: not loaded yet; False: missing
        self.modules = {"gpt": model}
        self.optimizers = {"main": ["gpt"]}
        self.ema_modules = ("gpt",)
        self._params = sum(p.numel() for p in model.parameters())

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        codes, labels = batch["codes"], batch["cls"]
        if codes.dim() == len(self.spec.shape) + 2:  # (B, 2, k, *grid): image and mirror
            pick = torch.randint(0, codes.shape[1], (codes.shape[0],), device=codes.device)
            codes = codes[torch.arange(codes.shape[0], device=codes.device), pick]
        if labels.numel() and int(labels.max()) >= self.cfg.num_classes:
            raise RecipeError(f"class id {int(labels.max())} in the data >= model.num_classes="
                              f"{self.cfg.num_classes}; raise model.num_classes")
        logits = self.modules["gpt"](codes, Condition(labels=labels))
        return self.unwrapped("gpt").loss_from_logits(logits, codes)

    @torch.no_grad()
    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """Class-conditional samples: code usage per sub-codebook, and a grid decoded by the tokenizer
        export named in ``codes.json`` at ``<run_dir>/samples/step_<N>.png`` (rank 0; skipped with a
        warning when that export is not there). Every rank generates the same rows in lockstep, so
        FSDP2 / ZeRO-3 gather parameters as in training."""
        from vtok.eval.grid import save_grid

        inner = self.unwrapped("gpt")
        device = inner.cls_embed.weight.device
        n = min(self.cfg.eval_classes, self.cfg.num_classes)
        labels = torch.arange(n, device=device).repeat_interleave(self.cfg.eval_per_class)
        start = time.perf_counter()
        with self.gathered("gpt") as model:
            codes = model.generate(Condition(labels=labels), guidance=self.cfg.eval_guidance,
                                   generator=torch.Generator(device).manual_seed(step))
        seconds = time.perf_counter() - start
        metrics = {"sample_seconds": seconds,  # distinct codes drawn, per sub-codebook: collapse shows here
                   **{f"sample_usage{j}": codes[:, j].unique().numel() / v
                      for j, v in enumerate(inner.cfg.vocab_sizes)}}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        tokenizer = self._eval_tokenizer(device) if rank == 0 else None
        if tokenizer is not None:
            images = tokenizer.decode(codes.to(next(tokenizer.parameters()).device))
            save_grid(images, Path(run_dir) / "samples" / f"step_{step:09d}.png", nrow=self.cfg.eval_per_class)
        return metrics

    def _eval_tokenizer(self, device: torch.device) -> torch.nn.Module | None:
        """The tokenizer ``codes.json`` names, loaded once; None (warned once) when it is not there."""
        if self._tokenizer is None:
            path = Path(self.meta.get("tokenizer", ""))
            if (path / "config.json").is_file():
                self._tokenizer = load_export(path, "tokenizer", torch.device(device.type)).model
            else:
                log.warning("no sample grids: the tokenizer export named in codes.json (%r) is not there",
                            str(path))
                self._tokenizer = False
        return self._tokenizer or None

    def tokens_per_sample(self) -> int:
        return self.spec.num_tokens

    def flops_per_sample(self) -> float:
        return 6.0 * self._params * self.tokens_per_sample()  # dense estimate, attention excluded

    @classmethod
    def export_info(cls, cfg: "GPTTask.Config", recipe) -> dict[str, Any]:
        """The tokens' spec and the tokenizer export they came from (both from ``codes.json``)."""
        meta = find_codes_meta(recipe.data.train_shards, cfg.codes_meta)
        return {"arch": cfg.arch, "token_spec": TokenSpec.from_dict(meta["token_spec"]),
                "tokenizer": meta.get("tokenizer", "")}
