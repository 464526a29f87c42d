"""Splitting, shuffling, resume and bad-data policy of the loader, for both formats."""
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from conftest import NUM_SAMPLES, PER_SHARD, data_recipe
from vtok.data import DataError, ShardLoader, build_loader
from vtok.data.synthetic import synthetic_samples
from vtok.data.writers import write_shards

ALL_KEYS = {f"{i:08d}" for i in range(NUM_SAMPLES)}


def keys_of(loader, max_batches=None):
    """Keys of the batches taken from one epoch of ``loader`` (the first ``max_batches`` only)."""
    return [k for batch in islice(loader, max_batches) for k in batch["__key__"]]


def test_wds_two_ranks_two_workers_exactly_once_and_reshuffled(shards):
    recipe = data_recipe("wds", shards["wds"], "data.num_workers=2", "data.shuffle_buffer=16")
    loaders = [build_loader(recipe.data, rank=r, world_size=2, seed=3) for r in range(2)]
    epochs = []
    for _ in range(2):
        keys = [k for loader in loaders for k in keys_of(loader)]
        assert Counter(keys).most_common(1)[0][1] == 1
        assert set(keys) == ALL_KEYS
        epochs.append(keys)
    assert epochs[0] != epochs[1], "epoch 1 must be shuffled differently from epoch 0"
    fresh = [build_loader(recipe.data, rank=r, world_size=2, seed=3) for r in range(2)]
    assert [k for loader in fresh for k in keys_of(loader)] == epochs[0], "same seed+epoch, same order"


@pytest.mark.parametrize("workers", [0, 2])
def test_mds_exactly_once(shards, workers):
    recipe = data_recipe("mds", shards["mds"], f"data.num_workers={workers}")
    keys = keys_of(build_loader(recipe.data, seed=1))
    assert len(keys) == NUM_SAMPLES and set(keys) == ALL_KEYS


def batches_of(loader, max_batches=None):
    """Key lists of the batches taken from one epoch of ``loader`` (the first ``max_batches`` only)."""
    return [list(batch["__key__"]) for batch in islice(loader, max_batches)]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2)])
