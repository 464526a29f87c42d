"""``vtok precompute text-emb``: a frozen T5 encoder turns each ``caption`` into ``text_emb`` / ``text_mask``.

Per sample: ``text_emb`` float16 (L, D), the encoder's last hidden state for the caption tokenized to
exactly ``L = max_length`` tokens (truncated / padded; positions past the mask are the encoder's output
on padding, kept as it is), and ``text_mask`` bool (L,), True for real tokens. An empty caption is a
bad sample unless ``empty_caption="null"``, which stores the encoding of the empty string (the null
caption of classifier-free guidance). The model comes from a local directory (``T5EncoderModel`` +
its tokenizer, e.g. google/t5-v1_1-xl saved with ``save_pretrained``); nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtok.data.transforms import BadSample
from vtok.precompute.runner import DTYPES, Job, model_identity, resolve_dtype


@dataclass
class TextEmbOptions:
    """``vtok precompute text-emb`` flags (besides the runner's)."""

    encoder: str = field(metadata={"help": "local directory of a transformers T5 (encoder) + tokenizer"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory (default: --encoder)"})
    max_length: int = field(default=128, metadata={"help": "L: tokens per caption (padded / truncated)"})
    empty_caption: str = field(default="error", metadata={
        "help": "empty caption: a bad sample (error) or the encoding of '' (null)", "choices": ("error", "null")})
    dtype: str = field(default="auto", metadata={
        "help": "encoder dtype (auto: bfloat16 on GPU, float32 on CPU)",
        "choices": DTYPES})


class TextEmbJob(Job):
    """captions (list[str]) -> ``text_emb`` (B, L, D) float16 + ``text_mask`` (B, L) bool."""

    name = "text-emb"
    adds = ("text_emb", "text_mask")

    def __init__(self, opts: TextEmbOptions):
        self.opts = opts
        self.model: Any = None
        self.tokenizer: Any = None

    def identity(self) -> dict[str, Any]:
        o = self.opts
        tok = model_identity(o.tokenizer) if o.tokenizer else None
        return {"model": model_identity(o.encoder),
                "settings": {"tokenizer": tok, "max_length": o.max_length, "empty_caption": o.empty_caption,
                             "dtype": o.dtype}}

    def load(self, device: torch.device) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.device, self.dtype = device, resolve_dtype(self.opts.dtype, device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.opts.tokenizer or self.opts.encoder, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(self.opts.encoder, dtype=self.dtype, local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)

    def prepare(self, sample: dict[str, Any]) -> str:
        caption = sample["caption"]
        if not caption.strip():
            if self.opts.empty_caption != "null":
                raise BadSample("empty caption (--empty-caption null encodes it as the null caption '')")
            return ""
        return caption

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (hidden (B, L, D) in the model's dtype, mask (B, L) bool), on the device."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.opts.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()

    def stored(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> what the shards carry: (``text_emb`` (B, L, D) float16, ``text_mask`` (B, L) bool),
        on the CPU. ``vtok sample --caption`` conditions generators on exactly this."""
        hidden, mask = self.encode(captions)
        return hidden.to(torch.float16).cpu(), mask.cpu()

    def run(self, items: list[str]) -> list[dict[str, Any]]:
        emb, masks = self.stored(items)
        return [{"text_emb": e, "text_mask": m} for e, m in zip(emb.numpy(), masks.numpy())]

    def metadata(self) -> dict[str, Any]:
        cfg = self.model.config
        tokenizer = str(Path(self.opts.tokenizer).resolve()) if self.opts.tokenizer else ""
        return {"encoder": str(Path(self.opts.encoder).resolve()), "tokenizer": tokenizer, "d_model": cfg.d_model,
                "max_length": self.opts.max_length, "empty_caption": self.opts.empty_caption,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": [self.opts.max_length, cfg.d_model]}


def load_text_encoder(encoder: str, max_length: int, device: torch.device | str, *, tokenizer: str = "",
                      dtype: str = "auto") -> TextEmbJob:
    """A loaded ``TextEmbJob`` (the T5 in ``encoder``, its tokenizer, captions padded / truncated to
    ``max_length``): ``.stored(captions)`` gives the embeddings ``vtok precompute text-emb`` writes."""
    job = TextEmbJob(TextEmbOptions(encoder=encoder, tokenizer=tokenizer, max_length=max_length, dtype=dtype))
    job.load(torch.device(device))
    return job


def shapes_caption_words() -> list[str]:
    """Every word of the built-in synthetic shapes' captions (``vtok.data.synthetic``), sorted."""
    from vtok.data.synthetic import BACKGROUNDS, COLORS, SHAPES

    return sorted({w for name in (*SHAPES, *COLORS, *BACKGROUNDS) for w in name.split()}
                  | {"a", "an", "on", "small", "large", "background"})


def save_random_t5(out: str | Path, width: int = 32, *, heads: int = 4, d_ff: int = 0, num_layers: int = 2,
                   words: list[str] | tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """A tiny RANDOM T5 encoder (``num_layers`` blocks of width ``width``, ``heads`` heads, MLP ``d_ff``,
    default 2 x width) and a word-level tokenizer over ``words`` (default: the synthetic shapes' caption
    words), saved to ``out`` as ``save_pretrained`` does, for ``vtok precompute text-emb --encoder out``
    in smoke runs, demos, tests and benchmarks (nothing is downloaded). Its embeddings carry no
    language knowledge, only which words a caption has, which is what tells the shapes' captions apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words or shapes_caption_words())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_kv=width // heads, d_ff=d_ff or 2 * width,
                            num_layers=num_layers, num_heads=heads)).save_pretrained(out)
    return Path(out)
