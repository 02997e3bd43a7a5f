"""The training loop (CPU): what trains, where gradients go, exact resume, the identity loss.

Tests of what holds for any model (what trains, where gradients go, resuming, the identity loss, checkpoints of a
model directory, two processes, mixed precision) train the shallow tiny model's directory with the lookahead networks'
weights of ``loss_weights`` (both conftest.py): it loads, steps and saves checkpoints in a fraction of the tiny
preset's time. The CLI trains the tiny preset."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lcmla_sdk import Personalizer, model_dir
from lcmla_sdk.cli import app
from lcmla_sdk.images import sample_face
from lcmla_sdk.train import Trainer, config_from_dict
from lcmla_sdk.train.synthetic import write_synthetic_dataset


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def face_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(root, identities=2, images=6, size=64, with_problems=True)
    return root


def config_dict(face_set, output_dir, **overrides):
    config = {
        "output_dir": str(output_dir), "model": "tiny", "mixed_precision": "no", "batch_size": 1, "max_steps": 4,
        "data": {"sets": [{"root": str(face_set)}], "resolution": 64, "num_workers": 0},
        "faces": {"landmarks": "template"}, "logging": {"tracker": None},
    }  # fmt: skip
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def trainer(face_set, shallow_tiny_dir, loss_weights, tmp_path_factory):
    """The authors' configuration (gradient checkpointing on) on the shallow tiny model."""
    output_dir = tmp_path_factory.mktemp("run")
    return Trainer(config_from_dict(config_dict(face_set, output_dir, model=str(shallow_tiny_dir), **loss_weights)))


def all_tensors(trainer):
    modules = {
        "unet": trainer.model.unet, "vae": trainer.model.vae, "text_encoder": trainer.model.text_encoders[0],
        "text_encoder_2": trainer.model.text_encoders[1], "image_encoder": trainer.model.adapter.image_encoder,
        "resampler": trainer.model.adapter.resampler, "tiny_vae": trainer.tiny_vae,
        "arcface": trainer.identity_loss.arcface,
    }  # fmt: skip
    return {f"{m}.{k}": v.detach().clone() for m, module in modules.items() for k, v in module.state_dict().items()}


def test_one_step_changes_only_the_trainable_parameters(trainer):
    trainable = {name for named in trainer.groups.values() for name, _ in named}
    assert all(p.requires_grad for p in trainer.params)
    before = all_tensors(trainer)
    assert trainable < set(before)
    logs = trainer.train_step(trainer.batch_for_step(trainer.step))
    assert logs["grad_norm/diffusion"] > 0 and logs["grad_norm/lookahead"] > 0  # two optimiser steps
    after = all_tensors(trainer)
    frozen_changed = [name for name in before if name not in trainable and not torch.equal(before[name], after[name])]
    assert frozen_changed == []  # bit-identical, buffers (BatchNorm statistics) included
    unchanged = [name for name in trainable if torch.equal(before[name], after[name])]
    assert unchanged == []
    kinds = {".lora_A.kv_encoder", ".lora_B.kv_encoder", "to_k_kv.lora", "to_v_kv.lora", "to_k_ip", "to_v_ip", "resampler."}
    assert all(any(kind in name for name in trainable) for kind in kinds)


def _lookahead_grads(trainer, inputs, step):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.lookahead_loss(inputs, step)["loss"].backward()
    return {name: p.grad.clone() for named in trainer.groups.values() for name, p in named if p.grad is not None}


