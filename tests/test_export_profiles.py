"""What ``generate`` sends each network lies inside the profile its export declares (the runtime's shape contract):
the tiny preset's networks run as the runtime runs exported graphs, with every call's sizes recorded, no export needed."""

import pytest

from lcmla_sdk import Personalizer
from lcmla_sdk.export import ShapeRanges, build_specs


# Ranges whose smallest batch is above one image: a K/V cache still runs the K/V-encoder on one image's rows.
CALL_RANGES = ShapeRanges(batch=(2, 2, 3), height=(64, 64, 128), width=(64, 64, 128), references=(1, 2, 2))


class _RecordingRunner:
    """Runs a spec's PyTorch module where the runtime would run its exported graph, recording the sizes of each call."""

    def __init__(self, spec, seen):
        self.spec, self.seen = spec, seen

    def infer(self, inputs):
        self.seen.append((self.spec.name, _symbolic_sizes(self.spec, inputs)))
        outputs = self.spec.module(*(inputs[t.name] for t in self.spec.inputs))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {t.name: value for t, value in zip(self.spec.outputs, outputs)}


def _symbolic_sizes(spec, inputs):
    """Every symbolic dim's size in ``inputs`` (a subset of the spec's), checking static dims and repeated names."""
    sizes = {}
    for info in spec.inputs:
        if info.name in inputs:
            shape = tuple(inputs[info.name].shape)
            assert len(shape) == len(info.dims), (spec.name, info.name, shape)
            for dim, size in zip(info.dims, shape):
                expected = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
                assert size == expected, (spec.name, info.name, shape)
    return sizes


def _outside_profile(specs, seen):
    """``(network, dim, size)`` of every recorded size outside its spec's profile."""
    return [(name, dim, size) for name, sizes in seen for dim, size in sizes.items()
            if not specs[name].profile.min[dim] <= size <= specs[name].profile.max[dim]]  # fmt: skip


@pytest.fixture(scope="module")
def recording_model():
    """A tiny model running its networks as the runtime runs exported graphs (:mod:`lcmla_sdk.engines.runtime`) and its
    text encoders and VAE under forward pre-hooks, with every call's sizes recorded; the specs of ``CALL_RANGES``."""
    from lcmla_sdk.engines.runtime import ATTRIBUTES, _NETWORK_CLASSES
    from lcmla_sdk.manifest import NetworkEntry

    model = Personalizer.from_pretrained("tiny", device="cpu")
    specs, seen = build_specs(model, CALL_RANGES), []
    graphs = {}
    for name, network_class in _NETWORK_CLASSES.items():
        spec = specs[name]
        entry = NetworkEntry(name, spec.inputs, spec.outputs, spec.profile, f"{name}/model.onnx", "0" * 64)
        graphs[ATTRIBUTES[name]] = network_class(_RecordingRunner(spec, seen), entry, model.dtype)
    model.rebuild_networks(**graphs)
    hooked = {"text_encoder": model.text_encoders[0], "text_encoder_2": model.text_encoders[1],
              "vae_encoder": model.vae.encoder, "vae_decoder": model.decoder.network.vae.decoder}  # fmt: skip
    for name, module in hooked.items():
        # Each of these graphs has one input: what the module's forward takes first.
        def record(module, args, name=name):
            seen.append((name, _symbolic_sizes(specs[name], {specs[name].inputs[0].name: args[0]})))

        module.register_forward_pre_hook(record)
    return model, specs, seen, graphs


@pytest.fixture
def recording(recording_model):
    """:func:`recording_model` with nothing recorded yet and no K/V cached (built once: the setup dominates)."""
    model, specs, seen, graphs = recording_model
    seen.clear()
    model.rebuild_networks(**graphs)  # the same networks, with the K/V cache emptied
    return model, specs, seen


@pytest.mark.parametrize(
    "mode, images, references, use_kv, kv_cache, size",
    [("quality", 2, 2, True, False, (64, 64)), ("quality", 3, 1, False, False, (128, 64)),
     ("fast", 2, 1, True, True, (64, 128)), ("fast", 3, 2, True, False, (64, 64)),
     ("quality", 2, 2, True, True, (128, 128))],
)  # fmt: skip
def test_what_generate_sends_each_network_lies_inside_its_profile(recording, face, mode, images, references, use_kv,
                                                                   kv_cache, size):  # fmt: skip
    model, specs, seen = recording
    model.generate([face] * references, "a face", num_images=images, seed=0, mode=mode, steps=2, height=size[0],
                   width=size[1], use_kv=use_kv, kv_cache=kv_cache, output="pt")  # fmt: skip
    called = {name for name, _ in seen}
    assert {"adapter", "denoiser" if mode == "quality" else "denoiser_lcm", "vae_decoder", "text_encoder"} <= called
    assert ("kv_encoder" in called) == use_kv
    assert _outside_profile(specs, seen) == []


def test_more_references_than_exported_fall_outside_the_denoisers_profile(recording, face):
    model, specs, seen = recording
    model.generate([face] * 3, "a face", num_images=2, seed=0, steps=1, height=64, width=64, output="latent")
    outside = {(name, dim) for name, dim, _ in _outside_profile(specs, seen)}
    assert outside == {("denoiser", "face_tokens_1"), ("denoiser", "face_tokens_2")}
