"""Checkpoints: the file format (save, load, validate; the optional ``orientation`` and ``domain``
fields in :mod:`.fields`), using one (rebuild the model, fine-tune, summarise, record its
orientation or domain), and the catalogue of shipped and user checkpoints."""

from napari_medseg.engine.checkpoints.build import (
    build_model,
    check_compatible,
    checkpoint_summary,
    load_weights_for_finetune,
    with_domain,
    with_orientation,
    write_checkpoint,
)
from napari_medseg.engine.checkpoints.catalog import (
    CheckpointInfo,
    checkpoint_info,
    list_checkpoints,
    medseg_home,
    register_checkpoint,
    unregister_checkpoint,
    user_checkpoint_dir,
)
from napari_medseg.engine.checkpoints.format import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    as_checkpoint,
    load_checkpoint,
    save_checkpoint,
    to_plain,
)

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "as_checkpoint",
    "build_model",
    "check_compatible",
    "checkpoint_info",
    "checkpoint_summary",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights_for_finetune",
    "medseg_home",
    "register_checkpoint",
    "save_checkpoint",
    "to_plain",
    "unregister_checkpoint",
    "user_checkpoint_dir",
    "with_domain",
    "with_orientation",
    "write_checkpoint",
]
