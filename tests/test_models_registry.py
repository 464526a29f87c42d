"""Walk the model registry: every full size builds on ``meta`` with its published parameter count;
every tiny sibling runs forward + backward, round-trips through the export format, and works through
its contract (tokenizers: encode -> decode; generators: generate)."""
from dataclasses import fields, is_dataclass

import pytest
import torch

from vtok.config import RecipeError
from vtok.losses.alignment import cosine_alignment, infonce_alignment
from vtok.models.api import Condition, Generator, ResolutionError, Tokenizer, TokenSpec
from vtok.models.export import ExportError, load_export, save_export
from vtok.models.registry import MODELS, build_model

FULL = [n for n in MODELS if "tiny" not in n]
TINY = [n for n in MODELS if "tiny" in n]


def test_every_full_size_has_a_tiny_sibling_of_the_same_class():
    classes = {MODELS[n].model for n in TINY}
    assert all(MODELS[n].model in classes for n in FULL)


@pytest.mark.parametrize("name", FULL)
def test_full_size_builds_on_meta_with_published_count(name):
    with torch.device("meta"):
        model = build_model(name)
    count = sum(p.numel() for p in model.parameters())
    expected = MODELS[name].params
    if expected is not None:
        assert abs(count - expected) / expected < 0.01, f"{name}: {count:,} vs published {expected:,}"
    spec = model.token_spec
    if MODELS[name].kind == "tokenizer" and spec.variable_length:  # FlexTok: 1..256 ordered 1D tokens
        assert isinstance(model, Tokenizer) and spec.resolution == 256 and spec.shape == (1, 256)
    elif MODELS[name].kind == "tokenizer" and not spec.discrete:  # TexTok: N continuous 1D tokens of d = 8
        assert isinstance(model, Tokenizer) and spec.resolution in (256, 512) and spec.shape[1:] == (spec.dim,)
    elif MODELS[name].kind == "tokenizer":
        assert isinstance(model, Tokenizer) and spec.resolution == 256
        assert spec.shape[1:] in ((16, 16), (32, 32))  # 256 px at x16 / x8
    elif spec.discrete:  # generators: LlamaGen's 16x16 token grid of a 256 px image at x16
        assert isinstance(model, Generator) and spec.num_tokens == 256 and spec.condition == "class"
    else:  # diffusion generators: DiT's 32x32x4 SD-VAE latents of a 256 px image
        assert isinstance(model, Generator) and spec.shape == (4, 32, 32) and spec.condition == "class"


