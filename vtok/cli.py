"""The ``vtok`` command line.

    vtok demo [--out DIR]                       synthetic shapes -> FQGAN -> codes -> FAR -> sample grid
    vtok info RECIPE [key=value ...]            print the resolved recipe
    vtok train RECIPE [key=value ...]           train (resumes from the run dir's latest checkpoint)
    vtok export RECIPE --out DIR                model.safetensors + config.json for inference
    vtok precompute codes --tokenizer DIR ...   image shards -> code shards (resumable, multi-rank)
    vtok sample --generator DIR --tokenizer DIR class-conditional samples (KV cache, CFG) -> grid / npz
    vtok eval recon --tokenizer DIR ...         PSNR / SSIM / LPIPS / rFID / codebook usage + grid
    vtok eval gen --samples NPZ ...             gFID + Inception Score of generated samples
    vtok data synthetic OUT [--format mds]      write the built-in shapes dataset
    vtok data inspect PATH                      shard count, sample count, fields of the first sample

Every user error (bad recipe key, missing shard, corrupt data past the limit) ends with one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vtok.config import RecipeError, load_recipe, recipe_to_yaml
from vtok.data.schema import SchemaError
from vtok.data.transforms import DataError
from vtok.eval import EvalError
from vtok.eval.inception import WEIGHTS_FILE as INCEPTION_FILE, WEIGHTS_URL as INCEPTION_URL

USER_ERRORS = (RecipeError, DataError, SchemaError, FileNotFoundError, EvalError)
CACHE_HELP = "reference-statistics cache (default: $VTOK_CACHE_DIR/fid, else ~/.cache/vtok/fid)"


def _training_errors() -> tuple[type[Exception], ...]:
    from vtok.train import TrainingError

    return (TrainingError,)


def cmd_info(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.get:
        from omegaconf import OmegaConf

        print(OmegaConf.select(OmegaConf.structured(recipe), args.get))
    else:
        print(recipe_to_yaml(recipe), end="")


def cmd_train(args: argparse.Namespace) -> None:
    from vtok.train import Trainer

    trainer = Trainer(load_recipe(args.recipe, args.overrides))
    result = trainer.fit(resume=args.resume)
    if trainer.info.is_main:
        print(f"vtok train: {result['status']} at step {result['step']}; run dir {trainer.run_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    from vtok.train import Trainer

    recipe = load_recipe(args.recipe, [*args.overrides, "log.progress=false", "log.tensorboard=false"])
    trainer = Trainer(recipe)
    from vtok.train.checkpoint import resolve_resume

    path = resolve_resume(trainer.ckpt, args.resume)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {trainer.ckpt.dir}; train first or pass --resume")
    trainer.load(path)
    written = trainer.export(args.out, use_ema=args.ema)
    if trainer.info.is_main:
        print(f"vtok export: step {trainer.step} -> {', '.join(map(str, written))} + config.json")


def cmd_synthetic(args: argparse.Namespace) -> None:
    from vtok.data.synthetic import write_synthetic

    summary = write_synthetic(args.out, args.format, args.num_samples, args.samples_per_shard,
                              args.resolution, args.seed, args.image_format, args.workers)
    print(f"{args.out}: {summary}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from vtok.data.inspect import describe

    print(describe(args.path))


def cmd_demo(args: argparse.Namespace) -> None:
    from vtok.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=args.out, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
                         resolution=args.resolution, workers=args.workers, tokenizer_steps=args.tokenizer_steps,
                         generator_steps=args.generator_steps, per_class=args.per_class,
                         guidance=args.guidance, seed=args.seed))


def cmd_sample(args: argparse.Namespace) -> None:
    from vtok.eval.sample import SampleOptions, run_sample

    opts = SampleOptions(guidance=args.guidance, guidance_schedule=args.guidance_schedule,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         batch_size=args.batch_size, dtype=args.dtype)
    s = run_sample(args.generator, args.tokenizer, args.out, opts, classes=args.classes,
                   per_class=args.per_class, npz=args.npz)
    extra = f" + {s['npz']}" if args.npz else ""
    print(f"vtok sample: {s['num_images']} images in {s['seconds']:.1f}s ({s['images_per_s']:.2f} img/s) "
          f"-> {s['grid']}{extra}")


def cmd_precompute_codes(args: argparse.Namespace) -> None:
    from vtok.parallel.dist import init_distributed
    from vtok.precompute.codes import precompute_codes

    info = init_distributed()
    wrote = precompute_codes(args.tokenizer, args.data, args.out, info, out_format=args.format,
                             resolution=args.resolution, flip=args.flip, batch_size=args.batch_size)
    print(f"vtok precompute codes: rank {info.rank} wrote {wrote} shards -> {args.out}")


def cmd_eval_recon(args: argparse.Namespace) -> None:
    from vtok.eval.recon import evaluate_recon

    report = evaluate_recon(args.tokenizer, args.data, args.out, data_format=args.format,
                            resolution=args.resolution, batch_size=args.batch_size,
                            max_samples=args.max_samples, lpips_vgg=args.lpips_vgg,
                            inception=args.inception, cache_dir=args.cache_dir or None)
    lp = f", LPIPS {report['lpips']:.4f}" if report["lpips"] is not None else ""
    fid = f", rFID {report['rfid']:.3f}" if report["rfid"] is not None else ""
    usage = ", ".join(f"{c['usage']:.1%}" for c in report["codebooks"])
    print(f"vtok eval recon: {report['num_images']} images: PSNR {report['psnr']:.2f} dB, "
          f"SSIM {report['ssim']:.4f}{lp}{fid}; codebook usage {usage} -> {args.out}/recon.json")
    if report["rfid"] is None:
        print(f"  rFID not computed: pass --inception {INCEPTION_FILE} (from {INCEPTION_URL})")


def cmd_eval_gen(args: argparse.Namespace) -> None:
    from vtok.eval.gen import evaluate_gen

    report = evaluate_gen(args.samples, args.out, inception=args.inception, ref=args.ref,
                          ref_stats=args.ref_stats, data_format=args.format, resolution=args.resolution,
                          batch_size=args.batch_size, max_ref=args.max_ref, cache_dir=args.cache_dir or None)
    ref = report["num_ref"] or "precomputed"
    print(f"vtok eval gen: {report['num_samples']} samples vs {ref} reference images: "
          f"gFID {report['gfid']:.3f}, IS {report['inception_score']:.2f} +- {report['inception_score_std']:.2f}"
          f" -> {args.out}/gen.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtok", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole pipeline on built-in synthetic shapes: shards -> FQGAN "
                          "-> codes -> FAR -> samples (resumable)")
    demo.add_argument("--out", default="vtok_demo", help="output directory (default: vtok_demo)")
    demo.add_argument("--num-samples", type=int, default=2048, help="training images")
    demo.add_argument("--samples-per-shard", type=int, default=128)
    demo.add_argument("--resolution", type=int, default=32)
    demo.add_argument("--workers", type=int, default=2, help="data loader workers")
    demo.add_argument("--tokenizer-steps", type=int, default=500)
    demo.add_argument("--generator-steps", type=int, default=600)
    demo.add_argument("--per-class", type=int, default=4, help="samples per class (24 classes)")
    demo.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="print a recipe resolved with its includes and overrides")
    info.add_argument("recipe", help="recipe YAML, e.g. recipes/smoke/shapes_data.yaml")
    info.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.resolution=128")
    info.add_argument("--get", metavar="KEY", help="print one resolved value, e.g. --get run_dir")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a recipe (resumes from its run dir by itself)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.steps=1000")
    train.add_argument("--resume", default="", help="a checkpoint dir (default: <run_dir>/checkpoints/latest)")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="write model.safetensors + config.json from a checkpoint")
    export.add_argument("recipe")
    export.add_argument("overrides", nargs="*")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--resume", default="", help="checkpoint dir (default: the latest)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.set_defaults(func=cmd_export)

    pre = sub.add_parser("precompute", help="offline jobs over shards").add_subparsers(
        dest="precompute_command", required=True)
    codes = pre.add_parser("codes", help="image shards -> token-code shards with a frozen tokenizer")
    codes.add_argument("--tokenizer", required=True, help="a `vtok export` directory")
    codes.add_argument("--data", required=True, help="image shards: tar dir / brace pattern, or MDS dir")
    codes.add_argument("--out", required=True, help="output directory (resumable)")
    codes.add_argument("--format", choices=("wds", "mds"), default="", help="default: the input's")
    codes.add_argument("--resolution", type=int, default=256)
    codes.add_argument("--flip", action="store_true", help="also encode the mirrored image (codes (2, ...))")
    codes.add_argument("--batch-size", type=int, default=64)
    codes.set_defaults(func=cmd_precompute_codes)

    smp = sub.add_parser("sample", help="class-conditional images from a generator export + its tokenizer")
    smp.add_argument("--generator", required=True, help="`vtok export` dir of a gpt / far run")
    smp.add_argument("--tokenizer", required=True, help="`vtok export` dir of the tokenizer of its codes")
    smp.add_argument("--out", required=True, help="output dir (samples.png, samples.npz)")
    smp.add_argument("--classes", default="", help="comma-separated class ids (default: all)")
    smp.add_argument("--per-class", type=int, default=4)
    smp.add_argument("--guidance", type=float, default=2.0, help="CFG scale; 1 disables guidance")
    smp.add_argument("--guidance-schedule", choices=("constant", "linear"), default="constant")
    smp.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    smp.add_argument("--top-k", type=int, default=0, help="0: off")
    smp.add_argument("--top-p", type=float, default=1.0, help="1: off")
    smp.add_argument("--seed", type=int, default=0, help="batch i uses seed + i")
    smp.add_argument("--batch-size", type=int, default=32)
    smp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    smp.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0 uint8 NHWC) for eval gen")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    recon = ev.add_parser("recon", help="PSNR / SSIM / LPIPS / codebook usage of a tokenizer export")
    recon.add_argument("--tokenizer", required=True, help="a `vtok export` directory")
    recon.add_argument("--data", required=True, help="eval image shards")
    recon.add_argument("--format", choices=("wds", "mds"), default="wds")
    recon.add_argument("--out", required=True, help="report directory (recon.json, recon_grid.png)")
    recon.add_argument("--resolution", type=int, default=256)
    recon.add_argument("--batch-size", type=int, default=32)
    recon.add_argument("--max-samples", type=int, default=0, help="0: the whole set")
    recon.add_argument("--lpips-vgg", default="", help="torchvision vgg16 weights file for LPIPS")
    recon.add_argument("--inception", default="", help=f"FID Inception weights ({INCEPTION_FILE}) for rFID")
    recon.add_argument("--cache-dir", default="", help=CACHE_HELP)
    recon.set_defaults(func=cmd_eval_recon)
    gen = ev.add_parser("gen", help="gFID / Inception Score of generated samples (ADM .npz)")
    gen.add_argument("--samples", required=True, help=".npz whose arr_0 is uint8 (N, H, W, 3)")
    refs = gen.add_mutually_exclusive_group(required=True)
    refs.add_argument("--ref", default="", help="reference image shards (statistics are cached)")
    refs.add_argument("--ref-stats", default="", help="precomputed reference .npz with mu, sigma")
    gen.add_argument("--format", choices=("wds", "mds"), default="wds", help="format of --ref")
    gen.add_argument("--inception", required=True, help=f"FID Inception weights ({INCEPTION_FILE})")
    gen.add_argument("--out", required=True, help="report directory (gen.json)")
    gen.add_argument("--resolution", type=int, default=256, help="center-crop size of the reference images")
    gen.add_argument("--batch-size", type=int, default=64)
    gen.add_argument("--max-ref", type=int, default=0, help="reference images to use; 0: all")
    gen.add_argument("--cache-dir", default="", help=CACHE_HELP)
    gen.set_defaults(func=cmd_eval_gen)

    data = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command",
                                                                            required=True)
    syn = data.add_parser("synthetic", help="write the built-in coloured-shapes dataset")
    syn.add_argument("out")
    syn.add_argument("--format", choices=("wds", "mds"), default="wds")
    syn.add_argument("--num-samples", type=int, default=2048)
    syn.add_argument("--samples-per-shard", type=int, default=256)
    syn.add_argument("--resolution", type=int, default=256)
    syn.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--workers", type=int, default=2)
    syn.set_defaults(func=cmd_synthetic)
    ins = data.add_parser("inspect", help="summarise a shard directory or tar")
    ins.add_argument("path")
    ins.set_defaults(func=cmd_inspect)
    return p


def load_plugins() -> None:
    """Import the modules named in VTOK_PLUGINS (comma-separated), e.g. out-of-tree TrainTasks that
    register themselves with ``@register_task``."""
    import importlib
    import os

    for name in filter(None, (n.strip() for n in os.environ.get("VTOK_PLUGINS", "").split(","))):
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_plugins()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("streaming").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        args.func(args)
    except USER_ERRORS + (_training_errors() if args.command in ("train", "export") else ()) as e:
        print(f"vtok: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
