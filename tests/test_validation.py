"""Validation at the door (issue 12): every public argument of generate, encode_face, from_pretrained and Identity.load
is checked for type and range before any work, with a ValueError (or an LcmlaError for files) naming it."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcmla_sdk import Identity, IdentityMismatchError, InvalidImageError, ModelFilesError, Personalizer, validation

BAD_GENERATE = [
    ({"use_kv": "false"}, "use_kv: expected True or False, got 'false'"),
    ({"use_kv": 0}, "use_kv: expected True or False"),
    ({"kv_cache": 1}, "kv_cache: expected True or False"),
    ({"prompt": None}, "prompt: expected a string or a non-empty list of strings, got None"),
    ({"prompt": []}, "prompt: expected a string or a non-empty list"),
    ({"prompt": ["a face", 3]}, "prompt: expected a string or a non-empty list"),
    ({"negative_prompt": 3}, "negative_prompt: expected a string or a non-empty list"),
    ({"negative_prompt": ["x", "y"]}, "negative_prompt: 2 given for 1 prompts"),
    ({"prompt": "a \ud800 face"}, "prompt: character 2 is a lone surrogate ('\\ud800'), not valid Unicode text"),
    ({"prompt": ["a face", "\udcff"]}, "prompt: string 1, character 0 is a lone surrogate ('\\udcff')"),
    ({"negative_prompt": "blurry\udc80"}, "negative_prompt: character 6 is a lone surrogate"),
    ({"prompt": b"a face"}, "prompt: expected a string or a non-empty list of strings, got b'a face'"),
    ({"prompt": ["a face", None]}, "prompt: expected a string or a non-empty list"),
    ({"prompt": [["a face"]]}, "prompt: expected a string or a non-empty list"),
    ({"negative_prompt": [b"x"]}, "negative_prompt: expected a string or a non-empty list"),
    ({"num_images": 0}, "num_images: 0 is out of range (>= 1)"),
    ({"num_images": 2.0}, "num_images: expected an integer, got 2.0 (float)"),
    ({"num_images": True}, "num_images: expected an integer, got True (bool)"),
    ({"seed": -1}, "seed: -1 is out of range (0 .. 18446744073709551615)"),
    ({"seed": 2**64}, "seed: 18446744073709551616 is out of range"),
    ({"seed": 2**64 - 1, "num_images": 2}, "seed: 18446744073709551615 + 1 for the last image is beyond"),
    ({"seed": 1.5}, "seed: expected an integer, got 1.5 (float)"),
    ({"seed": [1, "2"], "num_images": 2}, "seed: seed 1: expected an integer, got '2' (str)"),
    ({"seed": [1, 2]}, "seed: 2 seeds given for 1 image "),
    ({"mode": "turbo"}, "mode: 'turbo' is not one of ('quality', 'fast')"),
    ({"mode": ["fast"]}, "mode: ['fast'] is not one of"),
    ({"steps": 1000}, "steps: quality mode: 1000 is out of range (1 .. 150)"),
    ({"steps": 51, "mode": "fast"}, "steps: fast mode: 51 is out of range (1 .. 50)"),
    ({"steps": 0}, "steps: quality mode: 0 is out of range"),
    ({"steps": 2.0}, "steps: quality mode: expected an integer, got 2.0 (float)"),
    ({"guidance": 5.0}, "guidance: expected three weights (no_kv, full, kv), got 5.0"),
    ({"guidance": (1.0, 2.0)}, "guidance: expected three weights"),
    ({"guidance": (1.0, math.nan, 2.0)}, "guidance: full weight: nan is out of range (0.0 .. 100.0)"),
    ({"guidance": (1.0, 2.0, -1.0)}, "guidance: kv weight: -1.0 is out of range"),
    ({"guidance": (1.0, "2", 2.0)}, "guidance: full weight: expected a number, got '2' (str)"),
    ({"adapter_scale": math.inf}, "adapter_scale: inf is out of range (0.0 .. 100.0)"),
    ({"adapter_scale": "1"}, "adapter_scale: expected a number, got '1' (str)"),
    ({"height": 100}, "height: 100 is not a multiple of 32"),
    ({"width": -64}, "width: -64 is out of range (32 .. 8192)"),
    ({"height": 10**6}, "height: 1000000 is out of range (32 .. 8192)"),
    ({"output": "gif"}, "output: 'gif' is not one of ('pil', 'np', 'pt', 'latent')"),
    ({"callback": 3}, "callback: expected a callable or None, got int"),
]


@pytest.mark.parametrize("change, message", BAD_GENERATE, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_GENERATE)])
def test_bad_generate_arguments_are_refused_before_any_work(tiny, change, message, monkeypatch):
    monkeypatch.setattr(tiny, "encode_prompt", lambda *a: pytest.fail("work started before the arguments were checked"))
    arguments = {"face": np.zeros((64, 64, 3), np.uint8), "prompt": "a face", "steps": 1, **change}
    with pytest.raises(ValueError) as error:
        tiny.generate(**arguments)
    assert str(error.value).startswith(message), str(error.value)


# Strings of valid Unicode that a caller may pass: each is tokenized and encoded (the tokenizers raise TypeError on
# lone surrogates only, refused above).
ODD_PROMPTS = ["", "   ", "a\x00b", "\x07\x1b[31m red", "a\nb\r\tc", "\ufeff\u202eabc\u2066x\u2069", "e\u0301\u0301",
               "\uffff\ue000\U0010ffff\U000e0041", "😀 顔の写真 ﬁ", "a face " * 20_000, np.str_("a face")]  # fmt: skip


def test_every_unicode_prompt_is_encoded(tiny):
    prompts = validation.strings(ODD_PROMPTS, "prompt")
    (text, pooled), (neg_text, _) = tiny.encode_prompt(prompts, validation.strings(ODD_PROMPTS[::-1], "negative_prompt"))
    assert text.shape[0] == neg_text.shape[0] == len(ODD_PROMPTS) and torch.isfinite(text).all()


def test_numpy_integers_are_integers(tiny, face):
    identity = tiny.encode_face(face)
    plain = tiny.generate(identity, "a face", seed=3, steps=1, height=64, width=64, output="latent", num_images=2)
    numpy = tiny.generate(identity, "a face", seed=np.int64(3), steps=np.int32(1), height=np.int64(64),
                          width=np.uint16(64), output="latent", num_images=np.int8(2), use_kv=np.bool_(True))  # fmt: skip
    assert torch.equal(plain, numpy)
    assert torch.equal(tiny.generate(identity, "a face", seed=np.array([3, 4]), steps=1, height=64, width=64,
                                     output="latent", num_images=2), plain)  # fmt: skip


def test_calls_beyond_the_memory_budget_are_refused_with_the_estimate(tiny, face, monkeypatch):
    with pytest.raises(ValueError, match=r"^num_images/height/width \(1000000 images of 64x64, quality mode\): needs "
                                         r"about [\d.]+ GiB of activations, more than the [\d.]+ GiB available on cpu"):
        tiny.generate(face, "a face", num_images=10**6, height=64, width=64)
    with pytest.raises(ValueError, match=r"^num_images/height/width \(2 images of 8192x8192"):
        tiny.generate(face, ["a", "b"], height=8192, width=8192)
    needed = validation.generation_bytes(tiny, 1, 128, 128, "quality", True)
    monkeypatch.setenv("LCMLA_MEMORY_BUDGET_GIB", str(needed / 2**30 * 0.9))
    with pytest.raises(ValueError, match=f"needs about {needed / 2**30:.1f} GiB .*LCMLA_MEMORY_BUDGET_GIB sets the budget"):
        tiny.generate(face, "a face", steps=1)
    with pytest.raises(ValueError, match=r"^face \(3 photos\): needs about"):
        tiny.encode_face([face] * 3)
    monkeypatch.setenv("LCMLA_MEMORY_BUDGET_GIB", str(needed / 2**30 * 1.1))
    assert len(tiny.generate(face, "a face", steps=1)) == 1


# The peak resident memory of this process image, measured for each case in turn in one process (starting Python
# and building the tiny preset is most of a case's time). Before each case the freed heap goes back to the system and
# VmHWM is reset to the current RSS ("5" to clear_refs), as a fresh exec would start it; getrusage's maxrss can be
# reset by neither. Face detection is off: the identity's tensors are the same size either way.
MEASURE = """
import ctypes, sys, torch
from lcmla_sdk import Personalizer, validation
from lcmla_sdk.images import sample_face

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

