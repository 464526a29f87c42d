"""Autoregressive generator training (LlamaGen GPT, FQGAN FAR) on code shards.

The code shards come from ``vtok precompute codes``: per sample ``codes`` (k, *grid), or
(2, k, *grid) with ``--flip`` (one of the two is drawn per sample and step, LlamaGen's augmentation),
and ``cls``. The generator is sized from the shards' ``codes.json`` (the tokenizer's ``token_spec``),
so it never imports the tokenizer: FlexTok's ordered (1, R) ids give a GPT with 1D RoPE over the R
positions and a 64,000-entry vocabulary at full size, trained on all R tokens. Loss: cross-entropy
of the next token (FAR: the mean over the k sub-codes).

``model.condition``: ``class`` (``cls``, a class token as prefix) or ``text`` (LlamaGen t2i: the
shards' T5 ``text_emb`` / ``text_mask`` from ``vtok precompute text-emb``, sized from its
``text-emb.json`` (``model.text_meta``), projected and used as a prefix with padding masked;
``class_dropout`` then drops captions to a learned null caption for CFG).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vtok.config import RecipeError
from vtok.data.shards import read_shard_meta
from vtok.eval import EvalError
from vtok.models.api import TokenSpec
from vtok.models.export import load_export
from vtok.models.registry import MODELS, build_model
from vtok.tasks.dit import text_encoder_info, text_shape
from vtok.tasks.conditions import ConditionSource
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
        condition: str = "class"  # "class" (cls) | "text" (the shards' T5 text_emb + text_mask as a prefix)
        text_meta: str = ""  # text-emb.json of the T5 embeddings (default: beside data.train_shards)
        num_classes: int = 1000
        class_dropout: float = 0.1  # LlamaGen: condition (class / caption) dropout for classifier-free guidance
        token_dropout: float = 0.1
        dropout: float = 0.1
        # every train.eval_every steps: <run_dir>/samples/step_N.png, decoded by codes.json's tokenizer
        eval_classes: int = 16  # the first N classes, one row each
        eval_per_class: int = 8
        eval_guidance: float = 2.0
        eval_num_tokens: int = 0  # variable-length tokenizers: also a grid from the first K tokens (0: off)

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
                           **cls.condition_fields(cfg, recipe), class_dropout=cfg.class_dropout,
                           token_dropout=cfg.token_dropout, dropout=cfg.dropout)

    @staticmethod
    def condition_fields(cfg: "GPTTask.Config", recipe) -> dict[str, Any]:
        """GPTConfig fields of ``model.condition``: the class count, or the caption shape (L, D) from
        the shards' ``text-emb.json``."""
        if cfg.condition == "class":
            return dict(condition="class", num_classes=cfg.num_classes)
        if cfg.condition != "text":
            raise RecipeError(f"model.condition={cfg.condition!r}: expected 'class' or 'text'")
        missing = [f for f in ("text_emb", "text_mask") if f not in recipe.data.fields]
        if missing:
            raise RecipeError(f"model.condition=text reads T5 embeddings: add {missing} to data.fields "
                              "(vtok precompute text-emb writes them)")
        length, width = text_shape(recipe, cfg.text_meta)
        return dict(condition="text", text_len=length, text_dim=width, num_classes=0)

    def __init__(self, cfg: "GPTTask.Config", recipe):
        self.cfg = cfg
        self.meta = find_codes_meta(recipe.data.train_shards, cfg.codes_meta)
        self.spec = TokenSpec.from_dict(self.meta["token_spec"])
        if cfg.eval_num_tokens and not (self.spec.variable_length and 1 <= cfg.eval_num_tokens <= self.spec.num_tokens):
            raise RecipeError(f"model.eval_num_tokens={cfg.eval_num_tokens}: expected 0 (off) or, for a "
                              f"variable-length tokenizer, 1..{self.spec.num_tokens}; these codes are "
                              f"{'variable' if self.spec.variable_length else 'fixed'}-length {list(self.spec.shape)}")
        model = self.build_export(cfg, recipe)
        self._decoder: Callable | bool | None = None  # codes -> images; None: not loaded yet; False: missing
        self.modules = {"gpt": model}
        self.optimizers = {"main": ["gpt"]}
        self.ema_modules = ("gpt",)
        self._params = sum(p.numel() for p in model.parameters())
        self.conditions = ConditionSource(cfg.condition, cfg.num_classes, cfg.eval_classes, cfg.eval_per_class)

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        codes = batch["codes"]
        if codes.dim() == len(self.spec.shape) + 2:  # (B, 2, k, *grid): image and mirror
            pick = torch.randint(0, codes.shape[1], (codes.shape[0],), device=codes.device)
            codes = codes[torch.arange(codes.shape[0], device=codes.device), pick]
        logits = self.modules["gpt"](codes, self.conditions.from_batch(batch))
        return self.unwrapped("gpt").loss_from_logits(logits, codes, accuracy=self.log_step)

    @torch.no_grad()
    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """Samples for the grid rows (classes, or the first captions seen): code usage per
        sub-codebook, and a grid decoded by the tokenizer export named in ``codes.json`` at
        ``<run_dir>/samples/step_<N>.png`` (+ ``step_<N>_k<K>.png`` from the first
        ``eval_num_tokens`` tokens of a variable-length tokenizer); rank 0, skipped with a warning
        when that export is not there. Every rank generates the same rows in lockstep, so FSDP2 /
        ZeRO-3 gather parameters as in training."""
        from vtok.eval.grid import save_grid

        inner = self.unwrapped("gpt")
        device = inner.rope.device
        cond = self.conditions.for_grid(device)
        if cond is None:
            return {}
        lengths = [None] + ([self.cfg.eval_num_tokens] if self.cfg.eval_num_tokens else [])
        start = time.perf_counter()
        with self.gathered("gpt") as model:
            samples = [model.generate(cond, num_tokens=n, guidance=self.cfg.eval_guidance,
                                      generator=torch.Generator(device).manual_seed(step)) for n in lengths]
        codes = samples[0]
        metrics = {"sample_seconds": time.perf_counter() - start,  # distinct codes drawn: collapse shows here
                   **{f"sample_usage{j}": codes[:, j].unique().numel() / v
                      for j, v in enumerate(inner.cfg.vocab_sizes)}}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        decode = self._eval_decoder(device) if rank == 0 else None
        if decode is not None:
            for n, x in zip(lengths, samples):
                name = f"step_{step:09d}" + (f"_k{n}" if n else "")
                save_grid(decode(x).float().clamp(-1, 1), Path(run_dir) / "samples" / f"{name}.png",
                          nrow=self.cfg.eval_per_class)
        return metrics

    def _eval_decoder(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """codes -> images through the tokenizer ``codes.json`` names, loaded once; None (warned
        once) when it is not there."""
        from vtok.eval.sample import token_decoder

        if self._decoder is None:
            path, device = Path(self.meta.get("tokenizer", "")), torch.device(device.type)
            self._decoder = False
            if not (path / "config.json").is_file():
                log.warning("no sample grids: the tokenizer export named in codes.json (%r) is not there", str(path))
            else:
                try:
                    self._decoder = token_decoder(load_export(path, "tokenizer", device), device)
                except EvalError as e:
                    log.warning("no sample grids: %s", e)
        return self._decoder or None

    def tokens_per_sample(self) -> int:
        return self.spec.num_tokens

    def flops_per_sample(self) -> float:
        return 6.0 * self._params * self.tokens_per_sample()  # dense estimate, attention excluded

    @classmethod
    def export_info(cls, cfg: "GPTTask.Config", recipe) -> dict[str, Any]:
        """The tokens' spec and the tokenizer export they came from (both from ``codes.json``), and
        the condition the generator takes (text: + the T5 of ``text-emb.json``)."""
        meta = find_codes_meta(recipe.data.train_shards, cfg.codes_meta)
        return {"arch": cfg.arch, "token_spec": TokenSpec.from_dict(meta["token_spec"]),
                "tokenizer": meta.get("tokenizer", ""), "condition": cfg.condition,
                **(text_encoder_info(recipe, cfg.text_meta) if cfg.condition == "text" else {})}
