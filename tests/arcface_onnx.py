"""Writes an IResNet as an insightface-style recognition ONNX (what torch's exporter makes of arcface_torch models:
conv+BN pairs folded into biased convs, the other BatchNorms kept, numeric initialiser names)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper, save


def write_iresnet_onnx(model, path, fold_batchnorm: bool = True) -> None:
    names = (f"onnx::{i}" for i in itertools.count(100))
    nodes, inits = [], []

    def const(array) -> str:
        name = next(names)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(op, inputs, **attrs) -> str:
        out = next(names)
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def batchnorm(x, bn) -> str:
        params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return node("BatchNormalization", [x, *(const(p.detach().numpy()) for p in params)], epsilon=bn.eps)

    def conv(x, conv_module, bn) -> str:
        weight = conv_module.weight.detach().numpy()
        attrs = {"kernel_shape": list(weight.shape[2:]), "strides": list(conv_module.stride),
                 "pads": [conv_module.padding[0]] * 4}  # fmt: skip
        if not fold_batchnorm:
            return batchnorm(node("Conv", [x, const(weight)], **attrs), bn)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        bias = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        return node("Conv", [x, const(weight * scale[:, None, None, None]), const(bias)], **attrs)

    def prelu(x, module) -> str:
        return node("PRelu", [x, const(module.weight.detach().numpy().reshape(-1, 1, 1))])

    x = prelu(conv("input.1", model.conv1, model.bn1), model.prelu)
    for index in range(len(model.config["layers"])):
        for block in getattr(model, f"layer{index + 1}"):
            out = prelu(conv(batchnorm(x, block.bn1), block.conv1, block.bn2), block.prelu)
            out = conv(out, block.conv2, block.bn3)
            shortcut = x if block.downsample is None else conv(x, block.downsample[0], block.downsample[1])
            x = node("Add", [out, shortcut])
    x = node("Flatten", [batchnorm(x, model.bn2)], axis=1)
    x = node("Gemm", [x, const(model.fc.weight.detach().numpy()), const(model.fc.bias.detach().numpy())], transB=1)
    x = batchnorm(x, model.features)
    size = model.config["input_size"]
    graph = helper.make_graph(
        nodes, "recognition", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", model.config["num_features"]])], inits,
    )  # fmt: skip
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
