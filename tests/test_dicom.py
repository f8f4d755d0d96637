"""DICOM as a PACS sends it: compressed transfer syntaxes, inverted display, padding, frames, views.

The files are pydicom-data's (offline, through data_store) and pydicom's own test files; the
lossless twins must give the SAME preprocessed pixels and the SAME probability from a model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import common
from conftest import load_stage

predict_stage = load_stage("07_predict")

pydicom = pytest.importorskip("pydicom")
data_store = pytest.importorskip("data_store")
STORE = Path(data_store.__file__).parent / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{name} is absent from this pydicom/pydicom-data install")
    return path


def _rle_copy(source: Path, target: Path) -> Path:
    """The radiograph re-encoded as RLE Lossless by pydicom's own encoder (no radiograph ships in RLE)."""
    dataset = pydicom.dcmread(source)
    dataset.compress(pydicom.uid.RLELossless)
    dataset.save_as(target)
    return target


# (compressed, uncompressed original): every lossless syntax a PACS archive uses.
TWINS = [
    ("store", "RG1_J2KR.dcm", "store", "RG1_UNCR.dcm"),                        # JPEG 2000 lossless, CR 15 bit
    ("store", "RG3_J2KR.dcm", "store", "RG3_UNCR.dcm"),                        # JPEG 2000 lossless, CR 10 bit
    ("rle", "RG3_UNCR.dcm", "store", "RG3_UNCR.dcm"),                          # RLE lossless, CR
    ("pydicom", "SC_rgb_jpeg_gdcm.dcm", "store", "SC_rgb.dcm"),                # JPEG Lossless process 14 SV1
    ("pydicom", "MR_small_jpeg_ls_lossless.dcm", "pydicom", "MR_small.dcm"),   # JPEG-LS lossless
    ("pydicom", "MR_small_RLE.dcm", "pydicom", "MR_small.dcm"),                # RLE lossless, 16 bit
]


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    torch.manual_seed(0)
    return common.create_model("test_resnet", num_classes=1, in_chans=1).eval()


def _probability(model, square: np.ndarray) -> float:
    import torch
    with torch.inference_mode():
        batch = common.prepare_images(torch.from_numpy(square[None, None]), torch.device("cpu"),
                                      train=False, channels_last=False)
        return float(torch.sigmoid(model(batch)[0, 0]))


@pytest.mark.parametrize("compressed_at, compressed, original_at, original", TWINS,
                         ids=[t[1] if t[0] != "rle" else "RG3_RLE" for t in TWINS])
