"""ONNX export of the shallow tiny model (conftest.py: the tiny architecture with 17 K/V layers instead of 70): graphs,
parity through onnxruntime, manifest, runtime contract, CLI."""

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from lcmla_sdk import IntegrityError, ModelFilesError, Personalizer
from lcmla_sdk.cli import app
from lcmla_sdk.engines import BuildOptions, EngineMismatchError, TensorRT, TensorRTRTX, TensorRTUnavailable
from lcmla_sdk.engines.engine import engine_cache_key
from lcmla_sdk.export import ShapeRanges, build_specs, export_model
from lcmla_sdk.integrity import sha256_file
from lcmla_sdk.manifest import Manifest

from conftest import EXPORT_NETWORKS as NETWORKS, EXPORT_RANGES, build_shallow_tiny

RANGES = ShapeRanges(**EXPORT_RANGES)


@pytest.fixture(scope="module")
def exported(shallow_export):
    """``NETWORKS`` of the shallow tiny model, exported once with parity checks (an :class:`ExportReport`)."""
    return shallow_export


def test_every_graph_matches_pytorch_within_its_stated_tolerance(exported):
    assert exported.failed_parity == []
    for name in NETWORKS:
        parity = exported.manifest.networks[name].parity
        assert parity["passed"] and parity["max_error"] <= parity["tolerance"] == 1e-4, name
        assert all(case["sizes"].get("batch", 2) == 2 for case in parity["cases"]), name
    denoiser_cases = {c["case"]: c["sizes"] for c in exported.manifest.networks["denoiser"].parity["cases"]}
    assert denoiser_cases["batch>1, non-square"]["width"] != denoiser_cases["batch>1, non-square"]["height"]
    assert denoiser_cases["K/V absent"]["face_tokens_1"] == 0 == denoiser_cases["K/V absent"]["face_tokens_2"]


def test_manifest_is_the_contract_names_dtypes_profiles_hashes(exported):
    manifest = Manifest.load(exported.folder)
    assert manifest.model_fingerprint == exported.manifest.model_fingerprint and manifest.precision == "fp32"
    assert manifest.versions["onnx_opset"] == "17" and manifest.tensorrt is None
    denoiser = manifest.networks["denoiser"]
    names = [t.name for t in denoiser.inputs]
    assert names[:8] == ["latent", "timestep", "text", "pooled_text", "time_ids", "image_tokens", "adapter_scale", "freeu"]
    assert names[8:] == [f"{kind}_{i:02d}" for i in range(17) for kind in "kv"]  # one K and V per K/V layer
    assert [t.name for t in manifest.networks["kv_encoder"].outputs] == names[8:]
    assert denoiser.input_shapes("min")["k_00"] == (1, 0, 64)  # K/V may be absent
    assert denoiser.input_shapes("max")["latent"] == (4, 4, 16, 20)  # 2 x 2 images for CFG, 128 x 160 px
    for name, entry in manifest.networks.items():
        assert entry.onnx_sha256 == sha256_file(exported.folder / entry.onnx), name


def test_graphs_are_portable_onnx_with_symbolic_dims(exported):
    from polygraphy.backend.onnx.util import get_input_metadata

    for name in ("denoiser", "kv_encoder"):
        path = exported.folder / name / "model.onnx"
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert model.opset_import[0].version == 17
        ops = {node.op_type for node in model.graph.node}
        assert {"LayerNormalization", "MatMul", "Softmax"} <= ops
        assert not {"Attention", "MultiHeadAttention", "ScaledDotProductAttention"} & ops
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        metadata = get_input_metadata(model.graph)  # polygraphy's view of the inputs, no TensorRT needed
        entry = exported.manifest.networks[name]
        assert list(metadata.keys()) == [t.name for t in entry.inputs]
        assert tuple(metadata["latent"].shape)[0] == "batch"


@pytest.fixture(scope="module")
def onnx_tiny(exported) -> Personalizer:
    """The shallow tiny model running the exported graphs through onnxruntime (tests only call it)."""
    model = build_shallow_tiny()
    model.use_exported(exported.folder, backend="onnxruntime")
    return model


def test_exported_graphs_run_the_sampling_loop_like_pytorch(shallow_tiny, onnx_tiny, face):
    reference = shallow_tiny.generate(face, "an oil painting of a face", seed=5, steps=2, output="latent")
    assert type(onnx_tiny.denoiser).__name__ == "GraphDenoiser"
    from_graphs = onnx_tiny.generate(face, "an oil painting of a face", seed=5, steps=2, output="latent")
    torch.testing.assert_close(from_graphs, reference, rtol=1e-3, atol=1e-3)
    no_kv = onnx_tiny.generate(face, "a face", seed=5, steps=1, output="latent", use_kv=False)
    assert torch.isfinite(no_kv).all()


