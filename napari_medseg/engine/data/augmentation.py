"""Data augmentation in PyTorch, on whatever device the batch lives (GPU when it is there).

The transforms and their default probabilities are nnU-Net (v1)'s training augmentation (Isensee et
al., Nature Methods 18, 2021, built on batchgenerators), applied per sample in this order:

1. rotation and scaling (one affine resampling: ``F.affine_grid`` + ``F.grid_sample``; bilinear for
   images, nearest for labels; outside the patch the image is 0 and the label 0, background),
   optionally with a centre crop to a smaller ``patch_size`` (see :func:`enlarged_patch_size`);
2. Gaussian noise, multiplicative brightness, contrast, gamma (optionally on the inverted image);
3. mirroring along each axis with probability ``p_mirror``.

Differences from batchgenerators, on purpose: ``noise_var`` is the noise *variance* (batchgenerators
uses the drawn value as the standard deviation); inverted-image gamma is off by default
(``p_gamma_invert``; nnU-Net v1 uses 0.1); rotation and scaling act in voxel space about the patch
centre and use one shared scale for all axes, like nnU-Net's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.errors import MedsegError


class AugmentationError(MedsegError, ValueError):
    """Bad augmentation parameters or input shapes."""


def _range(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (-abs(float(value)), abs(float(value)))
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise AugmentationError(f"{name} must be (low, high) with low <= high, got {value}")
    return lo, hi


def rotation_matrix(angles: Sequence[float], dims: int) -> np.ndarray:
    """Rotation in array-axis order: 2D one angle; 3D rotations about axes 0, 1, 2, composed."""
    if dims == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        c, s = math.cos(a), math.sin(a)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


def enlarged_patch_size(
    patch_size: Sequence[int], rotation_deg: float | Sequence[float] | None = None,
    scale_range: Sequence[float] = (0.7, 1.4),
) -> tuple[int, ...]:
    """Patch to sample so that rotation and scaling of it rarely bring zero padding into the centre.

    As nnU-Net's "basic generator patch size": the patch extent rotated by the largest angle about
    each axis (separately, angles capped at 90 degrees), the largest per axis, times the largest
    scale. Give it to :class:`~napari_medseg.engine.data.dataset.PatchSampler` and pass the network's patch
    as the :class:`Augmenter`'s ``patch_size``.
    """
    dims = len(patch_size)
    rot = _range(rotation_deg if rotation_deg is not None else (30.0 if dims == 3 else 180.0), "rotation_deg")
    amax = min(max(abs(rot[0]), abs(rot[1])), 90.0) * math.pi / 180
    ext = np.asarray(patch_size, float)
    best = ext.copy()
    angles_to_try = np.linspace(0, amax, 33)
    for axis in range(1 if dims == 2 else 3):
        for a in angles_to_try:
            ang = [a] if dims == 2 else [a if k == axis else 0.0 for k in range(3)]
            r = np.abs(rotation_matrix(ang, dims))
            best = np.maximum(best, r @ ext)
    best *= max(1.0, max(scale_range))
    return tuple(int(math.ceil(b - 1e-6)) for b in best)


class Augmenter:
    """Random spatial and intensity augmentation of a batch, on the batch's device.

    Args:
        spatial_dims: 2 or 3.
        p_rotation: Probability per sample of a rotation.
        rotation_deg: Angle range in degrees, symmetric number or ``(low, high)``; default 30 for 3D
            (about each axis) and 180 for 2D.
        p_scale: Probability per sample of a scaling.
        scale_range: Scale of the sampling coordinates (> 1 zooms out). As nnU-Net, half the scaled
            samples draw from ``(low, 1)`` and half from ``(1, high)``.
        mirror_axes: Spatial axes that may be flipped (default all); ``()`` disables mirroring.
        p_mirror: Probability per sample and axis of a flip.
        p_gamma: Probability per sample of a gamma transform (intensities rescaled to [0, 1], raised
            to gamma, scaled back, mean and std restored).
        gamma_range: Gamma range (half the samples below 1, half above).
        p_gamma_invert: Probability of a gamma transform of the inverted image.
        p_noise: Probability per sample of additive Gaussian noise.
        noise_var: Range of the noise variance.
        p_brightness: Probability per sample of a multiplicative brightness change (per channel).
        brightness_range: Multiplier range.
        p_contrast: Probability per sample of a contrast change (per channel, range preserved).
        contrast_range: Contrast factor range (half below 1, half above).
        seed: Seed of the random parameters and noise; ``None`` draws one from torch's global RNG.
        patch_size: Output spatial size (a centre crop of the input after the spatial transform);
            default the input size.
    """

    def __init__(
        self,
        spatial_dims: int,
        p_rotation: float = 0.2,
        rotation_deg: float | Sequence[float] | None = None,
        p_scale: float = 0.2,
        scale_range: Sequence[float] = (0.7, 1.4),
        mirror_axes: Sequence[int] | None = None,
        p_mirror: float = 0.5,
        p_gamma: float = 0.3,
        gamma_range: Sequence[float] = (0.7, 1.5),
        p_gamma_invert: float = 0.0,
        p_noise: float = 0.1,
        noise_var: Sequence[float] = (0.0, 0.1),
        p_brightness: float = 0.15,
        brightness_range: Sequence[float] = (0.75, 1.25),
        p_contrast: float = 0.15,
        contrast_range: Sequence[float] = (0.75, 1.25),
        seed: int | None = None,
        patch_size: Sequence[int] | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise AugmentationError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        probs = dict(p_rotation=p_rotation, p_scale=p_scale, p_mirror=p_mirror, p_gamma=p_gamma,
                     p_gamma_invert=p_gamma_invert, p_noise=p_noise, p_brightness=p_brightness,
                     p_contrast=p_contrast)
        for name, p in probs.items():
            if not 0.0 <= float(p) <= 1.0:
                raise AugmentationError(f"{name} must be a probability in [0, 1], got {p}")
            setattr(self, name, float(p))
        deg = rotation_deg if rotation_deg is not None else (30.0 if spatial_dims == 3 else 180.0)
        self.rotation_rad = tuple(v * math.pi / 180 for v in _range(deg, "rotation_deg"))
        self.scale_range = _range(scale_range, "scale_range")
        self.gamma_range = _range(gamma_range, "gamma_range")
        self.noise_var = _range(noise_var, "noise_var")
        self.brightness_range = _range(brightness_range, "brightness_range")
        self.contrast_range = _range(contrast_range, "contrast_range")
        if min(self.scale_range) <= 0 or min(self.gamma_range) <= 0 or self.noise_var[0] < 0:
            raise AugmentationError("scale_range and gamma_range must be positive, noise_var >= 0")
        axes = tuple(range(spatial_dims)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
        if any(a < 0 or a >= spatial_dims for a in axes):
            raise AugmentationError(f"mirror_axes {mirror_axes} must be spatial axes 0..{spatial_dims - 1}")
        self.mirror_axes = axes
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        if self.patch_size is not None and len(self.patch_size) != spatial_dims:
            raise AugmentationError(f"patch_size {patch_size} must have {spatial_dims} entries")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._device_gens: dict[str, torch.Generator] = {}

    # -------------------------------------------------------------------------------- randomness
    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen, dtype=torch.float64)

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * self._rand(n)

    def _split_uniform(self, n: int, rng: tuple[float, float]) -> torch.Tensor:
        """nnU-Net's draw: half from (low, 1), half from (max(low, 1), high) when low < 1."""
        lo, hi = rng
        below = self._uniform(n, lo, min(1.0, hi))
        above = self._uniform(n, max(lo, 1.0), hi)
        coin = self._rand(n) < 0.5
        if hi <= 1.0:
            return below
        if lo >= 1.0:
            return above
        return torch.where(coin, below, above)

    def _device_gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._device_gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed + 1)
            self._device_gens[key] = g
        return self._device_gens[key]

    # ---------------------------------------------------------------------------------- spatial
    def _theta(self, angles: np.ndarray, scale: float, in_size, out_size) -> torch.Tensor:
        a = rotation_matrix(angles, self.spatial_dims) * scale  # voxel offsets, array-axis order
        a = np.diag(2.0 / np.asarray(in_size, float)) @ a @ np.diag(np.asarray(out_size, float) / 2.0)
        a = a[::-1, ::-1]  # affine_grid works in (x, y[, z]) = reversed axis order
        return torch.from_numpy(np.concatenate([a, np.zeros((self.spatial_dims, 1))], 1).copy())

    def _spatial(self, images, labels, out_size):
        b = images.shape[0]
        in_size = tuple(images.shape[2:])
        n_ang = 1 if self.spatial_dims == 2 else 3
        do_rot = self._rand(b) < self.p_rotation
        angles = self.rotation_rad[0] + (self.rotation_rad[1] - self.rotation_rad[0]) * self._rand(b, n_ang)
        do_scale = self._rand(b) < self.p_scale
        scales = self._split_uniform(b, self.scale_range)
        transformed = (do_rot | do_scale).nonzero().flatten().tolist()
        if not transformed and out_size == in_size:
            return images, labels
        start = [(i - o) // 2 for i, o in zip(in_size, out_size)]
        crop = (slice(None), slice(None), *(slice(s, s + o) for s, o in zip(start, out_size)))
        out_img = images[crop].clone()
        out_lab = labels[crop].clone() if labels is not None else None
        if transformed:
            thetas = []
            for i in transformed:
                ang = angles[i].numpy() if do_rot[i] else np.zeros(n_ang)
                sc = float(scales[i]) if do_scale[i] else 1.0
                thetas.append(self._theta(ang, sc, in_size, out_size))
            theta = torch.stack(thetas).to(device=images.device, dtype=torch.float32)
            idx = torch.tensor(transformed, device=images.device)
            grid = F.affine_grid(theta, [len(transformed), 1, *out_size], align_corners=False)
            sel = images.index_select(0, idx).float()
            warped = F.grid_sample(sel, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out_img[idx] = warped.to(images.dtype)
            if labels is not None:
                lab = labels.index_select(0, idx).float()
                warped = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
                out_lab[idx] = warped.round().to(labels.dtype)
        return out_img, out_lab

    # -------------------------------------------------------------------------------- intensity
    def _per_sample(self, p: float, b: int) -> tuple[torch.Tensor, list[int]]:
        do = self._rand(b) < p
        return do, do.nonzero().flatten().tolist()

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        dev = x.device
        red = tuple(range(2, x.ndim))
        shape_bc = (b, c) + (1,) * (x.ndim - 2)

        do, idx = self._per_sample(self.p_noise, b)
        var = self._uniform(b, *self.noise_var)
        if idx:
            sigma = (var.sqrt() * do).to(dev, torch.float32).view(b, *([1] * (x.ndim - 1)))
            noise = torch.randn(x.shape, generator=self._device_gen(dev), device=dev, dtype=torch.float32)
            x = x + sigma * noise

        do, idx = self._per_sample(self.p_brightness, b)
        mult = self._uniform(b * c, *self.brightness_range).view(b, c)
        if idx:
            mult = torch.where(do[:, None], mult, torch.ones_like(mult))
            x = x * mult.to(dev, torch.float32).view(shape_bc)

        do, idx = self._per_sample(self.p_contrast, b)
        factor = self._split_uniform(b * c, self.contrast_range).view(b, c)
        if idx:
            sel = x[idx]
            mean = sel.mean(dim=red, keepdim=True)
            lo, hi = sel.amin(dim=red, keepdim=True), sel.amax(dim=red, keepdim=True)
            f = factor[idx].to(dev, torch.float32).view(len(idx), c, *([1] * (x.ndim - 2)))
            x = x.clone()
            x[idx] = torch.maximum(torch.minimum((sel - mean) * f + mean, hi), lo)

        for p, invert in ((self.p_gamma_invert, True), (self.p_gamma, False)):
            do, idx = self._per_sample(p, b)
            gamma = self._split_uniform(b, self.gamma_range)
            if idx:
                g = gamma[idx].to(dev, torch.float32).view(len(idx), *([1] * (x.ndim - 1)))
                x = x.clone()
                x[idx] = self._gamma(x[idx], g, invert, red)
        return x

    @staticmethod
    def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool, red) -> torch.Tensor:
        if invert:
            x = -x
        mean, std = x.mean(dim=red, keepdim=True), x.std(dim=red, keepdim=True)
        lo, hi = x.amin(dim=red, keepdim=True), x.amax(dim=red, keepdim=True)
        rng = hi - lo
        y = ((x - lo) / (rng + 1e-7)).clamp_min(0).pow(gamma) * rng + lo
        y = (y - y.mean(dim=red, keepdim=True)) / (y.std(dim=red, keepdim=True) + 1e-8) * std + mean
        return -y if invert else y

    # ---------------------------------------------------------------------------------- mirror
    def _mirror(self, images, labels):
        b = images.shape[0]
        flips = self._rand(b, max(len(self.mirror_axes), 1)) < self.p_mirror
        if not self.mirror_axes or not flips.any():
            return images, labels
        images = images.clone()
        labels = labels.clone() if labels is not None else None
        for i in range(b):
            dims = [1 + a for a, f in zip(self.mirror_axes, flips[i]) if f]  # dims of images[i]
            if dims:
                images[i] = torch.flip(images[i], dims)
                if labels is not None:
                    labels[i] = torch.flip(labels[i], dims)
        return images, labels

    # ----------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch.

        Args:
            images: ``(B, C, *spatial)`` floating-point tensor.
            labels: ``(B, 1, *spatial)`` integer tensor (or ``None``).

        Returns:
            ``(images, labels)`` on the input device with the input dtypes; spatial size
            ``patch_size`` when set. Labels only take values of the input labels (or 0).
        """
        if images.ndim != self.spatial_dims + 2:
            raise AugmentationError(
                f"Expected images (B, C, *spatial) with {self.spatial_dims} spatial axes, got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise AugmentationError(f"Images must be floating point, got {images.dtype}")
        if labels is not None and (labels.shape[0] != images.shape[0] or labels.shape[2:] != images.shape[2:]
                                   or labels.ndim != images.ndim):
            raise AugmentationError(f"Labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        out_size = self.patch_size or tuple(images.shape[2:])
        if any(o > i for o, i in zip(out_size, images.shape[2:])):
            raise AugmentationError(f"patch_size {out_size} is larger than the input {tuple(images.shape[2:])}")
        dtype = images.dtype
        images, labels = self._spatial(images, labels, out_size)
        images = self._intensity(images.float()).to(dtype)
        images, labels = self._mirror(images, labels)
        return images, labels
