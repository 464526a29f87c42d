"""``vtok demo``: the whole pipeline on the built-in synthetic shapes, on a CPU in minutes.

``--family fqgan`` (default): a tokenizer and an AR generator on its codes:

    synthetic shapes ──▶ WebDataset shards ──▶ smoke FQGAN-Dual (recipes/smoke/fqgan_dual.yaml)
      ──▶ export ──▶ reconstruction eval ──▶ code shards ──▶ smoke FAR (recipes/smoke/far_dual.yaml)
      ──▶ export ──▶ class-conditional samples ──▶ demo.json

``--family dit``: a class-conditional DiT (rectified flow) on the 16 px images themselves
(recipes/smoke/dit_shapes.yaml; the same task and DiT code that train on VAE latents at scale):

    synthetic shapes ──▶ WebDataset shards ──▶ smoke DiT ──▶ export ──▶ samples ──▶ demo.json

``--family flextok``: an ordered 1D tokenizer and a variable-length AR generator on its tokens, with
the identity "VAE" (the 16 px pixels are the latents) so that it fits on 2 CPU cores:

    synthetic shapes ──▶ WebDataset shards ──▶ smoke FlexTok (recipes/smoke/flextok_shapes.yaml)
      ──▶ export ──▶ eval by length (PSNR by k, coarse-to-fine grid, judged reconstructions)
      ──▶ token shards ──▶ smoke GPT (recipes/smoke/gpt_flextok_shapes.yaml) ──▶ export
      ──▶ class-conditional samples from the first K tokens, for each K in --num-tokens ──▶ demo.json

``--family textok``: captions -> T5 embeddings (a tiny random T5 built offline) -> a TexTok that
reads them in context (recipes/smoke/textok_shapes.yaml) -> PSNR with and without the captions ->
token shards (with the captions) -> a DiT-T2I on the tokens (recipes/smoke/dit_textok_t2i.yaml) ->
samples for one typed caption per class ("a red circle on a white background"), judged.

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
        "help": "fqgan: FQGAN tokenizer -> codes -> FAR (AR); dit: a DiT on the 16 px images (diffusion); "
                "flextok: FlexTok (ordered 1D tokens) -> tokens -> a GPT sampled at several lengths; "
                "textok: captions -> T5 -> TexTok (text in context) -> tokens -> DiT-T2I sampled from typed captions"})
    num_samples: int = field(default=2048, metadata={"help": "training images"})
    samples_per_shard: int = 128
    resolution: int = 32
    workers: int = field(default=2, metadata={"help": "data loader workers"})
    tokenizer_steps: int = field(default=0, metadata={
        "help": "steps of the tokenizer (default 0: the family's, fqgan 400, flextok 3000, textok 3000)"})
    generator_steps: int = field(default=0, metadata={
        "help": "steps of the FAR / DiT / GPT / DiT-T2I generator (default 0: the family's, 600; textok 1500)"})
    generator_batch: int = field(default=0, metadata={"help": "batch size of the generator (default 0: its recipe's)"})
    per_class: int = field(default=4, metadata={"help": "samples per class (24 classes)"})
    guidance: float = field(default=0.0, metadata={
        "help": "classifier-free guidance scale (default 0: the family's, fqgan 2.0, dit 3.0)"})
    dit_resolution: int = field(default=16, metadata={
        "help": "image side the --family dit DiT and the --family flextok FlexTok model"})
    num_tokens: str = field(default="1,16", metadata={
        "help": "flextok: comma-separated token counts K; samples are generated from the first K tokens for each"})
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


FAMILIES = ("fqgan", "dit", "flextok", "textok")
GUIDANCE = {"fqgan": 2.0, "dit": 3.0, "flextok": 2.0, "textok": 3.0}  # best class match of each smoke generator
# textok 3000: at 400 steps its reconstructions are pale blobs (5% keep the colour) that the DiT cannot colour
TOKENIZER_STEPS = {"fqgan": 400, "dit": 0, "flextok": 3000, "textok": 3000}
GENERATOR_STEPS = {"fqgan": 600, "dit": 600, "flextok": 600, "textok": 1500}
STAGES = {"fqgan": 5, "dit": 3, "flextok": 5, "textok": 6}


def run_demo(opts: DemoOptions) -> dict:
    """Run (or resume) every stage of ``opts.family``; writes ``<out>/demo.json`` and returns it."""
    from vtok.config import RecipeError

    if opts.family not in FAMILIES:
        raise RecipeError(f"--family {opts.family!r}: expected one of {', '.join(FAMILIES)}")
    out = Path(opts.out).resolve()
    opts = replace(opts, guidance=opts.guidance or GUIDANCE[opts.family],
                   tokenizer_steps=opts.tokenizer_steps or TOKENIZER_STEPS[opts.family],
                   generator_steps=opts.generator_steps or GENERATOR_STEPS[opts.family])
    lengths = _parse_num_tokens(opts.num_tokens) if opts.family == "flextok" else []
    timings: dict[str, float] = {}
    report: dict = {"options": vars(opts)}
    stages = STAGES[opts.family]
    t = _stage(f"1/{stages} data: {opts.num_samples} synthetic {opts.resolution}px shapes (24 classes) -> {out}/wds")
    _data(opts, out)
    timings["data"] = time.perf_counter() - t
    if opts.family == "fqgan":
        tokenizer, res = _fqgan_stages(opts, out, report, timings), opts.resolution
    elif opts.family == "flextok":
        tokenizer, res = _flextok_stages(opts, out, report, timings), opts.dit_resolution
    elif opts.family == "textok":
        tokenizer, res = _textok_stages(opts, out, report, timings), opts.resolution
    else:
        tokenizer, res = _dit_stage(opts, out, report, timings), opts.dit_resolution
    t = _stage(f"{stages}/{stages} sampling: {opts.per_class} per class, guidance {opts.guidance}"
               + (f", from the first K = {', '.join(map(str, lengths))} tokens" if lengths else ""))
    if opts.family == "textok":
        report["samples"] = _sample_captions(opts, out, tokenizer)
    elif lengths:
        report["samples_by_k"] = {k: _sample(opts, out, tokenizer, res, num_tokens=k)
                                  for k in lengths}
        for k, s in report["samples_by_k"].items():
            print(f"K = {k:3d} tokens: colour {s['colour_match']:.0%}, shape {s['shape_match']:.0%}, "
                  f"both {s['class_match']:.0%} -> {s['grid']}")
        report["samples"] = report["samples_by_k"][lengths[-1]]
    else:
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
    recon = {"fqgan": f"{out / 'recon_grid.png'} (originals above reconstructions), ",
             "textok": f"{out / 'recon_grid.png'} (originals, then reconstructions with and without captions), ",
             "flextok": f"{out / 'coarse_to_fine.png'} (input, then decodes from k = 1, 2, 4, ... tokens), "
                        f"{out / 'by_length.png'}, "}.get(opts.family, "")
    print(f"pictures: {report['samples']['grid']} (one row per class), {recon}{out / 'runs/generator/samples'}/ "
          f"(samples during training); metrics: {out / 'demo.json'}")
    return report


def _common(opts: DemoOptions, resolution: int) -> list[str]:
    return [f"data.resolution={resolution}", f"data.num_workers={opts.workers}", "log.tensorboard=false",
            f"seed={opts.seed}"]


def _generator_args(opts: DemoOptions) -> list[str]:
    """Recipe overrides of the generator stage: its steps, and its batch size when set."""
    return [f"train.steps={opts.generator_steps}", *([f"data.batch_size={opts.generator_batch}"]
                                                     if opts.generator_batch else [])]


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

    _codes_and_generator(opts, out, report, timings, "wds", "far_dual.yaml", res, flip=True,
                         titles=("3/5 codes: frozen tokenizer -> code shards (image + mirror)",
                                 f"4/5 generator: smoke FAR on the codes, {opts.generator_steps} steps"),
                         in_process=True)
    return str(out / "tokenizer")


def _codes_and_generator(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float], data: str,
                         recipe: str, res: int, *, titles: tuple[str, str], flip: bool = False,
                         in_process: bool = False) -> None:
    """The frozen ``<out>/tokenizer`` encodes ``<out>/<data>`` into ``<out>/codes`` (resumable), then the
    generator ``recipe`` trains on them and is exported to ``<out>/generator``; ``in_process``: read the
    code shards without loader workers (they are tiny: the FAR stage ran 8% faster so on 2 cores)."""
    from vtok.parallel.dist import init_distributed
    from vtok.precompute.codes import precompute_codes

    t = _stage(titles[0])
    precompute_codes(str(out / "tokenizer"), str(out / data), str(out / "codes"), init_distributed(),
                     resolution=res, flip=flip, batch_size=64)
    timings["codes"] = time.perf_counter() - t
    t = _stage(titles[1])
    last = _train(recipe, [*_common(opts, res), *(["data.num_workers=0"] if in_process else []),
                           f"data.train_shards={out / 'codes'}", f"run_dir={out / 'runs/generator'}",
                           *_generator_args(opts)], out / "generator")
    report["generator"] = {k: v for k, v in last.items() if k.startswith("main/")}
    timings["generator"] = time.perf_counter() - t


def _parse_num_tokens(text: str) -> list[int]:
    """"1,16" -> [1, 16] (sorted, unique); one-line RecipeError otherwise."""
    from vtok.config import RecipeError

    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise RecipeError(f"--num-tokens {text!r}: expected comma-separated token counts >= 1, e.g. 1,16")
    return ks


FLEXTOK_DECODE_STEPS = 10  # Euler steps of the smoke FlexTok's decoder (no guidance: it hurts this tiny model)


def _flextok_stages(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float]) -> str:
    """Tokenizer, its evaluation by length, token shards and the GPT; returns the tokenizer dir."""
    from vtok.eval.recon import evaluate_recon

    res, common = opts.dit_resolution, _common(opts, opts.dit_resolution)
    t = _stage(f"2/5 tokenizer: smoke FlexTok (identity VAE, {res}px), {opts.tokenizer_steps} steps")
    last = _train("flextok_shapes.yaml", [*common, f"data.train_shards={out / 'wds'}",
                                          f"run_dir={out / 'runs/tokenizer'}", f"train.steps={opts.tokenizer_steps}"],
                  out / "tokenizer")
    recon = evaluate_recon(str(out / "tokenizer"), str(out / "eval"), str(out), resolution=res, batch_size=64,
                           steps=FLEXTOK_DECODE_STEPS, guidance=1.0, apg=False, seed=opts.seed)
    table = "  ".join(f"k={row['k']}: {row['psnr']:.2f}" for row in recon["by_length"])
    print(f"reconstruction of 256 held-out images from the first k tokens, PSNR dB: {table}")
    judged = _judge_reconstructions(out / "tokenizer", res, opts.seed)
    print("judged reconstructions (96 renders): " + ", ".join(
        f"k={k}: colour {v['colour_match']:.0%} shape {v['shape_match']:.0%}" for k, v in judged.items()))
    report["tokenizer"] = {"train_mse": last.get("main/mse"), "by_length": recon["by_length"], "judged": judged,
                           "codebooks": recon["codebooks"]}
    timings["tokenizer"] = time.perf_counter() - t

    _codes_and_generator(opts, out, report, timings, "wds", "gpt_flextok_shapes.yaml", res,
                         titles=("3/5 tokens: frozen FlexTok -> token shards",
                                 f"4/5 generator: smoke GPT on the ordered tokens, {opts.generator_steps} steps"))
    return str(out / "tokenizer")


def _textok_stages(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float]) -> str:
    """Caption embeddings, the TexTok (with its with / without text evaluation), its tokens and the
    DiT-T2I; returns the tokenizer dir."""
    from vtok.eval.recon import evaluate_recon
    from vtok.parallel.dist import init_distributed
    from vtok.precompute.runner import RunnerOptions, run_job
    from vtok.precompute.text_emb import TextEmbJob, TextEmbOptions, save_random_t5

    res, common = opts.resolution, _common(opts, opts.resolution)
    t = _stage("2/6 text: captions -> T5 embeddings (a tiny random T5, built offline)")
    if not (out / "t5" / "config.json").is_file():
        save_random_t5(out / "t5")
    for src in ("wds", "eval"):
        run_job(TextEmbJob(TextEmbOptions(encoder=str(out / "t5"), max_length=TEXT_LENGTH)),
                RunnerOptions(data=str(out / src), out=str(out / f"{src}_t5"), batch_size=128,
                              workers=opts.workers), init_distributed())
    timings["text"] = time.perf_counter() - t

    t = _stage(f"3/6 tokenizer: smoke TexTok (captions in context), {opts.tokenizer_steps} steps")
    last = _train("textok_shapes.yaml", [*common, f"data.train_shards={out / 'wds_t5'}",
                                         f"run_dir={out / 'runs/tokenizer'}", f"train.steps={opts.tokenizer_steps}"],
                  out / "tokenizer")
    recon = evaluate_recon(str(out / "tokenizer"), str(out / "eval_t5"), str(out), resolution=res, batch_size=64)
    without = recon["without_text"]
    print(f"reconstruction of 256 held-out images: PSNR {recon['psnr']:.2f} dB with their captions, "
          f"{without['psnr']:.2f} dB with the captions masked -> {out}/recon_grid.png")
    report["tokenizer"] = {"train_psnr": last.get("eval/psnr"), "psnr": recon["psnr"], "ssim": recon["ssim"],
                           "without_text": {k: without[k] for k in ("psnr", "ssim")}}
    timings["tokenizer"] = time.perf_counter() - t

    _codes_and_generator(opts, out, report, timings, "wds_t5", "dit_textok_t2i.yaml", res,
                         titles=("4/6 tokens: frozen TexTok -> token shards (with the captions)",
                                 f"5/6 generator: smoke DiT-T2I on the tokens, {opts.generator_steps} steps"))
    return str(out / "tokenizer")


TEXT_LENGTH = 16  # T5 tokens per caption in the textok demo (the shapes' captions have at most 9 words)


def typed_captions(background: str = "white") -> tuple[list[str], np.ndarray]:
    """One caption per class, in the synthetic data's own words ("a red circle on a white background"),
    and the class ids (24,) they name."""
    from vtok.data.synthetic import COLORS, SHAPES, class_id

    captions, labels = [], []
    for shape in SHAPES:
        for colour in COLORS:
            article = "an" if colour[0] in "aeiou" else "a"
            captions.append(f"{article} {colour} {shape} on a {background} background")
            labels.append(class_id(shape, colour))
    return captions, np.array(labels)


def _sample_captions(opts: DemoOptions, out: Path, tokenizer: str) -> dict:
    """Samples of the DiT-T2I for one typed caption per class (``<out>/samples.png``: a row per
    caption), judged for the colour and shape the caption names."""
    from vtok.eval.judge import judge_samples
    from vtok.eval.sample import SampleOptions, run_sample

    captions, classes = typed_captions()
    sampled = run_sample(str(out / "generator"), tokenizer, str(out),
                         SampleOptions(guidance=opts.guidance, seed=opts.seed, batch_size=48),
                         captions=captions, per_caption=opts.per_class, npz=True)
    with np.load(sampled["npz"]) as z:
        images, labels = z["arr_0"], classes[z["labels"]]
    judged = judge_samples(images, labels, seed=opts.seed).to_dict()
    return {"num_images": len(images), "grid": sampled["grid"], "guidance": opts.guidance, **judged,
            "captions": captions}


def _judge_reconstructions(tokenizer: Path, res: int, seed: int, count: int = 96) -> dict[int, dict]:
    """Colour / shape faithfulness (``vtok.eval.judge``) of FlexTok reconstructions of ``count`` fresh
    renders from their first k tokens, k = 0 (the null condition), 1 and R."""
    import torch

    from vtok.eval.grid import to_uint8
    from vtok.eval.judge import judge_samples, render_real, train_judge
    from vtok.models.export import load_export

    model = load_export(str(tokenizer), "tokenizer").model.eval()
    images, labels = render_real(count, res, seed=seed + 7)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    out, judge = {}, train_judge(res, seed=seed)
    with torch.no_grad():
        ids = model.encode(x)
        for k in (0, 1, model.cfg.num_registers):
            rec = model.decode(ids, num_tokens=k, steps=FLEXTOK_DECODE_STEPS, noise=noise)
            j = judge_samples(to_uint8(rec), labels, seed=seed, judge=judge)
            out[k] = {n: j.samples[n] for n in ("colour_match", "shape_match", "class_match")}
    return out


def _dit_stage(opts: DemoOptions, out: Path, report: dict, timings: dict[str, float]) -> str:
    """The smoke DiT on the images at ``dit_resolution``; returns "" (pixels need no decoder)."""
    t = _stage(f"2/3 generator: smoke DiT (rectified flow) on {opts.dit_resolution}px images, "
               f"{opts.generator_steps} steps")
    last = _train("dit_shapes.yaml", [*_common(opts, opts.dit_resolution), f"data.train_shards={out / 'wds'}",
                                      f"run_dir={out / 'runs/generator'}", *_generator_args(opts)],
                  out / "generator")
    report["generator"] = {k: v for k, v in last.items() if k.startswith("main/")}
    timings["generator"] = time.perf_counter() - t
    return ""


def _sample(opts: DemoOptions, out: Path, tokenizer: str, res: int, num_tokens: int = 0) -> dict:
    """Class-conditional samples of ``<out>/generator`` (``<out>/samples.png`` + npz) judged for class
    colour and shape (``vtok.eval.judge``), beside the same statistics on real renders at the same
    resolution; ``num_tokens`` = K > 0: a variable-length generator draws (and FlexTok decodes) K
    tokens, written to ``<out>/samples_k<K>/``."""
    from vtok.data.synthetic import NUM_CLASSES
    from vtok.eval.judge import judge_samples
    from vtok.eval.sample import SampleOptions, run_sample

    sampled = run_sample(str(out / "generator"), tokenizer, str(out / f"samples_k{num_tokens}" if num_tokens else out),
                         SampleOptions(guidance=opts.guidance, seed=opts.seed, batch_size=48, num_tokens=num_tokens,
                                       **({"decode_steps": FLEXTOK_DECODE_STEPS} if num_tokens else {})),
                         per_class=opts.per_class, npz=True)
    with np.load(sampled["npz"]) as z:
        images, labels = z["arr_0"], z["labels"]
    judged = judge_samples(images, labels, seed=opts.seed).to_dict()
    return {"num_images": len(images), "grid": sampled["grid"], "guidance": opts.guidance, **judged,
            "classes": NUM_CLASSES}