def test_lookahead_gradient_reaches_the_kv_encoder_lora_and_the_resampler(trainer):
    step = 1
    inputs = trainer.prepare_inputs(trainer.batch_for_step(step), step)
    grads = _lookahead_grads(trainer, inputs, step)
    for kind in ("attn1.to_q.lora_B.kv_encoder", "attn2.to_v.lora_B.kv_encoder", "to_k_kv.lora_B.kv_encoder",
                 "to_v_kv.lora_A.kv_encoder", "resampler.", "to_k_ip"):  # fmt: skip
        assert any(kind in name and grad.abs().sum() > 0 for name, grad in grads.items()), kind
    frozen = [n for n, p in trainer.model.unet.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == []

    # Recomputing checkpointed blocks must see the LoRA state of the network that ran them: the gradients
    # equal those of a run without checkpointing ...
    unet = trainer.model.unet
    unet.disable_gradient_checkpointing()
    try:
        plain = _lookahead_grads(trainer, inputs, step)
        torch.testing.assert_close(grads, plain, rtol=1e-4, atol=1e-9)
        # ... and diffusers' own checkpointing, which recomputes under whatever adapters were activated last, does not.
        unet.enable_gradient_checkpointing()
        try:
            naive = _lookahead_grads(trainer, inputs, step)
            assert any(not torch.allclose(naive[n], plain[n]) for n in plain)
        except torch.utils.checkpoint.CheckpointError:
            pass
    finally:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=trainer.lora.checkpoint)
        trainer.optimizer.zero_grad(set_to_none=True)


def test_an_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(face_set, shallow_tiny_dir, loss_weights,
                                                                           tmp_path):
    def config(name):
        return config_from_dict(config_dict(face_set, tmp_path / name, model=str(shallow_tiny_dir), **loss_weights,
                                            gradient_checkpointing=False, checkpoint__every=2,
                                            lookahead__lcm_scale__every=1, lookahead__lcm_scale__full_prob=0.2))  # fmt: skip

    def recorder(losses, stop_at=None):
        def on_step(step, logs):
            losses[step] = {k: v for k, v in logs.items() if k.startswith(("loss/", "lcm_scale"))}
            if step == stop_at:
                raise Interrupted

        return on_step

    straight, interrupted, resumed = {}, {}, {}
    reference = Trainer(config("straight"))
    reference.train(on_step=recorder(straight))
    with pytest.raises(Interrupted):  # killed after step 3 of 4, one step after the checkpoint at 2
        Trainer(config("killed")).train(on_step=recorder(interrupted, stop_at=2))
    assert [interrupted[s] for s in (0, 1, 2)] == [straight[s] for s in (0, 1, 2)]
    assert (tmp_path / "killed/checkpoints/step-0000002/trainer_state/state.json").is_file()

    restarted = Trainer(config("killed"))
    result = restarted.train(resume=True, on_step=recorder(resumed))
    assert sorted(resumed) == [2, 3] and result["step"] == 4
    assert resumed == {s: straight[s] for s in (2, 3)}
    assert len({straight[s]["lcm_scale"] for s in straight}) > 1  # the scale draws really vary over these steps
    final, expected = restarted.trainable_state(), reference.trainable_state()
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_a_short_run_on_two_identities_lowers_the_identity_loss(face_set, shallow_tiny_dir, loss_weights, tmp_path):
    steps = 4
    trainer = Trainer(config_from_dict(config_dict(
        face_set, tmp_path / "run", model=str(shallow_tiny_dir), batch_size=2, max_steps=steps,
        gradient_checkpointing=False, **loss_weights,
        diffusion__weight=0.0,
        lookahead__identity_weight=1.0, optim__lr_encoder=1e-3, optim__lr_adapter=1e-3,
        checkpoint__every=100,
    )))  # fmt: skip
    inputs = [trainer.prepare_inputs(trainer.batch_for_step(s), s) for s in range(steps)]

    def identity_losses():
        with torch.no_grad():  # the same t, noise, K/V drop and LCM scale as the training step drew
            return torch.tensor([float(trainer.lookahead_loss(x, s)["identity"]) for s, x in enumerate(inputs)])

    before = identity_losses()
    trainer.train()
    after = identity_losses()
    assert after.mean() < 0.99 * before.mean()  # the shallow tiny's: 0.965 of before, each of the 4 steps lower
    assert int((after < before).sum()) >= steps - 1


