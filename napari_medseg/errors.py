"""The one base of napari-medseg's own errors.

Every error class the package defines for a problem the user can act on (a file it cannot read, a
setting out of range, an image outside a model's domain, a checkpoint it will not load) derives
from :class:`MedsegError` as well as from the built-in class it always had (``ValueError`` for most,
``OSError`` for a failed write, ``MemoryError`` / ``RuntimeError`` for memory), so code that caught
those still does, and code that wants every failure of the package catches one class::

    import napari_medseg as medseg
    try:
        medseg.predict_file("scan.nii.gz", "labels.nii.gz", "colin27_deepgm_unet3d")
    except medseg.MedsegError as err:  # e.g. DomainError, VolumeError, CheckpointError
        print(err)  # one line, naming the file or the setting

Imports nothing: any module may use it.
"""

from __future__ import annotations

__all__ = ["MedsegError"]


class MedsegError(Exception):
    """Base of the package's errors: the message is written for the user (it names the file, the
    setting or the model at fault and says what to do)."""
