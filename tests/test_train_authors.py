"""Training as the authors' ``train_encoder.py`` / ``losses/losses.py`` do it (issue 11, item 7): DreamSim in the
lookahead loss, and which gradients each step clips."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lcmla_sdk.train import Trainer, config_from_dict
from lcmla_sdk.train.config import ConfigError
from lcmla_sdk.train.losses import DREAMSIM_FILES, DreamSimLoss, MissingLossWarning, load_dreamsim
from lcmla_sdk.train.synthetic import write_synthetic_dataset

MAX_NORM = 1e-4  # far below every gradient norm of the tiny model, so clipping always acts


@pytest.fixture(scope="module")
def face_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(root, identities=2, images=4, size=64)
    return root


def config(face_set, output_dir, **lookahead):
    return config_from_dict({
        "output_dir": str(output_dir), "model": "tiny", "mixed_precision": "no", "batch_size": 2, "max_steps": 2,
        "data": {"sets": [{"root": str(face_set)}], "resolution": 64, "num_workers": 0},
        "faces": {"landmarks": "template"}, "logging": {"tracker": None},
        "optim": {"max_grad_norm": MAX_NORM}, "lookahead": {"batch_size": 2, **lookahead},
    })  # fmt: skip


@pytest.fixture(scope="module")
def trainer(face_set, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingLossWarning)
        return Trainer(config(face_set, tmp_path_factory.mktemp("run")))


def _group_norms(trainer):
    return {
        name: torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in named if p.grad is not None])).item()
        for name, named in trainer.groups.items()
    }


def test_diffusion_step_clips_the_encoder_only_and_lookahead_step_everything(trainer, monkeypatch):
    seen = []
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.append(_group_norms(trainer))
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", record)
    trainer.train_step(trainer.batch_for_step(trainer.step))
    diffusion, lookahead = seen
    # train_encoder.py, diffusion step: clip_grad_norm_(encoder params, max_grad_norm); the adapter's are left as
    # they are.
    assert diffusion["encoder"] == pytest.approx(MAX_NORM, rel=1e-2)  # torch divides by norm + 1e-6
    assert diffusion["adapter"] > 100 * MAX_NORM
    # LCM step: clip_grad_norm_(every param group's params) -- one norm over all of them.
    assert np.hypot(lookahead["encoder"], lookahead["adapter"]) == pytest.approx(MAX_NORM, rel=1e-2)  # torch divides by norm + 1e-6


def test_dreamsim_input_is_the_authors_unit_range_bicubic_224():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 64, generator=generator) * 2 - 1
    seen = []
    loss = DreamSimLoss(lambda a, b: seen.append((a, b)) or (a - b).abs().mean((1, 2, 3)))
    preview = images.clone().requires_grad_()
    result = loss(preview, images.flip(0))
    assert result.shape == (2,)
    result.sum().backward()
    assert preview.grad.abs().sum() > 0  # the loss trains the preview
    preview, reference = seen[0]
    # (x + 1) / 2, then torchvision's bicubic Resize((224, 224)) -- which on tensors matches Pillow's BICUBIC.
    for got, source in ((preview, images), (reference, images.flip(0))):
        unit = ((source + 1) / 2).numpy()
        expected = np.stack([
            np.stack([np.asarray(Image.fromarray(channel, mode="F").resize((224, 224), Image.Resampling.BICUBIC))
                      for channel in image]) for image in unit
        ])  # fmt: skip
        np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-4)


def test_dreamsim_enters_the_lookahead_loss_weighted_1e3_times_the_lcm_lora_scale(trainer, monkeypatch):
    distances = []

    def metric(a, b):
        distance = (a - b).pow(2).mean((1, 2, 3))
        distances.append(distance.detach())
        return distance

    monkeypatch.setattr(trainer, "dreamsim", DreamSimLoss(metric))
    inputs = trainer.prepare_inputs(trainer.batch_for_step(trainer.step), trainer.step)
    result = trainer.lookahead_loss(inputs, trainer.step)
    (distance,) = distances
    assert float(result["dreamsim"]) == pytest.approx(distance.mean().item())
    expected = result["lcm_scale"] * 1e-3 * (float(result["identity"]) + distance.mean().item())
    assert float(result["loss"].detach()) == pytest.approx(expected, rel=1e-5)


def test_without_a_dreamsim_folder_the_trainer_warns_loudly(face_set, tmp_path):
    with pytest.warns(MissingLossWarning, match="training WITHOUT it, unlike the authors"):
        trainer = Trainer(config(face_set, tmp_path / "a"))
    assert trainer.dreamsim is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingLossWarning)
        Trainer(config(face_set, tmp_path / "b", dreamsim_weight=0.0))  # off on purpose: no warning


def test_an_incomplete_dreamsim_folder_is_a_config_error_naming_the_files(tmp_path):
    (tmp_path / "ensemble_lora").mkdir()
    (tmp_path / "ensemble_lora" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="^lookahead.dreamsim: .* lacks .*dino_vitb16_pretrain.pth"):
        load_dreamsim(tmp_path, torch.device("cpu"))


def test_without_the_dreamsim_package_a_complete_folder_is_a_config_error(tmp_path):
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the dreamsim package is installed here; this checks the message when it is not")
    for name in DREAMSIM_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ConfigError, match="dreamsim package cannot be imported"):
        load_dreamsim(tmp_path, torch.device("cpu"))


@pytest.mark.skipif(
    not os.environ.get("LCMLA_DREAMSIM_DIR"),
    reason="needs the dreamsim package (and a torchvision built for this torch: PyPI's is a CUDA build, unusable "
    "with the CPU torch here) and DreamSim's weights in a folder named by LCMLA_DREAMSIM_DIR; none can be had here",
)
def test_real_dreamsim_from_a_local_folder():
    loss = load_dreamsim(os.environ["LCMLA_DREAMSIM_DIR"], torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 128, generator=generator) * 2 - 1
    preview = images.flip(0).clone().requires_grad_()
    same, different = loss(images, images), loss(preview, images)
    assert same.abs().max() < 1e-4 and (different > 1e-3).all()
    different.sum().backward()
    assert preview.grad.abs().sum() > 0
