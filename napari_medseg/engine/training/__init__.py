"""The training room: a run's config, data preparation, the trainer loop and its registered variants.

* :mod:`.config` -- :class:`TrainConfig` (shared by GUI and CLI), :func:`resolve_recipe`;
* :mod:`.prepare` -- :func:`prepare_data`: plan, preprocess, check and split the cases;
* :mod:`.trainer` -- :class:`Trainer` (a short loop over documented hooks) and :func:`train`;
* :mod:`.registry` -- :func:`register_trainer` / :func:`trainer_for`: which trainer trains a run;
* :mod:`.replan`, :mod:`.correction` -- fine-tuning: a new plan for data the parent does not fit;
  what a fine-tune on the parent's own classes keeps of it, and its learning rate;
* :mod:`.validation`, :mod:`.losses`, :mod:`.optim` -- pseudo Dice, Dice + CE, Lookahead;
* :mod:`.variants` -- the trainer variants (cascade, whole-volume models) (imported last: importing registers them).

Run a training generator to its end with :func:`napari_medseg.engine.jobs.drive`.
"""

from napari_medseg.engine.training.config import (
    TrainConfig,
    TrainingError,
    register_variant_option,
    resolve_recipe,
)
from napari_medseg.engine.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    LossError,
    deep_supervision_weights,
    downsample_targets,
)
from napari_medseg.engine.training.optim import Lookahead, lookahead_nadam
from napari_medseg.engine.training.prepare import (
    CaseInputs,
    TrainingData,
    prepare_data,
    register_derived_configuration,
)
from napari_medseg.engine.training.registry import (
    get_trainer,
    list_trainers,
    register_trainer,
    trainer_for,
)
from napari_medseg.engine.training.trainer import Trainer, train
from napari_medseg.engine.training.validation import DiceCounts

# isort: split
from napari_medseg.engine.training import variants  # last: importing it registers the variants

__all__ = [
    "CaseInputs", "DeepSupervisionLoss", "DiceCELoss", "DiceCounts", "LossError", "Lookahead", "TrainConfig",
    "Trainer", "TrainingData", "TrainingError", "deep_supervision_weights", "downsample_targets", "get_trainer",
    "list_trainers", "lookahead_nadam", "prepare_data", "register_derived_configuration", "register_trainer",
    "register_variant_option", "resolve_recipe", "train", "trainer_for", "variants",
]
