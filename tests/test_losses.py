"""Perceptual and GAN losses."""
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import vgg16

from vtok.losses import LPIPS, LeCAM, PatchGANDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG16 saved like torchvision's checkpoint (features only, to keep it small)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, str(path))
    return path


def test_lpips_matches_the_reference_package_on_the_same_weights(vgg_file):
    lpips_pkg = pytest.importorskip("lpips")
    ours = LPIPS(vgg_file)
    ref = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    ref_layers = [m for s in slices for m in s]
    for a, b in zip(ours.trunk, ref_layers):
        b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_properties_and_gradients(vgg_file, tmp_path):
    d = LPIPS(vgg_file)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(d(y, y), torch.zeros(2), atol=1e-7)
    dist = d(x, y)
    assert (dist > 0).all()
    torch.testing.assert_close(dist, d(y, x))
    dist.sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in d.parameters())
    d.train()
    assert not d.training
    with pytest.raises(FileNotFoundError, match="LPIPS VGG16 weights not found"):
        LPIPS(tmp_path / "missing.pth")


def test_patchgan_shapes_and_hinge():
    disc = PatchGANDiscriminator(ndf=16, n_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake) == 0.0  # both beyond the margin
    assert hinge_d_loss(-real, -fake) == pytest.approx(3.0)
    assert hinge_g_loss(fake) == 2.0


def test_lecam_pulls_outputs_toward_the_other_sides_ema():
    reg = LeCAM(decay=0.0)  # EMA = last batch mean
    real, fake = torch.tensor([3.0]), torch.tensor([-3.0])
    reg(real, fake)
    assert reg.ema_real == 3.0 and reg.ema_fake == -3.0
    assert reg(real, fake) == pytest.approx(36.0 + 36.0)
    assert reg(torch.tensor([-4.0]), torch.tensor([4.0])) == 0.0


def test_adaptive_weight_balances_gradient_norms():
    w = torch.nn.Parameter(torch.ones(3))
    rec = (w * 2).sum()
    g = (w * 0.5).sum()
    assert adaptive_weight(rec, g, w) == pytest.approx(4.0, rel=1e-3)
