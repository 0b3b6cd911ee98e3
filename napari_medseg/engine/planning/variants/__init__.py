"""Planning variants; importing this package registers them."""

from napari_medseg.engine.planning.variants import cascade  # noqa: F401
