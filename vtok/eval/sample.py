"""``vtok sample``: class- or text-conditional images from any exported generator (GPT / FAR or DiT).

GPT-family exports decode their codes through a tokenizer export (``--tokenizer``, default the one
named in the generator's export). On a variable-length tokenizer (FlexTok) ``num_tokens`` = K
generates only the first K tokens and decodes that prefix (the tokenizer's rectified-flow decoder,
``decode_steps`` / ``decode_guidance`` / ``decode_apg``, then the VAE its export names unless it is
the identity). DiT exports sample with the diffusion process they were trained
with (rectified flow: Euler / Heun ODE; DDPM: ancestral on respaced steps) and decode through the
VAE / tokenizer their export names, or show the samples directly when the DiT models pixels.
Text-conditional generators (``condition: text``: the text GPT, DiT-T2I) take captions instead of
classes: they are encoded by the T5 their export names (or ``--t5``) through the very code of ``vtok
precompute text-emb`` (same max length, padding and float16 rounding as the training shards); CFG's
unconditional branch is the generator's learned null caption.
Writes a PNG grid (one row per class / caption when ``per_class`` fits) and optionally an ADM-style
``.npz`` (``arr_0``: uint8 (N, H, W, 3), ``labels``: (N,) class ids, or caption indices with
``captions``: (N,) str) that ``vtok eval gen`` reads for gFID / IS.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.grid import save_grid, to_uint8
from vtok.models.api import Condition, TokenSpec
from vtok.models.export import Export, load_export

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleOptions:
    """Sampling settings; each field is a ``vtok sample`` flag (help and choices in its metadata)."""

    guidance: float = field(default=2.0, metadata={"help": "CFG scale; 1 disables guidance"})
    guidance_schedule: str = field(default="constant", metadata={"choices": ("constant", "linear")})
    temperature: float = field(default=1.0, metadata={"help": "0: greedy"})
    top_k: int = field(default=0, metadata={"help": "0: off"})
    top_p: float = field(default=1.0, metadata={"help": "1: off"})
    seed: int = field(default=0, metadata={"help": "batch i uses seed + i"})
    batch_size: int = 32
    # DiT (diffusion) generators
    steps: int = field(default=50, metadata={"help": "DiT: ODE / respaced DDPM steps"})
    solver: str = field(default="euler", metadata={"help": "DiT flow ODE solver", "choices": ("euler", "heun")})
    guidance_interval: str = field(default="0,1", metadata={
        "help": "DiT: 'lo,hi' normalized times (0 data, 1 noise) where CFG applies"})
    apg: bool = field(default=False, metadata={"help": "DiT: adaptive projected guidance instead of CFG"})
    dtype: str = field(default="fp32", metadata={"help": "autocast dtype", "choices": tuple(DTYPES)})
    # GPT on a variable-length tokenizer (FlexTok)
    num_tokens: int = field(default=0, metadata={
        "help": "GPT on a variable-length tokenizer: generate and decode the first K tokens (0: all)"})
    decode_steps: int = field(default=25, metadata={"help": "FlexTok decoder: Euler steps (README: 20)"})
    decode_guidance: float = field(default=1.0, metadata={"help": "FlexTok decoder: CFG scale (README: 7.5)"})
    decode_apg: bool = field(default=False, metadata={
        "help": "FlexTok decoder: adaptive projected guidance (README: on)"})
    compile: bool = field(default=False, metadata={
        "help": "GPT: torch.compile the decode step (static KV cache): the same "
                "tokens, faster per token at batch 1-2; each new batch size compiles once (seconds)"})


def condition_rows(cond: torch.Tensor | Condition, start: int, stop: int) -> torch.Tensor | Condition:
    """Rows ``start:stop`` of labels (N,) or of a Condition (labels / text (N, L, D) / text_mask (N, L))."""
    if isinstance(cond, torch.Tensor):
        return cond[start:stop]
    return Condition(*(None if t is None else t[start:stop] for t in (cond.labels, cond.text, cond.text_mask)))


@torch.no_grad()
def sample_batches(generator: torch.nn.Module, labels: torch.Tensor | Condition, opts: SampleOptions,
                   draw: Callable[[torch.Tensor | Condition, torch.Generator], torch.Tensor],
                   decode: Callable[..., torch.Tensor], progress: bool = True,
                   decode_rows: Condition | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) or a Condition of N rows (T5 text (N, L, D) + mask (N, L)) -> (images (N, 3, H, W) in
    [-1, 1] on CPU, tokens (N, ...) on CPU), ``opts.batch_size`` rows at a time: ``draw(rows, rng)``
    samples tokens under the autocast dtype, ``decode`` maps them to images (``decode(x, rows)`` with
    the same rows of ``decode_rows`` when given: a text tokenizer's captions). Batch i draws from a
    generator seeded with ``seed + i``, so a run is reproducible for a fixed batch size."""
    device = next(generator.parameters()).device
    dtype = DTYPES[opts.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    images, tokens = [], []
    batches = range(0, len(labels), opts.batch_size)
    for i, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        rows = condition_rows(labels, start, start + opts.batch_size).to(device)
        with autocast:
            x = draw(rows, torch.Generator(device).manual_seed(opts.seed + i))
        tokens.append(x.cpu())
        if decode_rows is None:
            images.append(decode(x).float().clamp(-1, 1).cpu())
        else:
            rows = condition_rows(decode_rows, start, start + opts.batch_size).to(device)
            images.append(decode(x, rows).float().clamp(-1, 1).cpu())
    return torch.cat(images), torch.cat(tokens)


def sample_images(generator: torch.nn.Module, tokenizer: torch.nn.Module, labels: torch.Tensor | Condition,
                  opts: SampleOptions, progress: bool = True,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT: labels (N,) or a text Condition of N rows -> (images (N, 3, H, W) in [-1, 1] on CPU,
    codes (N, k, *grid), or (N, 1, K)
    with ``opts.num_tokens`` = K on a variable-length tokenizer). ``decode``: codes -> images
    (default ``tokenizer.decode``; ``token_decoder`` adds a FlexTok's decoding options and VAE)."""
    check_pair(generator.token_spec, tokenizer.token_spec)
    num_tokens = check_num_tokens(opts.num_tokens, tokenizer.token_spec)

    def draw(rows: torch.Tensor | Condition, rng: torch.Generator) -> torch.Tensor:
        cond = rows if isinstance(rows, Condition) else Condition(labels=rows)
        return generator.generate(cond, num_tokens=num_tokens, guidance=opts.guidance,
                                  guidance_schedule=opts.guidance_schedule, temperature=opts.temperature,
                                  top_k=opts.top_k, top_p=opts.top_p, generator=rng, compile=opts.compile)

    return sample_batches(generator, labels, opts, draw, decode or tokenizer.decode, progress)


def check_num_tokens(num_tokens: int, spec: TokenSpec) -> int | None:
    """``--num-tokens`` checked against the tokenizer: None for 0 (all tokens), else K in 1..R of a
    variable-length tokenizer (one-line EvalError otherwise)."""
    if not num_tokens:
        return None
    if not spec.variable_length:
        raise EvalError(f"--num-tokens {num_tokens}: the tokenizer's tokens {list(spec.shape)} are fixed-length "
                        "(only ordered, variable-length tokenizers such as FlexTok decode a prefix); drop it")
    if not 1 <= num_tokens <= spec.num_tokens:
        raise EvalError(f"--num-tokens {num_tokens}: expected 1..{spec.num_tokens} (the tokenizer's tokens per image)")
    return num_tokens


def token_decoder(export: Export, device: torch.device | str, opts: SampleOptions | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """codes -> images (B, 3, H, W) through a loaded tokenizer export: its ``decode``, with the
    FlexTok decoder's steps / guidance from ``opts`` (default ``SampleOptions()``), then the VAE the
    export names ("identity" or none: the decoded latents are the images). One-line EvalError when
    that VAE is missing."""
    from vtok.models.diffusion import Guidance
    from vtok.tasks.flextok import IDENTITY, latents_to_images

    opts = opts or SampleOptions()
    tokenizer, kwargs = export.model, {}
    if export.token_spec.variable_length:  # a generative (rectified-flow) decoder
        kwargs = dict(steps=opts.decode_steps, guidance=Guidance(scale=opts.decode_guidance, apg=opts.decode_apg))
    elif any(getattr(opts, f) != getattr(SampleOptions, f) for f in ("decode_steps", "decode_guidance", "decode_apg")):
        log.warning("--decode-steps / --decode-guidance / --decode-apg have no effect: %s decodes in one pass",
                    export.arch)
    vae = export.meta.get("vae", "")
    if not vae or vae == IDENTITY:
        return lambda codes: tokenizer.decode(codes.to(device), **kwargs)
    to_images = latents_to_images(export.meta, device)
    if to_images is None:
        raise EvalError(f"the tokenizer export's VAE ({vae}) is not there: its decoded latents cannot become "
                        "images; put the VAE there or re-export the tokenizer naming it")
    return lambda codes: to_images(tokenizer.decode(codes.to(device), **kwargs))


def check_pair(gen_spec: TokenSpec, tok_spec: TokenSpec) -> None:
    """One-line EvalError unless the generator models the tokenizer's tokens (vocabularies and
    per-position sub-codes; the grid may follow the resolution the codes were made at)."""
    if gen_spec.vocab_sizes != tok_spec.vocab_sizes or gen_spec.shape[:1] != tok_spec.shape[:1]:
        raise EvalError(f"the generator models tokens {list(gen_spec.shape)} over vocabularies "
                        f"{list(gen_spec.vocab_sizes)} but the tokenizer makes {list(tok_spec.shape)} over "
                        f"{list(tok_spec.vocab_sizes)}: pass the tokenizer the codes came from")


def class_labels(num_classes: int, classes: str = "", per_class: int = 4) -> torch.Tensor:
    """``per_class`` copies of each class in ``classes`` ("3,7,12", default all), class-major: (N,)."""
    ids = [int(c) for c in classes.split(",") if c.strip()] if classes else list(range(num_classes))
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise EvalError(f"classes {bad} out of range: the generator knows classes 0..{num_classes - 1}")
    return torch.tensor(ids).repeat_interleave(per_class)


def parse_interval(text: str) -> tuple[float, float]:
    """``"lo,hi"`` -> (lo, hi) in [0, 1] (one-line EvalError otherwise)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise EvalError(f"--guidance-interval {text!r}: expected 'lo,hi', e.g. 0,1 or 0.1,0.9") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise EvalError(f"--guidance-interval {text!r}: expected 0 <= lo <= hi <= 1")
    return lo, hi


def sample_diffusion(generator: torch.nn.Module, decode, labels: torch.Tensor | Condition, diffusion: dict,
                     opts: SampleOptions, progress: bool = True, decode_rows: Condition | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT: labels (N,) or a text Condition of N rows -> (images (N, 3, H, W) in [-1, 1] on CPU,
    samples (N, *token_shape)).
    ``decode`` maps samples to images (with their rows of ``decode_rows``, N captions' Condition, when
    the tokenizer is text-conditioned); ``diffusion`` is the export's process settings."""
    from vtok.tasks.dit import sample_dit

    interval = parse_interval(opts.guidance_interval)
    if opts.compile:
        raise EvalError("--compile compiles a GPT's decode step; this generator is a diffusion model (DiT): drop it")

    def draw(rows: torch.Tensor | Condition, rng: torch.Generator) -> torch.Tensor:
        return sample_dit(generator, rows, diffusion, steps=opts.steps, solver=opts.solver,
                          guidance=opts.guidance, interval=interval, apg=opts.apg, generator=rng).float()

    return sample_batches(generator, labels, opts, draw, decode, progress, decode_rows)


def decoder_captions(decode, export: Export, generator_dir: str, cond: torch.Tensor | Condition,
                     class_captions: str, seed: int) -> tuple[Condition | None, list[str]]:
    """The captions a DiT's samples decode with, N rows: none for a decoder without text; the DiT's
    own (T2I ``cond``) for a text tokenizer (TexTok); for a class DiT one caption per label drawn
    (seeded by ``seed``) from ``class_captions`` or the list its export records. Returns (Condition
    or None, the drawn captions)."""
    from vtok.data.class_captions import ClassCaptions
    from vtok.tasks.dit import missing_class_captions

    if not getattr(decode, "needs_text", False):
        if class_captions:
            log.warning("--class-captions has no effect: the samples' decoder reads no captions")
        return None, []
    if isinstance(cond, Condition) and cond.text is not None:  # T2I: the DiT's captions
        if cond.text.shape[-1] != decode.text_dim:
            raise EvalError(f"the tokenizer decodes with T5 width {decode.text_dim} but the DiT's captions are "
                            f"{cond.text.shape[-1]} wide: pass the tokenizer its codes came from (--tokenizer)")
        return cond, []
    path = class_captions or export.meta.get("class_captions", "")
    if not path:
        raise EvalError(missing_class_captions(f"{generator_dir}: samples", "pass --class-captions FILE.json"))
    labels = cond.labels if isinstance(cond, Condition) else cond
    rows, words = ClassCaptions.load(path).condition(labels, torch.Generator().manual_seed(seed))
    if rows.text.shape[-1] != decode.text_dim:
        raise EvalError(f"class captions {path}: T5 width {rows.text.shape[-1]} != the tokenizer's "
                        f"{decode.text_dim}; rebuild it from the shards the tokenizer was trained on")
    return rows, words


def read_captions(captions: list[str] | None = None, file: str = "") -> list[str]:
    """``--caption`` values, then the non-blank lines of ``--captions FILE`` (one caption a line)."""
    out = list(captions or [])
    if file:
        path = Path(file)
        if not path.is_file():
            raise EvalError(f"--captions {file}: no such file; pass a text file with one caption per line")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        if not any(lines):
            raise EvalError(f"--captions {file} has no captions; write one caption per line")
        out += [line for line in lines if line]
    return out


def text_condition(export: Export, generator_dir: str, captions: list[str], per_caption: int, t5: str,
                   device: torch.device) -> Condition:
    """Captions -> the T5 condition of a text generator, ``per_caption`` rows each (caption-major):
    text (N, text_len, text_dim) float32 (rounded through float16 as the shards store it) + text_mask
    (N, text_len). The T5 is ``t5``, else the one the export records (one-line EvalError when missing
    or of another width than the generator's)."""
    from vtok.precompute.text_emb import load_text_encoder

    cfg = export.model.cfg
    info = export.meta.get("text_encoder") or {}
    flag = f"--t5 {t5}" if t5 else f"the T5 the export names ({info.get('encoder', '')})"
    tokenizer = "" if t5 else info.get("tokenizer", "")
    t5 = t5 or info.get("encoder", "")
    if not t5:
        raise EvalError(f"{generator_dir} records no T5 encoder (exported by an older vtok): pass --t5 DIR, the T5 "
                        "its text-emb.json names (or re-export the run)")
    if not (Path(t5) / "config.json").is_file():
        raise EvalError(f"{flag}: no T5 encoder there (config.json missing); pass --t5 DIR, the local T5 "
                        "directory `vtok precompute text-emb --encoder` used")
    width = json.loads((Path(t5) / "config.json").read_text()).get("d_model")
    if width != cfg.text_dim:
        raise EvalError(f"{flag}: its width d_model={width} != the generator's text width {cfg.text_dim}; "
                        "pass the T5 whose embeddings it was trained on")
    try:
        encoder = load_text_encoder(t5, cfg.text_len, device, tokenizer=tokenizer)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvalError(f"{flag}: cannot load a T5 encoder + tokenizer there ({first})") from None
    emb, mask = encoder.stored(captions)
    return Condition(text=emb.float().repeat_interleave(per_caption, 0),
                     text_mask=mask.repeat_interleave(per_caption, 0))


def run_sample(generator_dir: str, tokenizer_dir: str, out: str, opts: SampleOptions, *, classes: str = "",
               per_class: int = 4, npz: bool = False, progress: bool = True, captions: list[str] | None = None,
               per_caption: int = 4, t5: str = "", class_captions: str = "") -> dict:
    """``vtok sample``: writes ``<out>/samples.png`` (+ ``samples.npz``); returns a summary.
    ``tokenizer_dir``: "" = the decoder the generator's export names (a DiT on pixels needs none).
    Text-conditional generators take ``captions`` (``per_caption`` images each, one grid row per
    caption) encoded by ``t5`` ("" = the T5 the export records). A DiT over a text tokenizer's codes
    (TexTok) decodes T2I samples with their own captions and class samples with one caption of their
    class each, drawn (seeded by ``opts.seed``) from ``class_captions`` ("" = the file its export
    records; ``vtok data class-captions`` writes it)."""
    from vtok.models.generators.dit import DiT

    if opts.dtype not in DTYPES:
        raise EvalError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export = load_export(generator_dir, "generator", device)
    generator = export.model
    text, kind = generator.cfg.condition == "text", type(generator).__name__
    if captions and not text:
        raise EvalError(f"--caption: {generator_dir} is a class-conditional {kind}; drop --caption / --captions "
                        "(pick classes with --classes)")
    if text and not captions:
        raise EvalError(f"{generator_dir} is a text-conditional {kind}: pass --caption TEXT or --captions FILE"
                        + (" instead of --classes" if classes else ""))
    if text and per_caption < 1:
        raise EvalError(f"--per-caption {per_caption}: expected >= 1")
    if class_captions and (text or not isinstance(generator, DiT)):
        raise EvalError(f"--class-captions: {generator_dir} is a {'text-conditional' if text else kind} generator; "
                        "the caption list is for a class-conditional DiT over a text tokenizer (TexTok): drop it")
    if isinstance(generator, DiT) and opts.num_tokens:
        raise EvalError(f"--num-tokens {opts.num_tokens}: {generator_dir} is a DiT, which samples all its tokens; "
                        "--num-tokens is for a GPT on a variable-length tokenizer (FlexTok)")
    per = per_caption if text else per_class
    if text:
        labels = torch.arange(len(captions)).repeat_interleave(per_caption)  # caption index per sample
        cond = text_condition(export, generator_dir, captions, per_caption, t5, device)
    else:
        cond = labels = class_labels(generator.cfg.num_classes, classes, per_class)
    start, drawn = time.perf_counter(), []
    if isinstance(generator, DiT):
        from vtok.tasks.dit import make_decoder

        decode = make_decoder(export.meta, tokenizer_dir, device)
        if decode is None:
            named = export.meta.get("tokenizer") or export.meta.get("vae") or "nothing"
            raise EvalError(f"{generator_dir}: cannot decode its samples: the decoder its export names "
                            f"({named}) is not there; pass --tokenizer DIR")
        rows, drawn = decoder_captions(decode, export, generator_dir, cond, class_captions, opts.seed)
        images, _ = sample_diffusion(generator, decode, cond, export.meta.get("diffusion", {}), opts, progress,
                                     decode_rows=rows)
    else:
        tokenizer_dir = tokenizer_dir or export.meta.get("tokenizer", "")
        if not tokenizer_dir:
            raise EvalError(f"{generator_dir} names no tokenizer export: pass --tokenizer DIR")
        tok_export = load_export(tokenizer_dir, "tokenizer", device)
        check_num_tokens(opts.num_tokens, tok_export.token_spec)  # before the VAE loads
        images, _ = sample_images(generator, tok_export.model, cond, opts, progress,
                                  decode=token_decoder(tok_export, device, opts))
    seconds = time.perf_counter() - start
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = per if per >= 4 or text else max(4, math.ceil(math.sqrt(len(images))))
    grid = save_grid(images[:max(per, 1) * 32], out_dir / "samples.png", nrow=nrow)
    summary = {"num_images": len(images), "seconds": seconds, "grid": str(grid),
               "images_per_s": len(images) / seconds, "num_captions": len(captions) if text else 0, **vars(opts)}
    if npz:
        buf = io.BytesIO()
        extra = {"num_tokens": np.array(opts.num_tokens)} if opts.num_tokens else {}
        if text:
            extra["captions"] = np.array(captions)[labels.numpy()]
        elif drawn:  # the class captions the detokenizer read
            extra["decode_captions"] = np.array(drawn)
        np.savez(buf, arr_0=to_uint8(images), labels=labels.numpy(), **extra)
        atomic_write_bytes(out_dir / "samples.npz", buf.getvalue())
        summary["npz"] = str(out_dir / "samples.npz")
    return summary
