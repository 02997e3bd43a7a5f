"""The dlib face backend on real photos: the bundled sample face, scikit-image's astronaut, coffee, rocket, camera.

Figures measured with dlib-bin 20.0.1 and face_recognition_models 0.3.0 (cosine of L2-normalised 128-d
embeddings, sample face against): its mirror image 0.990, a crop resized to 200 px 0.999, the astronaut photo it
was cut from 0.998, the cameraman of ``camera()`` 0.822. (dlib's own rule, Euclidean distance of the raw
descriptors below 0.6 = same person, gives 0.20 for the mirror and 0.83 for the cameraman.)
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lcmla_sdk import ModelFilesError, MultipleFacesError, NoFaceError, Personalizer
from lcmla_sdk.faces import FaceBackend, align_face

pytest.importorskip("dlib", reason="the dlib backend needs the [faces] extra")
skimage_data = pytest.importorskip("skimage.data")
from lcmla_sdk.faces.dlib_backend import DlibFaceAnalyzer, five_points  # noqa: E402

# Hand-measured box of the astronaut's face (tests/facepack.py), in image pixels.
ASTRONAUT_BOX = (175, 60, 273, 180)


@pytest.fixture(scope="module")
def dlib_hog():
    return DlibFaceAnalyzer()


@pytest.fixture(scope="module")
def dlib_cnn():
    return DlibFaceAnalyzer(detector="cnn", upsample=0)  # upsampling 0 keeps a 512-px photo near a second


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_finds_the_sample_face_and_the_astronaut(dlib_hog, dlib_cnn, face, astronaut):
    sample = dlib_hog.detect(face)
    assert len(sample) == 1 and sample[0].score > 1.0
    x1, y1, x2, y2 = sample[0].box  # the face fills the middle of the 256-px crop
    assert 30 < x1 < x2 < 226 and 30 < y1 < y2 < 226 and x2 - x1 > 80
    assert sample[0].embedding.shape == (128,) and np.linalg.norm(sample[0].embedding) == pytest.approx(1, abs=1e-5)
    for analyzer in (dlib_hog, dlib_cnn):
        found = analyzer.find_face(Image.fromarray(astronaut), on_multiple="error")
        assert _iou(found.box, ASTRONAUT_BOX) > 0.5, (analyzer.name, found.box)


def test_the_detector_threshold_drops_a_false_box(astronaut):
    """HOG at upsampling 1 scores a box on the astronaut's suit at 0.12; the default threshold 0.5 drops it."""
    image = Image.fromarray(astronaut)
    everything = DlibFaceAnalyzer(det_thresh=0.0).detect(image)
    assert len(everything) == 2
    false_box = min(everything, key=lambda f: f.score)
    assert false_box.score < 0.5 and false_box.box[1] > 300  # on the suit, far below the face
    with pytest.raises(MultipleFacesError, match="2 faces found in the 512x512 image"):
        DlibFaceAnalyzer(det_thresh=0.0).find_face(image, on_multiple="error")


@pytest.mark.parametrize("photo", ["coffee", "rocket"])
def test_photos_without_a_face_raise_no_face_error(photo, dlib_hog, tiny):
    image = getattr(skimage_data, photo)()
    with pytest.raises(NoFaceError, match=r"no face found in the \d+x\d+ image \(detector threshold 0.5, dlib:hog,5\)"):
        dlib_hog.find_face(Image.fromarray(image))
    with pytest.raises(NoFaceError):  # detection is on by default for photos
        tiny.encode_face(image)
    with pytest.raises(NoFaceError):
        tiny.generate(image, "a face", steps=1)


def test_two_faces_side_by_side(dlib_hog, face, astronaut):
    """The sample face (enlarged to 384 px: a face about 160 px wide) left of the astronaut (about 90 px)."""
    composite = Image.new("RGB", (384 + 512, 512), "white")
    composite.paste(face.resize((384, 384), Image.Resampling.BICUBIC), (0, 64))
    composite.paste(Image.fromarray(astronaut), (384, 0))
    with pytest.raises(MultipleFacesError, match="2 faces found in the 896x512 image"):
        dlib_hog.find_face(composite, on_multiple="error")
    largest = dlib_hog.find_face(composite)
    assert largest.box[2] < 384  # the enlarged sample face
    other = dlib_hog.detect(composite)[1]
    assert _iou(other.box - np.array([384, 0, 384, 0]), ASTRONAUT_BOX) > 0.5


def test_same_face_is_far_more_similar_than_another_picture(dlib_hog, dlib_cnn, face):
    reference = dlib_hog.find_face(face).embedding
    mirror = dlib_hog.find_face(ImageOps.mirror(face)).embedding
    crop = dlib_hog.find_face(face.crop((16, 24, 240, 248)).resize((200, 200), Image.Resampling.BICUBIC)).embedding
    # HOG does not find the cameraman's turned face; the CNN detector does.
    cameraman = dlib_cnn.find_face(Image.fromarray(skimage_data.camera()).convert("RGB")).embedding
    same = [float(reference @ mirror), float(reference @ crop)]
    other = float(reference @ cameraman)
    assert min(same) > 0.97 and other < 0.9 and min(same) - other > 0.1, (same, other)


