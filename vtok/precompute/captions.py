"""``vtok precompute captions``: add a ``caption`` to every sample, from a local image-to-text model or
from a JSONL file.

Model: any transformers ``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq`` directory (BLIP,
BLIP-2, Florence-2, SmolVLM, Qwen2-VL, ...) with its ``AutoProcessor``; greedy batched ``generate``
(bfloat16 on GPU), the ``prompt`` given as text (wrapped in the processor's chat template when it has
one), the prompt echoed back by the model removed, whitespace normalised, and the caption truncated to
``max_words`` words (TexTok: 75). Remote code runs only with ``trust_remote_code``.

Import: ``from_jsonl`` lines ``{"__key__": ..., "caption": ...}``; a sample whose key is missing from
the file is a bad sample (skipped, counted by key in precompute.json, past ``--max-bad-fraction`` the
job stops). An existing ``caption`` field is replaced. An empty caption is a bad sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtok.data.transforms import BadSample, DataError, decode_image
from vtok.precompute.runner import DTYPES, Job, model_identity, resolve_dtype


@dataclass
class CaptionsOptions:
    """``vtok precompute captions`` flags (besides the runner's); give ``model`` or ``from_jsonl``."""

    model: str = field(default="", metadata={"help": "local directory of an image-to-text model + its processor"})
    from_jsonl: str = field(default="", metadata={"help": "import captions: JSONL lines {\"__key__\", \"caption\"}"})
    prompt: str = field(default="", metadata={"help": "text prompt for the model (e.g. 'a photography of')"})
    max_words: int = field(default=75, metadata={"help": "truncate captions to this many words (0: no limit)"})
    max_new_tokens: int = field(default=120, metadata={"help": "generation length limit"})
    dtype: str = field(default="auto", metadata={
        "help": "model dtype (auto: bfloat16 on GPU, float32 on CPU)", "choices": DTYPES})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model directory's own Python code"})


def clean_caption(text: str, prompt: str, max_words: int) -> str:
    """Drop an echoed ``prompt``, collapse whitespace, keep at most ``max_words`` words (0: all)."""
    text = " ".join(text.split())
    p = " ".join(prompt.split())
    if p and text.lower().startswith(p.lower()):
        text = text[len(p):].strip()
    words = text.split()
    return " ".join(words[:max_words] if max_words > 0 else words)


def read_captions(path: str) -> dict[str, str]:
    """``{key: caption}`` from a JSONL file (a later line for the same key wins)."""
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["__key__"])] = str(row["caption"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with __key__ and caption ({e})") from None
    return captions


def load_captioner(path: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    """(processor, model) from a local directory, as an image-text-to-text model, else a vision2seq one."""
    import transformers as tf

    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    processor = tf.AutoProcessor.from_pretrained(path, **kw)
    errors = []
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(tf, name, None)
        if cls is None:
            continue
        try:
            return processor, cls.from_pretrained(path, dtype=dtype, **kw)
        except ValueError as e:  # config not in this auto class's mapping
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise DataError(f"{path} is not an image-to-text model transformers can load ({'; '.join(errors)})")


class CaptionsJob(Job):
    """PIL images (or keys, when importing) -> ``caption`` str per sample."""

    name = "captions"
    adds = ("caption",)

    def __init__(self, opts: CaptionsOptions):
        if bool(opts.model) == bool(opts.from_jsonl):
            raise DataError("vtok precompute captions: give --model DIR or --from-jsonl FILE (one of them)")
        self.opts = opts
        self.captions: dict[str, str] = {}
        self.model: Any = None

    def identity(self) -> dict[str, Any]:
        o = self.opts
        settings: dict[str, Any] = {"max_words": o.max_words}
        if o.model:
            settings.update(prompt=o.prompt, max_new_tokens=o.max_new_tokens, dtype=o.dtype)
        return {"model": model_identity(o.model or o.from_jsonl), "settings": settings}

    def load(self, device: torch.device) -> None:
        self.device = device
        if self.opts.from_jsonl:
            self.captions = read_captions(self.opts.from_jsonl)
            return
        self.dtype = resolve_dtype(self.opts.dtype, device)
        self.processor, self.model = load_captioner(self.opts.model, self.dtype, self.opts.trust_remote_code)
        self.model.to(device).eval().requires_grad_(False)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only batched generation continues at the right end
        self.text = self.opts.prompt or None
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, *([{"type": "text", "text": self.opts.prompt}] if self.opts.prompt else [])]
            self.text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True)

    def prepare(self, sample: dict[str, Any]) -> Any:
        if self.opts.from_jsonl:
            caption = self.captions.get(sample["__key__"])
            if caption is None:
                raise BadSample(f"no caption for this key in {self.opts.from_jsonl}")
            return caption
        try:
            return decode_image(sample["image"])
        except Exception as e:  # PIL raises many types for corrupt files
            raise BadSample(f"cannot decode image: {type(e).__name__}: {e}") from None

    def generate(self, images: list[Any]) -> list[str]:
        """PIL images -> raw decoded generations (prompt echo removed when the model returns it)."""
        texts = None if self.text is None else [self.text] * len(images)
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=texts is not None)
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.opts.max_new_tokens, do_sample=False)
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] > ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # decoder-only models return prompt + continuation
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def run(self, items: list[Any]) -> list[dict[str, Any] | BadSample]:
        raw = items if self.opts.from_jsonl else self.generate(items)
        results: list[dict[str, Any] | BadSample] = []
        for text in raw:
            caption = clean_caption(text, self.opts.prompt, self.opts.max_words)
            results.append({"caption": caption} if caption else BadSample("empty caption"))
        return results

    def metadata(self) -> dict[str, Any]:
        o = self.opts
        if o.from_jsonl:
            return {"source": "jsonl", "file": str(Path(o.from_jsonl).resolve()),
                    "captions_in_file": len(self.captions),
                    "max_words": o.max_words}
        return {"source": "model", "model": str(Path(o.model).resolve()), "class": type(self.model).__name__,
                "prompt": o.prompt, "max_words": o.max_words, "max_new_tokens": o.max_new_tokens,
                "dtype": str(self.dtype).removeprefix("torch.")}
