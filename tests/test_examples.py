"""Every example runs on the tiny preset and writes what it says (run in-process, one denoising step)."""

import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args, "--model", "tiny", "--steps", "1"])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_quickstart(tmp_path, monkeypatch, capsys):
    run_example("quickstart.py", monkeypatch, "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["fast.png", "quality.png"]


def test_many_prompts_writes_every_prompt_in_both_modes(tmp_path, monkeypatch, capsys):
    run_example("many_prompts.py", monkeypatch, "--out", str(tmp_path))
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [f"{mode}-{i}.png" for mode in ("fast", "quality") for i in range(5)]
    # Different prompts give different images of the same identity.
    assert Image.open(tmp_path / "quality-0.png").tobytes() != Image.open(tmp_path / "quality-1.png").tobytes()


def test_reuse_identity_saves_loads_and_generates(tmp_path, monkeypatch, capsys, astronaut):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    run_example("reuse_identity.py", monkeypatch, "--face", str(photo), "--face", str(photo), "--out", str(tmp_path))
    assert (tmp_path / "identity.safetensors").is_file()
    assert "2 reference photo(s)" in capsys.readouterr().out
    assert len(list(tmp_path.glob("sketch-seed*.png"))) == 2


def test_batch_folder_skips_unreadable_and_faceless_photos(tmp_path, monkeypatch, capsys, astronaut, face):
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(astronaut).save(faces / "astronaut.png")
    face.save(faces / "sample.jpg")
    (faces / "broken.jpg").write_bytes(b"not an image")
    (faces / "notes.txt").write_text("not a photo")
    Image.fromarray(pytest.importorskip("skimage.data").coffee()).save(faces / "coffee.png")  # no face in it
    out = tmp_path / "out"
    run_example("batch_folder.py", monkeypatch, str(faces), "--out", str(out))
    printed = capsys.readouterr().out
    assert "skipped broken.jpg" in printed and "skipped coffee.png: face: no face found" in printed
    assert "2 of 4 photos personalized" in printed
    assert sorted(p.name for p in out.glob("*.png")) == ["astronaut.png", "sample.png"]
