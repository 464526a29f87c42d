"""Walk the task registry: every built-in task has a smoke recipe, trains two steps through the one
Trainer, exports through the one export format, and ``vtok export`` rebuilds the same export from its
checkpoint without building data, teachers or loss networks."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vtok.tasks  # noqa: F401  (registers the built-in tasks)
from conftest import ROOT
from vtok.config import load_recipe
from vtok.models.api import Condition
from vtok.models.export import load_export
from vtok.models.registry import MODELS
from vtok.train import Trainer
from vtok.train.task import TASKS

BUILTIN = sorted(n for n, cls in TASKS.items() if cls.__module__.startswith("vtok."))
SMOKE: dict[str, Path] = {}  # task -> its first smoke recipe by name (recipes that include another count too)
for _p in sorted((ROOT / "recipes" / "smoke").glob("*.yaml")):
    if _task := load_recipe(_p).train.task:
        SMOKE.setdefault(_task, _p)


@pytest.fixture(scope="session")
def code_shards(shards, exported, tmp_path_factory) -> str:
    """The session's image shards encoded by the session's exported smoke tokenizer."""
    from vtok.parallel.dist import DistInfo
    from vtok.precompute.codes import precompute_codes

    out = tmp_path_factory.mktemp("walk") / "codes"
    precompute_codes(str(exported), shards["wds"], str(out), DistInfo(), resolution=32, progress=False)
    return str(out)


def test_every_builtin_task_has_a_smoke_recipe():
    assert BUILTIN and set(BUILTIN) <= set(SMOKE), f"tasks without recipes/smoke/*.yaml: {set(BUILTIN) - set(SMOKE)}"


@pytest.mark.parametrize("task", BUILTIN)
def test_task_trains_two_steps_and_exports(task, shards, code_shards, tmp_path, monkeypatch):
    base = load_recipe(SMOKE[task])
    data = code_shards if "codes" in base.data.fields else shards["wds"]
    overrides = [f"data.train_shards={data}", "data.resolution=32", "data.batch_size=8", "data.num_workers=0",
                 f"run_dir={tmp_path / 'run'}", "train.steps=2", "train.log_every=1", "train.eval_every=0",
                 "log.progress=false", "log.tensorboard=false"]
    recipe = load_recipe(SMOKE[task], overrides)
    trainer = Trainer(recipe)
    result = trainer.fit()
    assert result["status"] == "complete" and result["step"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result["last"].items() if k.endswith("/loss"))
    trainer.export(tmp_path / "live")

    # `vtok export` path: only the exported module is built (no loader, teachers, LPIPS)
    def refuse(*a, **k):
        raise AssertionError("vtok export built something it does not export")
    monkeypatch.setattr("vtok.data.build_loader", refuse)
    monkeypatch.setattr("vtok.models.pretrained.build_pretrained", refuse)
    monkeypatch.setattr("vtok.losses.LPIPS", refuse)
    from vtok.train.export import export_checkpoint

    weights, step = export_checkpoint(recipe, tmp_path / "offline", trainer.ckpt.latest())
    assert step == 2
    live, offline = load_file(str(tmp_path / "live" / "model.safetensors")), load_file(str(weights))
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)

    export = load_export(tmp_path / "offline")
    assert export.kind == MODELS[export.arch].kind and export.meta["task"] == task and export.meta["step"] == 2
    if export.kind == "tokenizer":
        spec = export.token_spec
        assert spec.resolution == 32
        tokens = export.model.encode(torch.zeros(2, 3, 32, 32))
        assert tokens.shape == (2, *spec.shape)
        assert export.model.decode(tokens).shape == (2, 3, 32, 32)
    else:
        if export.meta.get("source", "codes") == "codes":  # a DiT on pixels has no tokenizer
            assert Path(export.meta["tokenizer"]).is_dir()
        assert export.token_spec.resolution == 32
        tokens = export.model.generate(Condition(labels=torch.tensor([0, 1])))
        assert tokens.shape == (2, *export.token_spec.shape)
