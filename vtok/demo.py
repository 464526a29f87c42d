"""``vtok demo``: the whole pipeline on the built-in synthetic shapes, on a CPU in minutes.

``--family fqgan`` (default): a tokenizer and an AR generator on its codes:

    synthetic shapes ──▶ WebDataset shards ──▶ smoke FQGAN-Dual (recipes/smoke/fqgan_dual.yaml)
      ──▶ export ──▶ reconstruction eval ──▶ code shards ──▶ smoke FAR (recipes/smoke/far_dual.yaml)
      ──▶ export ──▶ class-conditional samples ──▶ demo.json

``--family dit``: a class-conditional DiT (rectified flow) on the 16 px images themselves
(recipes/smoke/dit_shapes.yaml; the same task and DiT code that train on VAE latents at scale):

    synthetic shapes ──▶ WebDataset shards ──▶ smoke DiT ──▶ export ──▶ samples ──▶ demo.json

Every stage resumes: finished shards, trained runs (``COMPLETE``) and exports are kept, so a second
``vtok demo`` only re-samples. Class faithfulness (``vtok.eval.judge``): the colour of each sample's
shape and its shape, judged against the class it was asked for (chance 1/6 and 1/4), with an
accuracy-based Inception Score; the same statistics on real renders are printed beside them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import vtok
from vtok.data.writers import atomic_write_bytes

RECIPES = Path(vtok.__file__).resolve().parent.parent / "recipes" / "smoke"


@dataclass
class DemoOptions:
    """What ``vtok demo`` runs; each field is a ``--flag`` (``metadata["help"]`` is its help)."""

    out: str = field(default="vtok_demo", metadata={"help": "output directory (default: vtok_demo)"})
    family: str = field(default="fqgan", metadata={
        "help": "fqgan: FQGAN tokenizer -> codes -> FAR (AR); dit: a DiT on the 16 px images (diffusion)"})
    num_samples: int = field(default=2048, metadata={"help": "training images"})
    samples_per_shard: int = 128
    resolution: int = 32
    workers: int = field(default=2, metadata={"help": "data loader workers"})
    tokenizer_steps: int = 400
    generator_steps: int = field(default=600, metadata={"help": "steps of the FAR / DiT generator"})
    per_class: int = field(default=4, metadata={"help": "samples per class (24 classes)"})
    guidance: float = field(default=0.0, metadata={
        "help": "classifier-free guidance scale (default 0: the family's, fqgan 2.0, dit 3.0)"})
    dit_resolution: int = field(default=16, metadata={"help": "image side the --family dit DiT models"})
    seed: int = 0


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _train(recipe_name: str, overrides: list[str], export_dir: Path) -> dict:
    """Train a smoke recipe (resuming) and export it; returns the last logged metrics."""
    from vtok.config import load_recipe
    from vtok.train import Trainer

    recipe_path = RECIPES / recipe_name
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} not found: run vtok demo from a source checkout "
                                "(pip install -e .), where recipes/ sits beside the package")
    trainer = Trainer(load_recipe(recipe_path, overrides))
    result = trainer.fit()
    if not (export_dir / "config.json").is_file():
        trainer.export(export_dir)
    metrics_file = Path(trainer.run_dir) / "metrics.jsonl"
    last: dict = {}  # the latest value of every metric (train and eval lines alternate)
    for line in metrics_file.read_text().splitlines() if metrics_file.is_file() else []:
        last.update(json.loads(line))
    print(f"{recipe_name}: {result['status']} at step {result['step']}; exported -> {export_dir}")
    return last


def class_faithfulness(images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 images (N, H, W, 3) whose shape colour is the colour of their class ``labels``
    (N,) (``colour_match`` of ``vtok.eval.judge``, without fitting the shape judge)."""
    from vtok.data.synthetic import colour_of_class, dominant_colour

    return float((dominant_colour(images) == colour_of_class(labels)).mean())


FAMILIES = ("fqgan", "dit")
GUIDANCE = {"fqgan": 2.0, "dit": 3.0}  # measured best class match of each family's smoke generator


def run_demo(opts: DemoOptions) -> dict:
    """Run (or resume) every stage of ``opts.family``; writes ``<out>/demo.json`` and returns it."""
    from vtok.config import RecipeError

    if opts.family not in FAMILIES:
        raise RecipeError(f"--family {opts.family!r}: expected one of {', '.join(FAMILIES)}")
    out = Path(opts.out).resolve()
    opts = replace(opts, guidance=opts.guidance or GUIDANCE[opts.family])
    timings: dict[str, float] = {}
    report: dict = {"options": vars(opts)}
    stages = 5 if opts.family == "fqgan" else 3
    t = _stage(f"1/{stages} data: {opts.num_samples} synthetic {opts.resolution}px shapes (24 classes) -> {out}/wds")
    _data(opts, out)
    timings["data"] = time.perf_counter() - t
    if opts.family == "fqgan":
        tokenizer, res = _fqgan_stages(opts, out, report, timings), opts.resolution
    else:
        tokenizer, res = _dit_stage(opts, out, report, timings), opts.dit_resolution
    t = _stage(f"{stages}/{stages} sampling: {opts.per_class} per class, guidance {opts.guidance}")
    report["samples"] = _sample(opts, out, tokenizer, res)
    timings["sampling"] = time.perf_counter() - t
    report["seconds"] = timings
    atomic_write_bytes(out / "demo.json", json.dumps(report, indent=1, default=str).encode())
    s = report["samples"]
    print(f"\nclass faithfulness of {s['num_images']} samples (real images in brackets; chance in braces):\n"
          f"  colour {s['colour_match']:.0%} ({s['real']['colour_match']:.0%}) {{17%}}, "
          f"shape {s['shape_match']:.0%} ({s['real']['shape_match']:.0%}) {{25%}}, "
          f"both {s['class_match']:.0%} ({s['real']['class_match']:.0%}) {{4%}}; "
          f"judge inception score {s['inception_score']:.1f} ({s['real']['inception_score']:.1f}) of 24")
    print(f"stage times: {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}")
    recon = f"{out / 'recon_grid.png'} (originals above reconstructions), " if opts.family == "fqgan" else ""
    print(f"pictures: {out / 'samples.png'} (one row per class), {recon}{out / 'runs/generator/samples'}/ "
          f"(samples during training); metrics: {out / 'demo.json'}")
    return report


