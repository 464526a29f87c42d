"""AdamW: the fused kernel where every parameter allows it, the same update as the unfused one, and a
loaded state dict never switches the kernel."""
import torch
from torch import nn

from vtok.config.schema import OptimConfig
from vtok.train.optim import build_adamw, can_fuse, keep_kernel


def _train(fused, steps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    opt = build_adamw([model], OptimConfig(lr=1e-2, weight_decay=0.05), fused=fused)
    for i in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_fused_by_default_and_same_update():
    fused_model, fused_opt = _train(None)
    plain_model, plain_opt = _train(False)
    assert fused_opt.defaults["fused"] and not plain_opt.defaults["fused"]
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not can_fuse([torch.zeros(2, dtype=torch.long)])


def test_loading_a_state_dict_keeps_the_kernel():
    _, plain_opt = _train(False)
    _, fused_opt = _train(None)
    fused_opt.load_state_dict(plain_opt.state_dict())
    keep_kernel(fused_opt)
    assert all(g["fused"] for g in fused_opt.param_groups)