torch.set_num_threads(1)
model = Personalizer.from_pretrained("tiny", device="cpu", faces=None)
identity = model.encode_face(sample_face())
model.generate(identity, "a face", steps=1, seed=0, height=64, width=64)
for case in sys.argv[1:]:
    mode, images, side = case.split(",")
    images, side = int(images), int(side)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = peak()
    model.generate(identity, "a face", steps=1, seed=0, mode=mode, num_images=images, height=side, width=side)
    print(case, (peak() - before) / validation.generation_bytes(model, images, side, side, mode, True))
"""
MEMORY_CASES = [("quality", 2, 512), ("fast", 1, 768)]


@pytest.fixture(scope="module")
def memory_ratios() -> dict[str, float]:
    """Measured peak / estimate for each of MEMORY_CASES, from one subprocess."""
    cases = [",".join(map(str, case)) for case in MEMORY_CASES]
    run = subprocess.run([sys.executable, "-c", MEASURE, *cases], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return {case: float(ratio) for case, ratio in (line.split() for line in run.stdout.splitlines()[-len(cases):])}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads and resets the peak memory in /proc")
@pytest.mark.parametrize("mode, images, side", MEMORY_CASES)
def test_the_memory_estimate_is_within_a_factor_of_two_of_the_measured_peak(memory_ratios, mode, images, side):
    ratio = memory_ratios[f"{mode},{images},{side}"]
    assert 0.5 <= ratio <= 2.0, ratio


@pytest.mark.parametrize(
    "change, message",
    [({"crop": None}, "crop: None is not one of ('none', 'face')"),
     ({"on_multiple": 3}, "on_multiple: 3 is not one of"),
     ({"images": []}, "face: no image given"),
     ({"images": np.full((64, 64, 3), 200.0, np.float32)}, "face: a float array must hold values in [0, 1], found 200 .. 200; "
                                                           "for values in 0..255 pass a uint8 array or divide by 255")],
)  # fmt: skip
def test_bad_encode_face_arguments(tiny, face, change, message):
    with pytest.raises(ValueError) as error:
        tiny.encode_face(**{"images": face, **change})
    assert str(error.value).startswith(message), str(error.value)


def test_float_arrays_in_unit_range_still_work_and_match_uint8(tiny, face):
    pixels = np.asarray(face)  # a real face: detection is on by default
    from_float, from_uint8 = (tiny.encode_face(x) for x in (pixels / 255.0, pixels))
    assert torch.equal(from_float.cond_tokens, from_uint8.cond_tokens)
    with pytest.raises(InvalidImageError, match=r"found -0.5 .. 0.5$"):
        tiny.encode_face(pixels / 255.0 - 0.5)


@pytest.mark.parametrize(
    "change, message",
    [({"device": "gpu"}, "device: 'gpu' is not a device PyTorch knows"),
     ({"device": 0}, "device: expected a string or torch.device, got 0 (int)"),
     ({"dtype": "float16"}, "dtype: expected None or one of"),
     ({"dtype": torch.int8}, "dtype: expected None or one of"),
     ({"seed": -1}, "seed: -1 is out of range"),
     ({"seed": "0"}, "seed: expected an integer"),
     ({"faces": 3}, "faces: expected a path"),
     ({"verify": "no"}, "verify: expected True or False"),
     ({"cuda_graphs": 1}, "cuda_graphs: expected True or False"),
     ({"name": None}, "name: expected a path (str or os.PathLike), got None")],
)  # fmt: skip
def test_bad_from_pretrained_arguments(change, message):
    with pytest.raises(ValueError) as error:
        Personalizer.from_pretrained(**{"name": "tiny", "device": "cpu", **change})
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="device: 'cuda:1' asked for, but no CUDA device is available here"):
        Personalizer.from_pretrained("tiny", device="cuda:1")


# ------------------------------------------------------------------ identities
def test_identities_with_non_finite_or_foreign_tensors_are_refused(tiny, face, tmp_path):
    identity = tiny.encode_face(face)
    nan = Identity(**{**vars(identity), "latent_mean": identity.latent_mean * math.nan})
    with pytest.raises(ValueError, match="^face: the identity's latent_mean holds NaN or infinite values"):
        tiny.generate(nan, "a face", steps=1)
    path = nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(ModelFilesError, match=f"^identity: {path}: latent_mean holds NaN"):
        tiny.load_identity(path)
    # The right fingerprint, tensors of another shape (an edited file, or one made by hand).
    wide = Identity(**{**vars(identity), "cond_tokens": torch.zeros(1, 16, 8), "uncond_tokens": torch.zeros(1, 16, 8)})
    with pytest.raises(IdentityMismatchError, match=r"^face: the identity's cond_tokens has shape \(1, 16, 8\); this model needs"):
        tiny.generate(wide, "a face", steps=1)
    negative = Identity(**{**vars(identity), "latent_std": -identity.latent_std})
    with pytest.raises(ValueError, match="latent_std holds negative values"):
        tiny.generate(negative, "a face", steps=1)


def _edit_header(path, change):
    with safe_open(str(path), framework="pt") as opened:
        header = json.loads(opened.metadata()["lcmla"])
    change(header)
    save_file(load_file(str(path)), str(path), {"lcmla": json.dumps(header)})


@pytest.mark.parametrize(
    "change, message",
    [(lambda h: h.update(crop="weird"), "header: crop: expected one of ['none', 'face'], got 'weird' (str)"),
     (lambda h: h.update(sources="abc"), "header: sources: expected a list, got 'abc' (str)"),
     (lambda h: h.update(boxes=[["a"]]), "header: boxes[0][0]: expected a number, got 'a' (str)"),
     (lambda h: h.pop("model_fingerprint"), "header: top level: missing required key ['model_fingerprint']"),
     (lambda h: h.update(format_version=3), "header: format_version: expected one of [1, 2], got 3 (int)")],
)  # fmt: skip
def test_malformed_identity_headers_name_the_field(tiny, face, tmp_path, change, message):
    path = tiny.encode_face(face).save(tmp_path / "id.safetensors")
    _edit_header(path, change)
    with pytest.raises(ModelFilesError) as error:
        Identity.load(path)
    assert str(error.value).startswith(f"identity: {path}: {message}"), str(error.value)


def test_identity_header_that_is_not_json(tiny, face, tmp_path):
    path = tiny.encode_face(face).save(tmp_path / "id.safetensors")
    save_file(load_file(str(path)), str(path), {"lcmla": "{not json"})
    with pytest.raises(ModelFilesError, match="header is not valid JSON"):
        Identity.load(path)
    with pytest.raises(ValueError, match="^path: expected a path"):
        Identity.load(None)
    with pytest.raises(ValueError, match="^expected_fingerprint: expected a string or None"):
        Identity.load(path, expected_fingerprint=3)


def test_an_unknown_generate_keyword_is_named(tiny, face):
    with pytest.raises(TypeError, match="generate\\(\\) got an unexpected keyword argument 'num_image'"):
        tiny.generate(face, "a face", num_image=2)
