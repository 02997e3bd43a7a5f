import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generic_folders_install_under_the_lcmla_sdk_namespace():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {
        "lcmla_sdk": "lcmla_sdk", "lcmla_sdk.export": "export", "lcmla_sdk.engines": "engines",
        "lcmla_sdk.train": "train",
    }  # fmt: skip
    assert not {"export", "engines", "train"} & set(config["packages"])
    for name in ("export", "engines", "train"):
        module = importlib.import_module(f"lcmla_sdk.{name}")
        assert Path(module.__file__).resolve().parent == ROOT / name


def test_package_ships_its_tokenizer_and_sample_face():
    from lcmla_sdk.images import sample_face
    from lcmla_sdk.presets import tiny_tokenizer

    assert sample_face().size == (256, 256)
    ids = tiny_tokenizer()("A photo of a face").input_ids
    assert ids[0] == 512 and ids[-1] == 513