def _common(opts: DemoOptions, resolution: int) -> list[str]:
    return [f"data.resolution={resolution}", f"data.num_workers={opts.workers}", "log.tensorboard=false",
            f"seed={opts.seed}"]


def _data(opts: DemoOptions, out: Path) -> None:
    """Training shards (``<out>/wds``) and 256 held-out images (``<out>/eval``)."""
    from vtok.data.synthetic import write_synthetic

    res = opts.resolution
    print(write_synthetic(out / "wds", "wds", opts.num_samples, opts.samples_per_shard, res, seed=opts.seed,
                          workers=opts.workers))
    print(write_synthetic(out / "eval", "wds", 256, opts.samples_per_shard, res, seed=opts.seed + 1,
                          workers=opts.workers))


def _fqgan_stages(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float]) -> str:
    """Tokenizer, reconstruction eval, code shards and the FAR generator; returns the tokenizer dir."""
    from vtok.eval.recon import evaluate_recon
    from vtok.parallel.dist import init_distributed
    from vtok.precompute.codes import precompute_codes

    res, common = opts.resolution, _common(opts, opts.resolution)
    t = _stage(f"2/5 tokenizer: smoke FQGAN-Dual, {opts.tokenizer_steps} steps")
    last = _train("fqgan_dual.yaml", [*common, f"data.train_shards={out / 'wds'}", f"run_dir={out / 'runs/tokenizer'}",
                                      f"train.steps={opts.tokenizer_steps}"], out / "tokenizer")
    recon = evaluate_recon(str(out / "tokenizer"), str(out / "eval"), str(out), resolution=res, batch_size=64)
    usage = ", ".join(f"{c['usage']:.0%}" for c in recon["codebooks"])
    print(f"reconstruction of 256 held-out images: PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}, "
          f"codebook usage {usage} -> {out}/recon_grid.png")
    report["tokenizer"] = {"train_psnr": last.get("generator/psnr"), **{k: recon[k] for k in
                                                                          ("psnr", "ssim", "codebooks")}}
    timings["tokenizer"] = time.perf_counter() - t

    t = _stage("3/5 codes: frozen tokenizer -> code shards (image + mirror)")
    precompute_codes(str(out / "tokenizer"), str(out / "wds"), str(out / "codes"), init_distributed(),
                     resolution=res, flip=True, batch_size=64)
    timings["codes"] = time.perf_counter() - t

    t = _stage(f"4/5 generator: smoke FAR on the codes, {opts.generator_steps} steps")
    last = _train("far_dual.yaml", [*common, f"data.train_shards={out / 'codes'}", f"run_dir={out / 'runs/generator'}",
                                    f"train.steps={opts.generator_steps}"], out / "generator")
    report["generator"] = {k: v for k, v in last.items() if k.startswith("main/")}
    timings["generator"] = time.perf_counter() - t
    return str(out / "tokenizer")


def _dit_stage(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float]) -> str:
    """The smoke DiT on the images at ``dit_resolution``; returns "" (pixels need no decoder)."""
    t = _stage(f"2/3 generator: smoke DiT (rectified flow) on {opts.dit_resolution}px images, "
               f"{opts.generator_steps} steps")
    last = _train("dit_shapes.yaml", [*_common(opts, opts.dit_resolution), f"data.train_shards={out / 'wds'}",
                                      f"run_dir={out / 'runs/generator'}", f"train.steps={opts.generator_steps}"],
                  out / "generator")
    report["generator"] = {k: v for k, v in last.items() if k.startswith("main/")}
    timings["generator"] = time.perf_counter() - t
    return ""


def _sample(opts: DemoOptions, out: Path, tokenizer: str, res: int) -> dict:
    """Class-conditional samples (``<out>/samples.png`` + npz) judged for class colour and shape
    (``vtok.eval.judge``), beside the same statistics on real renders at the same resolution."""
    from vtok.data.synthetic import NUM_CLASSES
    from vtok.eval.judge import judge_samples
    from vtok.eval.sample import SampleOptions, run_sample

    sampled = run_sample(str(out / "generator"), tokenizer, str(out),
                         SampleOptions(guidance=opts.guidance, seed=opts.seed, batch_size=48),
                         per_class=opts.per_class, npz=True)
    with np.load(sampled["npz"]) as z:
        images, labels = z["arr_0"], z["labels"]
    judged = judge_samples(images, labels, seed=opts.seed).to_dict()
    return {"num_images": len(images), "grid": sampled["grid"], "guidance": opts.guidance, **judged,
            "classes": NUM_CLASSES}
