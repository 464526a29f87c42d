"""Frozen CLIP / DINOv2 teachers: tiny random models saved to disk and loaded back through the loaders."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from vtok.models.teachers import Teacher, load_clip_teacher, load_dinov2_teacher  # noqa: E402

DINO = "vit_small_patch14_dinov2"
DINO_KW = dict(depth=1, embed_dim=48, num_heads=2, img_size=56)
CLIP = "vtok-tiny-clip"
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def reference_input(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The documented preprocessing, written out independently of Teacher.preprocess."""
    x = (images + 1) / 2
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def save(state_dict: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, str(path))
    return str(path)


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _marker_write(path: str) -> None:  # what an unsafe unpickler would run
    open(path, "w").close()


class _Malicious:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _marker_write, (self.marker,)


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory) -> str:
    cfg_file = tmp_path_factory.mktemp("clip_cfg") / f"{CLIP}.json"
    cfg_file.write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    return CLIP


@pytest.fixture(scope="module")
def dino_model():
    torch.manual_seed(0)
    return timm.create_model(DINO, pretrained=False, num_classes=0, **DINO_KW).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_dinov2_loads_saved_weights(tmp_path, dino_model, suffix):
    path = save(dino_model.state_dict(), tmp_path / f"dino{suffix}")
    teacher = load_dinov2_teacher(DINO, path, **DINO_KW)
    assert isinstance(teacher, Teacher)
    assert (teacher.image_size, teacher.feature_dim) == (56, 48)
    assert "state_dict" not in teacher.encoder.pretrained_cfg  # the checkpoint copy was released
    x = images()
    out = teacher(x)
    assert out.shape == (2, 48) and out.dtype == torch.float32
    with torch.no_grad():
        ref = dino_model(reference_input(x, 56, *IMAGENET))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A freshly initialised model disagrees: the match above comes from the loaded weights.
    torch.manual_seed(1)
    other = timm.create_model(DINO, pretrained=False, num_classes=0, **DINO_KW).eval()
    with torch.no_grad():
        assert not torch.allclose(other(reference_input(x, 56, *IMAGENET)), ref, atol=1e-3)


def test_dinov2_default_size_resamples_position_embeddings(tmp_path, dino_model):
    path = save(dino_model.state_dict(), tmp_path / "dino.safetensors")
    kw = {k: v for k, v in DINO_KW.items() if k != "img_size"}
    teacher = load_dinov2_teacher(DINO, path, **kw)
    assert teacher.image_size == 224 and teacher.encoder.pos_embed.shape == (1, 1 + 16 * 16, 48)
    assert teacher(images(1, 32)).shape == (1, 48)


def test_teacher_is_frozen(tmp_path, dino_model):
    teacher = load_dinov2_teacher(DINO, save(dino_model.state_dict(), tmp_path / "d.safetensors"), **DINO_KW)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert teacher.training and not teacher.encoder.training
    assert not any(m.training for m in teacher.encoder.modules())
    x = images().requires_grad_(True)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None
    assert set(teacher.state_dict()) == {f"encoder.{k}" for k in teacher.encoder.state_dict()}  # mean/std not saved


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_clip_loads_saved_weights(tmp_path, tiny_clip_config, suffix):
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_config).eval()
    path = save(model.state_dict(), tmp_path / f"clip{suffix}")
    teacher = load_clip_teacher(tiny_clip_config, path)
    assert (teacher.image_size, teacher.feature_dim) == (32, 32)
    assert teacher.mean.flatten().tolist() == pytest.approx(OPENAI[0])
    visual_params = sum(p.numel() for p in model.visual.parameters())
    assert sum(p.numel() for p in teacher.parameters()) == visual_params  # text tower dropped
    x = images()
    out = teacher(x)
    assert out.shape == (2, 32) and out.dtype == torch.float32 and not out.requires_grad
    with torch.no_grad():
        ref = model.encode_image(reference_input(x, 32, *OPENAI))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    other = open_clip.create_model(tiny_clip_config).eval()
    with torch.no_grad():
        assert not torch.allclose(other.encode_image(reference_input(x, 32, *OPENAI)), ref, atol=1e-3)


def test_missing_weights_raise_file_not_found(tmp_path, tiny_clip_config):
    missing = str(tmp_path / "nope" / "weights.safetensors")
    for load, key in ((lambda: load_clip_teacher(tiny_clip_config, missing), "model.teachers[].weights"),
                      (lambda: load_dinov2_teacher(DINO, missing), "model.teachers[].weights")):
        with pytest.raises(FileNotFoundError) as err:
            load()
        message = str(err.value)
        assert missing in message and key in message and "\n" not in message


def test_unknown_names_raise_value_error(tmp_path, tiny_clip_config):
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_clip_teacher("ViT-B-23", str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match=DINO):
        load_dinov2_teacher("vit_smal_patch14_dinov2", str(tmp_path / "w.pt"))
    torch.manual_seed(0)
    path = save(open_clip.create_model(tiny_clip_config).state_dict(), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="pretrained tag"):
        load_clip_teacher(tiny_clip_config, path, pretrained_tag="openai")


def test_unsafe_pickles_are_refused(tmp_path, dino_model, tiny_clip_config):
    marker = tmp_path / "pwned"
    for name, load, state_dict in (
            ("dino.pt", lambda p: load_dinov2_teacher(DINO, p, **DINO_KW), dino_model.state_dict()),
            ("clip.pt", lambda p: load_clip_teacher(tiny_clip_config, p),
             open_clip.create_model(tiny_clip_config).state_dict())):
        path = tmp_path / name
        torch.save({**state_dict, "payload": _Malicious(str(marker))}, path)
        with pytest.raises((pickle.UnpicklingError, RuntimeError)):
            load(str(path))
        assert not marker.exists()


def test_any_input_size_is_resized(tmp_path, dino_model):
    teacher = load_dinov2_teacher(DINO, save(dino_model.state_dict(), tmp_path / "d.safetensors"), **DINO_KW)
    for size in (64, 40, 56):
        x = images(2, size)
        torch.testing.assert_close(teacher.preprocess(x), reference_input(x, 56, *IMAGENET))
        assert teacher(x).shape == (2, 48)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        teacher(torch.zeros(3, 64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_bf16_and_returns_float32(tmp_path, dino_model):
    teacher = load_dinov2_teacher(DINO, save(dino_model.state_dict(), tmp_path / "d.safetensors"), **DINO_KW)
    x = images()
    ref = teacher(x)
    out = teacher.cuda()(x.cuda())
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=0.1, rtol=0.05)


def test_clip_cls_feature_is_the_pre_projection_token(tiny_clip_config, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_config)
    path = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(path))
    teacher = load_clip_teacher(tiny_clip_config, str(path), feature="cls")
    width = model.visual.transformer.width
    assert teacher.feature_dim == width
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    model.visual.proj = None
    expected = model.visual(teacher.preprocess(x))
    torch.testing.assert_close(teacher(x), expected.float(), rtol=1e-5, atol=1e-5)
