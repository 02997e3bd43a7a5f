"""``lcmla export``: ONNX graphs (and TensorRT engines when TensorRT is installed) for every network.

Installed as ``lcmla_sdk.export``. Output folder layout (``engines/NAME/``)::

    manifest.json              the contract read by the runtime (lcmla_sdk.manifest)
    <network>/model.onnx       one folder per network; large graphs keep weights in model.onnx.data
    <network>/model.plan       TensorRT engine (only when built)
    timing.cache               TensorRT timing cache shared by the builds
"""

from .exporting import ExportReport, export_model, parse_range
from .specs import ShapeRanges, build_specs

__all__ = ["ExportReport", "ShapeRanges", "build_specs", "export_model", "parse_range"]