def test_lossless_copy_gets_the_same_pixels_and_probability(compressed_at, compressed, original_at,
                                                             original, tiny_model, tmp_path):
    folders = {"store": STORE, "pydicom": PYDICOM_FILES}
    if compressed_at == "rle":
        compressed_path = _rle_copy(_file(STORE, compressed), tmp_path / "rle.dcm")
    else:
        compressed_path = _file(folders[compressed_at], compressed)
    original_path = _file(folders[original_at], original)
    syntax = pydicom.dcmread(compressed_path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed and not pydicom.dcmread(original_path).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(common.read_raw_image(compressed_path), common.read_raw_image(original_path))
    square_compressed, box_compressed = common.preprocess_image(compressed_path, 64)
    square_original, box_original = common.preprocess_image(original_path, 64)
    np.testing.assert_array_equal(square_compressed, square_original)
    assert box_compressed == box_original and square_original.std() > 0
    assert _probability(tiny_model, square_compressed) == _probability(tiny_model, square_original)


# One file per transfer syntax a PACS sends (lossy ones included): each must decode to an image.
EVERY_SYNTAX = [
    (PYDICOM_FILES, "SC_rgb_jpeg.dcm", "1.2.840.10008.1.2.4.50"),                  # JPEG baseline
    (PYDICOM_FILES, "JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),                  # JPEG extended 12 bit
    (STORE, "JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70"),           # JPEG Lossless P14 SV1
    (STORE, "JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),                              # JPEG Lossless 16 bit
    (PYDICOM_FILES, "MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),    # JPEG-LS lossless
    (PYDICOM_FILES, "JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),        # JPEG-LS near-lossless
    (STORE, "RG1_J2KR.dcm", "1.2.840.10008.1.2.4.90"),                             # JPEG 2000 lossless
    (STORE, "RG1_J2KI.dcm", "1.2.840.10008.1.2.4.91"),                             # JPEG 2000
    (PYDICOM_FILES, "MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),                    # RLE lossless
    (PYDICOM_FILES, "MR_small_implicit.dcm", "1.2.840.10008.1.2"),                 # implicit VR LE
    (PYDICOM_FILES, "MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),              # explicit VR BE
    (PYDICOM_FILES, "image_dfl.dcm", "1.2.840.10008.1.2.1.99"),                    # deflated
]


@pytest.mark.parametrize("folder, name, syntax", EVERY_SYNTAX, ids=[e[1] for e in EVERY_SYNTAX])
def test_every_common_transfer_syntax_decodes(folder, name, syntax):
    path = _file(folder, name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    square, _ = common.preprocess_image(path, 64)
    assert square.std() > 0


def test_corrupt_compressed_file_is_one_line_reason_not_install_hint():
    path = _file(PYDICOM_FILES, "JPEG-lossy.dcm")  # a JPEG Extended stream libjpeg rejects
    with pytest.raises(common.ImageReadError) as caught:
        common.read_raw_image(path)
    message = str(caught.value)
    assert "\n" not in message and "JPEG-lossy.dcm" in message
    assert "corrupt" in message and "pip install" not in message


def test_multi_frame_is_a_reason_not_a_silent_first_frame():
    with pytest.raises(common.ImageReadError, match="multi-frame DICOM \\(10 frames\\)"):
        common.read_raw_image(_file(STORE, "emri_small.dcm"))


def _variant(source: Path, target: Path, **tags) -> Path:
    dataset = pydicom.dcmread(source)
    for keyword, value in tags.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(target)
    return target


def test_presentation_lut_inverse_flips_once(tmp_path):
    source = _file(STORE, "RG3_UNCR.dcm")  # MONOCHROME1
    monochrome1 = common.read_raw_image(source)
    # MONOCHROME2 + INVERSE is displayed exactly as MONOCHROME1 (bone bright after loading) ...
    inverse2 = common.read_raw_image(_variant(source, tmp_path / "m2_inverse.dcm",
                                              PhotometricInterpretation="MONOCHROME2",
                                              PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(inverse2, monochrome1)
    # ... and MONOCHROME1 + INVERSE (as DX objects write it) is ONE flip, not two.
    inverse1 = common.read_raw_image(_variant(source, tmp_path / "m1_inverse.dcm", PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(inverse1, monochrome1)
    identity2 = common.read_raw_image(_variant(source, tmp_path / "m2.dcm", PhotometricInterpretation="MONOCHROME2"))
    assert not np.array_equal(identity2, monochrome1)


def test_pixel_padding_is_left_out_of_the_scaling_and_painted_background(tmp_path):
    source = _file(STORE, "RG1_UNCR.dcm")  # stored values 874..26479: 0 never occurs
    dataset = pydicom.dcmread(source)
    pixels = dataset.pixel_array.copy()
    pixels[:300, :] = 0
    pixels[:, :300] = 0
    dataset.PixelData = pixels.tobytes()
    dataset.add_new("PixelPaddingValue", "US", 0)  # unsigned pixels (PixelRepresentation 0)
    padded_path = tmp_path / "padded.dcm"
    dataset.save_as(padded_path)
    unit = common.scale_to_unit(common.read_raw_image(padded_path))
    assert (unit[:300, :] == 0).all() and (unit[:, :300] == 0).all()
    # The image inside is scaled as if the border were not there at all.
    inside = common.scale_to_unit(common.read_raw_image(source)[300:, 300:])
    np.testing.assert_allclose(unit[300:, 300:], inside, atol=1e-5)


def test_view_laterality_and_study_from_the_header(tmp_path):
    from pydicom.dataset import Dataset
    source = _file(STORE, "RG3_UNCR.dcm")  # ViewPosition AP, Laterality R

    def view_code(value, scheme, meaning):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return [item]

    tags = predict_stage.read_dicom_tags(source, b"salt")
    assert (tags["projection"], tags["view_source"], tags["laterality"]) == ("AP", "ViewPosition", "R")
    uid = str(pydicom.dcmread(source).StudyInstanceUID)
    assert tags["study_key"].startswith("S") and uid not in tags["study_key"]
    assert predict_stage.read_dicom_tags(source, b"salt")["study_key"] == tags["study_key"]
    assert predict_stage.read_dicom_tags(source, b"other")["study_key"] != tags["study_key"]
    cases = [(view_code("R-10206", "SRT", "antero-posterior"), "AP"),      # legacy SNOMED RT code
             (view_code("399067008", "SCT", "lateral"), "Lat"),
             (view_code("399099002", "SCT", "lateral-medial oblique"), "other"),
             (None, None)]
    for i, (sequence, expected) in enumerate(cases):
        path = _variant(source, tmp_path / f"view{i}.dcm", ViewPosition=None, ViewCodeSequence=sequence,
                        ImageLaterality="L")
        tags = predict_stage.read_dicom_tags(path)
        assert tags["projection"] == expected, sequence
        assert tags["view_source"] == (expected and "ViewCodeSequence")
        assert tags["laterality"] == "L"  # ImageLaterality wins over the series' Laterality
