"""CUDA-graph sampling and graph-ready networks, on a GPU (fp16). Run on the device: ``python -m pytest -m gpu``."""


import pytest
import torch
from conftest import run_together, unet_inputs
from diffusers.models.upsampling import Upsample2D

from lcmla_sdk import Personalizer
from lcmla_sdk.lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, activate_adapters
from lcmla_sdk.networks import Denoiser, KVEncoder
from lcmla_sdk.upsampling import PhaseUpsample2D

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device: pytest -m gpu)"),
]
# Graph replay runs the captured kernels on the same inputs: the result should be identical; allow a few fp16 ulps.
GRAPH_TOLERANCE = 2e-3

CASES = [
    {"mode": "fast"},
    {"mode": "fast", "kv_cache": True},
    {"mode": "fast", "num_images": 2, "seed": [5, 6]},
    {"mode": "quality", "steps": 3},
    {"mode": "quality", "steps": 3, "use_kv": False},
    {"mode": "quality", "steps": 3, "num_images": 2, "seed": [5, 6], "guidance": (2.0, 1.0, 0.5)},
]


@pytest.fixture(scope="module")
def model() -> Personalizer:
    return Personalizer.from_pretrained("tiny", device="cuda")


@pytest.fixture(scope="module")
def identity(model, face):
    return model.encode_face(face)


def _generate(model, identity, graphs: bool, **kwargs):
    kwargs = {"seed": 3, "output": "latent", **kwargs}
    model.cuda_graphs = graphs
    try:
        return model.generate(identity, "a face", **kwargs)
    finally:
        model.cuda_graphs = True


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_graph_loop_equals_the_eager_loop_and_is_reused(model, identity, case):
    eager = _generate(model, identity, False, **case)
    before = len(model.step_graphs)
    graphed = _generate(model, identity, True, **case)
    assert len(model.step_graphs) == before + 1  # captured once for this shape ...
    again = _generate(model, identity, True, **case)
    assert len(model.step_graphs) == before + 1  # ... and replayed, not captured again
    diff = (graphed.float() - eager.float()).abs().max().item()
    print(f"graph vs eager {case}: max |diff| {diff:.3g}")
    assert diff <= GRAPH_TOLERANCE * eager.abs().max().item()
    assert torch.equal(graphed, again)
    assert graphed.data_ptr() != again.data_ptr()  # results are copies, not the graph's buffers


def test_a_new_value_changes_the_replayed_result(model, identity):
    base = _generate(model, identity, True, mode="quality", steps=3)
    other = _generate(model, identity, True, mode="quality", steps=3, guidance=(1.0, 4.0, 0.0), adapter_scale=0.5)
    reference = _generate(model, identity, False, mode="quality", steps=3, guidance=(1.0, 4.0, 0.0), adapter_scale=0.5)
    assert (other - base).abs().max() > 1e-2
    torch.testing.assert_close(other, reference, rtol=0, atol=GRAPH_TOLERANCE * reference.abs().max().item())


@torch.no_grad()
def test_each_network_is_captured_alone_and_replays_new_inputs(model):
    inputs = [x.to("cuda", torch.float16 if x.is_floating_point() else x.dtype) for x in unet_inputs(model)]
    inputs[1] = inputs[1].float()
    tokens = torch.randn(2, 16, model.unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    scale = torch.ones(2, device="cuda")
    kv = model.kv_encoder(*inputs)
    calls = {
        "kv_encoder": lambda ins: model.kv_encoder(*ins),
        "denoiser": lambda ins: model.denoiser(*ins, tokens, scale, kv),
        "lcm_denoiser": lambda ins: model.lcm_denoiser(*ins, tokens, scale, kv),
    }
    for name, call in calls.items():
        static = [x.clone() for x in inputs]
        call(static)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(static)
        fresh = [torch.randn_like(x) if x.is_floating_point() and x.dim() > 1 else x for x in inputs]
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        expected = call(fresh)
        outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
        for a, b in zip(outs, expecteds):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3, msg=name)


