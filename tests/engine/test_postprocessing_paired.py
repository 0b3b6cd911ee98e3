"""The largest-component rule for classes that hold a left and a right structure (paired classes)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.engine.inference import keep_largest_component
from napari_medseg.engine.inference.config import InferenceError
from napari_medseg.engine.inference.inferers import (
    LARGEST_FOREGROUND,
    PAIRED_CLASSES,
    component_rule,
)


def _two_sided(shape=(20, 30, 40)):
    """Class 1 left and right of the mid-plane (x = 20), a small class-1 blob far right, class 2 once."""
    labels = np.zeros(shape, np.uint8)
    labels[8:12, 10:16, 8:14] = 1  # left structure (144 voxels)
    labels[8:12, 10:16, 26:31] = 1  # right structure (120 voxels)
    labels[2:4, 25:27, 36:38] = 1  # a stray blob on the right (8 voxels)
    labels[8:12, 18:22, 17:23] = 2  # a midline structure
    labels[15:17, 2:4, 2:4] = 2  # its stray blob
    return labels


def test_plain_rule_deletes_one_side_of_a_paired_class():
    labels = _two_sided()
    out = keep_largest_component(labels, [1, 2])
    assert (out[..., 26:31] == 1).sum() == 0 and (out == 1).sum() == 144


@pytest.mark.parametrize("flip", [False, True])
def test_paired_class_keeps_one_component_per_side(flip):
    labels = _two_sided()
    if flip:  # the same anatomy stored right to left
        labels = labels[..., ::-1].copy()
    out = keep_largest_component(labels, [1, 2], paired=[1], side_axis=-1)
    assert (out == 1).sum() == 144 + 120  # both sides, not the stray blob
    assert (out == 2).sum() == 4 * 4 * 6  # an unpaired class keeps one component
    # On another axis the two sides are one "side": one component per side of *that* axis.
    other = keep_largest_component(labels, [1], paired=[1], side_axis=0)
    assert (other == 1).sum() < 144 + 120


def test_component_rule_reads_the_checkpoint():
    from types import SimpleNamespace

    def ckpt(extra, orientation):
        return SimpleNamespace(extra=extra, orientation=orientation, num_classes=7)

    plain = {"foreground_first": False}
    assert component_rule(ckpt({PAIRED_CLASSES: [1, 2]}, "SAR")) == {"paired": (1, 2), "side_axis": -1, **plain}
    assert component_rule(ckpt({PAIRED_CLASSES: [3]}, "RAS")) == {"paired": (3,), "side_axis": -3, **plain}
    assert component_rule(ckpt({}, None)) == {"paired": (), "side_axis": -1, **plain}
    assert component_rule(ckpt({LARGEST_FOREGROUND: True}, None))["foreground_first"]
    with pytest.raises(InferenceError, match="foreground classes"):
        component_rule(ckpt({PAIRED_CLASSES: [0, 9]}, "SAR"))


def test_prediction_follows_the_checkpoints_recommendation_unless_told():
    """``largest_component=None`` (the default everywhere): as the checkpoint's ``extra`` says."""
    from types import SimpleNamespace

    from napari_medseg.engine.inference import PredictConfig
    from napari_medseg.engine.inference.inferers import LARGEST_COMPONENT, finish_ensemble
    from napari_medseg.engine.jobs import drive

    labels = _two_sided()
    mean = np.stack([(labels == c).astype(np.float32) for c in range(3)])  # one-hot "probabilities"

    def run(extra, **config):
        ckpt = SimpleNamespace(extra=extra, orientation="SAR", num_classes=3, label_names={})
        return drive(finish_ensemble(mean, PredictConfig(**config), [ckpt])).labels

    everything = (labels == 1).sum()
    assert (run({}) == 1).sum() == everything  # no recommendation: nothing removed
    recommended = {LARGEST_COMPONENT: True, PAIRED_CLASSES: [1]}
    assert (run(recommended) == 1).sum() == 144 + 120  # both sides, not the stray blob
    assert (run(recommended, largest_component=False) == 1).sum() == everything  # the user's word wins
    assert (run({LARGEST_COMPONENT: True}) == 1).sum() == 144  # unpaired: one side only
    assert (run({}, largest_component=True) == 1).sum() == 144


def test_foreground_first_keeps_a_complex_over_a_larger_stray_of_one_class():
    """A class-2 false positive larger than the true class-2 structure, away from the complex:
    per class it wins; with the foreground taken first, the complex (classes 1 and 2 touching,
    on each side) is kept and the stray goes."""
    labels = np.zeros((20, 30, 40), np.uint8)
    for x0 in (6, 26):  # a complex on each side: class 1 with a small class 2 next to it
        labels[8:12, 10:16, x0:x0 + 6] = 1
        labels[8:12, 16:18, x0:x0 + 6] = 2  # 48 voxels each
    labels[1:5, 24:29, 17:23] = 2  # a stray class-2 blob near the mid-plane (120 voxels), apart
    per_class = keep_largest_component(labels, [1, 2], paired=[1, 2], side_axis=-1)
    assert (per_class[1:5, 24:29] == 2).any()  # per class, the stray beats a true side
    first = keep_largest_component(labels, [1, 2], paired=[1, 2], side_axis=-1, foreground_first=True)
    assert not (first[1:5, 24:29] == 2).any()
    assert (first == 2).sum() == 96 and (first == 1).sum() == 2 * 144


def test_foreground_first_prefers_the_complex_of_several_classes_over_a_larger_blob():
    """The complex: both thalami (class 2) touching at the mid-plane, a class-1 structure on each
    side; a larger single-class false positive (class 2) at the vertex, apart. By size alone the
    blob would win both sides; the component holding the most classes wins."""
    labels = np.zeros((30, 30, 40), np.uint8)
    labels[10:14, 10:16, 14:26] = 2  # thalami across the mid-plane (x = 20): 288 voxels
    labels[10:14, 16:18, 8:13] = 1  # left structure, touching
    labels[10:14, 16:18, 27:32] = 1  # right structure, touching
    labels[22:29, 20:28, 12:28] = 2  # a vertex blob of class 2, 896 voxels, apart
    complex_only = labels.copy()
    complex_only[22:29] = 0
    out = keep_largest_component(labels, [1, 2], paired=[1, 2], side_axis=-1, foreground_first=True)
    np.testing.assert_array_equal(out, complex_only)
    by_size = keep_largest_component(labels, [1, 2], paired=[1, 2], side_axis=-1)
    assert (by_size[22:29] == 2).any()  # per class, the blob beats the thalami
