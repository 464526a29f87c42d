"""``vtok import KIND CHECKPOINT --out EXPORT_DIR``: the subcommand's parser and its function."""
from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("dit", "flextok", "llamagen-gpt", "llamagen-vq", "fqgan", "far")  # the built-in importers (vtok.importers.IMPORTERS holds plugins too)


def add_import_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    imp = sub.add_parser("import", help="a released checkpoint (DiT, FlexTok, LlamaGen GPT / VQ, FQGAN, FAR) -> a vtok export",
                         description="Map a released checkpoint onto vtok's model and write a normal vtok "
                         "export (model.safetensors + config.json) that sample / eval / precompute / "
                         "fine-tuning read. The file is read safely (safetensors, or torch.load with "
                         "weights_only); its size is recognised from the shapes; any unmapped, missing or "
                         "mis-shaped key is one error line naming it.")
    imp.add_argument("kind", help=f"the checkpoint's model family: {', '.join(KINDS)}")
    imp.add_argument("checkpoint", help="the released file, e.g. DiT-XL-2-256x256.pt, FlexTok's "
                     "model.safetensors, LlamaGen's c2i_B_256.pt or vq_ds16_c2i.pt")
    imp.add_argument("--out", required=True, help="export directory to write (model.safetensors, config.json)")
    imp.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                     help="from a training checkpoint holding both, take the EMA weights (--no-ema: the raw "
                     "model weights); a file with one state dict is taken as is (default: --ema)")
    imp.add_argument("--vae", default="", help="local diffusers AutoencoderKL directory to record in the "
                     "export for decoding latents to images (DiT: the SD VAE, e.g. sd-vae-ft-ema; FlexTok: "
                     "flextok_vae_c16) (default: none: the export decodes to latents only)")
    imp.add_argument("--arch", default="", help="insist on this registry size, e.g. dit-xl-2; a checkpoint "
                     "of another size is refused (default: the size the shapes say)")
    imp.add_argument("--image-size", type=int, default=0, help="image size the model was trained at, where the "
                     "weights do not say: LlamaGen GPTs and FAR (their token grid is image_size / 16; default: read "
                     "from the file name, e.g. c2i_XL_384.pt -> 384) and VQ tokenizers (the export's resolution; "
                     "default: the registry size's, 256)")
    imp.add_argument("--tokenizer", default="", help="generators: the `vtok export` dir of the tokenizer whose "
                     "codes the model predicts (e.g. from `vtok import llamagen-vq`), recorded so that "
                     "`vtok sample` decodes with it (default: none: pass --tokenizer to vtok sample)")
    imp.set_defaults(func=cmd_import)
    return imp


def cmd_import(args: argparse.Namespace) -> None:
    from vtok.console import existing, summary
    from vtok.importers import ImportOptions, get_importer, import_checkpoint

    result = import_checkpoint(args.kind, args.checkpoint, args.out,
                               ImportOptions(ema=args.ema, vae=args.vae, arch=args.arch,
                                             image_size=args.image_size, tokenizer=args.tokenizer))
    ckpt, meta = result.checkpoint, result.meta
    entry = f"the '{ckpt.picked}' entry of {', '.join(ckpt.available)}" if ckpt.picked else "a raw state dict"
    rows = [("export dir", args.out), ("weights", result.weights),
            ("config", existing(Path(args.out) / "config.json")),
            ("from", f"{ckpt.path} ({entry}, {len(ckpt.state)} tensors)"),
            ("model", f"{result.arch} = {meta.get('official', '')}"
                      + (f", overrides {result.overrides}" if result.overrides else ""))]
    if "tokenizer" in meta:  # a generator on a tokenizer's codes
        rows.append(("tokenizer", meta["tokenizer"] or "none (pass --tokenizer DIR here or to vtok sample)"))
    else:
        rows.append(("vae", meta.get("vae") or "none (pass --vae DIR to decode to images)"))
    if ckpt.dropped:
        rows.append(("left out", ", ".join(f"{n} {k} keys" for k, n in ckpt.dropped.items())))
    notes = getattr(get_importer(args.kind), "notes", "")
    if notes:
        rows.append(("differences", notes))
    print(summary(f"vtok import {args.kind}: {result.arch} -> {result.weights}", rows))


__all__ = ["KINDS", "add_import_parser", "cmd_import"]
