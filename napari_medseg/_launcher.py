"""How napari is set up for medical volumes: the reader preference, the radiological view, the docks.

No Qt and no napari import at module level (napari is imported inside the functions that need it);
the view logic (:func:`view_spec`, :func:`direction_letters`, :func:`acquisition_plane`) is plain
Python on numbers and can be tested without a viewer.

**Reader preference.** napari's own reader claims ``*.nii``, ``*.nrrd``, ``*.dcm``... as well, and
napari keeps no reader priority: with two readers for a file and no saved preference, File > Open
and drag-and-drop ask "Choose reader" (napari's builtins first), and ``viewer.open(path,
plugin=None)`` raises. The only mechanism is napari's ``settings.plugins.extension2reader``
(pattern -> plugin), which napari consults on every open without a plugin. :func:`activate` is the
manifest's ``on_activate``: npe2 calls it the first time any contribution of the plugin is used in a
napari session (a widget, a sample, the reader, a writer), and it records this plugin for every
file pattern of the reader that has no preference yet (:func:`prefer_medseg_reader`; a pattern the
user gave to another reader is left alone). napari saves the setting, so from then on every session
opens these files without a question. DICOM *folders* have no file pattern: napari asks once per
folder (and remembers the folder when told to).

**Radiological view.** Layers from this plugin's reader live in RAS+ millimetres, napari world axes
``(S, A, R)``. napari's default 2D view draws the second displayed axis downwards, so an axial slice
shows anterior at the bottom. :func:`follow_viewer` sets the camera (never a layer's data or
transform, which must stay exact for saving) when the first napari-medseg layer arrives:
the slicing axis of the acquisition plane (:func:`acquisition_plane`), anterior (axial) or superior
(coronal, sagittal) up, and patient left on screen right (radiological convention; neurological:
patient left on screen left; sagittal: anterior on the left). Four canvas text overlays name the
directions on screen (A/P, R/L, S/I) and follow the dims order and the camera. The convention is
switched in the Display widget, or by default with the environment variable
``MEDSEG_CONVENTION=neurological``.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

PLUGIN = "napari-medseg"

# ---------------------------------------------------------------------------- reader preference
#: Filename patterns napari should open with this plugin (the reader's patterns; folders excluded).
READER_PATTERNS = ("*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm", "*.dicom", "*.ima")


def prefer_medseg_reader(patterns: Sequence[str] = READER_PATTERNS) -> list[str]:
    """Record this plugin as napari's reader for ``patterns`` that have no preference yet.

    A pattern the user gave to another reader (napari's "Choose reader" dialog with "remember", or
    Preferences > Plugins) keeps that reader; to stop this plugin from taking a pattern, give it to
    another reader there.

    Returns:
        The patterns added.
    """
    from napari.settings import get_settings

    settings = get_settings()
    readers = dict(settings.plugins.extension2reader)
    added = [p for p in patterns if p not in readers]
    if added:
        readers.update(dict.fromkeys(added, PLUGIN))
        settings.plugins.extension2reader = readers
    return added


def activate(context=None) -> None:
    """npe2 ``on_activate``: runs once per session, when a contribution is first used.

    Records the reader preference and lets the current viewer show the radiological view. Never
    raises (a failure here must not stop the contribution that triggered it).
    """
    napari = sys.modules.get("napari")
    if napari is None:  # used outside napari (npe2 tooling): no settings or viewer to touch
        return
    try:
        added = prefer_medseg_reader()
        if added:
            logger.info("napari will open %s with %s", ", ".join(added), PLUGIN)
        viewer = napari.current_viewer()
        if viewer is not None:
            follow_viewer(viewer)
    except Exception:  # noqa: BLE001 - see the docstring
        logger.warning("Could not set napari up for %s", PLUGIN, exc_info=True)


# --------------------------------------------------------------------------------- the view
#: napari world axes of this plugin's layers, ``(S, A, R)``: the letters of each axis's positive
#: and negative direction.
WORLD_AXES = (("S", "I"), ("A", "P"), ("R", "L"))
#: The world axis each view slices along (the one not displayed).
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}
CONVENTIONS = ("radiological", "neurological")
#: Axis labels napari shows on the dims sliders (RAS+ millimetres).
AXIS_LABELS = ("S", "A", "R")
#: Voxel spacing ratio from which the coarsest axis is taken as the slice direction.
ANISOTROPY = 1.2
OVERLAY_POSITIONS = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left",
                     "right": "middle_right", "view": "bottom_left"}
OVERLAY_KEY = "medseg_{}"


def default_convention() -> str:
    """``$MEDSEG_CONVENTION`` when it names a convention, else ``"radiological"``."""
    value = os.environ.get("MEDSEG_CONVENTION", "").strip().lower()
    return value if value in CONVENTIONS else "radiological"


@dataclass(frozen=True)
class ViewSpec:
    """A standard view: which world axis is sliced and how the camera draws the other two.

    Attributes:
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        convention: ``"radiological"`` or ``"neurological"``.
        order: napari ``dims.order`` of the three world axes (sliced axis first, displayed last).
        orientation2d: napari ``camera.orientation2d``: the direction in which the vertical and
            the horizontal displayed axes increase on screen.
    """

    plane: str
    convention: str
    order: tuple[int, int, int]
    orientation2d: tuple[str, str]

    @property
    def displayed(self) -> tuple[int, int]:
        """The world axes drawn vertically and horizontally."""
        return self.order[1], self.order[2]

    def letters(self) -> dict[str, str]:
        """The anatomical direction at each edge of the canvas (``top``, ``bottom``, ``left``, ``right``)."""
        return direction_letters(self.displayed, self.orientation2d)


def view_spec(plane: str = "axial", convention: str | None = None) -> ViewSpec:
    """The standard view of ``plane``: superior (coronal, sagittal) or anterior (axial) up; in axial
    and coronal views the patient's left on screen right (radiological) or left (neurological);
    sagittal views face left (anterior on the left) in both conventions."""
    convention = convention or default_convention()
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {sorted(PLANES)}, not {plane!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
    sliced = PLANES[plane]
    rows, cols = (a for a in range(3) if a != sliced)
    if cols == 2:  # R across the screen: R increases to the left puts patient left on screen right
        horizontal = "left" if convention == "radiological" else "right"
    else:  # sagittal: A across the screen, anterior on the left
        horizontal = "left"
    return ViewSpec(plane, convention, (sliced, rows, cols), ("up", horizontal))


def direction_letters(displayed: Sequence[int], orientation2d: Sequence[str]) -> dict[str, str]:
    """Anatomical letters at the canvas edges for world axes ``displayed`` = (vertical, horizontal)
    drawn with camera ``orientation2d`` (napari: ``"up"``/``"down"``, ``"left"``/``"right"``: where
    each axis increases)."""
    (v_pos, v_neg), (h_pos, h_neg) = WORLD_AXES[displayed[0]], WORLD_AXES[displayed[1]]
    up, left = str(orientation2d[0]) == "up", str(orientation2d[1]) == "left"
    return {"top": v_pos if up else v_neg, "bottom": v_neg if up else v_pos,
            "left": h_pos if left else h_neg, "right": h_neg if left else h_pos}


def acquisition_plane(affine: np.ndarray) -> str:
    """The plane a volume was acquired in, from its voxel-to-RAS+ ``affine`` (4x4, file voxel order).

    The slices are perpendicular to the coarsest voxel axis when the spacing is anisotropic (at
    least :data:`ANISOTROPY` times coarser than the finest); that axis's nearest world axis names
    the plane (S: axial, A: coronal, R: sagittal). Isotropic volumes give ``"axial"``.
    """
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if not np.all(spacing > 0) or spacing.max() < ANISOTROPY * spacing.min():
        return "axial"
    direction = np.abs(lin[:, int(np.argmax(spacing))])
    world = int(np.argmax(direction))  # 0: R (x), 1: A (y), 2: S (z)
    return ("sagittal", "coronal", "axial")[world]


def layer_geometry(layer) -> dict | None:
    """The plain geometry this plugin's reader put on a layer (``None`` for other layers)."""
    meta = getattr(layer, "metadata", None)
    geom = meta.get("medseg_geometry") if isinstance(meta, dict) else None
    return geom if isinstance(geom, dict) and "affine" in geom else None


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _world_offset(viewer) -> int | None:
    """Index of the first of the three RAS world axes among the viewer's dims (``None`` when the
    viewer has fewer than three)."""
    n = viewer.dims.ndim
    return n - 3 if n >= 3 else None


