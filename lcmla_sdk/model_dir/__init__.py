"""lcmla model directories, by job: the format of the index ``lcmla.json`` and its files (:mod:`.format`),
validation before any heavy load (:mod:`.checks`), loading (:mod:`.loading`) and saving (:mod:`.saving`)."""

from .checks import validate
from .format import INDEX, Component, ModelLayout, describe, is_model_dir
from .loading import components_config, load, load_sdxl
from .saving import save, write_index

__all__ = [
    "INDEX", "Component", "ModelLayout", "components_config", "describe", "is_model_dir", "load", "load_sdxl", "save",
    "validate", "write_index",
]  # fmt: skip
