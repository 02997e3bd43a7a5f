"""Compiled networks (``backend="torch"``): functions compiled ahead of time, the folder's contract, refusals, and
(on a GPU) compiled = uncompiled and the build -> load round trip in a second process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lcmla_sdk import Personalizer
from lcmla_sdk.engines import EngineMismatchError
from lcmla_sdk.compiling import AheadOfTime, CompiledNetwork
from lcmla_sdk.engines.compiled import (
    MANIFEST,
    CompiledShape,
    build_compiled,
    parse_shapes,
    write_manifest,
)
from lcmla_sdk.errors import IntegrityError, ModelFilesError

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
# Inductor reorders and fuses fp16 arithmetic: compiled latents differ from eager ones by rounding, not more.
COMPILE_TOLERANCE = 2e-2


@pytest.fixture
def folder(tmp_path, tiny):
    """A compiled folder for the tiny model whose one function file is empty (what a build writes, minus the code)."""
    path = tmp_path / "compiled"
    path.mkdir()
    (path / "aot-decode-0.bin").write_bytes(b"")
    write_manifest(path, tiny.fingerprint, tiny.device, "tiny", [CompiledShape("fast", 1, 64, 64)], 1.0)
    return path


def _edit(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_loading_a_folder_switches_to_compiled_networks(folder):
    model = Personalizer.from_pretrained("tiny", device="cpu", compiled=folder)
    assert isinstance(model.kv_encoder, CompiledNetwork) and isinstance(model.lcm_denoiser, CompiledNetwork)
    assert model.decoder.compiled
    plain = Personalizer.from_pretrained("tiny", device="cpu")
    assert not isinstance(plain.kv_encoder, CompiledNetwork) and not plain.decoder.compiled  # nothing behind a back


@pytest.mark.parametrize(
    "field, change",
    [
        ("model_fingerprint", lambda m: m.update(model_fingerprint="0" * 64)),
        ("versions.torch", lambda m: m["versions"].update(torch="1.0.0")),
        ("gpu.gpu", lambda m: m["gpu"].update(gpu="NVIDIA Imaginary")),
    ],
)
def test_a_folder_built_for_something_else_is_refused_by_name(folder, tiny, field, change):
    _edit(folder, change)
    with pytest.raises(EngineMismatchError, match=rf"built for {field} .* but this is"):
        tiny.use_exported(folder, backend="torch")
    assert not isinstance(tiny.kv_encoder, CompiledNetwork)


def test_a_mismatch_can_fall_back_to_uncompiled_networks(folder):
    _edit(folder, lambda m: m["versions"].update(torch="1.0.0"))
    with pytest.raises(EngineMismatchError, match="versions.torch"):
        Personalizer.from_pretrained("tiny", device="cpu", compiled=folder)
    fallback = Personalizer.from_pretrained("tiny", device="cpu", compiled=folder, compiled_fallback=True)
    assert not isinstance(fallback.kv_encoder, CompiledNetwork) and not fallback.decoder.compiled


def test_damaged_folders_are_named(folder, tiny):
    (folder / "aot-decode-0.bin").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="aot-decode-0.bin"):
        tiny.use_exported(folder, backend="torch")
    _edit(folder, lambda m: m.pop("cache_key"))
    with pytest.raises(ModelFilesError, match="cache_key"):
        tiny.use_exported(folder, backend="torch")
    (folder / MANIFEST).unlink()
    with pytest.raises(ModelFilesError, match="lcmla export --backend torch"):
        tiny.use_exported(folder, backend="torch")


def test_shapes_are_parsed_and_checked(tiny, tmp_path):
    assert parse_shapes("fast:1,quality:8:768x1024") == [CompiledShape("fast", 1), CompiledShape("quality", 8, 768, 1024)]
    for bad in ("slow:1", "fast", "fast:x", "fast:0", "fast:1:64"):
        with pytest.raises(ValueError, match="shapes"):
            parse_shapes(bad)
    with pytest.raises(ValueError, match="not a multiple"):
        build_compiled("tiny", tmp_path / "out", [CompiledShape("fast", 1, 65, 64)], device="cpu")
    assert not (tmp_path / "out").exists()


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x, pair):
        return self.second(torch.relu(self.first(x) + pair[0])) * pair[1]


def test_a_function_compiled_ahead_of_time_is_saved_loaded_and_kept_to_its_signature(tmp_path, monkeypatch):
    load, threads = torch.compiler.load_compiled_function, []

    def load_and_note_threads(file):  # a load must not start Inductor's pool of compile workers
        threads.append(torch._inductor.config.compile_threads)
        return load(file)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load_and_note_threads)
    torch.manual_seed(0)
    net, args = _Net(), (torch.randn(2, 8), (torch.randn(2, 8), torch.randn(2, 4)))
    with torch.inference_mode():
        recorded = CompiledNetwork(net, "net", AheadOfTime(tmp_path, record=True))(*args)
        files = [p.name for p in tmp_path.iterdir()]
        assert len(files) == 1 and files[0].startswith("aot-net-")
        other = _Net()  # other weights: parameters are arguments of the saved function, not constants in it
        loading = AheadOfTime(tmp_path, files)
        torch.testing.assert_close(CompiledNetwork(other, "net", loading)(*args), other(*args))
        torch.testing.assert_close(recorded, net(*args))
        assert loading.function("net", other, (torch.randn(3, 8), args[1])) is None  # another shape: none
        assert loading.function("net", other, (args[0].t().contiguous().t(), args[1])) is None  # other strides
        assert loading.function("other", other, args) is None
    assert threads == [1]


# --------------------------------------------------------------------------------------------------- on a GPU
CASES = [{"mode": "fast"}, {"mode": "quality", "steps": 3}, {"mode": "fast", "num_images": 2, "seed": [4, 5]}]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiled_networks_equal_the_uncompiled_ones(case, face):
    plain = Personalizer.from_pretrained("tiny", device="cuda")
    identity = plain.encode_face(face)
    arguments = {"seed": 3, **case}  # a case may give one seed per image
    expected = plain.generate(identity, "a face", output="pt", **arguments)
    compiled = Personalizer.from_pretrained("tiny", device="cuda")
    compiled.warmup(case["mode"], case.get("num_images", 1), kv_cache=case.get("kv_cache", False),
                    steps=case.get("steps"), compile=True, progress=False)  # fmt: skip
    found = compiled.generate(identity, "a face", output="pt", **arguments)
    assert isinstance(compiled.denoiser if case["mode"] == "quality" else compiled.lcm_denoiser, CompiledNetwork)
    assert (found - expected).abs().max().item() <= COMPILE_TOLERANCE


_SECOND_PROCESS = """
import os, sys, torch
from lcmla_sdk import Personalizer
model = Personalizer.from_pretrained("tiny", device="cuda", compiled=sys.argv[1])
identity = model.load_identity(sys.argv[2])
torch.save(model.generate(identity, "a face", seed=3, mode="fast", output="pt").cpu(), sys.argv[3])
pid = os.getpid()
print("CHILDREN", len(open(f"/proc/{pid}/task/{pid}/children").read().split()))
"""


@pytest.mark.gpu
@needs_gpu
def test_a_built_folder_loads_in_a_second_process_and_gives_the_same_image(tmp_path, face):
    folder = tmp_path / "compiled"
    manifest = build_compiled("tiny", folder, [CompiledShape("fast", 1)], device="cuda", jobs=2)
    assert manifest["artefacts"] and all((folder / name).stat().st_size > 0 for name in manifest["artefacts"])
    model = Personalizer.from_pretrained("tiny", device="cuda")
    identity = model.encode_face(face)
    identity.save(tmp_path / "person.safetensors")
    expected = model.generate(identity, "a face", seed=3, mode="fast", output="pt").cpu()
    out = tmp_path / "images.pt"
    second = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(folder), str(tmp_path / "person.safetensors"),
                             str(out)], check=True, capture_output=True, text=True,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty")})  # fmt: skip
    assert "none built" not in second.stderr  # every network and the decode ran the folder's functions
    assert "CHILDREN 0" in second.stdout  # loading started no pool of compile workers
    found = torch.load(out, weights_only=True)
    assert (found - expected).abs().max().item() <= COMPILE_TOLERANCE
