"""Checkpoint integrity and trust, `vtok info` model checks, dotlist list items, strict weight loading."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_tasks
from conftest import ROOT, read_metrics, write_train_recipe
from vtok.cli import USER_ERRORS, main
from vtok.config import RecipeError, load_recipe
from vtok.data.synthetic import write_synthetic
from vtok.parallel.dist import DistInfo
from vtok.train import Trainer, TrainingError
from vtok.train.checkpoint import META, CheckpointManager, resolve_resume, verify_checkpoint

STEP2, STEP4 = "step_000000002", "step_000000004"


# ---- checkpoints: a tiny-ae run with checkpoints at steps 2 and 4, copied per test -----------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """32 MDS samples at 32 px: one epoch of the 4 steps x batch 8 below."""
    out = tmp_path_factory.mktemp("ckpt_data") / "mds"
    write_synthetic(out, "mds", 32, 16, resolution=32, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt_run")
    recipe = write_train_recipe(root / "r.yaml", data, "tiny-ae", root / "run", steps=4)
    assert Trainer(load_recipe(recipe)).fit()["status"] == "complete"
    return root / "run"


@pytest.fixture
def run(trained, data, tmp_path) -> tuple[str, Path]:
    """(recipe path, its checkpoints dir): a private copy of the trained run."""
    shutil.copytree(trained, tmp_path / "run")
    recipe = write_train_recipe(tmp_path / "r.yaml", data, "tiny-ae", tmp_path / "run", steps=4)
    return recipe, tmp_path / "run" / "checkpoints"


def manager(ckpts: Path, trust: bool = False) -> CheckpointManager:
    return CheckpointManager(ckpts, keep_last=10, info=DistInfo(), trust=trust)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_meta_records_size_and_hash_of_every_file(run):
    _, ckpts = run
    meta = json.loads((ckpts / STEP4 / META).read_text())
    on_disk = sorted(p.name for p in (ckpts / STEP4).iterdir() if p.name != META)
    assert sorted(meta["files"]) == on_disk == ["model-ae.safetensors", "optim-main.pt", "rank00000.pt"]
    for name, entry in meta["files"].items():
        assert entry["size"] == (ckpts / STEP4 / name).stat().st_size and len(entry["sha256"]) == 64
    assert not list((ckpts / STEP4).glob("*.tmp")), "meta.json is written atomically"
    assert verify_checkpoint(ckpts / STEP4) == "" and verify_checkpoint(ckpts / STEP2) == ""


def test_truncated_weights_of_newest_fall_back_to_older_and_train_on(run, caplog):
    recipe, ckpts = run
    truncate(ckpts / STEP4 / "model-ae.safetensors")
    caplog.set_level(logging.INFO, logger="vtok.train")
    result = Trainer(load_recipe(recipe)).fit()
    assert result["status"] == "complete" and result["step"] == 4
    warned = warnings_of(caplog)
    assert any("model-ae.safetensors" in w and "truncated" in w and STEP4 in w for w in warned), warned
    assert all("\n" not in w for w in warned)
    assert any(f"resumed from {ckpts / STEP2} at step 2" in r.getMessage() for r in caplog.records)
    assert [m["step"] for m in read_metrics(ckpts.parent)][-2:] == [3, 4]  # steps 3, 4 were retrained
    assert verify_checkpoint(ckpts / STEP4) == "", "the broken step was saved again"


@pytest.mark.parametrize("damage, file, what", [
    ("flip", "optim-main.pt", "sha256 differs"),
    ("flip", "model-ae.safetensors", "sha256 differs"),
    ("delete", META, "missing"),
    ("delete", "rank00000.pt", "missing"),
    ("add", "extra.pt", "not listed"),
    ("edit_meta", META, "digest"),
    ("garble_meta", META, "unreadable"),
])
def test_damaged_newest_checkpoint_warns_one_line_and_falls_back(run, caplog, damage, file, what):
    _, ckpts = run
    path = ckpts / STEP4 / file
    if damage == "flip":
        flip(path)
    elif damage == "delete":
        path.unlink()
    elif damage == "add":
        torch.save({"x": torch.zeros(1)}, path)
    elif damage == "edit_meta":
        path.write_text(path.read_text().replace('"step": 4', '"step": 40'))
    else:
        path.write_text(path.read_text()[:50])
    caplog.set_level(logging.WARNING, logger="vtok.train")
    assert resolve_resume(manager(ckpts), "") == ckpts / STEP2
    warned = warnings_of(caplog)
    assert any(str(path) in w and what in w for w in warned), warned
    assert all("\n" not in w for w in warned)
    no_meta = damage == "delete" and file == META
    with pytest.raises(FileNotFoundError if no_meta else TrainingError):  # named explicitly: no fallback
        resolve_resume(manager(ckpts), str(ckpts / STEP4))


def test_all_checkpoints_corrupt_is_one_line_exit_2_through_vtok_train(run, capsys):
    recipe, ckpts = run
    truncate(ckpts / STEP4 / "model-ae.safetensors")
    (ckpts / STEP2 / "rank00000.pt").unlink()
    assert main(["train", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vtok: error:"), err
    assert str(ckpts / STEP4 / "model-ae.safetensors") in err and "1 older" in err


def test_subdirectories_are_hashed_like_dcp_and_deepspeed_write_them(tmp_path, caplog):
    class NestedStrategy:  # writes what FSDP2 (dcp/) and DeepSpeed (<tag>/) write: files in subdirs
        def save(self, path: Path, extra) -> None:
            (path / "dcp").mkdir()
            (path / "dcp" / ".metadata").write_bytes(b"metadata" * 10)
            (path / "dcp" / "__0_0.distcp").write_bytes(b"\x01" * 1000)
            (path / "generator").mkdir()
            (path / "generator" / "mp_rank_00_model_states.pt").write_bytes(b"\x02" * 500)

    m = manager(tmp_path / "ckpts")
    for step in (1, 2):
        m.save(step, NestedStrategy(), {}, {"step": step, "loader": {}}, {"strategy": "fake"})
    newest = tmp_path / "ckpts" / "step_000000002"
    files = json.loads((newest / META).read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "generator/mp_rank_00_model_states.pt"} <= set(files)
    flip(newest / "dcp" / ".metadata")
    caplog.set_level(logging.WARNING, logger="vtok.train")
    assert resolve_resume(m, "") == tmp_path / "ckpts" / "step_000000001"
    assert any("dcp/.metadata" in w for w in warnings_of(caplog))
    (newest / "dcp" / "__0_0.distcp").unlink()
    assert "__0_0.distcp: missing" in verify_checkpoint(newest)


def strip_hashes(step_dir: Path) -> None:
    """meta.json as another writer (or an older vtok) leaves it: step and world size, no hashes."""
    meta = json.loads((step_dir / META).read_text())
    (step_dir / META).write_text(json.dumps({"step": meta["step"], "world_size": meta["world_size"]}))


def test_checkpoint_without_vtok_hashes_is_refused_unless_trusted(run):
    recipe, ckpts = run
    strip_hashes(ckpts / STEP4)
    strip_hashes(ckpts / STEP2)
    for explicit in (str(ckpts / STEP4), ""):
        with pytest.raises(TrainingError) as err:
            resolve_resume(manager(ckpts), explicit)
        msg = str(err.value)
        assert "\n" not in msg and "not written by vtok" in msg and "ckpt.trust=true" in msg
    assert resolve_resume(manager(ckpts, trust=True), "") == ckpts / STEP4
    r = load_recipe(recipe, ["ckpt.trust=true"])
    assert r.ckpt.trust is True and load_recipe(recipe).ckpt.trust is False
    trainer = Trainer(r)
    trainer.load(resolve_resume(trainer.ckpt, ""))
    assert trainer.step == 4


def test_readme_security_section_before_tests():
    text = (ROOT / "README.md").read_text()
    assert text.index("## Security") < text.index("## Tests")
    section = text[text.index("## Security"):text.index("## Tests")]
    for needle in ("safetensors", "weights_only=True", "pickle", "ckpt.trust=true", "trust_remote_code"):
        assert needle in section


# ---- vtok info checks the model section -----------------------------------------------------------
def test_info_checks_model_section_like_train(tmp_path, capsys, monkeypatch):
    assert main(["info", str(ROOT / "recipes/smoke/fqgan_dual.yaml"), "model.num_codebok=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'model.num_codebok'" in err, err

    def no_build(self, cfg, recipe):
        raise AssertionError("vtok info must not build the model")

    monkeypatch.setattr(tiny_tasks.TinyAETask, "__init__", no_build)
    recipe = write_train_recipe(tmp_path / "r.yaml", "shards", "tiny-ae", tmp_path / "run")
    assert main(["info", recipe, "model.widht=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'model.width'" in err, err
    assert main(["info", recipe, "model.width=8"]) == 0
    assert "width: 8" in capsys.readouterr().out


# ---- dotlist overrides reach list items -----------------------------------------------------------
F16 = ROOT / "recipes/fqgan/fqgan_dual_f16.yaml"


@pytest.mark.parametrize("key", ["model.teachers.0.weights", "model.teachers[0].weights"])
def test_override_sets_a_list_item_field(key):
    r = load_recipe(F16, [f"{key}=/data/clip.safetensors", "data.fields.0=img"])
    teacher = r.model["teachers"][0]
    assert teacher["weights"] == "/data/clip.safetensors"
    assert (teacher["kind"], teacher["tag"], teacher["codebook"]) == ("clip", "openai", 1)  # rest kept
    assert r.data.fields[0] == "img"


def test_override_index_out_of_range_is_one_line_naming_the_length():
    with pytest.raises(RecipeError) as err:
        load_recipe(F16, ["model.teachers.3.weights=x"])
    msg = str(err.value)
    assert "\n" not in msg and "command line" in msg and "model.teachers.3" in msg and "has 1 item" in msg
    with pytest.raises(RecipeError, match="'first' is not a list index"):
        load_recipe(F16, ["model.teachers.first.weights=x"])


# ---- weights files with the wrong keys or shapes --------------------------------------------------
def test_load_state_dict_strict_one_line_errors():
    from vtok.models.weights import WeightsError, load_state_dict_strict

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    good = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}  # older files lack the BN counter
    load_state_dict_strict(net, good, "w.pt")
    assert torch.equal(net[2].weight, good["2.weight"])
    assert issubclass(WeightsError, USER_ERRORS)

    bad = {("x." + k if k.startswith("2.") else k): v for k, v in good.items()}
    with pytest.raises(WeightsError) as err:
        load_state_dict_strict(net, bad, "/w/bad.pt")
    msg = str(err.value)
    assert "\n" not in msg and "/w/bad.pt" in msg
    assert "missing keys: 2 ('2.weight', '2.bias')" in msg and "unexpected keys: 2 ('x.2.weight'" in msg

    wrong = {**good, "0.weight": torch.zeros(3, 5)}
    with pytest.raises(WeightsError, match=r"'0.weight': file \(3, 5\), model \(3, 4\)"):
        load_state_dict_strict(net, wrong, "w.pt")


def test_dinov2_and_clip_teachers_wrong_file_is_one_line(tmp_path):
    timm = pytest.importorskip("timm")
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    from vtok.models.teachers import load_clip_teacher, load_dinov2_teacher
    from vtok.models.weights import WeightsError

    kw = dict(depth=1, num_heads=2, img_size=28)
    small = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=48, **kw)
    state = small.state_dict()
    path = tmp_path / "dino.safetensors"
    save_file({**{k: v for k, v in state.items() if not k.startswith("norm.")}, "extra.w": torch.zeros(1)},
              str(path))
    with pytest.raises(WeightsError) as err:
        load_dinov2_teacher("vit_small_patch14_dinov2", str(path), embed_dim=48, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "missing keys: 2 ('norm.weight', 'norm.bias')" in msg
    assert "unexpected keys: 1 ('extra.w')" in msg
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"shape mismatch.*file \(.*48.*\), model \(.*64.*\)"):
        load_dinov2_teacher("vit_small_patch14_dinov2", str(path), embed_dim=64, **kw)
    clip_cfg = tmp_path / "vtok-ckpt-tiny-clip.json"
    vision = {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1}
    clip_cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(clip_cfg)
    with pytest.raises(WeightsError) as err:  # a DINOv2 file given to a CLIP teacher
        load_clip_teacher("vtok-ckpt-tiny-clip", str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value) and "missing keys" in str(err.value)


def test_lpips_wrong_files_are_one_line(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import vgg

    from vtok.losses import LPIPS
    from vtok.models.weights import WeightsError

    features = {f"features.{k}": v for k, v in vgg.make_layers(vgg.cfgs["D"]).state_dict().items()}
    vgg = tmp_path / "vgg.safetensors"
    save_file({**features, "features.0.weight": torch.zeros(32, 3, 3, 3)}, str(vgg))
    with pytest.raises(WeightsError, match=r"vgg.safetensors.*'0.weight': file \(32, 3, 3, 3\), model \(64, 3, "):
        LPIPS(vgg)
    save_file(features, str(vgg))
    heads = tmp_path / "heads.safetensors"
    save_file({f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512))},
              str(heads))
    with pytest.raises(WeightsError, match=r"heads.safetensors.*missing keys: 1 \('lin4.model.1.weight'\)"):
        LPIPS(vgg, heads)
    save_file({f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), float(i))
               for i, c in enumerate((64, 128, 256, 512, 512))}, str(heads))
    assert LPIPS(vgg, heads).heads[3].weight.flatten()[0] == 3.0


def test_inception_shape_mismatch_names_key_and_shapes(tmp_path):
    from vtok.eval import EvalError
    from vtok.eval.inception import InceptionFeatures

    model = InceptionFeatures(None)
    state = {k: v for k, v in model.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    key = next(k for k, v in state.items() if v.ndim == 4)
    shape = tuple(state[key].shape)
    path = tmp_path / "inc.pth"
    torch.save({**state, key: torch.zeros(shape[0] + 1, *shape[1:])}, path)
    with pytest.raises(EvalError) as err:
        InceptionFeatures(path)
    msg = str(err.value)
    assert "\n" not in msg and f"'{key}': file ({shape[0] + 1}, " in msg and f"model {shape}" in msg
    torch.save(state, path)  # without the BN counters: loads
    assert torch.equal(InceptionFeatures(path).net.state_dict()[key], state[key])
