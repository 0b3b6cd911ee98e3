#!/usr/bin/env bash
# The main job: napari with the plugin's widgets docked and the Colin27 sample volume open.
# Usage: bash scripts/run.sh [FILE.nii.gz ...]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
with_display "$VENV/bin/napari-medseg" view --sample "$@"
