"""ONNX graphs: export from a spec, clean up, and check parity with PyTorch through onnxruntime."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from lcmla_sdk.manifest import DATA_SUFFIX, onnx_files  # noqa: F401 (onnx_files: benchmarks import it from here)

from .specs import NetworkSpec

OPSET = 17  # LayerNormalization as one op; attention lowers to MatMul/Softmax (no SDPA op)
PROTOBUF_LIMIT = 2 * 1024**3  # graphs above this keep their weights in one external data file


@torch.no_grad()
def export_onnx(spec: NetworkSpec, path: Path, trace_sizes: dict[str, int], device: torch.device) -> Path:
    """Trace ``spec.module`` at ``trace_sizes`` and write a cleaned-up graph to ``path``.

    Dims named in the spec stay symbolic (ONNX ``dynamic_axes``); the trace sizes only pick the example.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(spec.sample_inputs(trace_sizes, device))
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter warns about Python-level shape arithmetic it records as graph ops.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module,
                inputs,
                str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        _optimize(raw, path)
    return path


def _optimize(raw: Path, path: Path) -> None:
    """One graphsurgeon pass: clean-up, constant folding (evaluated with onnxruntime), topological sort; then
    ONNX shape inference on the saved file (which also works past protobuf's 2 GB limit).

    One import/export keeps at most two copies of the weights in host memory (the loaded graph and the cleaned
    one): a full-size UNet exports within 24 GiB.
    """
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # folding runs many tiny sessions; keep their chatter out
    graph = gs.import_onnx(onnx.load(str(raw)))  # pulls external data of >2 GB exports into memory
    graph.cleanup().toposort()
    graph.fold_constants(size_threshold=64 * 1024**2, error_ok=True).cleanup().toposort()
    model = gs.export_onnx(graph)
    del graph
    _save(model, path)
    del model
    onnx.shape_inference.infer_shapes_path(str(path), str(path))


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Size of the initializers (``ModelProto.ByteSize`` itself fails beyond protobuf's 2 GB limit)."""
    return sum(tensor.ByteSize() for tensor in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path) -> None:
    data = path.with_name(path.name + DATA_SUFFIX)
    if data.exists():
        data.unlink()
    if _weight_bytes(model) > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))


def parity_cases(spec: NetworkSpec) -> list[tuple[str, dict[str, int]]]:
    """Sizes to check: batch > 1 and non-square where the profile allows, and K/V absent for the denoisers."""
    low, high = spec.profile.min, spec.profile.max
    sizes = dict(spec.profile.opt)
    if "batch" in sizes:
        sizes["batch"] = min(max(2, sizes["batch"]), high["batch"])
    if "width" in sizes:
        # A width other than the height, one step of the UNet's size grid away, inside the profile.
        for width in (sizes["height"] + spec.latent_step, sizes["height"] - spec.latent_step):
            if low["width"] <= width <= high["width"]:
                sizes["width"] = width
                break
        if "image_width" in sizes:
            sizes["image_width"] = sizes["width"] * sizes["image_height"] // sizes["height"]
    cases = [("batch>1, non-square" if sizes.get("width") != sizes.get("height") else "batch>1", sizes)]
    empty_kv = {name: 0 for name in sizes if name.startswith("face_tokens") and low[name] == 0}
    if empty_kv:
        cases.append(("K/V absent", {**sizes, **empty_kv}))
    return cases


@contextmanager
def _exact_fp32():
    """fp32 references without TF32 tensor cores (PyTorch's GPU default for convolutions), as onnxruntime computes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def check_parity(spec: NetworkSpec, path: Path, device: torch.device, seed: int = 1) -> dict[str, Any]:
    """Run the graph in onnxruntime and the module in PyTorch on the same fresh inputs; compare every output.

    The error is ``max|onnx - torch| / max|torch|`` over all outputs, checked against the spec's tolerance for
    the graph's precision.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    precision = spec.outputs[0].dtype
    tolerance = spec.tolerance[precision]
    results = []
    for label, sizes in parity_cases(spec):
        inputs = spec.sample_inputs(sizes, device, seed)
        with _exact_fp32():
            expected = spec.module(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {t.name: x.cpu().numpy() for t, x in zip(spec.inputs, inputs)})
        errors = []
        for reference, value in zip(expected, got):
            reference = reference.float().cpu().numpy()
            scale = max(float(np.abs(reference).max()), 1e-6) if reference.size else 1.0
            errors.append(float(np.abs(value.astype(np.float32) - reference).max(initial=0.0)) / scale)
        results.append({"case": label, "sizes": sizes, "error": max(errors)})
    worst = max(r["error"] for r in results)
    return {"precision": precision, "tolerance": tolerance, "max_error": worst, "passed": worst <= tolerance,
            "cases": results}  # fmt: skip
