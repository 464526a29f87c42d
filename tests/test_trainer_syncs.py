"""Device->host syncs per training step: none per micro-batch, one per optimizer phase (the skip
decision), and the metrics become Python floats only on log steps. Plus the skip semantics of a
non-finite loss in one micro-batch out of several."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny_tasks  # noqa: F401  (registers the test tasks)
from conftest import read_metrics, write_train_recipe
from vtok.config import load_recipe
from vtok.train import Trainer

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# AdamW keeps its per-parameter step counters on the CPU and reads them with .item(): by design no
# device sync (and not vtok's doing), so calls from inside torch.optim are not counted.
OPTIM_DIR = str(Path(torch.optim.__file__).parent)


class SyncCounter:
    """Counts calls of the tensor methods that copy a value to the host while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        self.where: list[str] = []
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            frame = sys._getframe(1)
            caller = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            while frame is not None:
                if frame.f_code.co_filename.startswith(OPTIM_DIR):
                    return original(*args, **kwargs)
                frame = frame.f_back
            self.count += 1
            self.where.append(caller)
            return original(*args, **kwargs)

        return counted


class MemoryLoader:
    """Fixed micro-batches, endlessly; records ``counter.count`` whenever a step's first micro-batch
    is taken, and can poison one micro-batch (NaN image) at a given (step, index)."""

    def __init__(self, grad_accum: int, batch_size: int = 2, counter: SyncCounter | None = None,
                 poison: tuple[int, int] | None = None):
        gen = torch.Generator().manual_seed(0)
        self.batches = [{"image": torch.rand(batch_size, 3, 32, 32, generator=gen) * 2 - 1}
                        for _ in range(grad_accum)]
        self.grad_accum, self.counter, self.poison = grad_accum, counter, poison
        self.marks: list[int] = []
        self.taken = 0

    def __iter__(self):
        while True:
            step, i = divmod(self.taken, self.grad_accum)
            if i == 0 and self.counter is not None:
                self.marks.append(self.counter.count)
            batch = dict(self.batches[i])
            if self.poison == (step, i):
                batch["image"] = torch.full_like(batch["image"], float("nan"))
            self.taken += 1
            yield batch


def make_trainer(tmp_path, task: str, steps: int, *overrides: str, loader: MemoryLoader) -> Trainer:
    path = write_train_recipe(tmp_path / "r.yaml", str(tmp_path / "no-shards"), task, tmp_path / "run",
                              steps=steps)
    recipe = load_recipe(path, ["data.batch_size=2", "train.global_batch_size=8",
                                "ckpt.every_steps=1000", *overrides])
    return Trainer(recipe, loader=loader)


@pytest.mark.parametrize("task, phases", [("tiny-ae", [1] * 7), ("tiny-gan", [1, 1, 2, 2, 2, 2, 2])])
def test_syncs_per_step_do_not_grow_with_micro_batches(tmp_path, monkeypatch, task, phases):
    loader = MemoryLoader(grad_accum=4)
    trainer = make_trainer(tmp_path, task, 7, "train.log_every=3", loader=loader)
    assert trainer.grad_accum == 4
    counter = SyncCounter(monkeypatch)
    loader.counter = counter
    result = trainer.fit()
    monkeypatch.undo()
    assert result["status"] == "complete"
    per_step = [b - a for a, b in zip(loader.marks, loader.marks[1:])]  # steps 1..6 (0-based 0..5)
    assert len(per_step) == 6
    non_log = [i for i in range(6) if (i + 1) % 3]
    for i in non_log:
        assert per_step[i] <= phases[i], (
            f"step {i + 1}: {per_step[i]} host syncs for {phases[i]} optimizer phase(s) and 4 "
            f"micro-batches; calls from: {sorted(set(counter.where))}")
    logged = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert logged == [3, 6, 7]


def test_non_finite_micro_batch_skips_the_step_without_poisoning(tmp_path):
    """Micro-batch 2 of 4 is NaN at step 1: no update, grads discarded, Adam state untouched; the
    next steps train normally."""
    loader = MemoryLoader(grad_accum=4, poison=(1, 2))
    trainer = make_trainer(tmp_path, "tiny-ae", 1, "train.log_every=1", loader=loader)
    trainer.fit()
    module, opt = trainer.strategy.raw["ae"], trainer.strategy.optimizer("main")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    steps_before = [opt.state[p]["step"].item() for p in module.parameters()]

    trainer.recipe.train.steps = 2  # step index 1: the poisoned one
    trainer.fit()
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a skipped step"
    assert all(p.grad is None for p in module.parameters()), "NaN grads are dropped"
    assert [opt.state[p]["step"].item() for p in module.parameters()] == steps_before
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())

    trainer.recipe.train.steps = 4
    trainer.fit()
    metrics = {m["step"]: m for m in read_metrics(tmp_path / "run")}
    assert metrics[2]["main/skipped"] == 1.0 and metrics[2]["bad_steps_in_a_row"] == 1
    assert metrics[3]["main/skipped"] == 0.0 and metrics[4]["bad_steps_in_a_row"] == 0
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
