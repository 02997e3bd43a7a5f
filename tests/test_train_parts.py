"""Training parts that need no SDK model: config, data, random draws, alignment, ArcFace loading, checkpoints."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from scipy import stats

from lcmla_sdk.presets import preset_config
from lcmla_sdk.errors import ModelFilesError
from lcmla_sdk.train import ConfigError, DataError, load_arcface, load_config
from lcmla_sdk.train import checkpoints
from lcmla_sdk.train.arcface import IRSE, IResNet
from lcmla_sdk.train.config import DataSetConfig
from lcmla_sdk.train.data import MISSING_FILE, SINGLE_IMAGE, UNREADABLE, PairDataset, PairIndex, prompt_from_filename
from lcmla_sdk.train.faces import ARCFACE_TEMPLATE, TemplateLandmarks, align_faces, similarity_to_template
from lcmla_sdk.train.losses import lcm_preview
from lcmla_sdk.train.draws import (
    drop_image_tokens, drop_kv_tokens, generator_for, importance_weights, lcm_lora_scale, sample_timesteps,
)  # fmt: skip
from lcmla_sdk.train.synthetic import write_synthetic_dataset


# ---------------------------------------------------------------------------- config
def test_yaml_and_overrides_are_typed_and_checked(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("output_dir: out\ndata:\n  sets:\n    - root: a\n    - root: b\noptim:\n  lr_encoder: 1e-5\n")
    config = load_config(path, ["max_steps=7", "data.sets.1.weight=3", "lookahead.lcm_scale.every=2",
                                "optim.betas=[0.8, 0.9]", "faces.landmarks=template"])  # fmt: skip
    assert config.optim.lr_encoder == 1e-5 and config.max_steps == 7  # YAML reads 1e-5 as a string
    assert [s.weight for s in config.data.sets] == [1.0, 3.0]
    assert config.lookahead.lcm_scale.every == 2 and config.optim.betas == (0.8, 0.9)
    assert config.optim.lr_adapter == 1e-5 and config.dropout.kv_tokens == 0.05  # the authors' defaults
    bad = {
        "max_stepz=3": r"^max_stepz: unknown key",
        "max_steps=many": r"^max_steps: expected an integer",
        "dropout.adapter=1.5": r"^dropout.adapter: must be in",
        "data.sets.5.weight=1": r"^data.sets.5: list index out of range",
        "mixed_precision=fp8": r"^mixed_precision: must be one of",
        "faces.landmarks=detector": r"^faces.pack: required",
        "novalue": r"expected key.path=value",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(path, ["faces.landmarks=template", override])
    with pytest.raises(ConfigError, match=r"^data: required"):
        load_config(None, ["output_dir=x"])


# ---------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Ann/vanilla/A_photo_of_conceptname_123456.jpg", "A photo of face"),
        ("Ann/stylized/A_watercolor_painting_of_conceptname_12_345.png", "A watercolor painting of face"),
        ("x/conceptname_in_2024_style_77.jpg", "face in 2024 style"),
    ],
)
def test_prompts_come_from_file_names(path, expected):
    assert prompt_from_filename(path, "face") == expected


@pytest.fixture(scope="module")
def messy_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(root, identities=2, images=6, size=64, with_problems=True)
    return root


def test_index_counts_what_it_leaves_out_and_pairs_within_identities(messy_set):
    index = PairIndex([DataSetConfig(root=str(messy_set))])
    assert index.summary.counts == {MISSING_FILE: 1, SINGLE_IMAGE: 1}
    assert index.summary.identities == 2
    for step in range(200):
        reference, target = index.draw(0, step, 0, 0, 0)
        assert reference.identity == target.identity and reference.path != target.path
        assert "vanilla" in str(reference.path)  # vanilla-only references by default
    anywhere = PairIndex([DataSetConfig(root=str(messy_set), vanilla_only_references=False)])
    assert any("stylized" in str(anywhere.draw(0, s, 0, 0, 0)[0].path) for s in range(200))
    assert index.draw(3, 5, 1, 2, 0) == index.draw(3, 5, 1, 2, 0)


def test_sets_mix_by_weight(tmp_path):
    for name in ("a", "b"):
        write_synthetic_dataset(tmp_path / name, identities=2, images=3, size=32, seed=ord(name))
    index = PairIndex([DataSetConfig(root=str(tmp_path / "a"), weight=3.0), DataSetConfig(root=str(tmp_path / "b"))])
    draws = [str(index.draw(0, step, 0, 0, 0)[1].path) for step in range(2000)]
    from_a = sum(str(tmp_path / "a") in d for d in draws)
    assert stats.binomtest(from_a, len(draws), 0.75).pvalue > 1e-3


def test_unreadable_files_are_redrawn_and_reported(messy_set):
    index = PairIndex([DataSetConfig(root=str(messy_set))])
    dataset = PairDataset(index, 64, 224, TemplateLandmarks(), seed=0, rank=0, max_redraws=32)
    broken = str(messy_set / "Person0/vanilla/A_photo_of_conceptname_222222.jpg")
    seen = []
    for step in range(60):
        sample = dataset[(step, 0)]
        seen += sample["skipped"]
        assert sample["reference_pixels"].shape == sample["target_pixels"].shape == (3, 64, 64)
        assert sample["reference_clip"].shape == (3, 224, 224) and sample["reference_landmarks"].shape == (5, 2)
    assert (UNREADABLE, broken) in seen
    assert {reason for reason, _ in seen} == {UNREADABLE}


def test_no_usable_pair_and_bad_metadata_are_clear_errors(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps({"a.jpg": "A"}))
    with pytest.raises(DataError, match="no usable"):
        PairIndex([DataSetConfig(root=str(tmp_path))])
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(DataError, match=r"^data.sets.0.metadata: cannot read"):
        PairIndex([DataSetConfig(root=str(tmp_path))])


def test_a_model_directory_without_lookahead_weights_fails_before_anything_loads(tmp_path):
    from lcmla_sdk.train import Trainer, config_from_dict

    config = {"output_dir": str(tmp_path / "out"), "model": str(tmp_path / "model"), "data": {"sets": [{"root": "x"}]},
              "faces": {"landmarks": "template"}, "logging": {"tracker": None},
              "mixed_precision": "no"}  # accelerate's state is per process: the other tests' precision  # fmt: skip
    with pytest.raises(ConfigError, match=r"^tiny_vae: required for a model directory"):
        Trainer(config_from_dict(config))  # the data set and the model directory do not exist either
    with pytest.raises(ConfigError, match=r"^arcface.weights: required for a model directory"):
        Trainer(config_from_dict({**config, "tiny_vae": str(tmp_path / "taesdxl")}))


# ---------------------------------------------------------------------------- random draws
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_timesteps_follow_the_importance_distribution(alpha):
    draws = sample_timesteps(200_000, 1000, alpha, generator_for(0, alpha * 10, "t"))
    counts = torch.bincount(draws // 50, minlength=20).numpy()  # 20 bins of 50 timesteps
    expected = importance_weights(1000, alpha).view(20, 50).sum(1).numpy() * len(draws)
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # and it is not the uniform distribution: the test can tell the difference
    assert stats.chisquare(counts, np.full(20, len(draws) / 20)).pvalue < 1e-6
    ratio = importance_weights(1000, alpha)[-1] / importance_weights(1000, alpha)[0]
    assert math.isclose(ratio, (1 + alpha) / (1 - alpha), rel_tol=1e-4)


def test_lcm_lora_scale_draws_match_their_distribution():
    scales = np.array([lcm_lora_scale(0, step, 5, 0.5, 0.1) for step in range(0, 5 * 4000, 5)])
    full = scales == 1.0
    assert stats.binomtest(int(full.sum()), len(scales), 0.5).pvalue > 1e-3
    assert stats.kstest(scales[~full], stats.uniform(0.1, 0.9).cdf).pvalue > 1e-3
    assert scales.min() >= 0.1
    blocks = [{lcm_lora_scale(0, step, 5, 0.5, 0.1) for step in range(b * 5, b * 5 + 5)} for b in range(20)]
    assert all(len(block) == 1 for block in blocks)  # redrawn every 5 steps, constant in between


def test_kv_token_drop_is_per_layer_shared_by_k_v_and_the_batch():
    kv = []
    for tokens in (64, 16, 64):
        key = torch.arange(2 * tokens, dtype=torch.float32).view(2, tokens, 1).expand(2, tokens, 3)
        kv += [key, key + 1000]
    dropped = drop_kv_tokens(kv, 0.25, generator_for(0, "kv"))
    kept_total = 0
    for layer in range(3):
        key, value = dropped[2 * layer], dropped[2 * layer + 1]
        torch.testing.assert_close(value, key + 1000)
        torch.testing.assert_close(key[1] - key[0], torch.full_like(key[0], kv[2 * layer].shape[1]))
        kept_total += key.shape[1]
    assert 0.6 < kept_total / 144 < 0.9
    assert drop_kv_tokens(kv, 0.0, generator_for(0, "kv")) == tuple(kv)


def test_adapter_drop_swaps_whole_samples_to_unconditional_tokens():
    cond, uncond = torch.ones(1000, 4, 2), torch.zeros(1000, 4, 2)
    mixed = drop_image_tokens(cond, uncond, 0.1, generator_for(0, "adapter"))
    per_sample = mixed.mean((1, 2))
    assert set(per_sample.tolist()) == {0.0, 1.0}
    assert stats.binomtest(int((per_sample == 0).sum()), 1000, 0.1).pvalue > 1e-3


# ---------------------------------------------------------------------------- LCM preview
def test_lcm_preview_is_diffusers_lcm_step_to_zero():
    scheduler = LCMScheduler.from_config(preset_config("tiny")["scheduler"], timestep_scaling=10.0)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    noisy, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(eps, t, noisy, return_dict=True).denoised
    torch.testing.assert_close(lcm_preview(scheduler, eps, noisy, t.repeat(2)), expected, rtol=1e-5, atol=1e-5)
    # boundary condition: at t = 0 the preview is the input itself
    torch.testing.assert_close(lcm_preview(scheduler, eps, noisy, torch.zeros(2, dtype=torch.long)), noisy)


# ---------------------------------------------------------------------------- alignment
def test_similarity_warp_matches_skimage_and_passes_gradients(astronaut):
    transform = pytest.importorskip("skimage.transform")
    angle, scale, shift = 0.3, 2.5, np.array([150.0, 90.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = scale * ARCFACE_TEMPLATE @ rotation.T + shift + np.random.default_rng(0).normal(0, 1, (5, 2))
    if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        reference = transform.SimilarityTransform.from_estimate(landmarks, ARCFACE_TEMPLATE)
    else:
        reference = transform.SimilarityTransform()
        reference.estimate(landmarks, ARCFACE_TEMPLATE)
    matrix = similarity_to_template(torch.tensor(landmarks[None], dtype=torch.float32))[0]
    np.testing.assert_allclose(matrix.numpy(), reference.params[:2], rtol=1e-5, atol=1e-4)

    image = torch.tensor(astronaut / 255.0, dtype=torch.float32).permute(2, 0, 1)[None].requires_grad_(True)
    crop = align_faces(image, torch.tensor(landmarks[None], dtype=torch.float32))
    expected = transform.warp(astronaut / 255.0, reference.inverse, output_shape=(112, 112), order=1, mode="constant")
    np.testing.assert_allclose(crop[0].permute(1, 2, 0).detach().numpy(), expected, atol=1e-4)
    crop.sum().backward()
    assert image.grad.abs().sum() > 0 and image.grad[..., :50, :].abs().sum() == 0  # only the face region


def test_template_landmarks_of_a_224_image_sample_every_other_pixel():
    # Pixel centres at integer coordinates (cv2/insightface): crop pixel u is image pixel 2u, exactly.
    image = torch.rand(1, 3, 224, 224)
    landmarks = torch.as_tensor(TemplateLandmarks()(np.zeros((224, 224, 3))))[None]
    torch.testing.assert_close(align_faces(image, landmarks), image[:, :, ::2, ::2], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- ArcFace weights
def _randomised_eval(model):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.1, generator=generator)
    return model.eval()


@pytest.mark.parametrize("fold_batchnorm", [True, False])
def test_insightface_onnx_initialisers_load_into_iresnet(tmp_path, fold_batchnorm):
    onnxruntime = pytest.importorskip("onnxruntime")
    from arcface_onnx import write_iresnet_onnx

    torch.manual_seed(0)
    original = _randomised_eval(IResNet(layers=(1, 2, 1, 1), widths=(8, 16, 16, 24), num_features=32))
    path = tmp_path / "w600k_tiny.onnx"
    write_iresnet_onnx(original, path, fold_batchnorm)
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    expected = original(faces).detach()
    onnx_out = onnxruntime.InferenceSession(str(path)).run(None, {"input.1": faces.numpy()})[0]
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4)  # the file is a faithful export
    loaded = load_arcface(path)
    assert loaded.config == original.config and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(faces), expected, rtol=1e-4, atol=1e-4)


def test_state_dicts_of_iresnet_and_ir_se_load_with_their_shapes(tmp_path):
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    for cls, widths in ((IResNet, (8, 8, 16, 16)), (IRSE, (8, 16, 24, 32))):
        torch.manual_seed(1)
        original = _randomised_eval(cls(layers=(2, 1, 1, 1), widths=widths, num_features=16))
        path = tmp_path / f"{cls.__name__}.pth"  # the DataParallel-style layout pSp ships
        torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, path)
        loaded = load_arcface(path)
        assert type(loaded) is cls and loaded.config == original.config
        torch.testing.assert_close(loaded(faces), original(faces).detach(), rtol=0, atol=0)


def test_bad_arcface_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFilesError, match="no such file"):
        load_arcface(tmp_path / "missing.pth")
    pickled = tmp_path / "object.pth"
    torch.save({"model": TemplateLandmarks()}, pickled)  # an arbitrary object: refused, never unpickled
    with pytest.raises(ModelFilesError, match="not a weights-only torch file"):
        load_arcface(pickled)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelFilesError, match="neither an arcface_torch IResNet nor a pSp IR-SE"):
        load_arcface(other)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ModelFilesError):
        load_arcface(garbage)


# ---------------------------------------------------------------------------- checkpoint directories
def test_unfinished_checkpoints_are_never_resumed_from(tmp_path):
    for step in (2, 4):
        staging = checkpoints.begin(tmp_path, step)
        (staging / checkpoints.STATE_DIR / "state.json").write_text("{}")
        checkpoints.commit(staging, tmp_path, step, keep=0)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-0000004"
    checkpoints.begin(tmp_path, 6)  # a run killed while writing step 6
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-0000004"
    (tmp_path / checkpoints.CHECKPOINTS / checkpoints.LATEST).write_text("step-0000009")  # a stale pointer
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-0000004"
    staging = checkpoints.begin(tmp_path, 8)
    (staging / checkpoints.STATE_DIR / "state.json").write_text("{}")
    checkpoints.commit(staging, tmp_path, 8, keep=2)
    remaining = sorted(p.name for p in (tmp_path / checkpoints.CHECKPOINTS).glob("step-*"))
    assert remaining == ["step-0000004", "step-0000008"]


def _checkpoint(output_dir, step):
    """A small complete checkpoint (trainer state only), written the way the trainer writes one."""
    staging = checkpoints.begin(output_dir, step)
    linear = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(linear.parameters())
    linear(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoints.write_rng_state(staging / checkpoints.STATE_DIR, 0)
    checkpoints.write_trainer_state(staging / checkpoints.STATE_DIR, dict(linear.named_parameters()),
                                    optimizer.state_dict(), {}, None, {"step": step, "world_size": 1})  # fmt: skip
    return checkpoints.commit(staging, output_dir, step, keep=0)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_broken_checkpoint_is_named_with_the_previous_intact_one(tmp_path):
    first, second, third = (_checkpoint(tmp_path, step) for step in (2, 4, 6))
    assert checkpoints.read_trainer_state(third)[2]["step"] == 6
    state = third / checkpoints.STATE_DIR
    recorded = json.loads((state / "state.json").read_text())["files"]["optimizer.pt"]
    _flip_last_byte(state / "optimizer.pt")
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.read_trainer_state(checkpoints.latest_checkpoint(tmp_path))
    found = hashlib.sha256((state / "optimizer.pt").read_bytes()).hexdigest()
    assert str(error.value) == (
        f"resume: checkpoint {third} is broken (trainer_state/optimizer.pt: sha256 {found}, but state.json records "
        f"{recorded}); the previous complete checkpoint is {second}: resume from it with --resume-from {second}"
    )
    # The offer skips checkpoints that are broken too, and says so when none is left.
    (second / checkpoints.STATE_DIR / "state.json").write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match=f"is broken .*; the previous complete checkpoint is {first}:"):
        checkpoints.read_trainer_state(third)
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {second} is broken .*state.json.*; the previous complete checkpoint is {first}"):
        checkpoints.read_trainer_state(second)
    (first / checkpoints.STATE_DIR / "trainables.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(checkpoints.CheckpointError, match="there is no earlier complete checkpoint to resume from$"):
        checkpoints.read_trainer_state(second)


def test_damaged_files_of_checkpoints_without_recorded_hashes_are_reported_not_raised(tmp_path):
    first, second = (_checkpoint(tmp_path, step) for step in (1, 2))
    state = second / checkpoints.STATE_DIR
    saved = json.loads((state / "state.json").read_text())
    del saved["files"]  # as checkpoints written before hashes were recorded
    (state / "state.json").write_text(json.dumps(saved))
    (state / "trainables.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {second} is broken .*; the previous complete checkpoint is {first}"):
        checkpoints.read_trainer_state(second)
    (first / checkpoints.STATE_DIR / "rng-rank0.safetensors").write_bytes(b"junk")
    rng = torch.get_rng_state()
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {first} is broken \\(rng-rank0.safetensors: "):
        checkpoints.read_rng_state(first / checkpoints.STATE_DIR, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing was set from the damaged file


# ---------------------------------------------------------------------------- landmarks from a face pack
def test_reference_landmarks_come_from_the_face_packs_detector(messy_set, tmp_path):
    pytest.importorskip("insightface")
    from facepack import FakeFace, write_face_pack

    from lcmla_sdk.train.data import NO_FACE
    from lcmla_sdk.train.faces import DetectorLandmarks

    # A 64 px reference is letterboxed x10 into the detector's 640 px input.
    landmarks = ((250.0, 260.0), (390.0, 262.0), (320.0, 350.0), (262.0, 430.0), (380.0, 428.0))
    pack = write_face_pack(tmp_path / "pack", [FakeFace((150.0, 120.0, 490.0, 560.0), landmarks)])
    index = PairIndex([DataSetConfig(root=str(messy_set))])
    dataset = PairDataset(index, 64, 224, DetectorLandmarks(pack), seed=0, rank=0, max_redraws=4)
    sample = dataset[(0, 0)]
    np.testing.assert_allclose(sample["reference_landmarks"].numpy(), np.array(landmarks) / 10, atol=0.05)

    faceless = write_face_pack(tmp_path / "empty", [])
    dataset = PairDataset(index, 64, 224, DetectorLandmarks(faceless), seed=0, rank=0, max_redraws=4)
    with pytest.raises(DataError, match=f"4 draws in a row .* unusable .*{NO_FACE}"):
        dataset[(0, 0)]
    with pytest.raises(ModelFilesError, match="no such folder"):
        DetectorLandmarks(tmp_path / "missing")
