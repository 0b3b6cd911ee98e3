"""The settings of one prediction, shared by the CLI, the Segment widget and the Python API."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from napari_medseg.errors import MedsegError


class InferenceError(MedsegError, ValueError):
    """Prediction cannot run with these settings or this input."""


class DomainError(InferenceError):
    """The image lies far outside what the model was trained on (another modality, much coarser
    voxels, ...); raised before any compute. The message is one line of reasons; ``reasons`` holds
    them one by one. Predict with ``force=True`` to segment it anyway."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__(
            "The image looks unlike the model's training data: " + "; ".join(self.reasons) + "."
        )


@dataclass(frozen=True)
class PredictConfig:
    """How to predict (what to predict with is the checkpoint list, passed beside it).

    Attributes:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        mirror: Mirroring test-time augmentation over the axes the model was trained mirrored on.
        step: Sliding-window stride as a fraction of the patch, in (0, 1].
        batch_size: Tiles (or slices of a 2D model) per model call.
        largest_component: Keep only the largest connected component of each class (one per side
            for classes the checkpoint marks as paired: left and right in one class); ``None``: as
            the checkpoint recommends (``Checkpoint.extra["largest_component"]``; off when absent).
        return_probabilities: Also return the mean softmax ``(K, *spatial)``.
        return_uncertainty: Also return the normalised entropy of the mean softmax.
        save_probabilities: When predicting a file, also write the probabilities beside the labels
            (implies ``return_probabilities``).
        overwrite: When predicting a file, replace an existing output file (an input is never
            replaced).
        force: Segment even an image far outside the checkpoint's training domain (otherwise
            :class:`DomainError` is raised before any compute).
    """

    device: str = "auto"
    mirror: bool = True
    step: float = 0.5
    batch_size: int = 1
    largest_component: bool | None = None
    return_probabilities: bool = False
    return_uncertainty: bool = False
    save_probabilities: bool = False
    overwrite: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and 0 < self.step <= 1):
            raise InferenceError(f"step must be a number in (0, 1], got {self.step!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InferenceError(f"batch_size must be a whole number of at least 1, got {self.batch_size!r}.")
        if self.save_probabilities and not self.return_probabilities:
            object.__setattr__(self, "return_probabilities", True)

    @classmethod
    def build(cls, config: PredictConfig | dict | None = None, **overrides: Any) -> PredictConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are an error."""
        known = {f.name for f in fields(cls)}
        base = config if isinstance(config, PredictConfig) else cls(**_checked(dict(config or {}), known))
        return replace(base, **_checked(overrides, known)) if overrides else base

    def to_dict(self) -> dict:
        """The settings as a plain dict (JSON-able; ``PredictConfig.build(config.to_dict())`` round-trips)."""
        return asdict(self)


def _checked(values: dict, known: set[str]) -> dict:
    unknown = sorted(set(values) - known)
    if unknown:
        raise InferenceError(f"Unknown prediction setting(s) {unknown}; known: {sorted(known)}.")
    return values
