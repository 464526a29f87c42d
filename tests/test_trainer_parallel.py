"""The trainer under real 2-process torchrun (gloo, CPU): DDP, FSDP2 and DeepSpeed."""
import pytest
import torch

from conftest import read_metrics, run_vtok, write_train_recipe

pytest.importorskip("torch.distributed.fsdp")


def losses(run_dir, key):
    return [m[key] for m in read_metrics(run_dir) if key in m]


@pytest.fixture(scope="module")
def single_runs(shards, tmp_path_factory):
    """Single-process reference trajectories of both tiny tasks (global batch 8)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for task in ("tiny-ae", "tiny-gan"):
        recipe = write_train_recipe(root / f"{task}.yaml", shards["mds"], task, root / task)
        run_vtok("train", recipe)
        out[task] = (recipe, root / task)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "hsdp"])
def test_two_ranks_follow_single_process_trajectory(single_runs, tmp_path, strategy):
    """hsdp: FSDP2 on a (replicate 2, shard 1) mesh (parallel.fsdp_shard_size=1); its step-4
    checkpoint (DCP of 2D-mesh DTensors) also resumes into the same steps 5 and 6."""
    recipe, ref = single_runs["tiny-ae"]
    run = tmp_path / "run"
    args = ["parallel.strategy=fsdp2", "parallel.fsdp_shard_size=1"] if strategy == "hsdp" else [
        f"parallel.strategy={strategy}"]
    run_vtok("train", recipe, *args, f"run_dir={run}", "data.batch_size=4", nproc=2)
    if strategy == "hsdp":
        again = tmp_path / "again"
        run_vtok("train", recipe, *args, f"run_dir={again}", "data.batch_size=4",
                 f"ckpt.resume={run / 'checkpoints' / 'step_000000004'}", nproc=2)
        assert [m["step"] for m in read_metrics(again)] == [5, 6]
        torch.testing.assert_close(torch.tensor(losses(again, "main/loss")),
                                   torch.tensor(losses(run, "main/loss")[4:]), rtol=1e-6, atol=1e-8)
    ref_loss, loss = losses(ref, "main/loss"), losses(run, "main/loss")
    assert len(loss) == len(ref_loss) == 6
    assert loss[-1] < loss[0]
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed"])
def test_two_optimizer_gan_matches_single_process(single_runs, tmp_path, strategy):
    pytest.importorskip("deepspeed") if strategy == "deepspeed" else None
    recipe, ref = single_runs["tiny-gan"]
    run = tmp_path / "run"
    run_vtok("train", recipe, f"parallel.strategy={strategy}", f"run_dir={run}", "data.batch_size=4", nproc=2)
    for key in ("generator/loss", "discriminator/loss"):
        ref_l, got = losses(ref, key), losses(run, key)
        assert len(got) == len(ref_l) >= 4  # the discriminator starts at step 2
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_l), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_train_checkpoint_load_continue(shards, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=4)
    common = ["parallel.strategy=deepspeed", f"parallel.deepspeed.zero_stage={zero_stage}",
              "data.batch_size=4", "train.optim.main.schedule=constant"]  # lr independent of train.steps
    run_vtok("train", recipe, *common, nproc=2)
    assert (tmp_path / "run" / "checkpoints" / "step_000000004" / "main").is_dir()
    proc = run_vtok("train", recipe, *common, "train.steps=8", nproc=2)
    assert "complete at step 8" in proc.stdout
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8], "resumed at step 4, not from scratch"
    # Uninterrupted reference: DeepSpeed's resume reproduces the loss trajectory to fp32 noise.
    ref = write_train_recipe(tmp_path / "ref.yaml", shards["mds"], "tiny-ae", tmp_path / "ref", steps=8)
    run_vtok("train", ref, *common, nproc=2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "run", "main/loss")),
                               torch.tensor(losses(tmp_path / "ref", "main/loss")), rtol=1e-5, atol=1e-7)
    # the export reader gets full fp32 weights out of the ZeRO files, in this non-distributed process
    from tiny_tasks import TinyAE
    from vtok.parallel.strategy import read_checkpoint_module

    last = [read_checkpoint_module(d / "checkpoints" / "step_000000008", "ae", TinyAE())
            for d in (tmp_path / "run", tmp_path / "ref")]
    fresh = TinyAE().state_dict()
    assert TinyAE().load_state_dict(last[0]) is not None
    for k, v in last[0].items():
        torch.testing.assert_close(v, last[1][k], rtol=1e-4, atol=1e-6)
    assert not torch.equal(last[0]["inp.weight"], fresh["inp.weight"])


def test_fsdp2_checkpoint_from_two_ranks_loads_at_one(shards, tmp_path):
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=4)
    run_vtok("train", recipe, "parallel.strategy=fsdp2", "data.batch_size=4", nproc=2)
    # One rank: resume the 2-rank DCP checkpoint, train on, then export full weights.
    proc = run_vtok("train", recipe, "parallel.strategy=fsdp2", "train.steps=6", nproc=1)
    assert "complete at step 6" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-2:] == [5, 6]
    # the export reader: full tensors from the 1-rank DCP checkpoint, in this (non-distributed) process
    from tiny_tasks import TinyAE
    from vtok.parallel.strategy import read_checkpoint_module

    weights = read_checkpoint_module(tmp_path / "run" / "checkpoints" / "step_000000006", "ae", TinyAE())
    assert weights["inp.weight"].shape == (16, 3, 4, 4)
    assert TinyAE().load_state_dict(weights) is not None
