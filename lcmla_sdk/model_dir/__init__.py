"""lcmla model directories, by job: the format of the index ``lcmla.json`` and the one pass that reads a directory
(:mod:`.format`), validation before any heavy load (:mod:`.checks`), building modules from the files
(:mod:`.building`), loading a model by name (:mod:`.loading`) and saving (:mod:`.saving`)."""

from .checks import validate
from .format import INDEX, Component, ModelLayout, describe, read_layout
from .building import assemble, load, load_sdxl
from .saving import save, write_index

__all__ = [
    "INDEX", "Component", "ModelLayout", "assemble", "describe", "load", "load_sdxl", "read_layout", "save", "validate",
    "write_index",
]  # fmt: skip