@torch.no_grad()
def test_merged_adapters_equal_the_unmerged_math_in_fp16(model):
    inputs = [x.to("cuda", torch.float16 if x.is_floating_point() else x.dtype) for x in unet_inputs(model)]
    inputs[1] = inputs[1].float()
    try:
        activate_adapters(model.unet, (KV_ENCODER_ADAPTER,))
        kv_unmerged = KVEncoder(model.unet, len(model.kv_blocks))(*inputs)
        activate_adapters(model.unet, (LCM_ADAPTER,))
        lcm_unmerged = Denoiser(model.unet)(*inputs, kv=kv_unmerged)
    finally:
        activate_adapters(model.unet, ())
    for a, b in zip(model.kv_encoder(*inputs), kv_unmerged):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model.lcm_denoiser(*inputs, kv=kv_unmerged), lcm_unmerged, rtol=2e-2, atol=2e-2)


def test_warmup_captures_ahead_of_the_first_call(face):
    model = Personalizer.from_pretrained("tiny", device="cuda")
    identity = model.encode_face(face)
    model.warmup(mode="fast", num_images=1)
    assert len(model.step_graphs) == 1
    model.generate(identity, "a face", mode="fast", seed=0, output="latent")
    assert len(model.step_graphs) == 1
    model.warmup(mode="quality", num_images=1)  # one step: the same graph as a call of many
    assert len(model.step_graphs) == 2
    model.generate(identity, "a face", mode="quality", steps=4, seed=0, output="latent")
    assert len(model.step_graphs) == 2


def test_rebuilt_networks_drop_stale_graphs(face):
    model = Personalizer.from_pretrained("tiny", device="cuda")
    identity = model.encode_face(face)
    before = _generate(model, identity, True, mode="fast")
    for name, param in model.unet.named_parameters():
        if ".lora_B.lcm" in name:
            param.data.mul_(3.0)
    model.rebuild_networks()
    assert len(model.step_graphs) == 0
    after = _generate(model, identity, True, mode="fast")
    eager = _generate(model, identity, False, mode="fast")
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, eager, rtol=0, atol=GRAPH_TOLERANCE * eager.abs().max().item())


def test_concurrent_calls_with_graphs_equal_the_calls_one_at_a_time(model, identity):
    calls = [{"mode": "fast", "seed": s} for s in range(4)] + [{"mode": "quality", "steps": 2, "seed": s} for s in range(4)]
    alone = [_generate(model, identity, True, **c) for c in calls]
    together = run_together(lambda i: model.generate(identity, "a face", output="latent", **calls[i]), len(calls))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_gpu_presets_are_drawn_on_the_gpu_reproducibly():
    first = Personalizer.from_pretrained("tiny", device="cuda", seed=4)
    second = Personalizer.from_pretrained("tiny", device="cuda", seed=4)
    assert first.fingerprint == second.fingerprint != Personalizer.from_pretrained("tiny", device="cpu", seed=4).fingerprint
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert a.device.type == "cuda" and torch.equal(a, b)


@torch.no_grad()
def test_graphed_text_encoders_equal_the_eager_ones(model):
    from lcmla_sdk.text import encode_prompts

    for prompts in (["a face"], ["an oil painting of a face", "x"], ["a photo of a face, studio light"]):
        graphed = model.prompt_encoder.encode(prompts, graphs=True)
        eager = encode_prompts(prompts, model.tokenizers, model.text_encoders)
        for a, b in zip(graphed, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    graphs = model.prompt_encoder.graphed.graphs
    assert 1 in graphs and 2 in graphs  # captured, not fallen back


def test_the_decode_network_equals_the_vaes_own_decode_in_fp16(model):
    generator = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(2, 4, 32, 48, device="cuda", dtype=model.vae.dtype, generator=generator)
    with torch.inference_mode():
        expected = model.vae.decode(latents).sample.float()
        got = model.decoder.network(latents).float()
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_eager_upsampling_by_phases_on_the_gpu_gives_a_contiguous_output():
    # contiguous is the layout the decode's later layers ran fastest in on an H100 (channels-last: 33% slower)
    upsample = Upsample2D(64, use_conv=True).to("cuda", torch.float16)
    x = torch.randn(2, 64, 24, 16, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, expected = PhaseUpsample2D(upsample)(x), upsample(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
