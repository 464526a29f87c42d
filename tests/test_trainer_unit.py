"""In-process pieces of the trainer: schedules, parameter groups, EMA, checkpoint manager, errors."""
import json
import math

import pytest
import torch
from torch import nn

import tiny_tasks  # noqa: F401  (registers the test tasks)
from conftest import write_train_recipe
from vtok.config import RecipeError, load_recipe
from vtok.config.schema import OptimConfig
from vtok.train import Trainer
from vtok.train.ema import EMA
from vtok.train.export import ExportUnsupported
from vtok.train.optim import lr_at, param_groups


def test_lr_schedule_warmup_cosine_constant_and_start_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(cfg, s, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4, 104) == pytest.approx(1.0)
    assert lr_at(cfg, 54, 104) == pytest.approx(0.55)  # half way: floor + half the range
    assert lr_at(cfg, 104, 104) == pytest.approx(0.1)
    const = OptimConfig(lr=2.0, schedule="constant", warmup_steps=0)
    assert lr_at(const, 0, 10) == lr_at(const, 9, 10) == 2.0
    late = OptimConfig(lr=1.0, warmup_steps=2, start_step=10, schedule="constant")
    assert lr_at(late, 10, 100) == 0.5 and lr_at(late, 11, 100) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(1, 2, 3))
    decay, no_decay = param_groups([model], 0.05)
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model[1].weight), id(model[3].weight)}
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 5


def test_ema_update_and_state_round_trip():
    m = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 1.1))
    other = EMA(m, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])


def recipe_for(shards, tmp_path, *overrides, task="tiny-ae", steps=5):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_train_recipe(tmp_path / "r.yaml", shards["mds"], task, tmp_path / "run", steps=steps)
    return load_recipe(path, list(overrides))


def test_checkpoints_keep_last_latest_and_resume_in_process(shards, tmp_path):
    recipe = recipe_for(shards, tmp_path, "ckpt.every_steps=1", "ckpt.keep_last=2", "train.ema.decay=0.5")
    result = Trainer(recipe).fit()
    assert result["status"] == "complete" and result["step"] == 5
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000000004", "step_000000005"]
    assert (ckpts / "latest").read_text() == "step_000000005"
    assert (ckpts / "step_000000005" / "ema-ae.safetensors").is_file()
    meta = json.loads((ckpts / "step_000000005" / "meta.json").read_text())
    assert meta["step"] == 5 and meta["strategy"] == "ddp"
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "COMPLETE").is_file()

    longer = recipe_for(shards, tmp_path, "ckpt.every_steps=1", "ckpt.keep_last=2", "train.ema.decay=0.5",
                        steps=7)
    trainer = Trainer(longer)
    assert trainer.fit()["step"] == 7
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert all(math.isfinite(x["main/loss"]) for x in lines)
    # the export reader overlays the EMA shadow on the saved weights
    from tiny_tasks import TinyAE
    from vtok.parallel.strategy import read_checkpoint_module

    state = read_checkpoint_module(trainer.ckpt.latest(), "ae", TinyAE(), ema=True)
    assert all(torch.equal(state[k], v) for k, v in trainer.ema["ae"].shadow.items())
    with pytest.raises(ExportUnsupported, match="declares no export module"):
        trainer.export(tmp_path / "export")


def test_trainer_recipe_errors(shards, tmp_path):
    with pytest.raises(RecipeError, match="task 'tiny-ae' has no optimizer 'mian'.*'train.optim.main'"):
        Trainer(recipe_for(shards, tmp_path, "train.optim.mian.lr=1"))
    with pytest.raises(RecipeError, match="global_batch_size=12 is not a multiple of data.batch_size"):
        Trainer(recipe_for(shards, tmp_path, "train.global_batch_size=12"))
    with pytest.raises(RecipeError, match="train.task='tiny-a' is not a registered task.*'tiny-ae'"):
        Trainer(recipe_for(shards, tmp_path, "train.task=tiny-a"))
    with pytest.raises(RecipeError, match="unknown key 'model.widht' \\(did you mean 'model.width'"):
        Trainer(recipe_for(shards, tmp_path, "model.widht=3"))


def test_gradient_accumulation_matches_one_big_batch(shards, tmp_path):
    big = Trainer(recipe_for(shards, tmp_path / "a", "data.batch_size=8", "ckpt.every_steps=100"))
    big.fit()
    acc = Trainer(recipe_for(shards, tmp_path / "b", "data.batch_size=2", "train.global_batch_size=8",
                             "ckpt.every_steps=100"))
    assert acc.grad_accum == 4
    acc.fit()
    for (n, p), (_, q) in zip(big.strategy.raw["ae"].named_parameters(),
                              acc.strategy.raw["ae"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_activation_checkpointing_mfu_and_tensorboard(shards, tmp_path):
    plain = Trainer(recipe_for(shards, tmp_path / "a", "ckpt.every_steps=100"))
    plain.fit()
    ac = Trainer(recipe_for(shards, tmp_path / "b", "ckpt.every_steps=100", "train.activation_checkpointing=true",
                            "train.peak_tflops=0.001", "log.tensorboard=true"))
    wrapped = [m for m in ac.strategy.raw["ae"].modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 2, "each block is wrapped"
    ac.fit()
    for p, q in zip(plain.strategy.raw["ae"].parameters(), ac.strategy.raw["ae"].parameters()):
        torch.testing.assert_close(p, q)
    last = json.loads((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # tiny-ae claims 1e6 FLOPs/sample; mfu = flops x samples/s / peak
    assert last["mfu"] == pytest.approx(1e6 * last["samples_per_s"] / 1e9, rel=1e-6)
    assert list((tmp_path / "b" / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_autocast_keeps_fp32_master_weights(shards, tmp_path):
    trainer = Trainer(recipe_for(shards, tmp_path, "ckpt.every_steps=100", "train.precision=bf16"))
    trainer.fit()
    losses = [json.loads(x)["main/loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.strategy.raw["ae"].parameters())
