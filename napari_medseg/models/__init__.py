"""Model registry and architectures (pure ``torch.nn``; no numpy I/O, no Qt).

Importing this package imports every architecture module, which registers its models::

    from napari_medseg.models import create_model, list_models
    net = create_model("unet-3d-fullres", in_channels=1, num_classes=3)
"""

from napari_medseg.models import pfseg, rkseg, sdn, unet, xdim  # noqa: F401  (importing registers the models)
from napari_medseg.models.registry import (
    ModelError,
    ModelSpec,
    accepted_kwargs,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
    register_model,
)
from napari_medseg.models.unet import NNUNet, input_divisor

__all__ = [
    "ModelError",
    "ModelSpec",
    "NNUNet",
    "accepted_kwargs",
    "count_parameters",
    "create_model",
    "get_model_spec",
    "input_divisor",
    "list_models",
    "register_model",
]
