import copy
import os
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face
from lcmla_sdk.model_dir import loading
from lcmla_sdk.presets import preset_config

# The run's sha256 cache (lcmla_sdk.integrity) stays out of the user's ~/.cache; subprocesses inherit it.
os.environ.setdefault("LCMLA_CACHE_DIR", tempfile.mkdtemp(prefix="lcmla-test-cache-"))
# Tiny-preset tensors gain nothing from a second thread, and on a 2-core CI machine every op would wait for it.
torch.set_num_threads(1)

# Building the tiny preset is mostly peft wiring its LoRA layers (about 5 of its 6 s), and tests load it dozens of
# times (fixtures, the CLI in-process, training): each test process builds it once per seed, dtype and device and
# hands out copies, as independent of each other as freshly built ones and with the same weights.
_ATOMIC = (str, int, float, bool, type(None), torch.dtype, torch.device)


def _copy_tree(obj, memo: dict):
    """``copy.deepcopy(obj, memo)``, with modules' registration dicts copied directly (twice as fast)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if not isinstance(obj, nn.Module):
        return copy.deepcopy(obj, memo)
    clone = memo[id(obj)] = object.__new__(type(obj))
    for key, value in vars(obj).items():
        if type(value) in (dict, OrderedDict):
            value = type(value)((k, v if isinstance(v, _ATOMIC) else _copy_tree(v, memo)) for k, v in value.items())
        elif not isinstance(value, _ATOMIC):
            value = _copy_tree(value, memo)
        vars(clone)[key] = value
    return clone


_built_tiny: dict = {}
_build_random_components = loading.build_random_components


def _tiny_built_once(config, seed=0, dtype=torch.float32, device="cpu"):
    if config != preset_config("tiny"):
        return _build_random_components(config, seed, dtype, device)
    key = (seed, dtype, torch.device(device))
    if key not in _built_tiny:
        _built_tiny[key] = _build_random_components(config, seed, dtype, device)
    built, memo = _built_tiny[key], {}
    return type(built)(**{name: _copy_tree(value, memo) for name, value in vars(built).items()})


loading.build_random_components = _tiny_built_once


@pytest.fixture(scope="session")
def tiny() -> Personalizer:
    """One shared tiny model; tests that change weights build their own with ``fresh_tiny``."""
    return Personalizer.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_without_faces() -> Personalizer:
    """The shared tiny model's twin with face detection off (``faces=None``); only read, like ``tiny``."""
    return Personalizer.from_pretrained("tiny", device="cpu", faces=None)


@pytest.fixture
def fresh_tiny() -> Personalizer:
    return Personalizer.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="session")
def face():
    return sample_face()


@pytest.fixture(scope="session")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


