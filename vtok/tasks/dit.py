"""Diffusion-transformer (DiT / SiT-style) training on pixels, VAE latents or continuous 1D tokens.

What the DiT models is read from the data, never from a tokenizer import:

* ``data.fields`` has ``latents``: the shards of ``vtok precompute latents``, sized from the
  ``latents.json`` beside them (per sample (C, h, w), or (2, C, h, w) with ``--flip``: one of the two
  is drawn per sample and step); the VAE and its scaling factor go into the export for decoding.
* ``data.fields`` has ``codes``: continuous tokens (TexTok-style (n, dim)) sized from ``codes.json``.
* otherwise ``image``: the "latent" is the image itself, (3, R, R) in [-1, 1] at ``data.resolution``,
  so a tiny DiT learns the synthetic shapes without any autoencoder.

REPA (``model.repa_depth`` > 0): the DiT's projector after that block predicts frozen DINOv2 patch
tokens of the sample's image (``vtok.models.pretrained``, ``feature="tokens"``), -cosine x
``repa_weight``; the teacher runs at the DiT's grid x 14 px so tokens match one to one.

Every random draw of a step (mirror pick, class dropout, t, noise) comes from ``KeyedDraws``: keyed by
sample and step, so 2 ranks x B/2 follow exactly the trajectory of 1 process x B.

Objective (``model.objective``): ``flow`` (rectified flow, logit-normal t, velocity target; see
``vtok.models.diffusion``) or ``ddpm`` (DiT's: 1000 linear steps, epsilon + learned sigma, hybrid
loss). The export records the diffusion settings, so ``vtok sample`` draws with the same process.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from vtok.config import RecipeError
from vtok.data.shards import read_shard_meta
from vtok.losses.alignment import build_repa_teacher, cosine_alignment, tokens_on_grid
from vtok.models.api import Condition, TokenSpec
from vtok.models.diffusion import GaussianDiffusion, Guidance, RectifiedFlow
from vtok.models.generators.dit import DiT
from vtok.models.pretrained import PretrainedSpec
from vtok.models.registry import MODELS, build_model
from vtok.train.keyed_rng import KeyedDraws
from vtok.tasks.conditions import ConditionSource
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")
OBJECTIVES = ("flow", "ddpm")


def find_source(recipe: Any, explicit: str = "") -> dict[str, Any]:
    """What the DiT models, from ``data.fields`` and the shards' metadata: ``{"source": "image" |
    "latents" | "codes", "token_spec": TokenSpec, "meta": dict (the metadata file, {} for pixels)}``."""
    fields, res = list(recipe.data.fields), int(recipe.data.resolution)
    if "latents" in fields:
        _, meta = read_shard_meta(recipe.data.train_shards, "latents.json", "latents", "model.source_meta",
                                  explicit)
        c, h, w = (int(s) for s in meta["shape"][-3:])
        spec = TokenSpec(shape=(c, h, w), resolution=int(meta.get("resolution", res)), dim=c,
                         downsample=int(meta.get("downsample", 0)), condition="class")
        return {"source": "latents", "token_spec": spec, "meta": meta}
    if "codes" in fields:
        path, meta = read_shard_meta(recipe.data.train_shards, "codes.json", "codes", "model.source_meta",
                                     explicit)
        spec = TokenSpec.from_dict(meta["token_spec"])
        if spec.discrete:
            raise RecipeError(f"{path}: the codes are discrete; a DiT models continuous tokens (use the gpt task)")
        return {"source": "codes", "token_spec": spec, "meta": meta}
    if "image" not in fields:
        raise RecipeError(f"data.fields={fields}: the dit task reads `image`, `latents` or `codes`")
    spec = TokenSpec(shape=(3, res, res), resolution=res, dim=3, downsample=1, condition="class")
    return {"source": "image", "token_spec": spec, "meta": {}}


def decoder_info(source: dict[str, Any]) -> dict[str, Any]:
    """Export metadata that maps samples back to images: the tokenizer export (codes), the diffusers
    VAE and its factors (latents), or nothing (pixels)."""
    meta = source["meta"]
    if source["source"] == "latents":
        return {"vae": meta.get("vae", ""), "latent_scaling": float(meta.get("scaling_factor", 1.0)),
                "latent_shift": float(meta.get("shift_factor", 0.0))}
    if source["source"] == "codes" and meta.get("tokenizer"):
        return {"tokenizer": meta["tokenizer"]}
    return {}


def make_decoder(meta: dict[str, Any], tokenizer_dir: str = "", device: torch.device | str = "cpu"
                 ) -> Callable[..., torch.Tensor] | None:
    """``decode(samples (B, *token_shape), cond=None) -> images (B, 3, H, W)`` in [-1, 1], from a DiT
    export's metadata (``tokenizer_dir`` overrides its tokenizer); None when the decoder named there
    is missing. A text-conditioned tokenizer (TexTok) needs ``cond``: the captions' Condition(text,
    text_mask) of the rows; ``decode.needs_text`` says so (``decode.text_dim``: its T5 width)."""
    from vtok.models.export import load_export

    source = meta.get("source", "image")
    if source == "image":
        return _decoder(lambda x, cond=None: x.float())
    if source == "latents" and not tokenizer_dir:
        vae_dir = meta.get("vae", "")
        if not (Path(vae_dir) / "config.json").is_file():
            return None
        from diffusers import AutoencoderKL  # the VAE the latents were made with (local files only)

        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(device).eval()
        scale, shift = float(meta.get("latent_scaling", 1.0)), float(meta.get("latent_shift", 0.0))
        return _decoder(lambda z, cond=None: vae.decode(z.float().to(device) / scale + shift).sample.float())
    path = tokenizer_dir or meta.get("tokenizer", "")
    if not (Path(path) / "config.json").is_file():
        return None
    export = load_export(path, "tokenizer", device)
    tokenizer = export.model
    if export.token_spec.condition != "text":
        return _decoder(lambda z, cond=None: tokenizer.decode(z.to(device)).float())

    def decode(z: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        if cond is None or cond.text is None:
            raise RecipeError(f"the tokenizer {path} decodes with captions (text-conditioned, e.g. TexTok): "
                              "pass the rows' Condition(text=..., text_mask=...)")
        return tokenizer.decode(z.to(device), Condition(text=cond.text, text_mask=cond.text_mask).to(device)).float()
    return _decoder(decode, needs_text=True, text_dim=int(getattr(tokenizer.cfg, "text_dim", 0)))


def _decoder(fn: Callable[..., torch.Tensor], needs_text: bool = False, text_dim: int = 0) -> Callable[..., torch.Tensor]:
    fn.needs_text, fn.text_dim = needs_text, text_dim  # type: ignore[attr-defined]
    return fn


def missing_class_captions(what: str, fix: str) -> str:
    """The one-line error of a class DiT over a text tokenizer's codes without a caption list."""
    return (f"{what} of a class-conditional DiT decode through a text-conditioned tokenizer (TexTok), which needs "
            f"a caption per sample: {fix}; build the file with `vtok data class-captions --data IMAGE_SHARDS "
            "--out FILE.json`")


