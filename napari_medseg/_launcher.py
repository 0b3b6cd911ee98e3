"""Open napari with the plugin's widgets docked (``napari-medseg view``). Imports napari."""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

PLUGIN = "napari-medseg"


def dock_all_widgets(viewer) -> list:
    """Dock every widget the plugin's manifest contributes; returns the dock widgets."""
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest(PLUGIN)
    docks = []
    for contrib in manifest.contributions.widgets or []:
        dock, _ = viewer.window.add_plugin_dock_widget(PLUGIN, contrib.display_name)
        docks.append(dock)
    if len(docks) > 1:
        for dock in docks[1:]:
            viewer.window._qt_window.tabifyDockWidget(docks[0], dock)
        docks[0].raise_()
    return docks


def prefer_medseg_reader() -> None:
    """Make napari open ``.nii``/``.nii.gz`` with this plugin without asking (unless the user chose another).

    napari's builtin reader claims every file name, so a dropped NIfTI file would otherwise open a
    "choose a reader" dialog; this records the choice a user would make there.
    """
    from napari.settings import get_settings

    readers = get_settings().plugins.extension2reader
    for pattern in ("*.nii", "*.nii.gz"):
        if pattern not in readers:
            readers[pattern] = PLUGIN
    get_settings().plugins.extension2reader = dict(readers)


def launch_viewer(files: Sequence[str] = (), *, sample: bool = False, run: bool = True):
    """Create a viewer, open ``files`` (and the sample volume), dock the widgets, run the event loop."""
    import napari

    prefer_medseg_reader()
    viewer = napari.Viewer(title="napari-medseg")
    if sample:
        viewer.open_sample(PLUGIN, "colin27_deepgm")
    for path in files:
        viewer.open(path, plugin=PLUGIN)
    dock_all_widgets(viewer)
    if run:
        napari.run()
    return viewer