def unet_inputs(model: Personalizer, batch: int = 2, side: int = 16, seed: int = 0):
    """Random (latent, t, text, pooled, time_ids) shaped for ``model``'s UNet."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (
        torch.randn(batch, 4, side, side, generator=g),
        torch.full((batch,), 500.0),
        torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
        torch.randn(batch, pooled_dim, generator=g),
        torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]], dtype=torch.float32).expand(batch, 6),
    )


# The networks the export and engine tests export (denoiser_lcm comes from the same spec code as denoiser; leaving it
# out saves CI a minute).
EXPORT_NETWORKS = ["adapter", "kv_encoder", "denoiser", "vae_decoder", "vae_encoder", "text_encoder", "text_encoder_2"]
# Their ShapeRanges (lcmla_sdk.export needs the export extra: imported where used).
EXPORT_RANGES = {"batch": (1, 1, 2), "height": (64, 128, 128), "width": (64, 128, 160)}


def shallow_tiny_config() -> dict:
    """The tiny architecture with one or two transformer layers per block: 17 K/V layers instead of 70, the same
    operations and kinds of inputs and outputs, for tests that need the architecture but not its depth (it builds in
    a third of the tiny preset's time, its graphs export in a quarter)."""
    config = copy.deepcopy(preset_config("tiny"))
    config["unet"]["transformer_layers_per_block"] = [1, 1, 2]  # the tiny preset's: [1, 2, 10]
    return config


def build_shallow_tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> Personalizer:
    return Personalizer.from_config(shallow_tiny_config(), device="cpu", dtype=dtype, seed=seed, label="shallow tiny")


@pytest.fixture(scope="session")
def shallow_tiny() -> Personalizer:
    """One shared shallow tiny model, only read (as ``tiny``)."""
    return build_shallow_tiny()


# A process that saves random weights of an architecture through the model-directory writer alone (argv: folder,
# config JSON, seed; "kill": killed before the new directory is swapped in; a WriteError is printed). It imports only
# what saving needs: importing the Personalizer (lcmla_sdk.pipeline) would cost a subprocess about 13 s of CPU.
SAVE_RANDOM_MODEL = """
import json, os, signal, sys
from lcmla_sdk.errors import WriteError
from lcmla_sdk.model_dir import saving
from lcmla_sdk.presets import build_random_components
components = build_random_components(json.loads(sys.argv[2]), seed=int(sys.argv[3]))
if sys.argv[4:] == ["kill"]:  # everything written beside, killed before the swap
    saving.write_index = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
try:
    saving.save(components, None, sys.argv[1])
except WriteError as error:
    print(error)
"""


@pytest.fixture(scope="session")
def shallow_tiny_half() -> Personalizer:
    """The shallow tiny model in fp16, only read: the fp16 export and engine tests share it (one worker, one build)."""
    return build_shallow_tiny(dtype=torch.float16)


@pytest.fixture(scope="session")
def shallow_tiny_dir(shallow_tiny, tmp_path_factory):
    """The shallow tiny model written once as a model directory: it loads in a quarter of the time a process takes
    to build the tiny preset or load it from a directory, for tests of what any model does (training, resuming)."""
    return shallow_tiny.save_pretrained(tmp_path_factory.mktemp("models") / "shallow_tiny")


@pytest.fixture(scope="session")
def loss_weights(tmp_path_factory) -> dict[str, str]:
    """ArcFace and tiny-VAE weight files as training config overrides (``arcface.weights``, ``tiny_vae``): what
    training from a model directory needs, loaded through the trainer's real file paths."""
    from diffusers import AutoencoderTiny

    from lcmla_sdk.train.arcface import IResNet
    from lcmla_sdk.train.losses import responsive_decoder_init

    root = tmp_path_factory.mktemp("loss_weights")
    torch.manual_seed(0)
    torch.save(IResNet(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), num_features=32).state_dict(), root / "arcface.pth")
    tiny_vae = AutoencoderTiny(**preset_config("tiny")["tiny_vae"])
    responsive_decoder_init(tiny_vae)
    tiny_vae.save_pretrained(root / "taesd")
    return {"tiny_vae": str(root / "taesd"), "arcface__weights": str(root / "arcface.pth")}


@pytest.fixture(scope="session")
def shallow_export(shallow_tiny, tmp_path_factory):
    """``EXPORT_NETWORKS`` of the shallow tiny model, exported once with parity checks (an :class:`ExportReport`);
    the export tests read its folder, the engine tests build in a copy of it."""
    from lcmla_sdk.export import ShapeRanges, export_model

    folder = tmp_path_factory.mktemp("engines") / "shallow_tiny"
    ranges = ShapeRanges(**EXPORT_RANGES)
    return export_model(shallow_tiny, folder, ranges, EXPORT_NETWORKS, check=True, log=lambda _: None)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny preset written once as a model directory."""
    return tiny.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def dir_model(tiny_dir) -> Personalizer:
    return Personalizer.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def astronaut_pack(tmp_path_factory):
    """A synthetic insightface pack that finds the astronaut's face (see tests/facepack.py)."""
    from facepack import astronaut_face, write_face_pack

    return write_face_pack(tmp_path_factory.mktemp("faces") / "one", [astronaut_face()])


def run_together(call, count: int) -> list:
    """``call(i)`` for ``i`` in ``range(count)``, each on its own thread at once; the results in order (a call's
    exception is raised here, not lost in its thread)."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


# Each file is a group of its own: its tests run on one xdist worker, in order, so its module fixtures are built once
# (as with --dist loadfile). The groups that take longest on a 2-core CI runner (about 25 s or more) are handed out
# first, longest first (--no-loadscope-reorder keeps this order), so that no worker starts a long one while the other
# runs out of work; the rest (about 20 s at most) follow in file order.
LONGEST_FIRST = ["test_train_loop.py", "test_export.py", "test_serve.py", "test_convert.py", "test_model_dir.py",
                 "test_atomic.py", "test_fast_paths.py", "test_validation.py", "test_cli.py",
                 "test_diffusers_pipeline.py", "test_cli_newcomer.py"]  # fmt: skip
# Files that share a session fixture join another file's group, so that one worker builds it once: the engine tests
# build from the export tests' graphs (shallow_export).
JOINS = {"test_tensorrt_rtx.py": "test_export.py"}


def xdist_group(item) -> str:
    return JOINS.get(item.path.name, item.path.name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group(item), len(rank)))  # stable: a group's tests keep their order
