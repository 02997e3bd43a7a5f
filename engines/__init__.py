"""TensorRT engines and the graph-backed runtime (installed as ``lcmla_sdk.engines``).

Build artefacts written by ``lcmla export`` go to sub-folders of the repository's ``engines/`` folder and are
git-ignored; only this package's code is tracked there.
"""

from .building import build_engines
from .engine import BuildOptions, EngineMismatchError, TensorRTUnavailable

__all__ = ["BuildOptions", "EngineMismatchError", "TensorRTUnavailable", "build_engines"]
