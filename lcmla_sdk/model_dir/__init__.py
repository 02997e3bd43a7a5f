"""lcmla model directories, by job: the format of the index ``lcmla.json`` and its files (:mod:`.format`),
validation before any heavy load (:mod:`.checks`), loading (:mod:`.loading`) and saving (:mod:`.saving`)."""

from .checks import validate
from .format import INDEX, Component, ModelLayout, describe, read_layout
from .loading import assemble, load, load_sdxl
from .saving import save, write_index

__all__ = [
    "INDEX", "Component", "ModelLayout", "assemble", "describe", "load", "load_sdxl", "read_layout", "save", "validate",
    "write_index",
]  # fmt: skip