def test_five_point_mapping_agrees_with_the_68_point_measurement(face, astronaut):
    """Eye centres are measured by both models; the nose tip placed from the eyes lands near the 68-point one."""
    five, sixty_eight = DlibFaceAnalyzer(landmarks=5), DlibFaceAnalyzer(landmarks=68)
    for image in (face, Image.fromarray(astronaut)):
        placed, measured = five.find_face(image).landmarks, sixty_eight.find_face(image).landmarks
        inter_ocular = np.linalg.norm(measured[1] - measured[0])
        error = np.linalg.norm(placed - measured, axis=1) / inter_ocular
        assert error[:2].max() < 0.03 and error[2] < 0.05, error
    assert sixty_eight.name == "dlib:hog,68"


def test_five_points_of_a_68_point_shape_are_the_named_landmarks():
    shape = np.arange(136, dtype=np.float32).reshape(68, 2)
    expected = [shape[36:42].mean(0), shape[42:48].mean(0), shape[30], shape[48], shape[54]]
    np.testing.assert_array_equal(five_points(shape), np.stack(expected))
    # 5-point shape: eye centres are the corner midpoints (points 2-3 image-left, 0-1 image-right).
    corners = np.array([[150, 100], [130, 100], [70, 100], [90, 100], [110, 140]], dtype=np.float32)
    np.testing.assert_allclose(five_points(corners)[:2], [[80, 100], [140, 100]], atol=1e-4)
    with pytest.raises(ValueError, match="^shape: expected 5 or 68"):
        five_points(shape[:10])


def test_aligned_crop_puts_the_eyes_level(dlib_hog, astronaut):
    """crop='face' rotates and scales by the landmarks: the crop's own detection has level eyes at the template."""
    crop = align_face(Image.fromarray(astronaut), dlib_hog.find_face(Image.fromarray(astronaut)).landmarks, 256)
    eyes = dlib_hog.find_face(crop).landmarks[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 4
    template_eyes = (np.array([[38.2946, 51.6963], [73.5318, 51.5014]]) / 112 - 0.5) * 128 + 128
    np.testing.assert_allclose(eyes, template_eyes, atol=6)


def test_identity_records_the_dlib_detection(tiny, astronaut):
    whole, cropped = tiny.encode_face(astronaut), tiny.encode_face(astronaut, crop="face")
    assert whole.face_backend == cropped.face_backend == "dlib:hog,5"
    assert _iou(whole.boxes[0], ASTRONAUT_BOX) > 0.5 and np.asarray(whole.landmarks[0]).shape == (5, 2)
    torch.testing.assert_close(whole.face_embeddings, cropped.face_embeddings)
    assert not torch.allclose(whole.cond_tokens, cropped.cond_tokens)


def test_faces_argument_forms(tmp_path):
    assert FaceBackend.parse("dlib:cnn,68") == FaceBackend("dlib", options=("cnn", "68"))
    assert FaceBackend.parse("insightface:packs/b") == FaceBackend("insightface", pack_dir=Path("packs/b"))
    assert FaceBackend.parse(tmp_path).pack_dir == tmp_path and FaceBackend.parse(str(tmp_path)).kind == "insightface"
    assert FaceBackend.parse(None).kind == FaceBackend.parse("none").kind == "off"
    assert FaceBackend.parse("auto").kind == "auto"
    for bad, message in (("dlib:fast", "unknown dlib option"), ("insightface:", "needs a pack folder"), (12, "got 12")):
        with pytest.raises(ValueError, match=f"^faces: .*{message}"):
            FaceBackend.parse(bad)
    analyzer = FaceBackend.parse("dlib:68").open()
    assert isinstance(analyzer, DlibFaceAnalyzer) and analyzer.name == "dlib:hog,68"


def test_missing_or_broken_model_files(tmp_path):
    with pytest.raises(ModelFilesError, match=r"lacks dlib model files \['shape_predictor_5_face_landmarks.dat'"):
        DlibFaceAnalyzer(model_dir=tmp_path)
    for name in ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"):
        (tmp_path / name).write_bytes(b"not a dlib model")
    with pytest.raises(ModelFilesError, match="cannot read dlib model files"):
        DlibFaceAnalyzer(model_dir=tmp_path)
    with pytest.raises(ValueError, match="^detector:"):
        DlibFaceAnalyzer(detector="mtcnn")


def test_without_dlib_auto_says_once_that_no_face_check_was_made(monkeypatch, face):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    monkeypatch.setattr("lcmla_sdk.faces.dlib_backend.is_installed", lambda: False)
    monkeypatch.setattr("lcmla_sdk.faces.backend._no_check_said", False)
    model = Personalizer.from_pretrained("tiny", device="cpu")
    coffee = skimage_data.coffee()
    with pytest.warns(UserWarning, match=r"no face check was made .* pip install 'lcmla\[faces\]'"):
        identity = model.encode_face(coffee)
    assert identity.face_embeddings is None and identity.face_backend == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next photo goes through without a word
        model.encode_face(face)
    with pytest.raises(ModelFilesError, match=r"the dlib backend needs dlib: pip install 'lcmla\[faces\]'"):
        Personalizer.from_pretrained("tiny", device="cpu", faces="dlib").encode_face(face)