def text_meta_path(recipe: Any, explicit: str = "") -> tuple[Path, dict[str, Any]]:
    """``(path, contents)`` of the shards' ``text-emb.json``: ``explicit``, else beside
    ``data.train_shards``, else (code shards of ``vtok precompute codes``, which keep the text fields)
    beside the shards those were made from (``precompute.json``'s input spec)."""
    if explicit:
        return read_shard_meta(recipe.data.train_shards, "text-emb.json", "text-emb", "model.text_meta", explicit)
    try:
        return read_shard_meta(recipe.data.train_shards, "text-emb.json", "text-emb", "model.text_meta")
    except RecipeError as missing:
        try:
            _, summary = read_shard_meta(recipe.data.train_shards, "precompute.json", "codes", "model.text_meta")
        except RecipeError:
            raise missing from None
        spec = (summary.get("input") or {}).get("spec", "")
        if not spec:
            raise missing from None
        try:
            return read_shard_meta(spec, "text-emb.json", "text-emb", "model.text_meta")
        except RecipeError:
            raise RecipeError(f"{missing} (nor beside {spec}, the shards these were precomputed from)") from None


def text_shape(recipe: Any, explicit: str = "") -> tuple[int, int]:
    """(L, D) of the shards' T5 embeddings, from the ``text-emb.json`` of ``vtok precompute text-emb``."""
    _, meta = text_meta_path(recipe, explicit)
    length, width = (int(v) for v in meta["shape"][-2:])
    return length, width