def load_checkpoint_model(checkpoint):
    """The SDK model of a training checkpoint, after checking it holds exactly the trainer's saved trainables."""
    trained = load_file(str(checkpoint / "trainer_state/trainables.safetensors"))
    model = Personalizer.from_pretrained(checkpoint, device="cpu")
    loaded = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    loaded |= {f"resampler.{k}": v for k, v in model.adapter.resampler.state_dict().items()}
    assert trained and all(torch.equal(loaded[name], value) for name, value in trained.items())
    return model, trained


def test_cli_trains_checkpoints_logs_and_resumes(face_set, tiny, tmp_path):
    path = tmp_path / "train.yaml"
    config = config_dict(face_set, tmp_path / "run", gradient_checkpointing=False)
    config["logging"] = {"tracker": "tensorboard", "every": 1, "preview_every": 1}
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--config", str(path), "max_steps=1"])
    assert first.exit_code == 0, first.output
    assert "trained to step 1" in first.output
    assert (tmp_path / "run/checkpoints/step-0000001/trainer_state/optimizer.pt").is_file()
    assert list((tmp_path / "run/logs").rglob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "run/data_summary.json").read_text())
    assert summary["left_out"]["missing files"] == 1 and summary["left_out"]["identities with a single image"] == 1

    second = runner.invoke(app, ["train", "--config", str(path), "max_steps=2", "--resume"])
    assert second.exit_code == 0, second.output
    assert "trained to step 2" in second.output
    checkpoint = tmp_path / "run/checkpoints/step-0000002"
    state = json.loads((checkpoint / "trainer_state/state.json").read_text())
    assert state["step"] == 2 and state["samples_seen"] == 2

    # The checkpoint is a model directory: the SDK loads it as it is, with the trained weights in place.
    model, trained = load_checkpoint_model(checkpoint)
    baseline = tiny.adapter.resampler.state_dict()
    assert any(not torch.equal(baseline[k], v) for k, v in model.adapter.resampler.state_dict().items())
    assert len(model.generate(sample_face(), "a face", steps=1, seed=0)) == 1

    # A damaged newest checkpoint: one line naming it and the previous intact one, and no training.
    optimizer = checkpoint / "trainer_state/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    broken = runner.invoke(app, ["train", "--config", str(path), "max_steps=3", "--resume"])
    previous = tmp_path / "run/checkpoints/step-0000001"
    assert broken.exit_code == 2 and len(broken.stderr.splitlines()) == 1, broken.output
    assert broken.stderr.startswith(f"error: resume: checkpoint {checkpoint} is broken (trainer_state/optimizer.pt: sha256 ")
    assert broken.stderr.strip().endswith(f"the previous complete checkpoint is {previous}: resume from it with --resume-from {previous}")

    bad = runner.invoke(app, ["train", "--config", str(path), "dropout.kv_tokens=2"])
    assert bad.exit_code == 2 and "dropout.kv_tokens: must be in [0, 1)" in bad.output
    assert "Traceback" not in bad.output


def test_checkpoints_of_a_model_directory_name_its_frozen_parts_instead_of_copying_them(
    face_set, loss_weights, shallow_tiny_dir, tmp_path
):
    config = config_dict(
        face_set, tmp_path / "run", model=str(shallow_tiny_dir), max_steps=1, gradient_checkpointing=False, **loss_weights
    )
    trainer = Trainer(config_from_dict(config))
    trainer.train()
    checkpoint = tmp_path / "run/checkpoints/step-0000001"
    manifest = json.loads((checkpoint / "lcmla.json").read_text())
    for frozen in ("sdxl", "image_encoder", "lcm_lora"):
        assert not (checkpoint / frozen).exists()
        assert manifest["components"][frozen]["path"] == str((shallow_tiny_dir / frozen).resolve())
    # The linked files keep the records (hashes) the base directory has for them.
    source = json.loads((shallow_tiny_dir / "lcmla.json").read_text())["files"]
    unet_file = "sdxl/unet/diffusion_pytorch_model.safetensors"
    assert manifest["files"][str((shallow_tiny_dir / unet_file).resolve())] == source[unet_file]

    model, trained = load_checkpoint_model(checkpoint)
    base = trainer.model.unet.state_dict()  # loaded from shallow_tiny_dir; training changed only the trained weights
    assert all(torch.equal(base[k], v) for k, v in model.unet.state_dict().items() if f"unet.{k}" not in trained)
    assert model.fingerprint != model_dir.validate(shallow_tiny_dir).fingerprint()


