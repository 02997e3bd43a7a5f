"""TensorRT-RTX engines from graphs of the tiny architecture.

Its ahead-of-time compiler needs no GPU, so every graph is parsed and every profile built here, and the parsed
network's inputs and outputs are checked against the manifest. The graphs are test_export.py's, of the shallow tiny
model (conftest.py): the tiny architecture with one or two transformer layers per block, 17 K/V layers instead of 70,
the same operations and kinds of inputs and outputs, and about 30 s of compiling instead of over 2 minutes (the
70-layer graphs are built by test_export.py's test_engines_match_pytorch, on a GPU that TensorRT-RTX runs on).
Deserialising an engine needs a GPU: the refusal on a GPU the engines do not support is a ``gpu`` test (an H100 or
H200, compute capability 9.0, is one).
"""

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lcmla_sdk import ModelFilesError, Personalizer
from lcmla_sdk.cli import app
from lcmla_sdk.engines import BuildOptions, EngineMismatchError, TensorRTRTX, build_engines
from lcmla_sdk.engines.backends import RTX_COMPUTE_CAPABILITIES, current_gpu, keep_normalisation_fp32
from lcmla_sdk.engines.engine import Engine, build_engine, check_io, tensor_io
from lcmla_sdk.export import ShapeRanges, export_model
from lcmla_sdk.integrity import sha256_file
from lcmla_sdk.manifest import Manifest, TensorInfo

from conftest import EXPORT_RANGES

trt = pytest.importorskip("tensorrt_rtx_bindings", reason=TensorRTRTX.install_hint)


@pytest.fixture(scope="module")
def built(shallow_export, tmp_path_factory):
    """A copy of the shallow tiny model's export (fp32) with a TensorRT-RTX engine built for every graph, here, without
    a GPU."""
    folder = Path(shutil.copytree(shallow_export.folder, tmp_path_factory.mktemp("rtx") / "tiny"))
    lines = []
    manifest = build_engines(folder, BuildOptions("fp32"), log=lines.append, backend=TensorRTRTX())
    return folder, manifest, lines


def test_every_graph_parses_and_every_profile_builds(built):
    folder, manifest, lines = built
    assert lines == [f"{name}: built {name}/model.plan" for name in manifest.networks]
    assert manifest.tensorrt == {"backend": "tensorrt-rtx", "version": trt.__version__,
                                 "compute_capabilities": list(RTX_COMPUTE_CAPABILITIES),
                                 "options": {"precision": "fp32", "optimization_level": 3, "workspace_gib": None}}  # fmt: skip
    for name, entry in Manifest.load(folder).networks.items():
        assert entry.engine_sha256 == sha256_file(folder / entry.engine) and entry.cache_key, name
    assert not (folder / "timing.cache").exists()  # TensorRT-RTX builds without one (it would look for a GPU)
    Manifest.load(folder).verify(folder, "tensorrt-rtx")


def test_an_unchanged_folder_is_not_rebuilt(built):
    folder, manifest, _ = built
    lines = []
    again = build_engines(folder, BuildOptions("fp32"), log=lines.append, backend=TensorRTRTX())
    assert lines == [f"{name}: engine up to date" for name in manifest.networks]
    assert {n: e.cache_key for n, e in again.networks.items()} == {n: e.cache_key for n, e in manifest.networks.items()}


def test_parsed_networks_have_the_manifests_io_and_a_wrong_manifest_is_named(built):
    folder, manifest, _ = built
    for name, entry in manifest.networks.items():
        network = _parse(folder / entry.onnx)
        check_io(tensor_io(trt, network), entry, "parsed")  # what the build checked, once more, explicitly
        assert [network.get_input(i).name for i in range(network.num_inputs)] == [t.name for t in entry.inputs], name
    entry = manifest.networks["denoiser"]
    wrong = type(entry)(**{**entry.__dict__, "inputs": [TensorInfo("latent", "float16", entry.inputs[0].dims),
                                                          *entry.inputs[1:]]})  # fmt: skip
    with pytest.raises(ModelFilesError, match=r"networks\['denoiser'\]: .* latent: manifest input float16 "
                                              r"\('batch', 4, 'height', 'width'\), found \('input', 'float32'"):
        build_engine(TensorRTRTX(), folder, wrong, BuildOptions("fp32"), folder / "denoiser" / "wrong.plan")
    assert not (folder / "denoiser" / "wrong.plan").exists()