def apply_view(viewer, spec: ViewSpec) -> None:
    """Show ``spec`` in ``viewer``: dims order, camera orientation, axis labels, direction letters.

    Only view state changes (``viewer.dims``, the camera, canvas overlays); layers keep their
    data and transforms. Axis labels are set only while they are napari's defaults.
    """
    lead = _world_offset(viewer)
    if lead is not None:
        viewer.dims.order = tuple(range(lead)) + tuple(lead + a for a in spec.order)
        labels = tuple(viewer.dims.axis_labels)
        if all(label.lstrip("-").isdigit() for label in labels[lead:]):
            viewer.dims.axis_labels = labels[:lead] + AXIS_LABELS
    viewer_camera(viewer).orientation2d = spec.orientation2d
    _state(viewer)["convention"] = spec.convention
    update_direction_labels(viewer)


def current_letters(viewer) -> dict[str, str] | None:
    """The anatomical letters at the canvas edges of ``viewer`` now (``None``: no napari-medseg
    layer, a 3D view, or displayed axes that are not the RAS world axes)."""
    lead = _world_offset(viewer)
    if lead is None or viewer.dims.ndisplay != 2 or not any(layer_geometry(lay) for lay in viewer.layers):
        return None
    displayed = [a - lead for a in viewer.dims.order[-2:]]
    if any(a < 0 for a in displayed):
        return None
    return direction_letters(displayed, [str(o) for o in viewer_camera(viewer).orientation2d])


