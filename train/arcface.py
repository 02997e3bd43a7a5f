"""Differentiable ArcFace networks for the identity loss, loading local weights only.

* :class:`IResNet` - insightface's ``arcface_torch`` backbones (``iresnet50``/``100``...), the networks inside
  insightface packs (``w600k_r50.onnx`` in buffalo_l, ``glintr100.onnx`` in antelopev2). Loads an ``arcface_torch``
  ``.pth``/``.safetensors`` state dict, or the initialisers of the pack's ONNX file.
* :class:`IRSE` - the IR-SE backbone of pSp / InsightFace_Pytorch (``model_ir_se50.pth``), which the authors' ID loss
  uses.

Both take ``(B, 3, 112, 112)`` RGB in [-1, 1] (an aligned crop) and return ``(B, num_features)`` un-normalised
embeddings. The architecture (depths, widths) is read from the weights, so tiny test networks load the same way.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lcmla_sdk.errors import ModelFilesError

ARCHS = {  # name -> (family, blocks per stage); widths (64, 128, 256, 512), 512 features
    "iresnet18": ("iresnet", (2, 2, 2, 2)),
    "iresnet34": ("iresnet", (3, 4, 6, 3)),
    "iresnet50": ("iresnet", (3, 4, 14, 3)),
    "iresnet100": ("iresnet", (3, 13, 30, 3)),
    "ir_se50": ("ir_se", (3, 4, 14, 3)),
    "ir_se100": ("ir_se", (3, 13, 30, 3)),
}
FULL_WIDTHS = (64, 128, 256, 512)


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """arcface_torch's residual unit: BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the shortcut."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs, eps=1e-5)
        self.conv1 = _conv3x3(inputs, width)
        self.bn2 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width, eps=1e-5)
        self.downsample = None
        if stride != 1 or inputs != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, width, 1, stride, bias=False), nn.BatchNorm2d(width, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ArcFaceBackbone(nn.Module):
    """Constructor arguments shared by both families; the loaders read them back from the weights."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 14, 3),
        widths: tuple[int, ...] = FULL_WIDTHS,
        num_features: int = 512,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        self.config = {"layers": list(layers), "widths": list(widths), "num_features": num_features,
                       "input_size": input_size}  # fmt: skip
        # Every stage halves the side; the last feature map is flattened into the embedding layer.
        self.flat_features = widths[-1] * (input_size // 2 ** len(layers)) ** 2


class IResNet(ArcFaceBackbone):
    """arcface_torch's IResNet; state-dict keys match its checkpoints (``conv1``, ``layer1.0.bn1``, ``fc``...)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        layers, widths = self.config["layers"], self.config["widths"]
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        inputs = widths[0]
        for index, (depth, width) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(inputs if b == 0 else width, width, 2 if b == 0 else 1) for b in range(depth)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            inputs = width
        self.bn2 = nn.BatchNorm2d(inputs, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(self.flat_features, self.config["num_features"])
        self.features = nn.BatchNorm1d(self.config["num_features"], eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for index in range(len(self.config["layers"])):
            x = getattr(self, f"layer{index + 1}")(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(1, channels // reduction), 1, bias=False)
        self.fc2 = nn.Conv2d(max(1, channels // reduction), channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(scale))))


class BottleneckIRSE(nn.Module):
    """pSp's ``bottleneck_IR_SE``: BN -> conv -> PReLU -> conv(stride) -> BN -> SE, plus the shortcut."""

    def __init__(self, inputs: int, depth: int, stride: int) -> None:
        super().__init__()
        if inputs == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(inputs, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(inputs), _conv3x3(inputs, depth), nn.PReLU(depth), _conv3x3(depth, depth, stride),
            nn.BatchNorm2d(depth), SEModule(depth),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE(ArcFaceBackbone):
    """pSp's IR-SE ``Backbone`` (without its final l2 normalisation); keys ``input_layer``, ``body``, ``output_layer``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        layers, widths = self.config["layers"], self.config["widths"]
        self.input_layer = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        units, inputs = [], widths[0]
        for depth, width in zip(layers, widths):
            units += [BottleneckIRSE(inputs if u == 0 else width, width, 2 if u == 0 else 1) for u in range(depth)]
            inputs = width
        self.body = nn.Sequential(*units)
        num_features = self.config["num_features"]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(inputs), nn.Dropout(0.0), nn.Flatten(), nn.Linear(self.flat_features, num_features),
            nn.BatchNorm1d(num_features),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def build_arcface(arch: str | dict) -> nn.Module:
    """An ArcFace network with random weights: a name from :data:`ARCHS`, or ``{"family": ..., **constructor}``."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"arcface.arch: {arch!r} is not one of {sorted(ARCHS)}")
        family, layers = ARCHS[arch]
        arch = {"family": family, "layers": layers}
    spec = dict(arch)
    family = spec.pop("family")
    return {"iresnet": IResNet, "ir_se": IRSE}[family](**spec)


def training_arcface(weights: str | None, arch: str | dict | None, seed: int) -> nn.Module:
    """The identity loss's ArcFace: from ``weights``, else ``arch`` with random weights drawn from ``seed`` (the
    global random state is left as it was)."""
    if weights is not None:
        return load_arcface(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_arcface(arch).eval().requires_grad_(False)


def load_arcface(path: str | Path) -> nn.Module:
    """Load ArcFace weights from a local file: ``.onnx`` (insightface pack), ``.safetensors``, or ``.pth``/``.pt``
    (``torch.load(weights_only=True)``). The network is returned in eval mode, frozen, in fp32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFilesError(f"arcface.weights: no such file: {path}")
    if path.suffix == ".onnx":
        model = _from_onnx(path)
    else:
        state = _read_state_dict(path)
        model = _from_state_dict(state, path)
    return model.eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling refusal or corrupt file gets the same clear message
            raise ModelFilesError(f"arcface.weights: {path} is not a weights-only torch file ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFilesError(f"arcface.weights: {path} does not hold a state dict")
    return {re.sub(r"^module\.", "", key): value for key, value in state.items()}


def _from_state_dict(state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    if "conv1.weight" in state and "fc.weight" in state:
        stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"layer(\d+)\.", k))})
        layers = [len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in stages]
        widths = [state[f"layer{s}.0.conv1.weight"].shape[0] for s in stages]
        cls, fc_key = IResNet, "fc.weight"
    elif "input_layer.0.weight" in state and "output_layer.3.weight" in state:
        units = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.")})
        depths = [state[f"body.{u}.res_layer.1.weight"].shape[0] for u in units]
        layers, widths = [], []
        for depth in depths:  # a stage starts where the width changes (first stage: at unit 0)
            if not widths or depth != widths[-1]:
                layers.append(0)
                widths.append(depth)
            layers[-1] += 1
        cls, fc_key = IRSE, "output_layer.3.weight"
    else:
        raise ModelFilesError(
            f"arcface.weights: {path} is neither an arcface_torch IResNet nor a pSp IR-SE state dict "
            f"(first keys: {sorted(state)[:5]})"
        )
    fc = state[fc_key]
    side = math.isqrt(fc.shape[1] // widths[-1])
    model = cls(tuple(layers), tuple(widths), fc.shape[0], side * 2 ** len(layers))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise ModelFilesError(f"arcface.weights: {path} does not match {cls.__name__}: {error}") from None
    return model


# ---------------------------------------------------------------------------- insightface ONNX packs
_PARAM_OPS = ("Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul")


def _onnx_ops(path: Path) -> list[tuple[str, list[np.ndarray], dict]]:
    """The parametrised ops of the graph in node order: (op type, initialiser arrays, attributes)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise ModelFilesError(f"arcface.weights: {path} is not a readable ONNX model ({error})") from None
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    ops: list[tuple[str, list[np.ndarray], dict]] = []
    for node in graph.node:
        params = [arrays[name] for name in node.input if name in arrays]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in _PARAM_OPS:
            ops.append((node.op_type, params, attrs))
        elif node.op_type == "Add" and params and ops and ops[-1][0] == "MatMul":
            ops[-1][1].append(params[0])  # MatMul + Add is a Linear's bias
    return ops


class _OpReader:
    """Walks the parametrised ops; every mismatch names the file and the position."""

    def __init__(self, ops: list, path: Path) -> None:
        self.ops, self.path, self.position = ops, path, 0

    def peek(self, offset: int = 0) -> str | None:
        index = self.position + offset
        return self.ops[index][0] if index < len(self.ops) else None

    def take(self, *op_types: str) -> tuple[str, list[np.ndarray], dict]:
        if self.peek() not in op_types:
            raise ModelFilesError(
                f"arcface.weights: {self.path} is not an IResNet recognition model (such as buffalo_l's "
                f"w600k_r50.onnx or antelopev2's glintr100.onnx): expected {'/'.join(op_types)} at parametrised op "
                f"{self.position}, found {self.peek()}"
            )
        self.position += 1
        return self.ops[self.position - 1]


def _from_onnx(path: Path) -> IResNet:
    """Rebuild an IResNet from an insightface recognition ONNX (torch export; conv+BN pairs may be fused)."""
    ops = _onnx_ops(path)
    layers, widths = _iresnet_shape(_OpReader(ops, path))
    reader = _OpReader(ops, path)
    _, params, attrs = next(op for op in ops if op[0] in ("Gemm", "MatMul"))
    in_features, out_features = params[0].shape[::-1] if attrs.get("transB", 0) else params[0].shape
    side = math.isqrt(in_features // widths[-1])
    model = IResNet(tuple(layers), tuple(widths), out_features, side * 2 ** len(layers))
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.PReLU, nn.Linear))]
    index = 0
    with torch.no_grad():
        while index < len(modules):
            module = modules[index]
            following = modules[index + 1] if index + 1 < len(modules) else None
            if isinstance(module, nn.Conv2d):
                _, params, _ = reader.take("Conv")
                module.weight.copy_(torch.tensor(params[0]))
                if len(params) > 1:  # the exporter folded the following BatchNorm into this conv
                    _set_identity_batchnorm(following, params[1])
                    index += 1
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                _, params, attrs = reader.take("BatchNormalization")
                for tensor, value in zip((module.weight, module.bias, module.running_mean, module.running_var), params):
                    tensor.copy_(torch.tensor(value))
                module.eps = float(attrs.get("epsilon", 1e-5))
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(torch.tensor(reader.take("PRelu")[1][0]).reshape(-1))
            else:
                op_type, params, attrs = reader.take("Gemm", "MatMul")
                transposed = op_type == "Gemm" and attrs.get("transB", 0)
                module.weight.copy_(torch.tensor(params[0] if transposed else params[0].T))
                module.bias.copy_(torch.tensor(params[1]))
            index += 1
    if reader.peek() is not None:
        raise ModelFilesError(f"arcface.weights: {path}: {len(ops) - reader.position} parametrised ops left over")
    return model


def _set_identity_batchnorm(norm: nn.BatchNorm2d, bias: np.ndarray) -> None:
    """A BatchNorm that adds ``bias`` and nothing else (its scale was folded into the preceding conv)."""
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0)
    norm.weight.fill_(math.sqrt(1.0 + norm.eps))
    norm.bias.copy_(torch.tensor(bias))


def _iresnet_shape(reader: _OpReader) -> tuple[list[int], list[int]]:
    """(blocks per stage, stage widths) from the op sequence: a block starts with a BatchNorm followed by a conv,
    and a block with a downsampling conv after its main branch starts a new stage."""

    def conv_then_norm() -> int:
        params = reader.take("Conv")[1]
        if len(params) == 1:  # every IResNet conv is followed by a BatchNorm, unless the exporter folded it in
            reader.take("BatchNormalization")
        return params[0].shape[0]

    conv_then_norm()
    reader.take("PRelu")
    layers: list[int] = []
    widths: list[int] = []
    while reader.peek() == "BatchNormalization" and reader.peek(1) == "Conv":
        reader.take("BatchNormalization")
        width = conv_then_norm()
        reader.take("PRelu")
        conv_then_norm()
        if reader.peek() == "Conv":  # the shortcut's 1x1 conv: a new stage begins with this block
            conv_then_norm()
            layers.append(0)
            widths.append(width)
        if not layers:
            raise ModelFilesError(f"arcface.weights: {reader.path}: the first block has no downsampling shortcut")
        layers[-1] += 1
    reader.take("BatchNormalization")
    reader.take("Gemm", "MatMul")
    reader.take("BatchNormalization")
    return layers, widths
