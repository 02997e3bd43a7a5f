"""The face path through the real insightface code, on synthetic ONNX packs written by tests/facepack.py."""

import numpy as np
import pytest
import torch
from facepack import DET_SIZE, FakeFace, astronaut_face, write_face_pack
from PIL import Image

from lcmla_sdk import ModelFilesError, MultipleFacesError, NoFaceError, Personalizer
from lcmla_sdk.faces import InsightFaceAnalyzer


@pytest.fixture(scope="module")
def with_faces(astronaut_pack):
    return Personalizer.from_pretrained("tiny", device="cpu", faces=astronaut_pack)


def test_insightface_detects_and_aligns_the_astronaut(astronaut_pack, astronaut):
    faces = InsightFaceAnalyzer(astronaut_pack).detect(Image.fromarray(astronaut))
    assert len(faces) == 1
    expected = astronaut_face(scale=1.0)  # the detector letterboxes 512 -> 640; insightface scales back
    np.testing.assert_allclose(faces[0].box, expected.box, atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, expected.landmarks, atol=1e-3)
    assert faces[0].embedding.shape == (512,)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_the_astronaut_photo_through_the_whole_face_path(with_faces, tiny_without_faces, astronaut):
    whole = with_faces.encode_face(astronaut)
    cropped = with_faces.encode_face(astronaut, crop="face")
    assert cropped.crop == "face" and cropped.boxes == [[175.0, 60.0, 273.0, 180.0]]
    assert cropped.face_backend == f"insightface:{with_faces.faces_dir.resolve()}"
    np.testing.assert_allclose(cropped.landmarks[0], astronaut_face(scale=1.0).landmarks, atol=1e-3)
    assert cropped.face_embeddings.shape == (1, 512) and cropped.embedding.shape == (512,)
    # ArcFace sees the same aligned face either way; the image encoder and VAE see different pictures.
    torch.testing.assert_close(whole.face_embeddings, cropped.face_embeddings)
    assert not torch.allclose(whole.cond_tokens, cropped.cond_tokens)
    assert not torch.allclose(whole.latent_mean, cropped.latent_mean)
    # With detection off, crop="none" is the same encoding minus the detection.
    plain = tiny_without_faces.encode_face(astronaut)
    assert plain.face_embeddings is None and plain.boxes == [None] and plain.face_backend == ""
    torch.testing.assert_close(plain.cond_tokens, whole.cond_tokens)
    images = with_faces.generate(cropped, "an oil painting of a face", seed=0, steps=1, output="np")
    assert images[0].shape == (128, 128, 3)


def test_no_face_names_the_image_size_and_threshold(tmp_path, astronaut):
    analyzer = InsightFaceAnalyzer(write_face_pack(tmp_path / "none", []))
    with pytest.raises(NoFaceError, match=r"no face found in the 512x512 image \(detector threshold 0.5"):
        analyzer.find_face(Image.fromarray(astronaut))
    weak = InsightFaceAnalyzer(write_face_pack(tmp_path / "weak", [FakeFace((10, 10, 90, 90), ((30, 40),) * 5, score=0.3)]))
    with pytest.raises(NoFaceError):
        weak.find_face(Image.fromarray(astronaut))


def test_several_faces_largest_by_default_or_an_error(tmp_path, astronaut):
    small = FakeFace((400, 400, 460, 460), ((415, 420), (445, 420), (430, 430), (418, 445), (442, 445)))
    analyzer = InsightFaceAnalyzer(write_face_pack(tmp_path / "two", [small, astronaut_face()]))
    image = Image.fromarray(astronaut)
    largest = analyzer.find_face(image)
    np.testing.assert_allclose(largest.box, astronaut_face(scale=1.0).box, atol=1e-3)
    with pytest.raises(MultipleFacesError, match=r"2 faces found in the 512x512 image"):
        analyzer.find_face(image, on_multiple="error")
    assert DET_SIZE == 640


def test_missing_or_incomplete_packs_name_the_folder_and_expected_files(tmp_path):
    with pytest.raises(ModelFilesError, match=r"no such folder; expected .*det_10g.onnx.*w600k_r50.onnx"):
        InsightFaceAnalyzer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesError, match="empty: no .onnx files"):
        InsightFaceAnalyzer(tmp_path / "empty")
    pack = write_face_pack(tmp_path / "det_only", [astronaut_face()])
    (pack / "w600k_r50.onnx").unlink()
    with pytest.raises(ModelFilesError, match="no recognition model among"):
        InsightFaceAnalyzer(pack)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "det_10g.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFilesError, match="cannot load its ONNX models"):
        InsightFaceAnalyzer(tmp_path / "broken")


def test_face_crop_and_strict_detection_need_detection(tiny_without_faces, face):
    for kwargs in ({"crop": "face"}, {"on_multiple": "error"}):
        with pytest.raises(ModelFilesError, match="need face detection, which is off"):
            tiny_without_faces.encode_face(face, **kwargs)
    with pytest.raises(ValueError, match="^crop:"):
        tiny_without_faces.encode_face(face, crop="square")