def current_plane(viewer) -> str | None:
    """``"axial"``, ``"coronal"`` or ``"sagittal"`` for the sliced world axis of a 2D view."""
    lead = _world_offset(viewer)
    if lead is None or viewer.dims.ndisplay != 2:
        return None
    sliced = viewer.dims.order[-3] - lead
    return {v: k for k, v in PLANES.items()}.get(sliced)


def update_direction_labels(viewer) -> None:
    """Show (or hide) the direction letters and the view name on ``viewer``'s canvas."""
    from napari.components.overlays import TextOverlay

    letters = current_letters(viewer)
    overlays = viewer.canvas.overlays
    plane = current_plane(viewer)
    texts = dict(letters or {})
    if letters is not None and plane is not None:
        texts["view"] = f"{plane} · {_state(viewer).get('convention', default_convention())}"
    for edge, position in OVERLAY_POSITIONS.items():
        key = OVERLAY_KEY.format(edge)
        if key not in overlays:
            big = edge != "view"
            overlays[key] = TextOverlay(position=position, font_size=16 if big else 10, visible=False)
        overlay = overlays[key]
        overlay.text = texts.get(edge, "")
        overlay.visible = edge in texts


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(viewer):
    """The viewer itself when napari handed a plugin widget its public-only proxy."""
    return getattr(viewer, "__wrapped__", viewer)


def _state(viewer) -> dict:
    """Per-viewer state of :func:`follow_viewer` (``applied``, ``convention``)."""
    return _STATE.setdefault(_unwrap(viewer), {"applied": False, "convention": default_convention()})


def viewer_convention(viewer) -> str:
    """The convention ``viewer`` shows (its last :func:`apply_view`, else the default)."""
    return _state(viewer)["convention"]


def show_standard_view(viewer, layer=None, convention: str | None = None) -> ViewSpec:
    """Apply the standard view of ``layer``'s acquisition plane (the first napari-medseg layer when
    ``None``; axial without one) in ``convention`` (the viewer's current one when ``None``)."""
    state = _state(viewer)
    if layer is None:
        layer = next((lay for lay in viewer.layers if layer_geometry(lay)), None)
    geom = layer_geometry(layer) if layer is not None else None
    plane = acquisition_plane(np.asarray(geom["affine"])) if geom else "axial"
    spec = view_spec(plane, convention or state["convention"])
    apply_view(viewer, spec)
    state["applied"] = True
    return spec


def follow_viewer(viewer) -> None:
    """Give ``viewer`` the standard view when its first napari-medseg layer arrives, and keep the
    direction letters in step with the dims and the camera. Idempotent."""
    viewer = _unwrap(viewer)
    state = _state(viewer)
    if state.get("following"):
        return
    state["following"] = True
    ref = weakref.ref(viewer)

    def on_inserted(event) -> None:
        v = ref()
        if v is None:
            return
        if layer_geometry(event.value) and not _state(v)["applied"]:
            show_standard_view(v, event.value)
        else:
            update_direction_labels(v)

    def on_removed(_event=None) -> None:
        v = ref()
        if v is None:
            return
        if not any(layer_geometry(lay) for lay in v.layers):
            _state(v)["applied"] = False  # the next volume gets the standard view again
        update_direction_labels(v)

    def on_view(_event=None) -> None:
        v = ref()
        if v is not None:
            update_direction_labels(v)

    viewer.layers.events.inserted.connect(on_inserted)
    viewer.layers.events.removed.connect(on_removed)
    viewer.dims.events.order.connect(on_view)
    viewer.dims.events.ndisplay.connect(on_view)
    viewer_camera(viewer).events.orientation.connect(on_view)
    if not state["applied"] and any(layer_geometry(lay) for lay in viewer.layers):
        show_standard_view(viewer)


# ------------------------------------------------------------------------------------ docking
def dock_all_widgets(viewer) -> list:
    """Dock every widget the plugin's manifest contributes, as tabs of one dock area; returns the
    dock widgets (the first one is raised)."""
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest(PLUGIN)
    docks = []
    for contrib in manifest.contributions.widgets or []:
        dock, _ = viewer.window.add_plugin_dock_widget(PLUGIN, contrib.display_name, tabify=True)
        docks.append(dock)
    if docks:
        docks[0].raise_()
    return docks


def launch_viewer(files: Sequence[str] = (), *, sample: bool = False, run: bool = True):
    """Create a viewer, open ``files`` (and the sample volume), dock the widgets, run the event loop."""
    import napari

    prefer_medseg_reader()
    viewer = napari.Viewer(title="napari-medseg")
    follow_viewer(viewer)
    if sample:
        viewer.open_sample(PLUGIN, "colin27_deepgm")
    for path in files:
        viewer.open(path, plugin=PLUGIN)
    dock_all_widgets(viewer)
    if run:
        napari.run()
    return viewer