def test_wds_resume_mid_shard_is_exact(shards, world, workers):
    """Stop anywhere (mid-shard, mid-round of the workers, in the 2nd epoch), resume from the merged
    state: the remaining batches are those of an uninterrupted run, same keys in the same order."""
    recipe = data_recipe("wds", shards["wds"], f"data.num_workers={workers}", "data.shuffle_buffer=8")

    def loaders():
        return [build_loader(recipe.data, rank=r, world_size=world, seed=5) for r in range(world)]

    full = loaders()
    expected = [[batches_of(loader) for _ in range(2)] for loader in full]  # [rank][epoch][batch]
    for stop in (0, 13, 40 // world):  # batches per rank: before any, mid-epoch 0, in epoch 1
        first = loaders()
        heads = []
        for loader in first:
            head = batches_of(loader, stop)
            if len(head) < stop:  # epoch 0 ended: continue into epoch 1
                head += batches_of(loader, stop - len(head))
            heads.append(head)
        state = ShardLoader.merge_rank_states([loader.state_dict() for loader in first])
        resumed = loaders()
        for loader in resumed:
            loader.load_state_dict(state)
        again = loaders()  # a state taken right after loading one is the same position
        for r, loader in enumerate(again):
            loader.load_state_dict(ShardLoader.merge_rank_states([x.state_dict() for x in resumed]))
        for r in range(world):
            whole = expected[r][0] + expected[r][1]
            for loader in (resumed[r], again[r]):
                tail = batches_of(loader)
                if loader.epoch == 1 and stop < len(expected[r][0]):
                    tail += batches_of(loader)
                assert heads[r] + tail == whole, f"rank {r}, stopped after {stop} batches"


def test_wds_resume_with_another_layout_is_exactly_once(shards):
    recipe = data_recipe("wds", shards["wds"], "data.num_workers=2", "data.shuffle_buffer=8")
    first = build_loader(recipe.data, seed=5)
    head = keys_of(first, max_batches=13)  # 104 samples: some shards done, some partly read
    state = first.state_dict()
    assert state["epoch"] == 0 and sorted(o for _, o in state["positions"]) == [8, 16]

    # Resume with a different worker layout: the unfinished shards are re-dealt and the samples
    # already delivered from partly read ones are skipped.
    resumed = build_loader(data_recipe("wds", shards["wds"], "data.num_workers=1",
                                       "data.shuffle_buffer=8").data, seed=5)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert len(head) + len(tail) == NUM_SAMPLES and set(head) | set(tail) == ALL_KEYS
    assert resumed.epoch == 1 and resumed.state_dict()["positions"] == [[0, 0]]

    # 2 ranks x 1 worker, stopped at different points, resumed on 1 rank x 2 workers.
    two = data_recipe("wds", shards["wds"], "data.num_workers=1", "data.shuffle_buffer=8").data
    ranks = [build_loader(two, rank=r, world_size=2, seed=5) for r in range(2)]
    heads = [keys_of(loader, max_batches=n) for loader, n in zip(ranks, (5, 9))]
    state = ShardLoader.merge_rank_states([loader.state_dict() for loader in ranks])
    resumed = build_loader(recipe.data, seed=5)
    resumed.load_state_dict(state)
    keys = heads[0] + heads[1] + keys_of(resumed)
    assert len(keys) == NUM_SAMPLES and set(keys) == ALL_KEYS


def test_wds_resume_refuses_other_shards(shards):
    recipe = data_recipe("wds", shards["wds"], "data.shuffle_buffer=8")
    state = build_loader(recipe.data).state_dict()
    other = build_loader(data_recipe("wds", shards["wds"], "data.shuffle_buffer=4").data)
    with pytest.raises(DataError, match="shuffle buffer of 8, but this run has 12 and 4"):
        other.load_state_dict(state)


def test_mds_resume_mid_epoch_is_exact(shards):
    recipe = data_recipe("mds", shards["mds"], "data.num_workers=2")
    full = keys_of(build_loader(recipe.data, seed=2))
    first = build_loader(recipe.data, seed=2)
    head = keys_of(first, max_batches=11)
    state = first.state_dict()
    assert state["streaming"]["sample_in_epoch"] == 88
    resumed = build_loader(recipe.data, seed=2)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert head + tail == full, "no repeat, no gap, same order as an uninterrupted epoch"


def test_too_few_shards_for_readers_is_an_error(shards):
    recipe = data_recipe("wds", shards["wds"], "data.num_workers=7")
    with pytest.raises(DataError, match=r"12 shards cannot feed 2 ranks x 7 workers = 14 readers"):
        build_loader(recipe.data, rank=0, world_size=2)


def test_missing_shard_names_the_file(shards, tmp_path):
    spec = f"{shards['wds']}/shard-{{000000..000013}}.tar"
    with pytest.raises(DataError, match=r"shard not found: .*shard-000012.tar .*make_shards"):
        build_loader(data_recipe("wds", spec).data)
    with pytest.raises(DataError, match=r"no MDS dataset at .*index.json"):
        build_loader(data_recipe("mds", str(tmp_path)).data)


def _corrupt_dataset(root: Path) -> Path:
    """4 shards x 10 samples; sample 3 has a corrupt JPEG; shard 2 is truncated mid-file."""
    def produce(i):
        for s in synthetic_samples(i * 10, 10, resolution=32):
            if s["__key__"] == "00000003":
                s["image"] = s["image"][:200] + b"\x00" * 50  # valid header, garbage body
            yield s

    write_shards(root, "wds", 4, produce, progress=False)
    tar = root / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return root


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path):
    root = _corrupt_dataset(tmp_path / "bad")
    loader = build_loader(data_recipe("wds", str(root), "data.max_bad_fraction=0.2").data)
    keys = keys_of(loader)
    assert "00000003" not in keys
    intact = {f"{i:08d}" for i in [*range(20), *range(30, 40)] if i != 3}  # shards 0, 1, 3
    assert intact <= set(keys)
    assert 29 < len(keys) < 39  # plus the samples of shard 2 before the truncation
    assert loader.stats.bad == 2  # one sample + one shard
    assert loader.stats.seen == len(keys) + 2


def test_bad_fraction_threshold_stops_the_run(tmp_path):
    root = _corrupt_dataset(tmp_path / "bad")
    loader = build_loader(data_recipe("wds", str(root), "data.max_bad_fraction=0.01").data)
    with pytest.raises(DataError, match=r"2 of \d+ samples/shards were bad .*data.max_bad_fraction=0.01"):
        keys_of(loader)


def test_mds_corrupt_image_is_skipped(tmp_path):
    def produce(i):
        for s in synthetic_samples(0, 12, resolution=32):
            if s["__key__"] == "00000005":
                s["image"] = b"\xff\xd8\xff" + b"\x01" * 100
            yield s

    write_shards(tmp_path, "mds", 1, produce, progress=False)
    loader = build_loader(data_recipe("mds", str(tmp_path), "data.max_bad_fraction=0.5").data)
    keys = keys_of(loader)
    assert len(keys) == 11 and "00000005" not in keys and loader.stats.bad == 1


def test_small_image_policies(shards):
    with pytest.raises(DataError) as e:
        keys_of(build_loader(data_recipe("wds", shards["wds"], "data.resolution=64").data))
    msg = str(e.value)
    assert "\n" not in msg and "key 0000" in msg and "shard-0000" in msg
    assert "32x32, smaller than data.resolution=64" in msg and "data.small_images=upscale" in msg
    up = build_loader(data_recipe("wds", shards["wds"], "data.resolution=64",
                                  "data.small_images=upscale").data)
    batch = next(iter(up))
    assert batch["image"].shape[1:] == (3, 64, 64)


