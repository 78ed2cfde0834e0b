"""Training augmentation, run batch-wise on the device after the slices are gathered (`loaders.batch_tfms`).

`Augment` moves each slice (flips, rotation, zoom, brightness and contrast), its mask following; `Infill` changes
what fills the labelled fossils, so that a model cannot read the class from a specimen's inside; `Scanner` shows a
slice as another scanner would give it (noise; gamma and blur when asked), so that a model trained on one scan holds
on the next.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastai.vision.all import TensorImage, TensorMask
from fastai.vision.augment import RandTransform

from .metrics import IGNORE


class Augment(RandTransform):
    """Training augmentation for a whole batch in a few tensor ops on its device; masks follow their image.

    Per slice: horizontal and vertical flips, rotation up to `max_rotate` degrees and zoom
    up to `max_zoom` (one affine `grid_sample`, with probability `p_affine`), and
    brightness/contrast up to `max_lighting` (probability `p_lighting`). It replaces
    fastai's `aug_transforms`, which cost more GPU time than a 1/4-size training step.
    """
    split_idx, order = 0, 20

    def __init__(self, max_rotate=10.0, max_zoom=1.1, max_lighting=0.2, p_affine=0.75, p_lighting=0.75):
        super().__init__(p=1.0)
        self.max_rotate, self.max_zoom, self.max_lighting = max_rotate, max_zoom, max_lighting
        self.p_affine, self.p_lighting = p_affine, p_lighting

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        x = b[0] if isinstance(b, tuple) else b
        n, dev = x.shape[0], x.device
        u = lambda: torch.rand(n, device=dev)  # noqa: E731
        on = u() < self.p_affine
        ang = torch.where(on, (2 * u() - 1) * math.radians(self.max_rotate), 0.0)
        inv_zoom = torch.where(on, 1 / (1 + u() * (self.max_zoom - 1)), 1.0)
        fx, fy = torch.where(u() < 0.5, -1.0, 1.0), torch.where(u() < 0.5, -1.0, 1.0)
        c, s, z = torch.cos(ang) * inv_zoom, torch.sin(ang) * inv_zoom, torch.zeros(n, device=dev)
        theta = torch.stack([torch.stack([c * fx, -s * fy, z], 1), torch.stack([s * fx, c * fy, z], 1)], 1)
        self.grid = F.affine_grid(theta, (n, 1, *x.shape[-2:]), align_corners=False)
        lit = u() < self.p_lighting
        self.contrast = torch.where(lit, torch.exp((2 * u() - 1) * math.log1p(self.max_lighting)), 1.0).view(-1, 1, 1, 1)
        self.brightness = torch.where(lit, (2 * u() - 1) * self.max_lighting / 2, 0.0).view(-1, 1, 1, 1)

    def encodes(self, x: TensorImage):
        x = F.grid_sample(x, self.grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
        return TensorImage(((x - 0.5) * self.contrast + 0.5 + self.brightness).clamp_(0, 1))

    def encodes(self, x: TensorMask):  # noqa: F811
        m = F.grid_sample(x[:, None].float(), self.grid, mode="nearest", padding_mode="reflection", align_corners=False)
        return TensorMask(m[:, 0].long())


class Infill(RandTransform):
    """Training augmentation: with probability `p` per slice, shift the inside of its labelled fossils to one random
    gray between the slice's darkest and its matrix, so that the class cannot be read from what fills a specimen.

    A shell's inside, hollow or sediment-filled, is no cue to its class, but a model trained briefly learns it before
    the shell's outline. Inside a fossil's labels, each pixel is compared (3 x 3 smoothed) with the darkest labelled
    pixel near it (5 x 5) and with the fossils' walls (their 95th percentile): one in the darker half between the two
    moves by the difference between the new gray and that darkest level, one in the brighter half the less the nearer
    it is to the walls, so that walls, septa and the texture keep their shape; the outermost ring of labelled pixels
    (the blurred outside of the wall) and everything unlabelled stay as they were. Masks are unchanged. (The labels
    of the centre slice serve every context channel.)
    """
    split_idx, order = 0, 15

    def __init__(self, p=0.5):
        super().__init__(p=1.0)
        self.p_slice = float(p)

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        self.out = None
        full, y = (t.as_subclass(torch.Tensor) for t in b)
        fossil = ((y > 0) & (y != IGNORE))[:, None]  # (IGNORE: unlabelled, or left out of the scores)
        on = (torch.rand(full.shape[0], device=full.device) < self.p_slice) & fossil.flatten(1).any(1)
        if not bool(on.any()):
            return
        x, fossil, mid = full[on], fossil[on], full.shape[1] // 2
        smooth = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        darkest = -F.max_pool2d(torch.where(fossil, -smooth, -2.0), 5, 1, 2)  # 2: no labelled pixel near
        darkest = F.avg_pool2d(darkest, 3, 1, 1, count_include_pad=False)  # (valid wherever `core` below is)
        wall, gray = [], []
        for sl, f in zip(smooth[:, mid], fossil[:, 0]):
            bg = sl[~f][::7] if bool((~f).any()) else sl.flatten()  # (a crop all fossil: its own levels)
            dark, matrix = torch.quantile(bg, torch.tensor([0.01, 0.5], device=x.device))
            wall.append(torch.quantile(sl[f], 0.95))
            gray.append(dark + torch.rand((), device=x.device) * (matrix - dark))
        wall, gray = torch.stack(wall).view(-1, 1, 1, 1), torch.stack(gray).view(-1, 1, 1, 1)
        core = -F.max_pool2d(-fossil.float(), 3, 1, 1)  # a labelled pixel's outermost ring is its wall's outside
        inside = (2 * (wall - smooth) / (wall - darkest).clamp(min=1e-3)).clamp(0, 1) * core
        self.out = full.clone()
        self.out[on] = (x + inside * (gray - darkest)).clamp(0, 1)  # (inside is 0 wherever darkest is the 2)

    def encodes(self, x: TensorImage): return x if self.out is None else TensorImage(self.out)


class Scanner(RandTransform):
    """Training augmentation: with probability `p` per slice, the slice as another scanner would give it: Gaussian
    noise (sigma uniform up to `max_noise`, in the 0-1 range of the slice) and, when asked, a gamma (log-uniform in
    [1 / `max_gamma`, `max_gamma`]; 1: none) and a Gaussian blur (sigma uniform up to `max_blur` px; 0: none).
    Contrast and brightness are `Augment`'s. Masks are unchanged: the same voxels, seen through another detector.
    (Runs after `Augment`, before the normalisation; every context channel of a slice gets the same gamma and blur,
    and noise of its own.)

    Noise alone by default: on the development grid the gamma and the blur (1.5 and 1.2 px) cost the rarer class's
    thin walls 0.07 of IoU, and another scanner's gamma, contrast and offset are undone at prediction instead
    (`bundle.matched_volume`); docs/evaluation.md, "Another scanner".
    """
    split_idx, order = 0, 25

    def __init__(self, p=0.5, max_gamma=1.0, max_blur=0.0, max_noise=0.04):
        super().__init__(p=1.0)
        self.p_slice, self.max_gamma, self.max_blur, self.max_noise = float(p), max_gamma, max_blur, max_noise

    def encodes(self, x: TensorImage):
        n, c = x.shape[:2]
        if not n or not self.p_slice:
            return x
        dev, u = x.device, (lambda: torch.rand(n, device=x.device))  # noqa: E731
        on = (u() < self.p_slice).view(-1, 1, 1, 1)
        if not bool(on.any()):
            return x
        y = x.as_subclass(torch.Tensor).float().clamp(0, 1)
        if self.max_gamma != 1:
            y = y ** torch.exp((2 * u() - 1) * math.log(self.max_gamma)).view(-1, 1, 1, 1)
        if self.max_blur:
            sigma = (u() * self.max_blur).clamp(min=1e-3)  # a 5-tap separable Gaussian per slice (1e-3: none)
            taps = torch.arange(-2.0, 3.0, device=dev)
            k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
            k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, 5)
            y = y.reshape(1, n * c, *x.shape[-2:])
            y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="reflect"), k.view(n * c, 1, 1, 5), groups=n * c)
            y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="reflect"), k.view(n * c, 1, 5, 1), groups=n * c).view_as(x)
        y = y + torch.randn_like(x, dtype=y.dtype) * (u() * self.max_noise).view(-1, 1, 1, 1)
        return TensorImage(torch.where(on, y.clamp(0, 1).to(x.dtype), x.as_subclass(torch.Tensor)))
