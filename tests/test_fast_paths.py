"""The speed paths compute what the plain paths compute: merged adapters, batched guidance branches, the
per-identity K/V cache, independent outputs, concurrent calls."""


import numpy as np
import pytest
import torch
from conftest import run_together, unet_inputs

from lcmla_sdk import Personalizer
from lcmla_sdk.guidance import Guidance, three_branch
from lcmla_sdk.lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, activate_adapters
from lcmla_sdk.networks import Denoiser, KVEncoder


@torch.no_grad()
def test_merged_adapters_equal_the_unmerged_peft_path(tiny):
    inputs = unet_inputs(tiny, batch=2)
    tokens = torch.randn(2, 16, tiny.unet.config.cross_attention_dim)
    peft_encoder, peft_denoiser = KVEncoder(tiny.unet, len(tiny.kv_blocks)), Denoiser(tiny.unet)
    try:
        activate_adapters(tiny.unet, (KV_ENCODER_ADAPTER,))
        kv_unmerged = peft_encoder(*inputs)
        activate_adapters(tiny.unet, (LCM_ADAPTER,))
        lcm_unmerged = peft_denoiser(*inputs, tokens, 1.0, kv_unmerged)
        activate_adapters(tiny.unet, ())
        plain_unmerged = peft_denoiser(*inputs, tokens, 1.0, kv_unmerged)
    finally:
        activate_adapters(tiny.unet, ())
    kv = tiny.kv_encoder(*inputs)
    for merged, unmerged in zip(kv, kv_unmerged):
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiny.lcm_denoiser(*inputs, tokens, 1.0, kv), lcm_unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiny.denoiser(*inputs, tokens, 1.0, kv), plain_unmerged, rtol=1e-4, atol=1e-5)
    # and the adapters matter: the merged networks are not the plain UNet
    assert (lcm_unmerged - plain_unmerged).abs().max() > 1e-3


@torch.no_grad()
def test_guidance_branches_in_one_pass_equal_two_separate_passes(tiny):
    latent, t, text, pooled, ids = unet_inputs(tiny, batch=2)
    tokens = torch.randn(2, 16, tiny.unet.config.cross_attention_dim)
    kv = tiny.kv_encoder(latent, t, text, pooled, ids)
    scale = torch.tensor([0.5, 1.0])
    nokv = tiny.denoiser(latent, t, text, pooled, ids, tokens, scale, None)
    full = tiny.denoiser(latent, t, text, pooled, ids, tokens, scale, kv)
    double = [torch.cat([x, x]) for x in (latent, t, text, pooled, ids, tokens, scale)]
    both = tiny.denoiser(*double, kv)  # K/V for the last two rows only
    torch.testing.assert_close(both[:2], nokv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[2:], full, rtol=1e-4, atol=1e-5)
    assert (full - nokv).abs().max() > 1e-3


def test_three_branch_takes_weights_as_a_tensor():
    e = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    torch.testing.assert_close(three_branch(*e, torch.tensor([3.0, 2.0, 2.0])), three_branch(*e, Guidance()))


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_cached_kv_loop_equals_the_uncached_loop_with_the_same_fixed_face_noise(tiny, face, mode):
    identity = tiny.encode_face(face)
    kwargs = {"seed": [3, 4], "mode": mode, "steps": 2 if mode == "quality" else None, "output": "latent"}
    uncached = tiny.generate(identity, "a face", num_images=2, face_noise="fixed", **kwargs)
    cached = tiny.generate(identity, "a face", num_images=2, kv_cache=True, **kwargs)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    # the cache is reused (no K/V-encoder call) for another prompt and seed
    calls, encoder = [], tiny.kv_encoder
    tiny.rebuild_networks(kv_encoder=lambda *a: calls.append(1) or encoder(*a))
    try:
        # the cache was dropped with the networks: computed again once, then reused
        tiny.generate(identity, "a face", num_images=2, kv_cache=True, **kwargs)
        first = len(calls)
        tiny.generate(identity, "an oil painting of a face", seed=9, mode=mode, steps=kwargs["steps"], kv_cache=True)
    finally:
        tiny.rebuild_networks()
    assert first == (2 if mode == "quality" else 4) and len(calls) == first
    # and the fixed noise is a real deviation from the authors' pairing
    paired = tiny.generate(identity, "a face", num_images=2, **kwargs)
    assert (paired - cached).abs().max() > 1e-3


@pytest.mark.parametrize("kv_cache", [False, True])
def test_kv_computed_ahead_in_batched_passes_equals_the_kv_computed_in_every_step(tiny, face, kv_cache):
    identity = tiny.encode_face(face)
    kwargs = {"num_images": 2, "seed": [3, 4], "mode": "fast", "output": "latent", "kv_cache": kv_cache, "face_noise": "fixed"}
    counting = RowCounter(tiny.kv_encoder)
    tiny.rebuild_networks(kv_encoder=counting)
    try:
        in_steps = tiny.generate(identity, "a face", **kwargs)
        tiny.kv_ahead_rows = 4 * 2 * 2  # 4 steps x (2 images, or the cache's one identity) in one pass
        tiny.identity_kv_cache.clear()
        ahead = tiny.generate(identity, "a face", **kwargs)
    finally:
        tiny.kv_ahead_rows = 0
        tiny.rebuild_networks()
    torch.testing.assert_close(ahead, in_steps, rtol=1e-4, atol=1e-4)
    # per step: 4 passes of the rows of one step; ahead: one pass of every step's rows
    rows = 1 if kv_cache else 2
    assert counting.rows == [rows] * 4 + [4 * rows]