def tensors(out) -> list[torch.Tensor]:
    """Every floating tensor in a model output (dataclasses, dicts, lists nest)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() and out.requires_grad else []
    if is_dataclass(out):
        return [t for f in fields(out) for t in tensors(getattr(out, f.name))]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    return []


def inputs(model, b: int = 2):
    """A batch the model trains on: images for tokenizers, (tokens, condition) for generators,
    (noisy tokens, condition, times in [0, 1]) for generators of continuous tokens (diffusion);
    latents (B, C, S, S) for tokenizers that work on VAE latents; images and a caption condition for
    tokenizers that read text (TexTok)."""
    spec = model.token_spec
    if isinstance(model, Generator) and not spec.discrete:
        return torch.randn(b, *spec.shape), Condition(labels=torch.arange(b)), torch.rand(b)
    if isinstance(model, Generator):
        tokens = torch.stack([torch.randint(0, v, (b, *spec.shape[1:])) for v in spec.vocab_sizes], 1)
        return tokens, Condition(labels=torch.arange(b))
    # tokenizers on VAE latents (FlexTok) say what they take with ``input_shape``; others take images
    shape = getattr(model, "input_shape", (3, spec.resolution, spec.resolution))
    if spec.condition == "text":
        text, mask = torch.randn(b, 5, model.cfg.text_dim), torch.arange(5) < torch.randint(1, 6, (b, 1))
        return torch.rand(b, *shape) * 2 - 1, Condition(text=text, text_mask=mask)
    return (torch.rand(b, *shape) * 2 - 1,)


@pytest.mark.parametrize("name", TINY)
def test_tiny_sibling_trains_exports_and_keeps_its_contract(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name)
    with torch.no_grad():  # zero-initialised layers (GPT's output, adaLN-Zero) would block gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = inputs(model)
    loss = sum(t.float().pow(2).mean() for t in tensors(model(*batch)))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)

    save_export(tmp_path, model.eval(), name)
    loaded = load_export(tmp_path, MODELS[name].kind)
    assert loaded.arch == name and loaded.token_spec == model.token_spec
    spec = model.token_spec
    if MODELS[name].kind == "tokenizer":
        x, cond = batch[0], (batch[1] if len(batch) > 1 else None)
        tokens = loaded.model.encode(x, cond)
        assert torch.equal(tokens, model.encode(x, cond)) and tokens.shape == (2, *spec.shape)
        assert not spec.discrete or int(tokens.max()) < min(spec.vocab_sizes)
        images = loaded.model.decode(tokens, cond)
        torch.testing.assert_close(images, model.decode(tokens, cond))
        assert images.shape == x.shape
    else:
        cond = Condition(labels=torch.tensor([0, 1]))
        torch.manual_seed(1)
        tokens = loaded.model.generate(cond, temperature=0)
        assert torch.equal(tokens, model.generate(cond, temperature=0)) and tokens.shape == (2, *spec.shape)
        assert all(int(tokens[:, j].max()) < v for j, v in enumerate(spec.vocab_sizes))


def test_export_kind_mismatch_and_foreign_dirs_are_one_line(tmp_path):
    save_export(tmp_path / "gen", build_model("gpt-tiny"), "gpt-tiny")
    with pytest.raises(ExportError, match="holds a generator \\(gpt-tiny\\), but a tokenizer is expected"):
        load_export(tmp_path / "gen", "tokenizer")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"arch": "fqgan-dual-tiny", "token_shape": [2, 16, 16]}')
    with pytest.raises(ExportError, match="not written in the vtok export format"):
        load_export(tmp_path / "old")
    with pytest.raises(ExportError, match="not a `vtok export` directory"):
        load_export(tmp_path / "missing")
    with pytest.raises(ExportError, match="not that registry entry's class"):
        save_export(tmp_path / "x", build_model("gpt-tiny"), "fqgan-dual-tiny")


def test_token_spec_is_the_one_source_of_the_grid():
    tok = build_model("fqgan-dual-tiny", image_size=32)  # trained at 32 px: 8x8 codes, not 16x16
    assert tok.token_spec.shape == (2, 8, 8) and tok.token_spec.num_tokens == 64
    with pytest.raises(ResolutionError, match="trained at 32 px.*pass --resolution 32"):
        tok.encode(torch.zeros(1, 3, 64, 64))
    plain = build_model("vqgan-tiny", image_size=32)  # no positional tables: any multiple of 4
    assert plain.token_spec.at(64).shape == (1, 16, 16)
    assert plain.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 16, 16)
    with pytest.raises(ResolutionError, match="not a multiple of the tokenizer's downsampling factor 4"):
        plain.token_spec.at(30)
    spec = TokenSpec(shape=(32, 8), resolution=256, dim=8)  # continuous 1D tokens (TexTok-style)
    assert not spec.discrete and spec.num_tokens == 32 and TokenSpec.from_dict(spec.to_dict()) == spec


def test_alignment_losses_fall_when_prediction_matches_teacher():
    torch.manual_seed(0)
    teacher, random_pred = torch.randn(8, 32), torch.randn(8, 32)
    noisy = teacher + 0.5 * torch.randn(8, 32)
    assert infonce_alignment(teacher, teacher) <= infonce_alignment(noisy, teacher) < infonce_alignment(random_pred, teacher)
    tokens = torch.randn(2, 5, 16)
    assert cosine_alignment(tokens, tokens) == pytest.approx(-1.0)
    assert cosine_alignment(tokens + 0.5 * torch.randn(2, 5, 16), tokens) > -1.0


def test_unknown_model_suggests():
    with pytest.raises(RecipeError, match="did you mean 'fqgan-dual-f16'"):
        build_model("fqgan-dual-16")
