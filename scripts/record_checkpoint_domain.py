"""Record the training domain and orientation in a checkpoint trained before they were recorded.

The domain check (Segment, ``predict``) and the reorientation of inputs read both from the
checkpoint; older files have neither. Give the training images (any format ``read_volume``
reads, with their label maps for the foreground intensities) and the modality::

    .venv/bin/python scripts/record_checkpoint_domain.py CKPT --images img.nii.gz --labels lab.nii.gz \\
        --modality T1 [--orientation-from img.nii.gz] [-o OUT.pt]

Used for the shipped ``colin27_deepgm_unet3d.pt`` (trained on the shipped Colin27 crop)::

    .venv/bin/python scripts/record_checkpoint_domain.py napari_medseg/checkpoints/colin27_deepgm_unet3d.pt \\
        --images napari_medseg/data/colin27_t1_deepgm.nii.gz --labels napari_medseg/data/colin27_deepgm_labels.nii.gz \\
        --modality T1 --orientation-from napari_medseg/data/colin27_t1_deepgm.nii.gz
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from napari_medseg.engine.checkpoints import load_checkpoint  # noqa: E402
from napari_medseg.engine.checkpoints.build import with_domain, with_orientation, write_checkpoint  # noqa: E402
from napari_medseg.engine.inference.domain import case_domain_stats, summarise_domain  # noqa: E402
from napari_medseg.engine.preprocessing import orientation_codes  # noqa: E402
from napari_medseg.io import read_volume  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--labels", nargs="*", default=[])
    p.add_argument("--modality", required=True, help="e.g. T1, T2, CT")
    p.add_argument("--orientation-from", help="an image in the layout the model was trained in")
    p.add_argument("-o", "--output", help="default: replace the checkpoint (atomically)")
    args = p.parse_args()
    stats = []
    for i, path in enumerate(args.images):
        vol = read_volume(path)
        label = read_volume(args.labels[i]).data if i < len(args.labels) else None
        data = vol.data if vol.channel_axis == 0 else vol.data[None]
        stats.append(case_domain_stats(data, label, vol.spacing))
    ckpt = with_domain(load_checkpoint(args.checkpoint), summarise_domain(stats, args.modality))
    if args.orientation_from:
        ckpt = with_orientation(ckpt, orientation_codes(read_volume(args.orientation_from).affine))
    out = write_checkpoint(ckpt, args.output or args.checkpoint, with_optimizer=False)
    print(f"{out}: orientation {ckpt.orientation}, domain {ckpt.domain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
