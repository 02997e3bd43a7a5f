"""A new user's first commands (issue 21): help without torch, switches shown as switches, checks before the model
loads, no image overwritten, the bundled sample face."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from lcmla_sdk import Personalizer
from lcmla_sdk.assets import sample_face_path
from lcmla_sdk.cli import app
from lcmla_sdk.cli_checks import image_paths
from lcmla_sdk.defaults import MODES

TINY_RUN = ["generate", "--model", "tiny", "--mode", "fast", "--steps", "1", "--height", "64", "--width", "64",
            "--device", "cpu", "--faces", "none"]  # fmt: skip


def test_importing_the_cli_loads_neither_torch_nor_diffusers():
    code = (
        "import sys, lcmla_sdk.cli\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from lcmla_sdk import Personalizer, Identity, NoFaceError\n"  # the package's names still import
        "assert Personalizer.__module__ == 'lcmla_sdk.pipeline' and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_shows_switches_without_a_value():
    text = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).stdout
    for switch in ("--no-kv", "--kv-cache", "--no-freeu", "--overwrite", "--warmup", "--no-verify", "--help"):
        line = next(line for line in text.splitlines() if line.strip().startswith(switch + " "))
        assert "<bool>" not in line and "BOOLEAN" not in line, line
    assert "<int>" in text  # options that take a value still say which
    assert "--debug " in CliRunner().invoke(app, ["--help"]).stdout


def test_sample_face_path_is_the_bundled_photo():
    path = sample_face_path()
    assert path.is_file() and path.suffix == ".jpg"
    with Image.open(path) as image:
        assert image.size == (256, 256)


def test_image_names_continue_the_numbering(tmp_path):
    assert image_paths(tmp_path / "new", 2, overwrite=False) == [tmp_path / "new" / "000.png", tmp_path / "new" / "001.png"]
    for name in ("000.png", "012.png", "notes.png", "7.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_paths(tmp_path, 2, overwrite=False)] == ["013.png", "014.png"]
    assert [p.name for p in image_paths(tmp_path, 1, overwrite=True)] == ["000.png"]


def test_generate_keeps_earlier_images_and_prints_the_new_names_at_the_end(tmp_path):
    old = tmp_path / "000.png"
    Image.new("RGB", (8, 8), "red").save(old)
    before = old.read_bytes()
    result = CliRunner().invoke(app, [*TINY_RUN, "--face", "sample", "--prompt", "a", "--prompt", "b", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "001.png"), str(tmp_path / "002.png")]
    assert old.read_bytes() == before and Image.open(tmp_path / "002.png").size == (64, 64)

    result = CliRunner().invoke(app, [*TINY_RUN, "--prompt", "a", "--out", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0 and result.stdout.splitlines() == [str(old)], result.output
    assert old.read_bytes() != before and Image.open(old).size == (64, 64)


def bad_inputs(tmp_path):
    text = tmp_path / "face.jpg"
    text.write_text("not an image")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), "gray").save(blank)
    broken_model = tmp_path / "model"
    broken_model.mkdir()
    (broken_model / "lcmla.json").write_text("{")
    return [
        (["--face", str(tmp_path / "missing.jpg")], f"error: face: no such image file: {tmp_path / 'missing.jpg'}"),
        (["--face", str(text)], f"error: face: cannot read an image from file {text}"),
        (["--face", str(blank), "--faces", "dlib"], "error: face: no face found in the 256x256 image"),
        (["--face", "sample", "--faces", str(tmp_path / "nopack")], f"error: face pack {tmp_path / 'nopack'}: no such folder"),
        (["--face", "sample", "--identity", str(tmp_path / "id.safetensors")], "error: face: give --face or --identity"),
        (["--identity", str(tmp_path / "id.safetensors")], f"error: identity: no such file: {tmp_path / 'id.safetensors'}"),
        (["--model", str(broken_model)], f"error: {broken_model / 'lcmla.json'}: invalid JSON"),
        (["--vae", "huge"], "error: vae: 'huge' is not one of ('full', 'tiny')"),
        (["--freeu", "1", "1", "1", "-1"], "error: freeu: -1.0 is out of range"),
        (["--adapter-scale", "1000"], "error: adapter_scale: 1000.0 is out of range"),
        (["--prompt", "a \udcff face"], "error: prompt: string 1, character 2 is a lone surrogate"),
        (["--negative-prompt", "\ud800"], "error: negative_prompt: character 0 is a lone surrogate"),
        (["--dtype", "float8"], "error: dtype: 'float8' is not one of ('float32', 'bfloat16', 'float16')"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch, case):
    pytest.importorskip("dlib")
    args, message = bad_inputs(tmp_path)[case]
    monkeypatch.setattr(Personalizer, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded first"))
    result = CliRunner().invoke(app, ["generate", "--prompt", "a face", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and result.stderr.startswith(message), result.output
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_tiny_vae_needs_a_folder_only_for_a_model_directory(tmp_path, tiny_dir):
    result = CliRunner().invoke(app, [*TINY_RUN, "--prompt", "a", "--vae", "tiny", "--out", str(tmp_path / "preset")])
    assert result.exit_code == 0, result.output  # the preset's own random tiny VAE
    assert Image.open(result.stdout.splitlines()[-1]).size == (64, 64)
    result = CliRunner().invoke(app, [*TINY_RUN, "--prompt", "a", "--model", str(tiny_dir), "--vae", "tiny", "--out", str(tmp_path / "dir")])
    assert result.exit_code == 2 and not (tmp_path / "dir").exists()
    assert result.stderr.startswith(f"error: vae: 'tiny' needs --tiny-vae DIR, a local AutoencoderTiny (TAESD-XL) folder: {tiny_dir} has no")


def test_an_error_inside_generate_prints_alone_without_a_progress_bar(tmp_path):
    # A combination only the request checks inside generate refuse: the K/V cache without the K/V.
    result = CliRunner().invoke(app, [*TINY_RUN, "--prompt", "a", "--out", str(tmp_path), "--kv-cache", "--no-kv"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["error: kv_cache: caches the K/V-encoder's output, so it needs use_kv=True"]


def test_the_readme_example_runs_in_ten_lines(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(MODES, "quality", 2)  # the example's default steps (50 and 4), cut for the test's time
    monkeypatch.setitem(MODES, "fast", 1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and len(namespace["more"]) == 2
    assert Image.open(tmp_path / "photo.png").size == (128, 128)
