"""Is a checkpoint file whole, and are its tensors plain dense ones? Checked before anything uses it.

Before ``torch.load``: the file is not empty or absurdly large, its zip archive would not unpack far
beyond its size (a zip bomb), and every archive entry matches the CRC-32 the archive stores for it
(:func:`check_file`). torch's own reader does not compare them, so without this a flipped bit in a
weight loads as a garbage weight. Reading the file once for the CRCs costs about as much as reading
it (the second read, by ``torch.load``, comes from the page cache); see ``docs/reliability.md``.

After it: every tensor counts against a budget (number and total elements) and must be a dense
(strided) tensor of a real or integer dtype: a sparse, quantised or complex tensor has no business
in a segmentation checkpoint and would fail later in a foreign error (:class:`TensorBudget`).
"""

from __future__ import annotations

import os
import zipfile

import torch

from napari_medseg.engine.checkpoints.plain import CheckpointError

_TENSOR_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool,
}


def check_file(path: str, max_bytes: int, max_tensors: int) -> None:
    """Refuse files that are empty, absurdly large, zip archives that would inflate far beyond their
    size on disk (a zip bomb), or whose archive entries fail their CRC-32 (a damaged copy), before
    ``torch.load`` reads anything.

    Raises:
        CheckpointError: naming the file and the problem.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint. Was the copy interrupted?")
    if size > max_bytes:
        raise CheckpointError(f"Refusing {path}: {size} bytes is more than the {max_bytes} a checkpoint may have.")
    if not zipfile.is_zipfile(path):
        return  # legacy (non-zip) torch format: weights_only still applies; it has no checksums
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > 2 * max_tensors + 100:
                raise CheckpointError(
                    f"Refusing {path}: its archive has {len(infos)} entries (at most {2 * max_tensors + 100})."
                )
            unpacked = sum(max(i.file_size, 0) for i in infos)
            if unpacked > 4 * size + 2**20:
                raise CheckpointError(
                    f"Refusing {path}: its archive would unpack to {unpacked} bytes from {size} on disk; torch "
                    "checkpoints are stored uncompressed, so this file is damaged or crafted."
                )
            bad = zf.testzip()  # reads every entry and compares its CRC-32 with the stored one
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as err:
        raise CheckpointError(f"Could not read checkpoint {path}: damaged archive ({err}).") from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is damaged: its entry {bad!r} does not match the CRC-32 checksum stored with it (a "
            "changed byte on disk or in a copy), so its weights would be wrong. Use another copy."
        )


class TensorBudget:
    """Counts tensors and elements while a checkpoint is validated, refusing absurd sizes and
    tensors that are not dense real/integer arrays."""

    def __init__(self, max_tensors: int, max_elements: int) -> None:
        self.max_tensors, self.max_elements = max_tensors, max_elements
        self.tensors = 0
        self.elements = 0

    def add(self, t: torch.Tensor, where: str) -> None:
        if t.layout != torch.strided or t.is_quantized:
            kind = "quantised" if t.layout == torch.strided else str(t.layout).replace("torch.", "")
            raise CheckpointError(f"Checkpoint tensor {where} is a {kind} tensor; only dense tensors are allowed.")
        if t.dtype not in _TENSOR_DTYPES:
            raise CheckpointError(f"Checkpoint tensor {where} has dtype {t.dtype}; only real and integer "
                                  "dtypes are allowed.")
        self.tensors += 1
        self.elements += t.numel()
        if self.tensors > self.max_tensors:
            raise CheckpointError(f"Refusing checkpoint: more than {self.max_tensors} tensors ({where}).")
        if self.elements > self.max_elements:
            raise CheckpointError(f"Refusing checkpoint: its tensors hold more than {self.max_elements} elements.")


__all__ = ["TensorBudget", "check_file"]
