"""Domain randomisation: training images painted from a full label map, on the batch's device.

After SynthSeg (Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and
resolution without retraining", Medical Image Analysis 86, 2023): a network that only ever sees
images whose contrast, resolution, artefacts and shape are drawn at random from a label map learns
what does not change (anatomy), and so holds on scans unlike its training scans. Our own
implementation, in torch, for a batch of label patches ``(B, 1, *spatial)``; per sample:

1. **shape**: a random affine (rotation, one scale per axis, shear) and a smooth elastic
   deformation (a coarse random displacement grid, upsampled) resample the labels (nearest) onto
   the output patch (a centre window of the input patch, like
   :class:`~napari_medseg.engine.data.augmentation.Augmenter`), then random mirroring;
2. **intensities**: every label gets a Gaussian with a random mean and spread (background air
   is dark with probability ``p_dark_background``; with ``p_skull_strip`` the ``strip_labels``
   are painted as air: a skull-stripped scan);
3. **artefacts**: partial-volume blur (random sigma per axis), low resolution along one random
   axis (thick slices: down- then up-sampling), a smooth multiplicative bias field, gamma,
   Gaussian noise;
4. **field of view**: with ``p_fov_cut`` one side of the patch is cut away (image 0 before
   normalisation, targets background), as in scans that cover part of the head;
5. **normalisation**: z-score over the patch, then a random scale and shift (the model meets
   other normalisation statistics at inference).

The targets are the labels through ``target_lut`` (generation-only classes become background).
The same seed gives the same batches (on one device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.data.augmentation import AugmentationError, rotation_matrix


@dataclass
class SynthConfig:
    """Ranges of the generator's random draws (see the module docstring for the order)."""

    mean_range: tuple[float, float] = (0.0, 1.0)
    std_max: float = 0.1  # per-label spread, drawn from (0, std_max)
    p_dark_background: float = 0.8  # air (label 0) mean from (0, 0.1) instead of mean_range
    p_skull_strip: float = 0.25
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.05
    elastic_voxels: float = 3.0  # largest displacement of the elastic field, in output voxels
    elastic_grid: int = 5  # control points per axis
    blur_sigma_max: float = 1.0  # voxels
    p_lowres: float = 0.4
    lowres_factor: tuple[float, float] = (1.5, 5.0)
    bias_std: float = 0.3  # std of the log bias field
    bias_grid: int = 4
    gamma_std: float = 0.25  # std of log(gamma)
    noise_std_max: float = 0.04  # relative to the painted range
    p_fov_cut: float = 0.2
    fov_cut_max: float = 0.45  # largest fraction of the patch cut away
    norm_scale_range: tuple[float, float] = (0.8, 1.25)
    norm_shift: float = 0.3

    def __post_init__(self) -> None:
        for name in ("p_dark_background", "p_skull_strip", "p_lowres", "p_fov_cut"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise AugmentationError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.mean_range[0] > self.mean_range[1] or self.std_max < 0 or self.lowres_factor[0] < 1.0:
            raise AugmentationError("mean_range must be (low, high), std_max >= 0, lowres_factor >= 1")


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(N, 1, *spatial)`` with one sigma (voxels) per axis."""
    dims = x.ndim - 2
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.1:
            continue
        k = _gaussian_kernel(float(sigma)).to(x.device, x.dtype)
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = k.numel() // 2
        conv = F.conv3d if dims == 3 else F.conv2d
        x = conv(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


class LabelSynthesizer:
    """Paints random training images from label patches (SynthSeg-style domain randomisation).

    Args:
        num_labels: Label values are ``0 .. num_labels - 1`` (targets and generation-only classes).
        target_lut: Target class per label value (length ``num_labels``); generation-only
            labels map to 0.
        patch_size: Output spatial size (a centre window of the input patch).
        config: The random ranges (default :class:`SynthConfig`).
        strip_labels: Labels painted as air in skull-stripped samples (e.g. scalp, skull).
        mirror_axes: Spatial axes that may be flipped.
        seed: Seed of every random draw.
    """

    def __init__(
        self,
        num_labels: int,
        target_lut: Sequence[int],
        patch_size: Sequence[int],
        config: SynthConfig | None = None,
        strip_labels: Sequence[int] = (),
        mirror_axes: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        if len(target_lut) != num_labels:
            raise AugmentationError(f"target_lut has {len(target_lut)} entries for {num_labels} labels")
        self.num_labels = int(num_labels)
        self.lut = torch.as_tensor(list(target_lut), dtype=torch.int64)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.dims = len(self.patch_size)
        if self.dims not in (2, 3):
            raise AugmentationError(f"patch_size must have 2 or 3 entries, got {patch_size}")
        self.config = config or SynthConfig()
        self.strip_labels = [int(v) for v in strip_labels]
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self._gen)

    # ------------------------------------------------------------------------------------ shape
    def _theta(self, in_size: Sequence[int], out_size: Sequence[int]) -> torch.Tensor:
        cfg = self.config
        n_ang = 1 if self.dims == 2 else 3
        angles = (self._rand(n_ang) * 2 - 1).numpy() * cfg.rotation_deg * math.pi / 180
        lo, hi = cfg.scale_range
        scales = lo + (hi - lo) * self._rand(self.dims).numpy()
        shear = np.eye(self.dims) + (self._rand(self.dims, self.dims).numpy() * 2 - 1) * cfg.shear * (
            1 - np.eye(self.dims))
        a = rotation_matrix(angles, self.dims) @ np.diag(scales) @ shear
        a = np.diag(2.0 / np.asarray(in_size, float)) @ a @ np.diag(np.asarray(out_size, float) / 2.0)
        a = a[::-1, ::-1]  # affine_grid works in (x, y[, z]) order
        return torch.from_numpy(np.concatenate([a, np.zeros((self.dims, 1))], 1).copy()).float()

    def _grid(self, b: int, in_size, out_size, device) -> torch.Tensor:
        cfg = self.config
        theta = torch.stack([self._theta(in_size, out_size) for _ in range(b)]).to(device)
        grid = F.affine_grid(theta, [b, 1, *out_size], align_corners=False)
        if cfg.elastic_voxels > 0:
            coarse = self._randn(b, self.dims, *([cfg.elastic_grid] * self.dims)) * (cfg.elastic_voxels / 2)
            mode = "trilinear" if self.dims == 3 else "bilinear"
            disp = F.interpolate(coarse.to(device), size=out_size, mode=mode, align_corners=True)
            # voxels of the input -> normalised coordinates, in (x, y[, z]) order
            scale = torch.tensor([2.0 / s for s in in_size][::-1], device=device)
            disp = disp.flip(1).movedim(1, -1) * scale
            grid = grid + disp
        return grid

    # -------------------------------------------------------------------------------- painting
    def paint(self, labels: torch.Tensor) -> torch.Tensor:
        """Step 2 alone: every label value a Gaussian of random mean and spread (``(B, 1, *spatial)``)."""
        cfg = self.config
        b, n = labels.shape[0], self.num_labels
        lo, hi = cfg.mean_range
        means = lo + (hi - lo) * self._rand(b, n)
        stds = cfg.std_max * self._rand(b, n)
        dark = self._rand(b) < cfg.p_dark_background
        means[:, 0] = torch.where(dark, 0.1 * self._rand(b), means[:, 0])
        stripped = self._rand(b) < cfg.p_skull_strip
        if self.strip_labels:
            for i in stripped.nonzero().flatten().tolist():
                means[i, self.strip_labels] = float(means[i, 0])
                stds[i, self.strip_labels] = float(stds[i, 0])
        dev = labels.device
        idx = labels.clamp(0, n - 1).flatten(1)  # (B, V)
        mu = torch.gather(means.to(dev), 1, idx)
        sd = torch.gather(stds.to(dev), 1, idx)
        noise = self._randn(*idx.shape).to(dev)
        return (mu + sd * noise).view(labels.shape).float()

    def _artefacts(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        size = x.shape[2:]
        mode = "trilinear" if self.dims == 3 else "bilinear"
        out = []
        for i in range(b):
            xi = x[i:i + 1]
            xi = gaussian_blur(xi, (self._rand(self.dims) * cfg.blur_sigma_max).tolist())
            if float(self._rand(1)) < cfg.p_lowres:
                axis = int(self._rand(1) * self.dims) % self.dims
                lo, hi = cfg.lowres_factor
                factor = lo + (hi - lo) * float(self._rand(1))
                small = list(size)
                small[axis] = max(2, int(round(size[axis] / factor)))
                sig = [0.0] * self.dims
                sig[axis] = 0.4 * factor  # the slice profile before sampling
                xi = F.interpolate(gaussian_blur(xi, sig), size=small, mode=mode, align_corners=False)
                xi = F.interpolate(xi, size=size, mode=mode, align_corners=False)
            out.append(xi)
        x = torch.cat(out)
        if cfg.bias_std > 0:
            coarse = self._randn(b, 1, *([cfg.bias_grid] * self.dims)) * cfg.bias_std
            x = x * torch.exp(F.interpolate(coarse.to(x.device), size=size, mode=mode, align_corners=True))
        red = tuple(range(1, x.ndim))
        lo_v, hi_v = x.amin(dim=red, keepdim=True), x.amax(dim=red, keepdim=True)
        x = ((x - lo_v) / (hi_v - lo_v + 1e-6)).clamp(0, 1)
        gamma = torch.exp(self._randn(b) * cfg.gamma_std).to(x.device).view(b, *([1] * (x.ndim - 1)))
        x = x.pow(gamma)
        sigma = (self._rand(b) * cfg.noise_std_max).to(x.device).view(b, *([1] * (x.ndim - 1)))
        return x + sigma * self._randn(*x.shape).to(x.device)

    def _fov_cut(self, x: torch.Tensor, target: torch.Tensor) -> None:
        cfg = self.config
        for i in range(x.shape[0]):
            if float(self._rand(1)) >= cfg.p_fov_cut:
                continue
            axis = int(self._rand(1) * self.dims) % self.dims
            n = x.shape[2 + axis]
            cut = int(n * cfg.fov_cut_max * float(self._rand(1)))
            if cut < 1:
                continue
            sl = [i, slice(None)] + [slice(None)] * self.dims
            sl[2 + axis] = slice(0, cut) if float(self._rand(1)) < 0.5 else slice(n - cut, n)
            x[tuple(sl)] = 0.0
            target[tuple(sl)] = 0

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        red = tuple(range(1, x.ndim))
        x = (x - x.mean(dim=red, keepdim=True)) / (x.std(dim=red, keepdim=True) + 1e-6)
        lo, hi = cfg.norm_scale_range
        scale = (lo + (hi - lo) * self._rand(b)).to(x.device).view(b, *([1] * (x.ndim - 1)))
        shift = ((self._rand(b) * 2 - 1) * cfg.norm_shift).to(x.device).view(b, *([1] * (x.ndim - 1)))
        return x * scale + shift

    def _mirror(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.mirror_axes:
            return labels
        flips = self._rand(labels.shape[0], len(self.mirror_axes)) < 0.5
        out = labels.clone()
        for i in range(labels.shape[0]):
            dims = [1 + a for a, f in zip(self.mirror_axes, flips[i]) if f]
            if dims:
                out[i] = torch.flip(labels[i], dims)
        return out

    # ------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthesise a batch.

        Args:
            labels: ``(B, 1, *spatial)`` integer label patches (full label maps), each spatial
                axis at least ``patch_size``.

        Returns:
            ``(images float32 (B, 1, *patch_size), targets int64 (B, 1, *patch_size))`` on the
            labels' device; ``targets`` through ``target_lut``.
        """
        if labels.ndim != self.dims + 2 or labels.shape[1] != 1:
            raise AugmentationError(f"Expected labels (B, 1, *spatial) with {self.dims} axes, got {tuple(labels.shape)}")
        in_size = tuple(labels.shape[2:])
        if any(o > i for o, i in zip(self.patch_size, in_size)):
            raise AugmentationError(f"patch_size {self.patch_size} is larger than the input {in_size}")
        grid = self._grid(labels.shape[0], in_size, self.patch_size, labels.device)
        warped = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        warped = self._mirror(warped.round().long())
        image = self._artefacts(self.paint(warped))
        target = self.lut.to(labels.device)[warped.clamp(0, self.num_labels - 1)]
        self._fov_cut(image, target)
        return self._normalise(image), target


__all__ = ["LabelSynthesizer", "SynthConfig", "gaussian_blur"]
