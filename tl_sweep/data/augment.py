"""Augmentation on uint8 image tensors, batched, on the trial's device: random resized crop and flip for training,
the centre crop for evaluation, both normalised."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the GPU wait: through pinned memory, asynchronously (torch's
    pinned-memory cache keeps the host copy alive until the copy is done)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class Augmenter:
    """Batched transforms on uint8 tensors (on the trial's device): random resized crop + flip, or centre crop.

    The random resized crop is one affine grid per image (``F.affine_grid`` + ``grid_sample``), so each
    image of a batch gets its own crop in one kernel, on the GPU when there is one.
    """

    def __init__(self, *, crop: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
                 enabled: bool = True, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        self.crop, self.scale, self.ratio, self.hflip, self.enabled = crop, scale, ratio, hflip, enabled
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.gen = generator

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def train(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:  # ``data.augment: none``: training sees the evaluation transform
            return self.eval(x)
        n = x.shape[0]
        # the batch's random numbers in one draw and one copy to the device (the same numbers, in the same order,
        # as one draw per quantity): a copy from pageable memory makes the GPU stream wait for the host
        u = to_device(torch.rand(5 if self.hflip else 4, n, generator=self.gen), self.device)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        logr = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[1]
        aspect = torch.exp(logr)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (u[2] * 2 - 1) * (1 - w)
        cy = (u[3] * 2 - 1) * (1 - h)
        flip = torch.where(u[4] < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n, device=self.device)
        theta = torch.zeros(n, 2, 3, device=self.device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, (n, 3, self.crop, self.crop), align_corners=False)
        return F.grid_sample(self._normalise(x), grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        o = (s - self.crop) // 2
        return self._normalise(x[..., o:o + self.crop, o:o + self.crop])
