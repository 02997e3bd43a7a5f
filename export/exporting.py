"""Exporting a model's networks into a folder: an ONNX graph per network and the folder's manifest."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lcmla_sdk.atomic import atomic_directory
from lcmla_sdk.integrity import sha256_file
from lcmla_sdk.manifest import Manifest, NetworkEntry, onnx_files

from .graphs import OPSET, check_parity, export_onnx
from .specs import NetworkSpec, ShapeRanges, build_specs


@dataclass
class ExportReport:
    folder: Path
    manifest: Manifest
    seconds: dict[str, float] = field(default_factory=dict)
    failed_parity: list[str] = field(default_factory=list)


def parse_range(text: str, name: str) -> tuple[int, int, int]:
    """``"MIN:OPT:MAX"`` or a single ``"N"`` -> ``(min, opt, max)``."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        raise ValueError(f"{name}: expected MIN:OPT:MAX or N, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"{name}: expected MIN:OPT:MAX or N, got {text!r}")
    return values[0], values[1], values[2]


def _versions() -> dict[str, str]:
    names = ("lcmla", "torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["onnx_opset"] = str(OPSET)
    return versions


def _entry(spec: NetworkSpec, folder: Path, path: Path) -> NetworkEntry:
    digest = ":".join(sha256_file(p) for p in onnx_files(path))
    return NetworkEntry(spec.name, spec.inputs, spec.outputs, spec.profile, str(path.relative_to(folder)), digest)


def export_model(
    model,
    folder: str | Path,
    ranges: ShapeRanges,
    networks: Iterable[str] | None = None,
    check: bool = False,
    log: Callable[[str], None] = print,
) -> ExportReport:
    """Export ONNX graphs of ``model``'s networks into ``folder`` and write its manifest.

    ``networks`` limits the export to some graphs (default: all the model has). ``check`` runs the onnxruntime
    parity check on every graph and records it in the manifest. Engines are built afterwards by
    :func:`lcmla_sdk.engines.build_engines`.
    """
    folder = Path(folder)
    specs = build_specs(model, ranges)
    wanted = list(specs) if networks is None else list(networks)
    unknown = sorted(set(wanted) - set(specs))
    if unknown:
        raise ValueError(f"networks: unknown {unknown}; this model has {sorted(specs)}")
    precision = "fp16" if model.dtype == torch.float16 else "fp32"
    manifest = Manifest(precision=precision, model_fingerprint=model.fingerprint, versions=_versions())
    report = ExportReport(folder, manifest)
    for name in wanted:
        spec = specs[name]
        start = time.perf_counter()
        # The network's folder is written beside and swapped in whole: an old graph (and the engine built from it)
        # stays intact until the new one is complete.
        with atomic_directory(folder / name) as staging:
            export_onnx(spec, staging / "model.onnx", spec.profile.opt, model.device)
        path = folder / name / "model.onnx"
        entry = _entry(spec, folder, path)
        report.seconds[name] = time.perf_counter() - start
        if check:
            entry.parity = check_parity(spec, path, model.device)
            if not entry.parity["passed"]:
                report.failed_parity.append(name)
        log(_summary(entry, report.seconds[name]))
        manifest.networks[name] = entry
        manifest.save(folder)  # after every graph, so an interrupted export leaves a valid folder
    return report


def _summary(entry: NetworkEntry, seconds: float) -> str:
    text = f"{entry.name}: {entry.onnx} ({seconds:.1f} s)"
    if entry.parity is not None:
        verdict = "ok" if entry.parity["passed"] else "FAILED"
        text += f", parity {verdict}: max error {entry.parity['max_error']:.2e} <= {entry.parity['tolerance']:.0e}"
    return text