def text_encoder_info(recipe: Any, explicit: str = "") -> dict[str, Any]:
    """Export metadata of a text-conditional generator: the T5 its captions were encoded with (the
    ``text-emb.json`` of ``vtok precompute text-emb``), so ``vtok sample --caption`` encodes alike."""
    _, meta = text_meta_path(recipe, explicit)
    return {"text_encoder": {"encoder": meta.get("encoder", ""), "tokenizer": meta.get("tokenizer", ""),
                             "max_length": int(meta.get("max_length", meta["shape"][-2]))}}


@torch.no_grad()
def sample_dit(model: DiT, cond: Condition | torch.Tensor, diffusion: dict[str, Any], *, steps: int = 50,
               solver: str = "euler", guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
               apg: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw (B, *token_shape) samples for ``cond`` (class labels (B,), or a ``Condition`` with labels or
    T5 text (B, L, D) + mask) with the process the DiT was trained with (``diffusion``: the export's
    settings): flow -> Euler / Heun ODE over ``steps``; ddpm -> ancestral sampling on ``steps``
    respaced steps. CFG ``guidance`` inside ``interval`` (0 = data, 1 = noise), or APG with ``apg``."""
    g = Guidance(scale=guidance, interval=interval, apg=apg)
    device = model.pos_embed.device
    cond = (cond if isinstance(cond, Condition) else Condition(labels=cond)).to(device)
    b = len(cond)
    if diffusion.get("objective", "flow") == "flow":
        return model.generate(cond, steps=steps, guidance=g, solver=solver,
                              shift=float(diffusion.get("flow_shift", 1.0)), generator=generator)
    ddpm = GaussianDiffusion(num_timesteps=int(diffusion.get("num_timesteps", 1000)),
                             learn_sigma=model.cfg.learn_sigma, channel_dim=model.channel_dim,
                             guided_channels=diffusion.get("guided_channels"))
    was_training = model.training
    model.eval()
    try:
        noise = torch.randn((b, *model.token_spec.shape), generator=generator, device=device)
        return ddpm.sample(model.diffusion_net(learned_sigma=model.cfg.learn_sigma), noise.shape,
                           model.full_condition(cond, b, device),
                           steps=str(steps), guidance=g, null_cond=model.null_condition(b, device),
                           noise=noise, generator=generator)
    finally:
        model.train(was_training)


@register_task("dit")
class DiTTask(TrainTask):
    export_module = "dit"

    @dataclass
    class Config:
        arch: str = "dit-s-2"  # a DiT in vtok.models.registry (dit-*)
        source_meta: str = ""  # latents.json / codes.json of the shards (default: beside data.train_shards)
        objective: str = "flow"  # "flow" (rectified flow) | "ddpm" (DiT: epsilon + learned sigma, hybrid loss)
        # "class" (cls labels) | "text" (DiT-T2I: cross-attention over the shards' T5 text_emb + text_mask,
        # sized from their text-emb.json; class_dropout then drops captions to the learned null one)
        condition: str = "class"
        text_meta: str = ""  # text-emb.json of the shards (default: beside data.train_shards, or beside
        # the image shards that code shards were precomputed from)
        # class DiT on a text-conditioned tokenizer's codes (TexTok): `vtok data class-captions` JSON; eval
        # grids and `vtok sample` decode each sample with a caption of its class drawn from it
        class_captions: str = ""
        num_classes: int = 1000
        class_dropout: float = 0.1  # DiT: label -> null w.p. 0.1 (classifier-free guidance)
        # size overrides of the arch (0 = the registry's); tiny recipes use them
        depth: int = 0
        hidden: int = 0
        heads: int = 0
        patch_size: int = 0
        flow_loc: float = 0.0  # logit-normal training t: sigmoid(loc + scale * N(0, 1))
        flow_scale: float = 1.0
        flow_shift: float = 1.0  # timestep shift (training and sampling); 1 = none
        num_timesteps: int = 1000  # ddpm
        vb_weight: float = 1.0  # ddpm: hybrid loss mse + vb_weight * vb
        # every train.eval_every steps: <run_dir>/samples/step_N.png (the first eval_classes classes)
        eval_classes: int = 16
        eval_per_class: int = 8
        eval_guidance: float = 4.0
        eval_steps: int = 50
        eval_solver: str = "euler"
        # REPA (Yu et al. 2025): a projector after block repa_depth predicts the frozen DINOv2 patch
        # tokens of the image (-cosine, x repa_weight). The REPA paper: block 8 of SiT-XL/2, DINOv2-B
        # (768-d) at 224 px, weight 0.5. 0 = off. Spatial tokens only; latents need `image` in data.fields.
        repa_depth: int = 0
        repa_dim: int = 768  # the teacher's width (DINOv2-S 384, B 768, L 1024)
        repa_weight: float = 0.5
        repa_teacher: PretrainedSpec = field(default_factory=lambda: PretrainedSpec(
            kind="dinov2", model="vit_base_patch14_dinov2", feature="tokens"))  # image_size 0: the DiT grid x 14

    @classmethod
    def build_export(cls, cfg: "DiTTask.Config", recipe) -> torch.nn.Module:
        """The DiT, sized from the data: (C, S, S) latents / pixels, or (n, dim) 1D tokens."""
        if cfg.arch not in MODELS or MODELS[cfg.arch].model is not DiT:
            known = ", ".join(n for n, e in MODELS.items() if e.model is DiT)
            raise RecipeError(f"model.arch={cfg.arch!r} is not a registered DiT; known: {known}")
        if cfg.objective not in OBJECTIVES:
            raise RecipeError(f"model.objective={cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        spec = find_source(recipe, cfg.source_meta)["token_spec"]
        sizes = {k: getattr(cfg, k) for k in ("depth", "hidden", "heads") if getattr(cfg, k)}
        if len(spec.shape) == 3:
            mode = dict(token_mode="2d", in_channels=spec.shape[0], input_size=spec.shape[1])
            patch = cfg.patch_size or MODELS[cfg.arch].config.patch_size
            if spec.shape[1] != spec.shape[2] or spec.shape[1] % max(patch, 1):
                raise RecipeError(f"a {spec.shape[1]}x{spec.shape[2]} grid does not split into {patch}x{patch} "
                                  "patches; change data.resolution or model.patch_size")
            mode["patch_size"] = patch
        else:
            mode = dict(token_mode="1d", in_channels=spec.shape[-1], input_size=spec.shape[0], patch_size=1)
        repa = dict(repa_depth=cfg.repa_depth, repa_dim=cfg.repa_dim) if cfg.repa_depth else dict(repa_depth=0)
        if cfg.repa_depth and mode["token_mode"] != "2d":
            raise RecipeError("model.repa_depth: REPA aligns spatial patches with DINOv2's; these 1D tokens "
                              "have no patch grid (set model.repa_depth=0)")
        if cfg.condition == "text":
            missing = [f for f in ("text_emb", "text_mask") if f not in recipe.data.fields]
            if missing:
                raise RecipeError(f"model.condition=text reads T5 embeddings: add {missing} to data.fields "
                                  "(vtok precompute text-emb writes them)")
            length, width = text_shape(recipe, cfg.text_meta)
            cond = dict(condition="text", text_len=length, text_dim=width, num_classes=0)
        elif cfg.condition == "class":
            cond = dict(condition="class", num_classes=cfg.num_classes)
        else:
            raise RecipeError(f"model.condition={cfg.condition!r}: expected 'class' or 'text'")
        return build_model(cfg.arch, **mode, **sizes, **cond, class_dropout=cfg.class_dropout,
                           learn_sigma=cfg.objective == "ddpm", **repa)

    def __init__(self, cfg: "DiTTask.Config", recipe):
        self.cfg = cfg
        self.source = find_source(recipe, cfg.source_meta)
        self.spec: TokenSpec = self.source["token_spec"]
        model = self.build_export(cfg, recipe)
        self.field = {"image": "image", "latents": "latents", "codes": "codes"}[self.source["source"]]
        if cfg.objective == "flow":
            self.process: Any = RectifiedFlow(cfg.flow_loc, cfg.flow_scale, cfg.flow_shift)
        else:
            self.process = GaussianDiffusion(num_timesteps=cfg.num_timesteps, learn_sigma=True,
                                             vb_weight=cfg.vb_weight, channel_dim=model.channel_dim)
        self._decoder: Callable | bool | None = None  # None: not built yet; False: missing
        self.modules = {"dit": model}
        self.optimizers = {"main": ["dit"]}
        self.ema_modules = ("dit",)
        self._params = sum(p.numel() for p in model.parameters())
        self.seed = int(recipe.seed)
        self.frozen = {}
        self._features: torch.Tensor | None = None  # REPA features of the last forward
        self.conditions = ConditionSource(cfg.condition, cfg.num_classes, cfg.eval_classes, cfg.eval_per_class)
        self._captions: Any = None  # ClassCaptions of a class DiT over a text tokenizer's codes
        if self.source["source"] == "codes" and self.spec.condition == "text" and cfg.condition == "class":
            if cfg.class_captions:
                from vtok.data.class_captions import ClassCaptions

                self._captions = ClassCaptions.load(cfg.class_captions)
            elif recipe.train.eval_every > 0:
                raise RecipeError(missing_class_captions("the eval grids", "set model.class_captions=FILE.json "
                                                         "(or train.eval_every=0)"))
        if cfg.repa_depth:
            self.frozen["repa_teacher"] = self._build_repa_teacher(cfg, recipe, model)

    @staticmethod
    def _build_repa_teacher(cfg: "DiTTask.Config", recipe, model: DiT) -> torch.nn.Module:
        """The frozen DINOv2 whose patch tokens REPA predicts; by default at the DiT's grid x 14 px,
        so teacher and DiT tokens match one to one (REPA: 224 px for a 16 x 16 grid)."""
        source = find_source(recipe, cfg.source_meta)["source"]
        if source == "latents" and (recipe.data.crop != "center" or recipe.data.hflip):
            raise RecipeError("model.repa_depth with latents: the teacher's image must be the crop the latents "
                              "were made from; set data.crop=center data.hflip=false (mirrors come from the "
                              "--flip latents)")
        return build_repa_teacher(cfg.repa_teacher, grid=model.grid, dim=cfg.repa_dim,
                                  fields=recipe.data.fields, depth=cfg.repa_depth)

    def _net(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The wrapped DiT as ``net(x_t, t, cond)``: all channels for DDPM (learned sigma), the
        prediction for flow; REPA features dropped."""
        out = self.modules["dit"](x_t, cond, t)
        if isinstance(out, tuple):
            out, self._features = out
        return out if self.cfg.objective == "ddpm" else out.narrow(self.unwrapped("dit").channel_dim, 0,
                                                                    self.spec.dim)

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Diffusion loss (+ REPA). Every random draw (mirror pick, class dropout, t, noise) is keyed
        by the sample and step (``KeyedDraws``), so 2 ranks x B/2 follow the 1 x B trajectory."""
        x = batch[self.field].float()
        draws = KeyedDraws(batch["__key__"], step, self.seed, x.device)
        image = batch.get("image") if self.cfg.repa_depth else None
        if x.dim() == len(self.spec.shape) + 2:  # (B, 2, *shape): the image's and its mirror's latents
            pick = draws.integers(x.shape[1])
            x = x[torch.arange(x.shape[0], device=x.device), pick]
            if image is not None:
                image = torch.where(pick.bool()[:, None, None, None], image.flip(-1), image)
        cond = self.conditions.from_batch(batch)
        cond.extra["dropout_u"] = draws.uniform()
        if self.cfg.objective == "flow":
            t = self.process.time_from_normal(draws.normal())
        else:
            t = (draws.uniform() * self.cfg.num_timesteps).long().clamp_(max=self.cfg.num_timesteps - 1)
        loss, metrics = self.process.loss(self._net, x, cond, t=t, noise=draws.normal(x.shape[1:]))
        if image is not None:
            repa = cosine_alignment(self._features, self._repa_target(image))
            loss = loss + self.cfg.repa_weight * repa
            metrics["repa"] = repa.detach()
        self._features = None
        return loss, metrics


    def _repa_target(self, image: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch tokens (B, num_patches, repa_dim) of images (B, 3, H, W), resampled to the
        DiT's grid when the teacher's grid differs."""
        return tokens_on_grid(self.frozen["repa_teacher"](image), self.unwrapped("dit").grid)

    @torch.no_grad()
    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """Class-conditional samples as a grid at ``<run_dir>/samples/step_<N>.png`` (rank 0; decoded
        by the VAE / tokenizer the data names, or shown directly for pixels; skipped with a warning
        when that decoder is missing; a text tokenizer (TexTok) decodes T2I rows with their captions and
        class rows with captions drawn from ``model.class_captions``, seeded by the step). Every rank samples the same rows in lockstep, so FSDP2 /
        ZeRO-3 gather parameters as in training."""
        from vtok.eval.grid import save_grid

        inner = self.unwrapped("dit")
        device = inner.pos_embed.device
        cond = self.conditions.for_grid(device)
        if cond is None:
            return {}
        start = time.perf_counter()
        with self.gathered("dit") as model:
            x = sample_dit(model, cond, self.diffusion_settings(self.cfg), steps=self.cfg.eval_steps,
                           solver=self.cfg.eval_solver, guidance=self.cfg.eval_guidance,
                           generator=torch.Generator(device).manual_seed(step))
        metrics = {"sample_seconds": time.perf_counter() - start, "sample_std": float(x.float().std())}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            if self._decoder is None:
                meta = {"source": self.source["source"], **decoder_info(self.source)}
                self._decoder = make_decoder(meta, device=torch.device(device.type)) or False
                if not self._decoder:
                    log.warning("no sample grids: the decoder the data names (%s) is not there", meta)
            if self._decoder:
                dcond = cond if cond.text is not None else None
                if self._captions is not None and self._decoder.needs_text:  # a caption of each row's class
                    dcond, _ = self._captions.condition(cond.labels, torch.Generator().manual_seed(step))
                images = self._decoder(x, dcond).clamp(-1, 1)
                save_grid(images, Path(run_dir) / "samples" / f"step_{step:09d}.png", nrow=self.cfg.eval_per_class)
        return metrics

    def tokens_per_sample(self) -> int:
        inner = self.unwrapped("dit")
        return int(inner.num_patches)

    def flops_per_sample(self) -> float:
        return 6.0 * self._params * self.tokens_per_sample()  # dense estimate, attention excluded

    @staticmethod
    def diffusion_settings(cfg: "DiTTask.Config") -> dict[str, Any]:
        """What sampling needs to know about the training process (stored in the export)."""
        return {"objective": cfg.objective, "flow_loc": cfg.flow_loc, "flow_scale": cfg.flow_scale,
                "flow_shift": cfg.flow_shift, "num_timesteps": cfg.num_timesteps,
                "learn_sigma": cfg.objective == "ddpm"}

    @classmethod
    def export_info(cls, cfg: "DiTTask.Config", recipe) -> dict[str, Any]:
        """The modelled tokens' spec, the source, the decoder (tokenizer / VAE) and diffusion settings."""
        source = find_source(recipe, cfg.source_meta)
        spec = replace(source["token_spec"], condition=cfg.condition)
        return {"arch": cfg.arch, "token_spec": spec, "source": source["source"],
                "diffusion": cls.diffusion_settings(cfg), **decoder_info(source),
                **(text_encoder_info(recipe, cfg.text_meta) if cfg.condition == "text" else {}),
                **({"class_captions": str(Path(cfg.class_captions).resolve())} if cfg.class_captions else {})}
