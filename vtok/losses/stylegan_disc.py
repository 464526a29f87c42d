"""StyleGAN2's residual discriminator (Karras et al. 2020, "resnet" architecture) and the R1 penalty.

    images (B, 3, R, R) --1x1 conv (fromRGB), LeakyReLU--> C0 channels
    n blocks, each: main = conv3x3 (Ci -> Ci), LReLU, blur, conv3x3 stride 2 (Ci -> Ci+1), LReLU
                    skip = blur, conv1x1 stride 2 (Ci -> Ci+1, no bias); out = (main + skip) / sqrt(2)
    at R / 2^n: minibatch stddev (+1 channel), conv3x3, LReLU, flatten, Linear, LReLU, Linear -> (B, 1)

Channels: ``ndf * multipliers[i]``; TexTok's setting is ndf 128 with [1, 2, 4, 4, 4, 4] at 256 px
(6 blocks: 256 -> 4). ``n_blocks`` (the registry's ``n_layers``) sets the depth; the multipliers
are the first ``n_blocks`` of the list, repeating its last one when more are needed. The input side
must be ``final_size * 2 ** n_blocks`` (4 x 2^n: 16 px for 2 blocks, 32 px for 3, 256 px for 6).

Choices (the paper is silent): downsampling is antialiased with StyleGAN2's [1, 3, 3, 1] binomial
blur; plain PyTorch initialisation and no equalised learning rate; LeakyReLU(0.2) without
StyleGAN2's sqrt(2) gain; minibatch stddev over groups of up to 4 samples, one feature channel.

R1 (Mescheder et al. 2018): ``r1_penalty(disc, real)`` = E_x ||grad_x D(x)||^2 (squared gradient
norm over all pixels of each real image, averaged over the batch), with no gamma / 2 factor; the
adversarial helper adds ``r1_weight / 2 * r1_penalty``, so ``r1_weight`` is StyleGAN2's gamma.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TEXTOK_MULTIPLIERS = (1, 2, 4, 4, 4, 4)


class Blur(nn.Module):
    """Depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 filter with ``pad`` zeros each side:
    (B, C, H, W) -> (B, C, H + 2 * pad - 3, W + 2 * pad - 3)."""

    def __init__(self, pad: int):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64.0)[None, None], persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        kernel = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        return F.conv2d(F.pad(x, [self.pad] * 4), kernel, groups=c)


class DownBlock(nn.Module):
    """Residual block halving the side: (B, Ci, H, W) -> (B, Co, H / 2, W / 2)."""

    def __init__(self, in_ch: int, out_ch: int, blur: bool = True):
        super().__init__()
        # blur then a stride-2 conv without padding keeps H / 2 (StyleGAN2's upfirdn padding)
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.blur_main = Blur(2) if blur else nn.ZeroPad2d(1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, stride=2)
        self.blur_skip = Blur(1) if blur else nn.Identity()
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.blur_main(h)), 0.2)
        return (h + self.skip(self.blur_skip(x))) * math.sqrt(0.5)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append one channel: the stddev over groups of samples, averaged over channels and pixels:
    (B, C, H, W) -> (B, C + 1, H, W). The group is the largest divisor of B that is <= ``group_size``
    (sample i groups with i + M, i + 2M, ... for M = B / G, as StyleGAN2)."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(g, b // g, c, h, w)  # fp32 at least
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # (M, C, H, W)
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (B, 1, H, W)
    return torch.cat([x, y.to(x.dtype)], 1)


class StyleGANDiscriminator(nn.Module):
    """images (B, 3, R, R) -> logits (B, 1); see the module docstring. ``R = final_size * 2 ** n_blocks``."""

    def __init__(self, ndf: int = 128, n_blocks: int = 6, multipliers: tuple[int, ...] = TEXTOK_MULTIPLIERS,
                 *, final_size: int = 4, mbstd_group: int = 4, blur: bool = True):
        super().__init__()
        if n_blocks < 1 or not multipliers:
            raise ValueError(f"StyleGAN discriminator: n_blocks={n_blocks} must be >= 1 with channel multipliers")
        mults = [multipliers[min(i, len(multipliers) - 1)] for i in range(n_blocks)]
        chans = [ndf * mults[0], *(ndf * m for m in mults)]
        self.from_rgb = nn.Conv2d(3, chans[0], 1)
        self.blocks = nn.ModuleList(DownBlock(chans[i], chans[i + 1], blur) for i in range(n_blocks))
        top = chans[-1]
        self.conv = nn.Conv2d(top + 1, top, 3, padding=1)
        self.fc = nn.Linear(top * final_size ** 2, top)
        self.out = nn.Linear(top, 1)
        self.resolution, self.final_size, self.mbstd_group = final_size * 2 ** n_blocks, final_size, mbstd_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            n = len(self.blocks)
            raise ValueError(f"images of shape {tuple(x.shape)}: this StyleGAN discriminator ({n} blocks) takes "
                             f"{self.resolution} px; set the GAN config's layers (task.gan.layers) to "
                             f"log2(resolution / {self.final_size})")
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.conv(minibatch_stddev(h, self.mbstd_group)), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.out(h)


def r1_from_logits(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E_x ||grad_x D(x)||^2 from logits computed on ``real`` (which must require grad); the graph is
    kept (``create_graph``) so the penalty trains the discriminator. Returns a scalar in fp32 (fp64
    for fp64 inputs)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.to(torch.promote_types(grad.dtype, torch.float32)).square().flatten(1).sum(1).mean()


def r1_penalty(disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 = E_x ||grad_x D(x)||^2 over real images (B, 3, H, W) (no gamma / 2 factor: see the
    module docstring); differentiable w.r.t. the discriminator's parameters."""
    real = real.detach().requires_grad_(True)
    return r1_from_logits(disc(real), real)


__all__ = ["Blur", "DownBlock", "StyleGANDiscriminator", "TEXTOK_MULTIPLIERS", "minibatch_stddev",
           "r1_from_logits", "r1_penalty"]