def test_augmentation_is_deterministic_and_channels_last(shards):
    overrides = ("data.crop=random", "data.hflip=true", "data.channels_last=true", "data.resolution=24")
    a = next(iter(build_loader(data_recipe("wds", shards["wds"], *overrides).data, seed=9)))
    b = next(iter(build_loader(data_recipe("wds", shards["wds"], *overrides).data, seed=9)))
    assert a["__key__"] == b["__key__"] and torch.equal(a["image"], b["image"])
    assert a["image"].shape == (8, 3, 24, 24)
    assert a["image"].is_contiguous(memory_format=torch.channels_last)


def test_state_for_the_wrong_format_is_rejected(shards):
    wds = build_loader(data_recipe("wds", shards["wds"]).data)
    mds = build_loader(data_recipe("mds", shards["mds"]).data)
    with pytest.raises(DataError, match="loader state is for format 'wds'"):
        mds.load_state_dict(wds.state_dict())


def test_augmentation_depends_on_sample_not_on_worker_layout(shards):
    """Per-sample RNG: any worker count (and a resume) gives each key the same crop and flip."""
    overrides = ("data.crop=random", "data.hflip=true", "data.resolution=20", "data.shuffle=false")
    images = []
    for workers in (0, 2):
        loader = build_loader(data_recipe("wds", shards["wds"], f"data.num_workers={workers}",
                                          *overrides).data, seed=4)
        images.append({k: img for b in loader for k, img in zip(b["__key__"], b["image"])})
    assert images[0].keys() == images[1].keys() == ALL_KEYS
    assert all(torch.equal(images[0][k], images[1][k]) for k in ALL_KEYS)


def test_pipe_urls_and_brace_ranges(shards):
    spec = f"pipe:cat {shards['wds']}/shard-{{000000..000011}}.tar"
    keys = keys_of(build_loader(data_recipe("wds", spec).data))
    assert len(keys) == NUM_SAMPLES and set(keys) == ALL_KEYS


@pytest.mark.parametrize("order", ["later", "adjacent"])
def test_duplicate_key_in_a_tar_is_one_bad_sample(tmp_path, caplog, order):
    """A second sample with a key already in the tar is skipped and counted, naming key and shard."""
    import io
    import tarfile

    write_shards(tmp_path / "src", "wds", 1, lambda i: synthetic_samples(0, 4, resolution=32),
                 progress=False)
    with tarfile.open(tmp_path / "src" / "shard-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dup = [(m, data) for m, data in members if m.name.startswith("00000001.")]
    if order == "later":  # 0 1 2 3 1
        members += dup
    else:  # 0 1 1 2 3: a member extension repeats within the key's group
        at = max(i for i, (m, _) in enumerate(members) if m.name.startswith("00000001.")) + 1
        members[at:at] = dup
    shard = tmp_path / "dup" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))

    loader = build_loader(data_recipe("wds", str(shard.parent), "data.max_bad_fraction=0.5").data)
    with caplog.at_level("WARNING", logger="vtok.data"):
        keys = keys_of(loader)
    assert sorted(keys) == [f"{i:08d}" for i in range(4)]
    assert loader.stats.bad == 1 and loader.stats.seen == 5
    [record] = [r.getMessage() for r in caplog.records if "duplicate key" in r.getMessage()]
    assert "'00000001'" in record and str(shard) in record


class _CollateInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        from vtok.data.transforms import collate

        images = [torch.randint(0, 255, (5, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
                  for i in range(3)]
        for channels_last in (False, True):
            batch = collate([{"__key__": str(i), "image": im} for i, im in enumerate(images)], channels_last)
            yield {"shared": batch["image"].untyped_storage().is_shared(), "image": batch["image"].clone(),
                   "expected": torch.stack(images).permute(0, 3, 1, 2).clone(), "channels_last": channels_last,
                   "nchw": batch["image"].is_contiguous(),
                   "nhwc": batch["image"].is_contiguous(memory_format=torch.channels_last)}


def test_image_batches_are_written_once_into_shared_memory_in_workers():
    """collate writes a worker's image batch straight into shared memory (sending it then moves a file
    descriptor, not 6 MB per 32 images at 256 px), contiguous NCHW or stored NHWC as asked; in the
    main process it allocates ordinary memory."""
    from vtok.data.transforms import collate

    items = list(torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1))
    assert [item["channels_last"] for item in items] == [False, True]
    for item in items:
        assert item["shared"] and torch.equal(item["image"], item["expected"])
        assert item["nhwc"] if item["channels_last"] else item["nchw"]
    local = collate([{"image": torch.zeros(4, 4, 3, dtype=torch.uint8)}])["image"]
    assert not local.untyped_storage().is_shared() and local.shape == (1, 3, 4, 4) and local.is_contiguous()
