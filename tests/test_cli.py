import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lcmla_sdk import Identity, ModelFilesError, model_dir
from lcmla_sdk.cli import app


def test_generate_writes_one_png_per_image(tmp_path):
    result = CliRunner().invoke(
        app,
        ["generate", "--model", "tiny", "--prompt", "a face", "--prompt", "an oil painting of a face",
         "--steps", "2", "--seed", "1", "--out", str(tmp_path), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["000.png", "001.png"]
    assert Image.open(files[0]).size == (128, 128)


def test_generate_with_face_file_and_fast_mode(tmp_path, astronaut):
    face = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(face)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["generate", "--face", str(face), "--prompt", "a face", "--mode", "fast", "--out", str(out), "--seed", "0",
              "--warmup"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 1
    assert "warm-up: nothing to capture (CUDA graphs are for a CUDA device" in result.output  # not "0.0 s" on a CPU


def test_bad_arguments_exit_non_zero_with_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--prompt", "a face", "--mode", "turbo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "mode: 'turbo' is not one of" in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------ model directories and identities (issue 3)
def test_identity_create_then_generate_from_the_identity(tmp_path, astronaut, astronaut_pack, fresh_tiny, face):
    tiny = fresh_tiny  # not the shared one: the session's export with parity checks moves its outputs by ~1e-5
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    identity_file = tmp_path / "ids" / "astronaut.safetensors"
    result = CliRunner().invoke(
        app, ["identity", "create", "--face", str(photo), "--out", str(identity_file), "--faces", str(astronaut_pack),
              "--crop", "face", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(identity_file)
    identity = Identity.load(identity_file, expected_fingerprint=tiny.fingerprint)
    assert identity.crop == "face" and identity.face_embeddings.shape == (1, 512) and identity.boxes[0] is not None
    assert identity.face_backend == f"insightface:{astronaut_pack.resolve()}"

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["generate", "--identity", str(identity_file), "--prompt", "a face", "--prompt", "a painting of a face",
              "--steps", "1", "--seed", "4", "--out", str(out), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000.png", "001.png"]
    # The PNGs are the identity's images, not the default sample face's.
    expected = tiny.generate(identity, ["a face", "a painting of a face"], steps=1, seed=4, output="np")
    assert all(np.array_equal(np.asarray(Image.open(f)), e) for f, e in zip(files, expected))
    assert not np.array_equal(expected[0], tiny.generate(face, "a face", steps=1, seed=4, output="np")[0])


def test_generate_from_a_model_directory(tmp_path, tiny_dir, tiny, face):
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tiny_dir), "--prompt", "a face", "--steps", "1", "--seed", "2",
              "--out", str(tmp_path), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # tiny_dir holds the tiny preset's weights: the same image, bit for bit.
    expected = tiny.generate(face, "a face", steps=1, seed=2, output="np")[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "000.png")), expected)


def test_info_lists_components_dtypes_sizes_and_validity(tiny_dir):
    result = CliRunner().invoke(app, ["info", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    sdxl_bytes = sum(p.stat().st_size for p in (tiny_dir / "sdxl").rglob("*") if p.is_file())
    assert rows["sdxl"].split()[1:4] == ["float32", f"{sdxl_bytes / 2**20:.1f}", "MiB"]
    assert rows["sdxl"].endswith(str(tiny_dir / "sdxl"))
    for name in ("image_encoder", "adapter", "kv_encoder", "lcm_lora"):
        assert rows[name].split()[1] == "float32" and rows[name].endswith(str(tiny_dir / name)), rows[name]
    assert "not present" in rows["vae"] and "not present" in rows["faces"]
    assert rows["valid;"] == f"valid; fingerprint {model_dir.validate(tiny_dir).fingerprint()}"


def test_info_names_a_missing_file_and_exits_non_zero(tiny_dir, tmp_path):
    broken = shutil.copytree(tiny_dir, tmp_path / "model")
    (broken / "kv_encoder" / "lora.safetensors").unlink()
    result = CliRunner().invoke(app, ["info", str(broken)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: missing files: {broken / 'kv_encoder' / 'lora.safetensors'}"
    assert "valid;" not in result.stdout and "kv_encoder" in result.stdout  # components listed before the check


def test_errors_are_one_line_unless_debug(tmp_path):
    (tmp_path / "lcmla.json").write_text('{"format": "lcmla-model", "format_version": 2}')
    debug = CliRunner().invoke(app, ["--debug", "info", str(tmp_path)])
    assert debug.exit_code != 0 and isinstance(debug.exception, ModelFilesError)
    assert str(tmp_path / "lcmla.json") in str(debug.exception)

    plain = CliRunner().invoke(app, ["info", str(tmp_path)])  # --debug does not stick to later commands
    assert plain.exit_code == 2 and not isinstance(plain.exception, ModelFilesError)
    assert plain.stderr.splitlines() == [f"error: {debug.exception}"]
    assert "Traceback" not in plain.output

    missing = tmp_path / "nobody.safetensors"
    result = CliRunner().invoke(app, ["generate", "--identity", str(missing), "--prompt", "a", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [f"error: identity: no such file: {missing}"]

    # An output path that cannot become a folder fails before any model is loaded, not after generating.
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"")
    result = CliRunner().invoke(app, ["generate", "--model", "no-such-model", "--prompt", "a", "--out", str(taken)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [f"error: out: {taken} is a file, not a folder"]
    result = CliRunner().invoke(app, ["generate", "--model", "tinyy", "--prompt", "a", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: model: 'tinyy' is neither a model directory nor an embedded preset "
                                          "('tiny', 'sdxl')"]  # fmt: skip


# ------------------------------------------------------------------ reliability (issue 12)
@pytest.mark.parametrize(
    "args, message",
    [(["generate", "--prompt", "a", "--device", "gpu"], "error: device: 'gpu' is not a device PyTorch knows"),
     (["generate", "--prompt", "a", "--device", "meta"], "error: device: 'meta': lcmla runs on 'cpu', 'cuda' or 'mps'"),
     (["export", "--device", "quantum", "--onnx-only"], "error: device: 'quantum' is not a device PyTorch knows"),
     (["export", "--opt-level", "9", "--onnx-only"], "error: optimization_level: must be 0..5, got 9"),
     (["identity", "create", "--face", "x.png", "--out", "id.safetensors", "--device", "tpu"], "error: device: 'tpu'"),
     (["identity", "create", "--face", "x.png", "--out", "id.safetensors", "--crop", "square"], "error: crop: 'square' is not one of"),
     (["generate", "--prompt", "a", "--steps", "1000"], "error: steps: quality mode: 1000 is out of range (1 .. 150)"),
     (["generate", "--prompt", "a", "--seed", "-1"], "error: seed: -1 is out of range"),
     (["generate", "--prompt", "a", "--num-images", "0"], "error: num_images: 0 is out of range (>= 1)"),
     (["generate", "--prompt", "a", "--height", "100000"], "error: height: 100000 is out of range"),
     (["generate", "--prompt", "a", "--model", "tiny", "--width", "100"], "error: width: 100 is not a multiple of 32")],
)  # fmt: skip
def test_bad_options_fail_in_one_line_before_any_model_is_loaded(tmp_path, monkeypatch, args, message):
    from lcmla_sdk import Personalizer

    monkeypatch.setattr(Personalizer, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.output


def test_a_model_directorys_size_step_is_checked_before_it_loads(tmp_path, monkeypatch, tiny_dir):
    from lcmla_sdk import Personalizer

    monkeypatch.setattr(Personalizer, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded first"))
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "a", "--height", "100",
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "error: height: 100 is not a multiple of 32 (the latents must survive every downsampling)"], result.output


def test_damaged_model_files_and_identities_are_one_line_errors(tmp_path, tiny_dir, tiny, face):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    runner = CliRunner()

    def error_line(*args) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output, result.output
        return result.stderr.strip()

    manifest = model / "lcmla.json"
    text = manifest.read_text()
    manifest.write_text(text[:-2])  # cut short
    assert error_line("generate", "--model", str(model), "--prompt", "a").startswith(f"error: {manifest}: invalid JSON")
    manifest.write_text(text.replace('"face_size": 128', '"face_size": "128"'))
    assert error_line("info", str(model)) == f"error: {manifest}: pipeline.face_size: expected an integer, got '128' (str)"
    manifest.write_text(text)

    tokenizer = model / "sdxl" / "tokenizer" / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(b"\x89PNG not a tokenizer")
    assert error_line("info", str(model)).startswith(f"error: {tokenizer}: invalid JSON")
    tokenizer.write_bytes(original)

    weights = model / "kv_encoder" / "lora.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert error_line("info", str(model)).startswith(f"error: {weights}: sha256 ")
    assert "valid; fingerprint" in runner.invoke(app, ["info", "--no-verify", str(model)]).stdout

    identity = tiny.encode_face(face).save(tmp_path / "person.safetensors")
    save_file(load_file(str(identity)), str(identity), {"lcmla": '{"format": "lcmla-identity", "crop": 3}'})
    line = error_line("generate", "--identity", str(identity), "--prompt", "a", "--out", str(tmp_path / "out"))
    assert line.startswith(f"error: identity: {identity}: header: ")