class RowCounter(torch.nn.Module):
    """A network that records the rows of each call."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.rows = network, []

    def forward(self, *args):
        self.rows.append(args[0].shape[0])
        return self.network(*args)


def test_kv_cache_and_face_noise_arguments_are_checked(tiny, face):
    with pytest.raises(ValueError, match="^kv_cache:"):
        tiny.generate(face, "a face", steps=1, kv_cache=True, use_kv=False)
    with pytest.raises(ValueError, match="^face_noise:"):
        tiny.generate(face, "a face", steps=1, kv_cache=True, face_noise="paired")
    with pytest.raises(ValueError, match="^face_noise:"):
        tiny.generate(face, "a face", steps=1, face_noise="random")
    with pytest.raises(ValueError, match="^kv_cache:"):
        tiny.generate(face, ["a", "b"], negative_prompt=["x", "y"], steps=1, kv_cache=True)
    with pytest.raises(ValueError, match="^vae:"):
        tiny.generate(face, "a face", steps=1, vae="huge")


def test_tiny_vae_decodes_the_same_latents_to_images_of_the_same_size(tiny, face):
    full = tiny.generate(face, "a face", seed=1, mode="fast", output="pt")
    preview = tiny.generate(face, "a face", seed=1, mode="fast", output="pt", vae="tiny")
    assert full.shape == preview.shape == (1, 3, 128, 128)
    assert 0 <= preview.min() and preview.max() <= 1 and not torch.equal(full, preview)


@torch.no_grad()
def test_outputs_of_successive_network_calls_are_independent(tiny):
    first_inputs, second_inputs = unet_inputs(tiny, seed=1), unet_inputs(tiny, seed=2)
    for network in (tiny.denoiser, tiny.lcm_denoiser, tiny.kv_encoder):
        first = network(*first_inputs)
        kept = [x.clone() for x in first] if isinstance(first, tuple) else first.clone()
        network(*second_inputs)
        if isinstance(first, tuple):
            assert all(torch.equal(a, b) for a, b in zip(first, kept))
        else:
            assert torch.equal(first, kept)


def test_graph_backed_networks_copy_outputs_out_of_reused_engine_buffers():
    """TensorRT's Engine returns views of static buffers; the runtime's networks must hand out copies."""
    from lcmla_sdk.engines.runtime import _GraphNetwork
    from lcmla_sdk.manifest import TensorInfo

    class ReusingRunner:  # returns one static buffer every call, as Engine.infer does
        buffer = torch.zeros(2, 3)

        def infer(self, inputs):
            self.buffer.copy_(inputs["x"] * 2)
            return {"y": self.buffer}

    class Entry:
        inputs, outputs = [TensorInfo("x", "float32", (2, 3))], [TensorInfo("y", "float32", (2, 3))]

    network = _GraphNetwork(ReusingRunner(), Entry(), torch.float32)
    (first,) = network._run([torch.ones(2, 3)])
    network._run([torch.full((2, 3), 5.0)])
    assert torch.equal(first, torch.full((2, 3), 2.0))


def test_concurrent_encode_face_calls_equal_the_calls_made_one_at_a_time(tiny, face, astronaut):
    photos = [face, astronaut, face, astronaut]
    alone = [tiny.encode_face(p) for p in photos]
    model = type(tiny).from_pretrained("tiny", device="cpu")  # the face analyzer not started yet
    together = run_together(lambda i: model.encode_face(photos[i]), len(photos))
    for a, b in zip(alone, together):
        assert a.digest() == b.digest() and a.boxes == b.boxes


def test_concurrent_generate_calls_give_the_images_of_the_same_calls_made_one_at_a_time(tiny, face):
    identity = tiny.encode_face(face)
    calls = [
        {"mode": "quality", "steps": 2, "seed": 1},
        {"mode": "fast", "seed": 2},
        {"mode": "quality", "steps": 2, "seed": 3, "use_kv": False},
        {"mode": "fast", "seed": 4, "kv_cache": True},
    ] * 2
    alone = [tiny.generate(identity, "a face", output="latent", **c) for c in calls]
    together = run_together(lambda i: tiny.generate(identity, "a face", output="latent", **calls[i]), len(calls))
    for index, (a, b) in enumerate(zip(alone, together)):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=str(calls[index]))


def test_presets_are_drawn_where_they_live_and_reproducibly(tiny):
    again = type(tiny).from_pretrained("tiny", device="cpu")
    assert again.fingerprint == tiny.fingerprint
    for (name, a), b in zip(tiny.unet.named_parameters(), again.unet.parameters()):
        assert torch.equal(a, b), name
    assert tiny.decoder.tiny_vae is not None and tiny.decoder.tiny_vae.device.type == "cpu"


def test_a_call_without_kv_builds_no_kv_encoder(face):
    """The K/V-encoder is a merged copy of the UNet (gigabytes at full size): made only for calls that use K/V."""
    model = Personalizer.from_pretrained("tiny", device="cpu")
    identity = model.encode_face(face)
    for mode in ("fast", "quality"):
        model.generate(identity, "a face", mode=mode, steps=1, use_kv=False, output="latent")
    assert "kv_encoder" not in model._networks._built
    model.generate(identity, "a face", mode="fast", steps=1, output="latent")
    assert "kv_encoder" in model._networks._built
