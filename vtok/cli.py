"""The vtok command line.

    vtok demo [--out DIR]                       synthetic shapes -> FQGAN -> codes -> FAR -> sample grid
    vtok demo --family dit [--out DIR]          synthetic shapes -> DiT (rectified flow) -> sample grid
    vtok info RECIPE [key=value ...]            print the resolved recipe
    vtok train RECIPE [key=value ...]           train (resumes from the run dir's latest checkpoint)
    vtok export RECIPE --out DIR                model.safetensors + config.json for inference
    vtok plan RECIPE --gpus N --gpu H100        memory per GPU per strategy, step time, days, GPU-hours
    vtok precompute codes --tokenizer DIR ...   image shards -> code shards (resumable, multi-rank)
    vtok precompute captions|text-emb|latents   add caption / T5 text_emb / VAE latents to shards
    vtok sample --generator DIR [--tokenizer DIR] class-conditional samples (GPT / DiT, CFG) -> grid / npz
    vtok sample --generator DIR --caption TEXT  text-conditional samples (T5 captions, CFG) -> grid / npz
    vtok eval recon --tokenizer DIR ...         PSNR / SSIM / LPIPS / rFID / codebook usage + grid
    vtok eval gen --samples NPZ ...             gFID + Inception Score of generated samples
    vtok data synthetic OUT [--format mds]      write the built-in shapes dataset
    vtok data inspect PATH                      shard count, sample count, fields of the first sample
    vtok data class-captions --data S --out F   held-out captions per class (TexTok under a class DiT)

Every user error (bad recipe key, missing shard, corrupt data past the limit) ends with one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vtok.cli_args import (HelpFormatter, RawHelpFormatter, add_dataclass_args, dataclass_from_args,
                           missing_help, plain, walk_parsers)
from vtok.config import RecipeError, load_recipe, recipe_to_yaml
from vtok.console import existing, setup_logging, summary
from vtok.data.schema import SchemaError
from vtok.data.transforms import DataError
from vtok.eval import EvalError
from vtok.eval.inception import WEIGHTS_FILE as INCEPTION_FILE, WEIGHTS_URL as INCEPTION_URL

USER_ERRORS = (RecipeError, DataError, SchemaError, FileNotFoundError, EvalError)
CACHE_HELP = "reference-statistics cache (default: $VTOK_CACHE_DIR/fid, else ~/.cache/vtok/fid)"
DESCRIPTION = ("vtok trains visual tokenizers and the generators on their tokens:\n"
               "image shards -> tokenizer -> code shards -> generator -> samples, each stage one command.")
RECIPE_HELP = "path to a recipe YAML, e.g. recipes/smoke/fqgan_dual.yaml"
OVERRIDES_HELP = "dotlist overrides of recipe keys, e.g. train.steps=1000 run_dir=runs/try1 (default: none)"
RUN_DIR_HELP = ("Each run writes into its recipe's run_dir (default: runs/<recipe name>, e.g. "
                "runs/smoke-fqgan-dual; change it with the override run_dir=DIR): config.yaml, "
                "run_info.json, metrics.jsonl, tensorboard/, samples/, checkpoints/step_*/ with a "
                "'latest' pointer (ckpt.dir moves them), and COMPLETE when all steps are done. "
                "Running the same command again resumes from the newest intact checkpoint.")
DEMO_HELP = {"samples_per_shard": "training images per shard", "resolution": "image size in pixels",
             "tokenizer_steps": "training steps of the smoke FQGAN-Dual tokenizer",
             "seed": "seed of the data, the training runs and the samples"}
SAMPLE_HELP = {"guidance_schedule": "how the CFG scale varies over the tokens / steps",
               "batch_size": "images per generator call"}


def _training_errors() -> tuple[type[Exception], ...]:
    from vtok.train import TrainingError

    return (TrainingError,)


def cmd_info(args: argparse.Namespace) -> None:
    from vtok.train.task import validate_model_section

    recipe = load_recipe(args.recipe, args.overrides)
    validate_model_section(recipe)  # the `model` section against its task's Config (nothing is built)
    if args.get:
        from omegaconf import OmegaConf

        print(OmegaConf.select(OmegaConf.structured(recipe), args.get))
    else:
        print(recipe_to_yaml(recipe), end="")


def cmd_train(args: argparse.Namespace) -> None:
    from vtok.train import Trainer

    if args.engine == "composer":  # MosaicML Composer's loop on the same recipe (vtok/integrations)
        from vtok.integrations import composer_fit

        result = composer_fit(load_recipe(args.recipe, args.overrides), resume=args.resume)
        if result["is_main"]:
            run = Path(result["run_dir"])
            again = shlex.join(["vtok", "train", args.recipe, *args.overrides, "--engine", "composer"])
            print(summary(f"vtok train: {result['status']} at step {result['step']} (Composer); run dir {run}", [
                ("run dir", run), ("checkpoint", result["checkpoint"]), ("metrics", existing(result["metrics"])),
                ("config", existing(run / "config.yaml")), ("tensorboard", existing(run / "tensorboard")),
                ("next", again if result["status"] != "complete" else None)]))
        return
    trainer = Trainer(load_recipe(args.recipe, args.overrides))
    result = trainer.fit(resume=args.resume)
    if trainer.info.is_main:
        run = trainer.run_dir
        again = shlex.join(["vtok", "train", args.recipe, *args.overrides])
        nxt = (f"vtok export {shlex.join([args.recipe, *args.overrides])} --out DIR"
               if result["status"] == "complete" and trainer.task.export_module else
               again if result["status"] != "complete" else None)
        print(summary(f"vtok train: {result['status']} at step {result['step']}; run dir {run}", [
            ("run dir", run), ("checkpoint", trainer.ckpt.latest()), ("metrics", trainer.metrics_path),
            ("config", existing(run / "config.yaml")), ("tensorboard", existing(run / "tensorboard")),
            ("samples", existing(run / "samples")), ("next", nxt)]))


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from vtok.plan import make_plan

    plan = make_plan(load_recipe(args.recipe, args.overrides), gpu=args.gpu, gpus=args.gpus,
                     gpus_per_node=args.gpus_per_node, mfu=args.mfu, gpu_table=args.gpu_table,
                     recipe_name=args.recipe)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())


def cmd_export(args: argparse.Namespace) -> None:
    from vtok.parallel.dist import DistInfo
    from vtok.train.checkpoint import CheckpointManager, resolve_resume
    from vtok.train.export import export_checkpoint

    recipe = load_recipe(args.recipe, args.overrides)
    ckpt_dir = recipe.ckpt.dir or f"{recipe.run_dir}/checkpoints"
    manager = CheckpointManager(ckpt_dir, recipe.ckpt.keep_last, DistInfo(), trust=recipe.ckpt.trust)
    path = resolve_resume(manager, args.resume)  # verified (hashes), falling back to an intact one
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; train first or pass --resume")
    weights, step = export_checkpoint(recipe, args.out, path, use_ema=args.ema)
    print(summary(f"vtok export: step {step} -> {weights} + config.json", [
        ("export dir", args.out), ("weights", weights), ("config", existing(Path(args.out) / "config.json")),
        ("from", f"{path}{' (EMA weights)' if args.ema else ''}")]))

def cmd_synthetic(args: argparse.Namespace) -> None:
    from vtok.data.synthetic import write_synthetic

    result = write_synthetic(args.out, args.format, args.num_samples, args.samples_per_shard,
                             args.resolution, args.seed, args.image_format, args.workers)
    print(summary(f"{args.out}: {result}", [
        ("shards", args.out), ("manifest", existing(Path(args.out) / "manifest.json")),
        ("next", f"vtok data inspect {args.out}")]))


def cmd_class_captions(args: argparse.Namespace) -> None:
    from vtok.data.class_captions import build_class_captions

    info = build_class_captions(args.data, args.out, args.per_class)
    n = sum(len(v) for v in info["captions"].values())
    npz = str(Path(args.out).with_suffix(".npz")) if info["embeddings"] else None
    print(summary(f"vtok data class-captions: {n} captions of {len(info['captions'])} classes -> {args.out}", [
        ("captions", args.out), ("embeddings", npz),
        ("next", "train a class DiT on the codes with model.class_captions=" + args.out
         if npz else "run `vtok precompute text-emb` on the shards first (no embeddings)")]))


def cmd_inspect(args: argparse.Namespace) -> None:
    from vtok.data.inspect import describe

    print(describe(args.path))


def cmd_demo(args: argparse.Namespace) -> None:
    from vtok.demo import DemoOptions, run_demo

    run_demo(dataclass_from_args(DemoOptions, args))


def cmd_sample(args: argparse.Namespace) -> None:
    from vtok.eval.sample import SampleOptions, read_captions, run_sample

    opts = dataclass_from_args(SampleOptions, args)
    s = run_sample(args.generator, args.tokenizer, args.out, opts, classes=args.classes,
                   per_class=args.per_class, npz=args.npz, captions=read_captions(args.caption, args.captions),
                   per_caption=args.per_caption, t5=args.t5, class_captions=args.class_captions)
    extra = f" + {s['npz']}" if args.npz else ""
    prefix = f" from the first {args.num_tokens} tokens" if args.num_tokens else ""
    prefix += f" for {s['num_captions']} caption(s)" if s["num_captions"] else ""
    print(summary(f"vtok sample: {s['num_images']} images{prefix} in {s['seconds']:.1f}s ({s['images_per_s']:.2f} "
                  f"img/s) -> {s['grid']}{extra}",
                  [("grid", s["grid"]), ("npz", s["npz"] if args.npz else None),
                   ("next", f"vtok eval gen --samples {s['npz']} --ref SHARDS --inception FILE --out DIR"
                    if args.npz else None)]))


def cmd_precompute(args: argparse.Namespace) -> None:
    from vtok.parallel.dist import init_distributed
    from vtok.precompute import job_classes
    from vtok.precompute.runner import RunnerOptions, run_job

    options, job_cls = job_classes(args.job)
    info = init_distributed()
    r = run_job(job_cls(dataclass_from_args(options, args)), dataclass_from_args(RunnerOptions, args), info)
    out = Path(args.out)
    rows = [("shards", out), ("manifest", existing(out / "manifest.json")),
            ("metadata", existing(out / f"{args.job}.json")), ("summary", existing(out / "precompute.json"))]
    print(summary(f"vtok precompute {args.job}: rank {info.rank} wrote {r.written_shards} shards "
                  f"({r.skipped_shards} already done; {r.samples} samples, {r.bad} bad) -> {args.out}",
                  rows if info.is_main else []))


def cmd_eval_recon(args: argparse.Namespace) -> None:
    from vtok.eval.by_length import parse_lengths
    from vtok.eval.recon import evaluate_recon

    report = evaluate_recon(args.tokenizer, args.data, args.out, data_format=args.format,
                            resolution=args.resolution, batch_size=args.batch_size,
                            max_samples=args.max_samples, lpips_vgg=args.lpips_vgg,
                            inception=args.inception, cache_dir=args.cache_dir or None,
                            lengths=parse_lengths(args.lengths), steps=args.steps, guidance=args.guidance,
                            apg=args.apg, seed=args.seed, compare=args.compare)
    lp = f", LPIPS {report['lpips']:.4f}" if report["lpips"] is not None else ""
    fid = f", rFID {report['rfid']:.3f}" if report["rfid"] is not None else ""
    usage = ", ".join(f"{c['usage']:.1%}" for c in report["codebooks"]) or "n/a (continuous tokens)"
    at = f" at {report['num_tokens']} tokens" if "by_length" in report else ""
    out = Path(args.out)
    print(summary(f"vtok eval recon: {report['num_images']} images{at}: PSNR {report['psnr']:.2f} dB, "
                  f"SSIM {report['ssim']:.4f}{lp}{fid}; codebook usage {usage} -> {args.out}/recon.json",
                  [("report", existing(out / "recon.json")), ("grid", existing(out / "recon_grid.png")),
                   *((f"k={row['k']}", f"PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}")
                     for row in report.get("by_length", [])),
                   ("by length", existing(out / "by_length.png") if "by_length" in report else None),
                   ("coarse to fine", existing(out / "coarse_to_fine.png") if "by_length" in report else None),
                   *((name, f"PSNR {report[name]['psnr']:.2f} dB, SSIM {report[name]['ssim']:.4f}")
                     for name in ("without_text", "compare") if name in report)]))
    if report["rfid"] is None:
        print(f"  rFID not computed: pass --inception {INCEPTION_FILE} (from {INCEPTION_URL})")


def cmd_eval_gen(args: argparse.Namespace) -> None:
    from vtok.eval.gen import evaluate_gen

    report = evaluate_gen(args.samples, args.out, inception=args.inception, ref=args.ref,
                          ref_stats=args.ref_stats, data_format=args.format, resolution=args.resolution,
                          batch_size=args.batch_size, max_ref=args.max_ref, cache_dir=args.cache_dir or None)
    ref = report["num_ref"] or "precomputed"
    rows = [("report", existing(Path(args.out) / "gen.json"))]
    for r in report.get("by_num_tokens", []):  # one row per samples file (token count K)
        k = "all" if r["num_tokens"] is None else r["num_tokens"]
        rows.append((f"K={k}", f"gFID {r['gfid']:.3f}, IS {r['inception_score']:.2f} ({r['samples']})"))
    print(summary(f"vtok eval gen: {report['num_samples']} samples vs {ref} reference images: "
                  f"gFID {report['gfid']:.3f}, IS {report['inception_score']:.2f} +- "
                  f"{report['inception_score_std']:.2f} -> {args.out}/gen.json", rows))


def build_parser() -> argparse.ArgumentParser:
    from vtok.demo import DemoOptions
    from vtok.eval.sample import SampleOptions
    from vtok.precompute import JOBS as PRECOMPUTE_JOBS, job_classes as precompute_job_classes
    from vtok.precompute.runner import RunnerOptions

    commands = plain(__doc__.split("\n\n", 1)[1])
    p = argparse.ArgumentParser(prog="vtok", description=DESCRIPTION, formatter_class=RawHelpFormatter,
                                epilog=f"synopsis:\n{commands}Run `vtok COMMAND --help` for a command's options.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                         help="what to run (`vtok COMMAND --help` for its options)")

    demo = sub.add_parser("demo", help="the whole pipeline on built-in synthetic shapes: shards -> FQGAN "
                          "-> codes -> FAR -> samples (resumable)")
    add_dataclass_args(demo, DemoOptions, help=missing_help(DemoOptions, DEMO_HELP))
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="print a recipe resolved with its includes and overrides")
    info.add_argument("recipe", help="path to a recipe YAML, e.g. recipes/smoke/shapes_data.yaml")
    info.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.resolution=128 (default: none)")
    info.add_argument("--get", metavar="KEY", help="print one resolved value, e.g. --get run_dir")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a recipe (resumes from its run dir by itself)",
                           description=f"Train a recipe on its data. {RUN_DIR_HELP}")
    train.add_argument("recipe", help=RECIPE_HELP)
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument("--resume", default="", help="a checkpoint dir (default: <run_dir>/checkpoints/latest); "
                       "with --engine composer a Composer checkpoint file (default: the newest in "
                       "<run_dir>/checkpoints-composer)")
    train.add_argument("--engine", choices=("vtok", "composer"), default="vtok",
                       help="the training loop: vtok's own, or MosaicML Composer's Trainer (one-optimizer "
                       "tasks, DDP; install it as the README's Composer section says)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="will a recipe fit, and how long will it take: memory per GPU for "
                          "ddp / fsdp2 / ZeRO 1-3 (with and without activation checkpointing), step time, "
                          "days and GPU-hours on N GPUs of a kind",
                          description="Profile a recipe's model on the meta device (nothing is allocated; one "
                          "batch is read from its shards for the shapes) and plan it on a cluster.")
    plan.add_argument("recipe", help=RECIPE_HELP)
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the job (world size)")
    plan.add_argument("--gpu", default="H100", help="a GPU of the table (vtok/plan/gpus.yaml): H100, H200, A100, L40S")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation the step time assumes")
    plan.add_argument("--gpu-table", default="", help="a YAML of more GPUs (entries as in vtok/plan/gpus.yaml)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    export = sub.add_parser("export", help="write model.safetensors + config.json from a checkpoint")
    export.add_argument("recipe", help=f"{RECIPE_HELP}; its run_dir holds the checkpoints")
    export.add_argument("overrides", nargs="*", help="the same dotlist overrides as for vtok train, e.g. "
                        "run_dir=runs/try1 (default: none)")
    export.add_argument("--out", required=True, help="output directory (model.safetensors, config.json)")
    export.add_argument("--resume", default="", help="checkpoint dir (default: the latest)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.set_defaults(func=cmd_export)

    from vtok.importers.cli import add_import_parser  # vtok import KIND CHECKPOINT --out DIR
    add_import_parser(sub)

    pre = sub.add_parser("precompute", help="offline jobs over shards").add_subparsers(
        dest="precompute_command", required=True, metavar="JOB", help="the job to run over the shards")
    batch_defaults = {"captions": {"batch_size": 16}, "text-emb": {"batch_size": 128}}  # others: 64
    for name, (_, _, _, text) in PRECOMPUTE_JOBS.items():
        options, _ = precompute_job_classes(name)
        job = pre.add_parser(name, help=text)
        add_dataclass_args(job, options)
        add_dataclass_args(job, RunnerOptions)
        job.set_defaults(func=cmd_precompute, job=name, **batch_defaults.get(name, {}))

    smp = sub.add_parser("sample", help="class- or text-conditional images from a generator export "
                         "(gpt / far / dit)")
    smp.add_argument("--generator", required=True, help="`vtok export` dir of a gpt / far / dit run")
    smp.add_argument("--tokenizer", default="", help="`vtok export` dir of the tokenizer of its tokens "
                     "(default: the one its export names; a DiT on pixels needs none)")
    smp.add_argument("--out", required=True, help="output dir (samples.png, samples.npz)")
    smp.add_argument("--classes", default="", help="comma-separated class ids (default: all)")
    smp.add_argument("--per-class", type=int, default=4, help="images per class")
    smp.add_argument("--caption", action="append", metavar="TEXT", help="text-conditional generators: a "
                     "caption (repeatable; one grid row each)")
    smp.add_argument("--captions", default="", metavar="FILE", help="text-conditional generators: a file "
                     "with one caption per line")
    smp.add_argument("--per-caption", type=int, default=4, help="images per caption")
    smp.add_argument("--t5", default="", metavar="DIR", help="local T5 encoder dir for the captions (default: "
                     "the one the generator's training text-emb.json names)")
    smp.add_argument("--class-captions", default="", metavar="FILE", help="class DiT over a text tokenizer "
                     "(TexTok): `vtok data class-captions` JSON; each sample decodes with a caption of its class "
                     "drawn from it (default: the file its export records)")
    add_dataclass_args(smp, SampleOptions, help=missing_help(SampleOptions, SAMPLE_HELP))
    smp.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0 uint8 NHWC) for eval gen")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True,
                                                                  metavar="WHAT", help="what to evaluate")
    recon = ev.add_parser("recon", help="PSNR / SSIM / LPIPS / codebook usage of a tokenizer export")
    recon.add_argument("--tokenizer", required=True, help="a `vtok export` directory")
    recon.add_argument("--data", required=True, help="eval image shards")
    recon.add_argument("--format", choices=("wds", "mds"), default="wds", help="format of --data")
    recon.add_argument("--out", required=True, help="report directory (recon.json, recon_grid.png)")
    recon.add_argument("--resolution", type=int, default=256, help="center-crop size of the eval images")
    recon.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call")
    recon.add_argument("--max-samples", type=int, default=0, help="0: the whole set")
    recon.add_argument("--lpips-vgg", default="", help="torchvision vgg16 weights file for LPIPS "
                       "(default: none: no LPIPS)")
    recon.add_argument("--inception", default="", help=f"FID Inception weights ({INCEPTION_FILE}) for rFID "
                       "(default: none: no rFID)")
    recon.add_argument("--cache-dir", default="", help=CACHE_HELP)
    ordered = "; ordered tokenizers (FlexTok) only"
    recon.add_argument("--lengths", default="", help="token counts k to evaluate, e.g. "
                       f"1,4,16 (default: 1, 2, 4, ... up to all of them){ordered}")
    recon.add_argument("--steps", type=int, default=None, help=f"Euler decoding steps (default 20){ordered}")
    recon.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale against "
                       f"the null condition, 1 = none (default 7.5, the official README's){ordered}")
    recon.add_argument("--apg", action=argparse.BooleanOptionalAction, default=None, help="adaptive projected "
                       f"guidance instead of plain CFG (default on){ordered}")
    recon.add_argument("--seed", type=int, default=0, help=f"decoding noise seed; image i uses seed + i{ordered}")
    recon.add_argument("--compare", default="", help="a second tokenizer export (e.g. the -notext twin) "
                       "evaluated on the same images: the report's `compare` block")
    recon.set_defaults(func=cmd_eval_recon)
    gen = ev.add_parser("gen", help="gFID / Inception Score of generated samples (ADM .npz)")
    gen.add_argument("--samples", required=True, nargs="+", help=".npz whose arr_0 is uint8 (N, H, W, 3); "
                     "several (e.g. `vtok sample --num-tokens K --npz` for each K) give a gFID / IS table by K")
    refs = gen.add_mutually_exclusive_group(required=True)
    refs.add_argument("--ref", default="", help="reference image shards (statistics are cached); "
                      "this or --ref-stats is required (no default)")
    refs.add_argument("--ref-stats", default="", help="precomputed reference .npz with mu, sigma; this or "
                      "--ref is required (no default)")
    gen.add_argument("--format", choices=("wds", "mds"), default="wds", help="format of --ref")
    gen.add_argument("--inception", required=True, help=f"FID Inception weights ({INCEPTION_FILE})")
    gen.add_argument("--out", required=True, help="report directory (gen.json)")
    gen.add_argument("--resolution", type=int, default=256, help="center-crop size of the reference images")
    gen.add_argument("--batch-size", type=int, default=64, help="images per Inception call")
    gen.add_argument("--max-ref", type=int, default=0, help="reference images to use; 0: all")
    gen.add_argument("--cache-dir", default="", help=CACHE_HELP)
    gen.set_defaults(func=cmd_eval_gen)

    data = sub.add_parser("data", help="dataset utilities").add_subparsers(
        dest="data_command", required=True, metavar="TOOL", help="the dataset tool to run")
    syn = data.add_parser("synthetic", help="write the built-in coloured-shapes dataset",
                          description="Write the built-in coloured shapes (24 classes: 6 colours x 4 shapes, "
                          "with captions) as shards. The smoke recipes (recipes/smoke/) read vtok_demo/wds: "
                          "`vtok data synthetic vtok_demo/wds`. Resumable: finished shards are kept.")
    syn.add_argument("out", help="output directory of the shards, e.g. vtok_demo/wds")
    syn.add_argument("--format", choices=("wds", "mds"), default="wds",
                     help="shard format: WebDataset tars or MosaicML MDS")
    syn.add_argument("--num-samples", type=int, default=2048, help="images to write")
    syn.add_argument("--samples-per-shard", type=int, default=256, help="images per shard")
    syn.add_argument("--resolution", type=int, default=256, help="image size in pixels (square)")
    syn.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="image encoding")
    syn.add_argument("--seed", type=int, default=0, help="seed of the shapes, colours and positions")
    syn.add_argument("--workers", type=int, default=2, help="processes writing shards in parallel")
    syn.set_defaults(func=cmd_synthetic)
    cc = data.add_parser("class-captions", help="held-out per-class caption lists (+ T5 embeddings) for a "
                         "class DiT over a text tokenizer (TexTok)",
                         description="Keep the last N captions of each class (shard order) of image shards "
                         "with cls + caption (+ text_emb / text_mask of `vtok precompute text-emb`): FILE.json "
                         "(captions) and FILE.npz (float16 embeddings, so decoding needs no T5). A class DiT "
                         "on TexTok codes decodes each sample with one of its class's captions "
                         "(model.class_captions / `vtok sample --class-captions`).")
    cc.add_argument("--data", required=True, help="image shards with cls and caption (text_emb for decoding)")
    cc.add_argument("--out", required=True, help="output .json (the embeddings go beside it as .npz)")
    cc.add_argument("--per-class", type=int, default=16, help="captions kept per class (the last N seen)")
    cc.set_defaults(func=cmd_class_captions)
    ins = data.add_parser("inspect", help="summarise a shard directory or tar")
    ins.add_argument("path", help="a shard directory (WebDataset or MDS) or one .tar")
    ins.set_defaults(func=cmd_inspect)
    for _, parser in walk_parsers(p):
        parser.formatter_class = RawHelpFormatter if parser is p else HelpFormatter
        for action in parser._actions:  # a subcommand's own --help starts with its one-line help
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    child = action.choices[choice.dest]
                    if child.description is None and choice.help:
                        child.description = choice.help[:1].upper() + choice.help[1:] + "."
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
    setup_logging(args.verbose)  # tqdm-aware: log lines go above the progress bars, never onto them
    try:
        args.func(args)
    except USER_ERRORS + (_training_errors() if args.command in ("train", "export") else ()) as e:
        print(f"vtok: error: {e}", file=sys.stderr)
        return 2
    if "torch.distributed" in sys.modules:  # a command under torchrun: leave its process group cleanly
        from vtok.parallel.dist import shutdown_distributed

        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