def test_runtime_refuses_a_folder_made_for_another_model(exported):
    other = build_shallow_tiny(seed=1)
    with pytest.raises(EngineMismatchError, match="model fingerprint"):
        other.use_exported(exported.folder, backend="onnxruntime")


def test_tensorrt_backend_without_tensorrt_says_how_to_install(exported, shallow_tiny):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(TensorRTUnavailable, match="pip install 'lcmla\\[tensorrt\\]'"):
            shallow_tiny.use_exported(exported.folder, backend="tensorrt")
    else:
        with pytest.raises(EngineMismatchError, match="no TensorRT engines"):
            shallow_tiny.use_exported(exported.folder, backend="tensorrt")


def test_engine_cache_key_covers_graph_shapes_options_backend_version_and_target(exported):
    entry = exported.manifest.networks["adapter"]
    record = {"backend": "tensorrt", "version": "10.13", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    key = engine_cache_key(entry, BuildOptions("fp16"), record)
    assert key == engine_cache_key(entry, BuildOptions("fp16"), dict(record))
    wider = json.loads(json.dumps(entry.profile.max))
    wider["batch"] += 1
    other_shapes = type(entry)(**{**entry.__dict__, "profile": type(entry.profile)(entry.profile.min, entry.profile.opt, wider)})
    other_graph = type(entry)(**{**entry.__dict__, "onnx_sha256": "0" * 64})
    variants = [
        engine_cache_key(other_shapes, BuildOptions("fp16"), record),
        engine_cache_key(other_graph, BuildOptions("fp16"), record),
        engine_cache_key(entry, BuildOptions("fp32"), record),
        engine_cache_key(entry, BuildOptions("fp16", optimization_level=5), record),
        engine_cache_key(entry, BuildOptions("fp16"), {**record, "version": "10.14"}),
        engine_cache_key(entry, BuildOptions("fp16"), {**record, "compute_capability": "8.0"}),
        engine_cache_key(entry, BuildOptions("fp16"), {"backend": "tensorrt-rtx", "version": "10.13",
                                                       "compute_capabilities": ["8.9"]}),
    ]
    assert len({key, *variants}) == 8


def test_fp16_graphs_export_and_match_within_fp16_tolerance(tmp_path, shallow_tiny_half):
    report = export_model(shallow_tiny_half, tmp_path, RANGES, ["adapter", "text_encoder_2"], check=True, log=lambda _: None)
    adapter, text = report.manifest.networks["adapter"], report.manifest.networks["text_encoder_2"]
    assert adapter.parity["precision"] == "float16" and adapter.parity["passed"]
    assert all(t.dtype == "float16" for t in adapter.inputs + adapter.outputs)
    # Text encoders stay fp32 graphs (see specs.py); their parity is checked at fp32 tolerance.
    assert text.parity["precision"] == "float32" and text.parity["passed"]
    assert report.manifest.precision == "fp16"


def test_specs_reject_bad_ranges_and_unknown_networks(tiny, tmp_path):
    with pytest.raises(ValueError, match="^batch:"):
        ShapeRanges(batch=(2, 1, 4))
    with pytest.raises(ValueError, match="^networks:"):
        export_model(tiny, tmp_path, RANGES, ["unet"], log=lambda _: None)
    assert set(build_specs(tiny, RANGES)) == set(NETWORKS) | {"denoiser_lcm"}


def test_cli_onnx_only_succeeds_and_full_export_needs_tensorrt(tmp_path):
    runner = CliRunner()
    args = ["export", "--model", "tiny", "--networks", "vae_encoder", "--height", "64:128:128", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--onnx-only", "--check"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "manifest.json").is_file() and (tmp_path / "a" / "vae_encoder" / "model.onnx").is_file()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
        assert result.exit_code == 3 and "TensorRT is not installed" in result.output
        assert (tmp_path / "b" / "vae_encoder" / "model.onnx").is_file()  # the ONNX is kept
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--height", "100", "--onnx-only"])
    assert bad.exit_code == 2 and "height" in bad.output and not (tmp_path / "c").exists()


def test_ranges_parse_and_static_conflict(tmp_path):
    result = CliRunner().invoke(
        app, ["export", "--model", "tiny", "--static", "128", "128", "--height", "64", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "static" in result.output
    result = CliRunner().invoke(app, ["export", "--model", "tiny", "--references", "2:1:3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "references: range must satisfy" in result.output


# ---------------------------------------------------------------------------------------------- TensorRT
def _engines_and_gpu(backend):
    """Skip unless ``backend``'s module is installed and there is a GPU it runs engines on."""
    pytest.importorskip(backend.module_name, reason=f"{backend.label} is not installed: {backend.install_hint}")
    if not torch.cuda.is_available():
        pytest.skip(f"{backend.label} engines need a CUDA GPU")
    refusals = backend.refusals(backend.record(importlib.import_module(backend.module_name)))
    if refusals:
        pytest.skip(refusals[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [TensorRT(), TensorRTRTX()], ids=lambda b: b.name)
def test_engines_match_pytorch(tmp_path, backend):
    _engines_and_gpu(backend)
    from lcmla_sdk.engines import build_engines

    # A blank image has no face: detection off, the comparison is about the networks.
    model = Personalizer.from_pretrained("tiny", device="cuda", dtype=torch.float16, faces=None)
    export_model(model, tmp_path, RANGES, ["denoiser", "kv_encoder"], log=lambda _: None)
    manifest = build_engines(tmp_path, BuildOptions("fp16"), log=lambda _: None, backend=backend)
    assert manifest.tensorrt["backend"] == backend.name and all(e.engine for e in manifest.networks.values())
    reference = model.generate(np.zeros((64, 64, 3), np.uint8), "a face", seed=0, steps=2, output="latent")
    model.use_exported(tmp_path, backend=backend.name)
    engines = model.generate(np.zeros((64, 64, 3), np.uint8), "a face", seed=0, steps=2, output="latent")
    torch.testing.assert_close(engines.float(), reference.float(), rtol=5e-2, atol=5e-2)
    rebuilt = build_engines(tmp_path, BuildOptions("fp16"), log=lambda _: None, backend=backend)  # cache hit
    assert {n: e.engine_sha256 for n, e in rebuilt.networks.items()} == {
        n: e.engine_sha256 for n, e in manifest.networks.items()
    }


@pytest.mark.gpu
def test_engine_folder_from_another_gpu_or_tensorrt_is_refused(tmp_path, exported):
    _engines_and_gpu(TensorRT())
    manifest = Manifest.load(exported.folder)
    manifest.tensorrt = {"version": "0.0", "gpu": "Other GPU", "compute_capability": "1.0"}
    folder = tmp_path / "copy"
    folder.mkdir()
    manifest.save(folder)
    model = Personalizer.from_pretrained("tiny", device="cuda")
    with pytest.raises(EngineMismatchError, match="version: built for 0.0"):
        model.use_exported(folder, backend="tensorrt")


def test_manifest_loading_errors(tmp_path):
    with pytest.raises(ModelFilesError, match="lcmla export"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(ModelFilesError, match="schema 99"):
        Manifest.load(Path(tmp_path))


@torch.no_grad()
def test_exported_networks_hand_out_outputs_that_the_next_call_does_not_touch(onnx_tiny):
    from conftest import unet_inputs

    first_inputs, second_inputs = unet_inputs(onnx_tiny, seed=1), unet_inputs(onnx_tiny, seed=2)
    for network in (onnx_tiny.denoiser, onnx_tiny.kv_encoder):
        first = network(*first_inputs)
        kept = [x.clone() for x in first] if isinstance(first, tuple) else first.clone()
        second = network(*second_inputs)
        if isinstance(first, tuple):
            assert all(torch.equal(a, b) for a, b in zip(first, kept)) and not torch.equal(first[0], second[0])
        else:
            assert torch.equal(first, kept) and not torch.equal(first, second)


# ------------------------------------------------------------------ integrity of export folders (issue 12)
@pytest.fixture
def folder_copy(exported, tmp_path):
    return Path(shutil.copytree(exported.folder, tmp_path / "tiny"))


@pytest.fixture
def manifest_copy(exported, tmp_path):
    """The export folder with a manifest of its own and links to the graphs: for tests that change the manifest
    only (copying the graphs dominated their time)."""
    folder = Path(shutil.copytree(exported.folder, tmp_path / "tiny", copy_function=os.symlink))
    (folder / "manifest.json").unlink()
    shutil.copyfile(exported.folder / "manifest.json", folder / "manifest.json")
    return folder


def edit(folder, change):
    raw = json.loads((folder / "manifest.json").read_text())
    change(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_a_modified_graph_or_a_wrong_recorded_hash_is_refused(folder_copy):
    fresh = build_shallow_tiny()  # it takes the graphs at the end: not the shared one
    graph = folder_copy / "denoiser" / "model.onnx"
    recorded = json.loads((folder_copy / "manifest.json").read_text())["networks"]["denoiser"]["onnx_sha256"]
    with graph.open("ab") as handle:
        handle.write(b"\0")
    found = sha256_file(graph)
    with pytest.raises(IntegrityError, match=re.escape(f"{graph}: sha256 {found} does not match {recorded} recorded in")):
        fresh.use_exported(folder_copy, backend="onnxruntime")
    graph.write_bytes(graph.read_bytes()[:-1])  # intact again
    adapter = folder_copy / "adapter" / "model.onnx"
    edit(folder_copy, lambda m: m["networks"]["adapter"].update(onnx_sha256="0" * 64))
    with pytest.raises(IntegrityError, match=re.escape(f"{adapter}: sha256 {sha256_file(adapter)} does not match {'0' * 64}")):
        fresh.use_exported(folder_copy, backend="onnxruntime")
    fresh.use_exported(folder_copy, backend="onnxruntime", verify=False)  # told to trust the manifest
    assert type(fresh.adapter).__name__ == "GraphAdapter"


@pytest.mark.parametrize(
    "change, message",
    [(lambda m: m["networks"]["denoiser"]["inputs"][0].update(dtype="float12"),
      "networks['denoiser'].inputs[0].dtype: expected one of ['float16', 'bfloat16', 'float32'"),
     (lambda m: m["networks"]["denoiser"].pop("profile"), "networks['denoiser']: missing required key ['profile']"),
     (lambda m: m["networks"]["denoiser"].update(onnx=7), "networks['denoiser'].onnx: expected a string, got 7 (int)"),
     (lambda m: m["networks"]["denoiser"].update(onnx="../elsewhere.onnx"), "networks['denoiser'].onnx: expected a path inside the folder"),
     (lambda m: m["networks"]["denoiser"]["profile"]["max"].update(batch=-1), "networks['denoiser'].profile.max['batch']: expected a non-negative integer"),
     (lambda m: m.update(precision="fp8"), "precision: expected one of ['fp16', 'fp32'], got 'fp8' (str)"),
     (lambda m: m.update(networks=[]), "networks: expected an object, got [] (list)"),
     (lambda m: m.update(extra=1), "top level: unknown key ['extra']"),
     (lambda m: m["networks"]["denoiser"].update(onnx_sha256="abc"), "networks['denoiser'].onnx_sha256: expected sha256s joined by ':'")],
)  # fmt: skip
def test_manifest_schema_errors_name_the_field(manifest_copy, change, message):
    edit(manifest_copy, change)
    with pytest.raises(ModelFilesError) as error:
        Manifest.load(manifest_copy)
    assert str(error.value).startswith(f"{manifest_copy / 'manifest.json'}: {message}"), str(error.value)


def test_missing_graphs_and_wrong_dtypes_are_named_before_onnxruntime_runs(folder_copy, shallow_tiny):
    # use_exported fails before it changes the model, so the shared one serves.
    text = (folder_copy / "manifest.json").read_bytes()
    (folder_copy / "manifest.json").write_bytes(b"\xff not json")
    with pytest.raises(ModelFilesError, match="manifest.json: invalid JSON"):
        Manifest.load(folder_copy)
    (folder_copy / "manifest.json").write_bytes(text)
    (folder_copy / "kv_encoder" / "model.onnx").unlink()
    with pytest.raises(ModelFilesError, match=re.escape(f"networks['kv_encoder'].onnx: {folder_copy / 'kv_encoder' / 'model.onnx'} is missing")):
        shallow_tiny.use_exported(folder_copy, backend="onnxruntime")
    edit(folder_copy, lambda m: m["networks"].pop("kv_encoder"))
    edit(folder_copy, lambda m: m["networks"]["denoiser"]["inputs"][0].update(dtype="float64"))
    with pytest.raises(ModelFilesError, match=re.escape(
        "networks['denoiser'].inputs[0]: 'latent' of dtype float64, but the graph "
        f"{folder_copy / 'denoiser' / 'model.onnx'} has dtype float32"
    )):  # fmt: skip
        shallow_tiny.use_exported(folder_copy, backend="onnxruntime")


def test_engines_are_verified_for_the_tensorrt_backend(manifest_copy):
    manifest = Manifest.load(manifest_copy)
    with pytest.raises(ModelFilesError, match=r"networks\['adapter'\].engine: not built"):
        manifest.verify(manifest_copy, "tensorrt")
    for name, entry in manifest.networks.items():
        (manifest_copy / name / "model.plan").write_bytes(name.encode())
        entry.engine, entry.engine_sha256 = f"{name}/model.plan", sha256_file(manifest_copy / name / "model.plan")
    manifest.verify(manifest_copy, "tensorrt")
    (manifest_copy / "adapter" / "model.plan").write_bytes(b"another engine")
    with pytest.raises(IntegrityError, match="adapter/model.plan: sha256"):
        manifest.verify(manifest_copy, "tensorrt")