def test_fp16_normalisation_layers_compute_in_fp32_and_the_engines_build(tmp_path, shallow_tiny_half):
    export_model(shallow_tiny_half, tmp_path, ShapeRanges(**EXPORT_RANGES), ["adapter"], log=lambda _: None)
    network = _parse(tmp_path / "adapter" / "model.onnx")
    layers = lambda: [network.get_layer(i) for i in range(network.num_layers)]  # noqa: E731
    norms = [layer for layer in layers() if layer.type == trt.LayerType.NORMALIZATION]
    assert norms and all(layer.get_input(0).dtype == trt.float16 for layer in norms)  # as parsed: fp16
    keep_normalisation_fp32(trt, network)
    for norm in norms:
        assert all(norm.get_input(i).dtype == trt.float32 for i in range(norm.num_inputs)) and norm.get_output(0).dtype == trt.float32
        readers = [layer for layer in layers() for i in range(layer.num_inputs)
                   if layer.get_input(i) is not None and layer.get_input(i).name == norm.get_output(0).name]  # fmt: skip
        assert [r.type for r in readers] == [trt.LayerType.CAST] and readers[0].get_output(0).dtype == trt.float16
    manifest = build_engines(tmp_path, BuildOptions("fp16"), log=lambda _: None, backend=TensorRTRTX())
    assert manifest.networks["adapter"].engine == "adapter/model.plan"
    with pytest.raises(ValueError, match="precision: fp32 asked, but TensorRT-RTX networks are strongly typed"):
        build_engines(tmp_path, BuildOptions("fp32"), log=lambda _: None, backend=TensorRTRTX())


def test_cli_builds_for_the_compute_capabilities_asked(tmp_path):
    args = ["export", "--model", "tiny", "--networks", "vae_encoder", "--height", "64", "--width", "64", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--backend", "tensorrt-rtx",
                                      "--compute-capability", "8.9", "--compute-capability", "8.6"])  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = Manifest.load(tmp_path / "a").tensorrt
    assert recorded["backend"] == "tensorrt-rtx" and recorded["compute_capabilities"] == ["8.9", "8.6"]
    hopper = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--backend", "tensorrt-rtx",
                                      "--compute-capability", "9.0"])  # fmt: skip
    assert hopper.exit_code == 2 and "compute_capabilities: ['9.0']; TensorRT-RTX targets" in hopper.output
    other = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--compute-capability", "8.9"])
    assert other.exit_code == 2 and "only for --backend tensorrt-rtx" in other.output
    unknown = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d"), "--backend", "tensorrt-llm"])
    assert unknown.exit_code == 2 and "backend: 'tensorrt-llm' is not one of" in unknown.output


def test_without_a_gpu_loading_is_refused_in_one_line(built, shallow_tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu test below covers loading")
    folder, _, _ = built
    with pytest.raises(EngineMismatchError) as error:
        shallow_tiny.use_exported(folder, backend="tensorrt-rtx")
    assert str(error.value) == f"{folder}: no CUDA GPU to run TensorRT-RTX engines on"


@pytest.mark.gpu
def test_a_gpu_the_engines_do_not_support_is_refused_at_load_in_one_line(built):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu, capability = current_gpu()
    if capability in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"{gpu} ({capability}) runs these engines; the refusal needs a GPU that does not (an H100: 9.0)")
    folder, manifest, _ = built
    expected = (f"TensorRT-RTX engines cannot run on {gpu}, which has compute capability {capability}; they support "
                f"compute capabilities {' '.join(RTX_COMPUTE_CAPABILITIES)}")  # fmt: skip
    with pytest.raises(EngineMismatchError) as error:
        Personalizer.from_pretrained("tiny", device="cuda").use_exported(folder, backend="tensorrt-rtx")
    assert "\n" not in str(error.value) and expected in str(error.value)
    # The engine itself, past the manifest: TensorRT-RTX's own validity check refuses it before deserialising.
    entry = manifest.networks["adapter"]
    with pytest.raises(EngineMismatchError) as error:
        Engine(folder / entry.engine, entry, TensorRTRTX()).load()
    assert "\n" not in str(error.value) and str(error.value) == f"{folder / entry.engine}: {expected}" + (
        " (on this GPU use the torch or tensorrt backend)")


_KEEP = []  # builders and parsers of the parsed networks (a parser owns the weights its network points to)


def _parse(path):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(TensorRTRTX().network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    _KEEP.append((logger, builder, parser))
    return network