def test_two_processes_step_in_sync(face_set, shallow_tiny_dir, loss_weights, tmp_path):
    """Two gloo processes (what `accelerate launch --num_processes 2` starts on GPUs) average their gradients and
    compare their trainables after every step."""
    import os
    import subprocess
    import sys

    path = tmp_path / "train.yaml"
    config = config_dict(face_set, tmp_path / "run", model=str(shallow_tiny_dir), **loss_weights, max_steps=2,
                         gradient_checkpointing=False, checkpoint__every=2, logging__check_sync_every=1)  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lcmla_sdk.cli", "train", "--config", str(path)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "step 1: trainables identical on 2 rank(s)" in run.stdout
    assert "step 2: trainables identical on 2 rank(s)" in run.stdout
    assert run.stdout.count("trained to step 2") == 1  # rank 0 reports
    state = tmp_path / "run/checkpoints/step-0000002/trainer_state"
    assert (state / "rng-rank0.safetensors").is_file() and (state / "rng-rank1.safetensors").is_file()
    assert json.loads((state / "state.json").read_text())["samples_seen"] == 4


def test_previews_without_a_detected_face_are_left_out_of_the_identity_loss(trainer, tmp_path):
    pytest.importorskip("insightface")
    from facepack import FakeFace, write_face_pack

    from lcmla_sdk.train.faces import DetectorLandmarks

    landmarks = ((250.0, 260.0), (390.0, 262.0), (320.0, 350.0), (262.0, 430.0), (380.0, 428.0))
    inputs = trainer.prepare_inputs(trainer.batch_for_step(5), 5)
    template = trainer.landmarks
    try:
        trainer.landmarks = DetectorLandmarks(write_face_pack(tmp_path / "face", [FakeFace((150, 120, 490, 560), landmarks)]))
        found = trainer.lookahead_loss(inputs, 5)
        assert found["faces_missing"] == 0 and found["loss"].requires_grad
        trainer.landmarks = DetectorLandmarks(write_face_pack(tmp_path / "none", []))
        missing = trainer.lookahead_loss(inputs, 5)
        assert missing["faces_missing"] == 1 and "identity" not in missing and not missing["loss"].requires_grad
        before = trainer.trainable_state()
        assert trainer.optimise(missing["loss"]) is None  # no gradient anywhere: no optimiser step
        assert all(torch.equal(before[k], v) for k, v in trainer.trainable_state().items())
    finally:
        trainer.landmarks = template


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test with another precision starts and leaves a clean one (so it
    runs last in this file: the module's shared trainer holds the state it replaces)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_keeps_frozen_weights_in_half_and_trainables_in_fp32(
    face_set, shallow_tiny_dir, loss_weights, tmp_path, fresh_accelerate_state
):
    config = config_dict(face_set, tmp_path, model=str(shallow_tiny_dir), **loss_weights, mixed_precision="bf16",
                         gradient_checkpointing=False)  # fmt: skip
    trainer = Trainer(config_from_dict(config))
    trainable = {id(p) for p in trainer.params}
    frozen = {p.dtype for p in trainer.model.unet.parameters() if id(p) not in trainable}
    assert frozen == {torch.bfloat16} and trainer.tiny_vae.dtype == torch.bfloat16
    assert trainer.model.vae.dtype == torch.float32  # the SDXL VAE config asks for fp32 (force_upcast)
    logs = trainer.train_step(trainer.batch_for_step(0))
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert torch.isfinite(torch.tensor([logs["loss/diffusion"], logs["loss/identity"]])).all()
    assert logs["grad_norm/diffusion"] > 0 and logs["grad_norm/lookahead"] > 0
