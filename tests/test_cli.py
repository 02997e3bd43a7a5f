from PIL import Image
from typer.testing import CliRunner

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
        app, ["generate", "--face", str(face), "--prompt", "a face", "--mode", "fast", "--out", str(out), "--seed", "0"]
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 1


def test_bad_arguments_exit_non_zero_with_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--prompt", "a face", "--mode", "turbo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "mode: 'turbo' is not one of" in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))
