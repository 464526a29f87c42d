"""Every schema field survives writing and reading in both formats, bit for bit."""
import numpy as np
import pytest
import torch

from conftest import data_recipe
from vtok.data import build_loader
from vtok.data.mds import mds_shard_entries, read_mds_shard
from vtok.data.schema import SchemaError, from_mds, from_wds
from vtok.data.synthetic import encode_image, render_sample
from vtok.data.transforms import images_to_float, normalize_batch
from vtok.data.webdataset import read_tar
from vtok.data.writers import write_shards


def full_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    img, cls, caption = render_sample(i, resolution=32)
    return {
        "__key__": f"s{i:04d}",
        "image": encode_image(img, "png" if i % 2 else "jpg"),
        "cls": cls,
        "caption": caption + " ünïcode",
        "text_emb": rng.standard_normal((7, 5)).astype(np.float16),
        "text_mask": rng.random(7) > 0.5,
        "codes": rng.integers(0, 16384, (2, 4, 4)).astype(np.int16),
    }


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        if isinstance(v, np.ndarray):
            assert b[k].dtype == v.dtype and b[k].shape == v.shape
            np.testing.assert_array_equal(b[k], v)
        else:
            assert b[k] == v, k


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_all_fields_round_trip(tmp_path, fmt):
    samples = [full_sample(i) for i in range(10)]
    summary = write_shards(tmp_path, fmt, 2, lambda i: samples[i * 5:(i + 1) * 5], progress=False)
    assert summary.total_samples == 10
    if fmt == "wds":
        back = [from_wds(m) for i in range(2) for m in read_tar(str(tmp_path / f"shard-00000{i}.tar"))]
    else:
        back = [from_mds(r) for e in mds_shard_entries(tmp_path) for r in read_mds_shard(tmp_path, e)]
    assert len(back) == 10
    for a, b in zip(samples, back):
        assert_same(a, b)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_loader_batches_every_field(tmp_path, fmt):
    samples = [full_sample(i) for i in range(8)]
    write_shards(tmp_path, fmt, 2, lambda i: samples[i * 4:(i + 1) * 4], progress=False)
    recipe = data_recipe(fmt, str(tmp_path), "data.shuffle=false", "data.batch_size=8",
                         "data.fields=[image,cls,caption,text_emb,text_mask,codes]")
    (batch,) = list(build_loader(recipe.data))
    # uint8 across the workers (a quarter of float32's bytes), channels-last; float in [-1, 1] on use
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
    image = normalize_batch(batch)["image"]
    assert image.dtype == torch.float32 and -1.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(image, batch["image"].float() / 127.5 - 1.0) and images_to_float(image) is image
    order = [int(k[1:]) for k in batch["__key__"]]
    assert sorted(order) == list(range(8))
    assert batch["cls"].tolist() == [samples[i]["cls"] for i in order]
    assert batch["caption"] == [samples[i]["caption"] for i in order]
    assert batch["text_emb"].dtype == torch.float16 and batch["text_emb"].shape == (8, 7, 5)
    assert batch["text_mask"].dtype == torch.bool
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (8, 2, 4, 4)
    for row, i in enumerate(order):
        np.testing.assert_array_equal(batch["codes"][row].numpy(), samples[i]["codes"])
        np.testing.assert_array_equal(batch["text_mask"][row].numpy(), samples[i]["text_mask"])


def test_writer_rejects_bad_keys_and_fields(tmp_path):
    bad_key = {"__key__": "a.b", "cls": 1}
    with pytest.raises(SchemaError, match="without '.'"):
        write_shards(tmp_path, "wds", 1, lambda i: [bad_key], progress=False)
    with pytest.raises(SchemaError, match="unknown fields"):
        write_shards(tmp_path / "x", "wds", 1, lambda i: [{"__key__": "a", "label": 1}], progress=False)
