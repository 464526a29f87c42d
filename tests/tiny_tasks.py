"""Tiny tasks the trainer tests run: an image autoencoder (one optimizer) and a GAN (two)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtok.train import TrainTask, register_task


class Block(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(self.norm(x)))


class TinyAE(nn.Module):
    """(B, 3, H, W) -> (B, 3, H, W) through a 2x downsampled bottleneck."""

    def __init__(self, width: int = 16, depth: int = 2):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 4, stride=2, padding=1)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1)

    def blocks(self):
        return self.layers

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


class TinyDisc(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x)


@register_task("tiny-ae")
class TinyAETask(TrainTask):
    @dataclass
    class Config:
        width: int = 16
        depth: int = 2
        nan_at_steps: list[int] | None = None  # make the loss NaN at these steps (fault tests)
        hang_rank: int = -1  # this rank sleeps hang_seconds in the loss of step hang_at_step (fault tests)
        hang_at_step: int = -1
        hang_seconds: float = 40.0

    def __init__(self, cfg, recipe):
        self.cfg = cfg
        self.modules = {"ae": TinyAE(cfg.width, cfg.depth)}
        self.optimizers = {"main": ["ae"]}

    def loss(self, phase, batch, step):
        if step == self.cfg.hang_at_step and int(os.environ.get("RANK", 0)) == self.cfg.hang_rank:
            time.sleep(self.cfg.hang_seconds)  # a hung rank: the others wait in the next collective
        x = batch["image"]
        loss = F.mse_loss(self.modules["ae"](x), x)
        if self.cfg.nan_at_steps and step in self.cfg.nan_at_steps:
            loss = loss * float("nan")
        return loss, {}

    def flops_per_sample(self):
        return 1e6


@register_task("tiny-gan")
class TinyGANTask(TrainTask):
    @dataclass
    class Config:
        width: int = 16
        adv_weight: float = 0.1

    def __init__(self, cfg, recipe):
        self.cfg = cfg
        self.modules = {"generator": TinyAE(cfg.width), "disc": TinyDisc(cfg.width)}
        self.optimizers = {"generator": ["generator"], "discriminator": ["disc"]}
        self.ema_modules = ("generator",)

    def loss(self, phase, batch, step):
        x = batch["image"]
        if phase == "generator":
            fake = self.modules["generator"](x)
            adv = -self.modules["disc"](fake).mean()
            rec = F.mse_loss(fake, x)
            return rec + self.cfg.adv_weight * adv, {"rec": rec.detach()}
        with torch.no_grad():
            fake = self.modules["generator"](x)
        real_logits, fake_logits = self.modules["disc"](x), self.modules["disc"](fake)
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        return loss, {}
