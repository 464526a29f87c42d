"""FID / Inception Score: safe weight loading, statistics, the reference cache, `vtok eval gen` and
`vtok eval recon --inception`, on a randomly initialised Inception of the standard structure."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from vtok.cli import main
from vtok.eval import EvalError
from vtok.eval import fid
from vtok.eval.fid import FeatureStats, frechet_distance, inception_score, load_stats, reference_stats, save_stats
from vtok.eval.gen import iter_samples
from vtok.eval.inception import InceptionFeatures


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> tuple[str, InceptionFeatures]:
    """(weights .pth path, the model) of a random Inception whose activations do not vanish."""
    model = InceptionFeatures(None)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.net.state_dict(), path)
    return str(path), model


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_weights_round_trip_through_pth_and_safetensors(random_inception, tmp_path):
    from safetensors.torch import save_file

    path, model = random_inception
    x = images(4)
    features, logits = model(x)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008) and features.std() > 1e-3
    loaded = InceptionFeatures(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(x)[0], features)
    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(st))
    torch.testing.assert_close(InceptionFeatures(st)(x)[1], logits)
    # uint8 input is the same images the [-1, 1] floats quantise to
    u8 = x.add(1).mul(127.5).round().to(torch.uint8)
    torch.testing.assert_close(model(u8)[0], features)


def test_weight_file_errors_are_one_line_and_name_the_file(random_inception, tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*pt_inception-2015-12-05"):
        InceptionFeatures(missing)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048), "extra.bias": torch.zeros(3)}, bad)
    with pytest.raises(EvalError, match=r"bad.pth do not match.*missing keys.*unexpected keys.*shape mismatch"):
        InceptionFeatures(bad)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": nn.Linear(2, 2)}, pickled)  # needs unpickling code: refused
    with pytest.raises(EvalError, match="cannot read Inception weights .*pickled.pth"):
        InceptionFeatures(pickled)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert main(["eval", "gen", "--samples", str(tmp_path / "s.npz"), "--ref-stats", str(tmp_path / "s.npz"),
                 "--inception", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "pytorch-fid" in err


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu + 0.5, sigma, mu, sigma) == pytest.approx(0.25 * 6, rel=1e-8)
    b = rng.normal(size=(40, 6)) * 2
    scipy_linalg = pytest.importorskip("scipy.linalg")
    sb = np.cov(b, rowvar=False)
    ref = (mu - b.mean(0)) @ (mu - b.mean(0)) + np.trace(sigma + sb) \
        - 2 * np.trace(scipy_linalg.sqrtm(sigma @ sb).real)
    assert frechet_distance(mu, sigma, b.mean(0), sb) == pytest.approx(ref, rel=1e-8) and ref > 0


def test_feature_stats_match_numpy_over_batches():
    x = torch.randn(37, 5, dtype=torch.float64) * 3 + 100
    acc = FeatureStats(5)
    for part in x.split(10):
        acc.update(part)
    mu, sigma = acc.result()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9)
    with pytest.raises(EvalError, match="at least 2 images"):
        one = FeatureStats(5)
        one.update(x[:1])
        one.result()


def test_inception_score_of_k_equally_used_classes_is_k():
    k, n = 7, 1400
    logits = torch.full((n, 1008), -30.0)
    logits[torch.arange(n), torch.arange(n) % k] = 30.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    assert inception_score(torch.zeros(50, 1008)) == pytest.approx((1.0, 0.0))  # one split under 100 images


def test_reference_stats_cached_once_and_reused(random_inception, shards, tmp_path, monkeypatch):
    path, model = random_inception
    kwargs = dict(data_format="wds", resolution=32, batch_size=4, max_images=6, cache_dir=tmp_path)
    first = reference_stats(model, path, shards["wds"], **kwargs)
    cached = list(tmp_path.glob("ref-*.npz"))
    assert first["num_images"] == 6 and first["sigma"].shape == (2048, 2048) and len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the shards were read again")

    monkeypatch.setattr(fid, "eval_images", no_reading)
    again = reference_stats(model, path, shards["wds"], **kwargs)
    assert cached[0].stat().st_mtime_ns == mtime and again["num_images"] == 6
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    key = dict(data_format="wds", resolution=32, max_images=6, batch_size=4, weights=path)
    assert fid.ref_stats_path(tmp_path, shards["wds"], **key) == cached[0]
    for change in (dict(max_images=7), dict(batch_size=6), dict(resolution=48)):
        assert fid.ref_stats_path(tmp_path, shards["wds"], **{**key, **change}) != cached[0]


def test_stats_files_in_pytorch_fid_layout(tmp_path):
    save_stats(tmp_path / "ours.npz", np.zeros(2048), np.eye(2048), 5)
    assert load_stats(tmp_path / "ours.npz")["num_images"] == 5
    np.savez(tmp_path / "adm.npz", mu=np.ones(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    adm = load_stats(tmp_path / "adm.npz")
    assert adm["num_images"] is None and adm["mu"].dtype == np.float64
    np.savez(tmp_path / "wrong.npz", m=np.zeros(3))
    with pytest.raises(EvalError, match="wrong.npz has keys \\['m'\\]; expected 'mu'"):
        load_stats(tmp_path / "wrong.npz")


def test_samples_stream_in_batches(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", images=arr)
    got = torch.cat(list(iter_samples(tmp_path / "c.npz", batch_size=2)))
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), arr)


def test_eval_gen_end_to_end(random_inception, shards, tmp_path, capsys):
    path, _ = random_inception
    samples = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples)  # arr_0, the ADM layout
    args = ["eval", "gen", "--samples", str(tmp_path / "samples.npz"), "--ref", shards["wds"], "--inception", path,
            "--out", str(tmp_path / "out"), "--resolution", "32", "--batch-size", "8", "--max-ref", "8",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "gen.json").read_text())
    assert report["num_samples"] == 8 and report["num_ref"] == 8 and report["gfid"] > 0
    assert report["inception_score"] >= 1 and report["inception_score_std"] == 0
    assert "gFID" in capsys.readouterr().out
    ref = next((tmp_path / "cache").glob("ref-*.npz"))
    assert main(["eval", "gen", "--samples", str(tmp_path / "samples.npz"), "--ref-stats", str(ref),
                 "--inception", path, "--out", str(tmp_path / "out2")]) == 0
    assert json.loads((tmp_path / "out2" / "gen.json").read_text())["gfid"] == pytest.approx(report["gfid"])
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 3, 8, 8), np.float32))
    assert main([*args[:2], "--samples", str(tmp_path / "bad.npz"), *args[4:]]) == 2
    assert "float32 (2, 3, 8, 8); expected an .npz whose 'arr_0'" in capsys.readouterr().err


def test_eval_recon_rfid(random_inception, exported, shards, tmp_path, capsys):  # noqa: F811
    path, _ = random_inception
    args = ["eval", "recon", "--tokenizer", str(exported), "--data", shards["wds"], "--resolution", "32",
            "--max-samples", "6", "--batch-size", "6"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "recon.json").read_text())["rfid"] is None
    assert "rFID not computed: pass --inception" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "fid"), "--inception", path, "--cache-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "fid" / "recon.json").read_text())
    assert report["rfid"] > 0 and report["num_images"] == 6 and "rFID" in capsys.readouterr().out
    assert len(list(tmp_path.glob("ref-*.npz"))) == 1  # the originals' statistics, for the next run
