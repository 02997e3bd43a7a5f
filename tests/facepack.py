"""Writes a synthetic insightface model pack: ONNX files with the signatures insightface's model_zoo routes on.

* ``det_10g.onnx``: an SCRFD-style detector, input ``(1, 3, 640, 640)``, nine outputs (scores, box distances and
  keypoint offsets for strides 8, 16 and 32, two anchors per cell). Its outputs are constants placed on chosen
  anchors (plus 0 x the input, so the graph consumes its image), so detections are known in advance.
* ``w600k_r50.onnx``: an ArcFace-style recogniser, input ``(N, 3, 112, 112)``, output ``(N, 512)``: an 8x8 average
  pool and a seeded random projection, so the embedding depends on the aligned crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2


@dataclass
class FakeFace:
    """A face in detector-input pixels (the image letterboxed into 640 x 640)."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 0.9


def astronaut_face(scale: float = DET_SIZE / 512) -> FakeFace:
    """Where the face is in scikit-image's 512 x 512 astronaut photo (hand-measured), in detector pixels."""
    box = (175, 60, 273, 180)
    landmarks = ((203, 101), (247, 102), (223, 125), (206, 142), (242, 142))
    return FakeFace(tuple(v * scale for v in box), tuple((x * scale, y * scale) for x, y in landmarks))


def _detector_outputs(faces: list[FakeFace]) -> list[np.ndarray]:
    stride = STRIDES[-1]  # every face sits on a stride-32 anchor; other strides score zero
    scores, boxes, kps = [], [], []
    for s in STRIDES:
        count = (DET_SIZE // s) ** 2 * ANCHORS
        scores.append(np.zeros((count, 1), np.float32))
        boxes.append(np.zeros((count, 4), np.float32))
        kps.append(np.zeros((count, 10), np.float32))
    for face in faces:
        x1, y1, x2, y2 = face.box
        col, row = int((x1 + x2) / 2 // stride), int((y1 + y2) / 2 // stride)
        cx, cy = col * stride, row * stride
        index = (row * (DET_SIZE // stride) + col) * ANCHORS
        scores[-1][index] = face.score
        boxes[-1][index] = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy]) / stride
        kps[-1][index] = np.array([[x - cx, y - cy] for x, y in face.landmarks]).reshape(-1) / stride
    return scores + boxes + kps


def write_detector(path: Path, faces: list[FakeFace]) -> None:
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["image_mean"], keepdims=0),
        helper.make_node("Mul", ["image_mean", "zero"], ["nothing"]),
    ]
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outputs = []
    for index, value in enumerate(_detector_outputs(faces)):
        name = f"out{index}"
        initializers.append(numpy_helper.from_array(value, f"const{index}"))
        nodes.append(helper.make_node("Add", [f"const{index}", "nothing"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "scrfd", [image], outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def write_recognizer(path: Path, seed: int = 0) -> None:
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])
    projection = np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "arcface", [image], [embedding], [numpy_helper.from_array(projection, "projection")]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def write_face_pack(folder: Path, faces: list[FakeFace]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_detector(folder / "det_10g.onnx", faces)
    write_recognizer(folder / "w600k_r50.onnx")
    return folder
