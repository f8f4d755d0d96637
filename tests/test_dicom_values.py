"""DICOM pixels read back to the values the standard defines, computed here by hand.

The file is written with known stored values, a modality LUT (rescale slope/intercept) that moves
them well away from the stored range, a window that clips both ends, and MONOCHROME1. Dropping
the rescale, the window or the inversion in the reader each changes the result.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import common

SIDE = 64
SLOPE, INTERCEPT = 2.0, -1024.0
CENTER, WIDTH = 4000.0, 2000.0  # in rescaled (modality) units [3000, 5000]: stored [2012, 3012]


def stored_values() -> np.ndarray:
    """Every 12-bit value 0..4095 once, in a scrambled (seeded) order so no resize blurs a ramp."""
    return np.random.default_rng(0).permutation(4096).reshape(SIDE, SIDE).astype(np.uint16)


def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME1") -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = SLOPE, INTERCEPT
    dataset.WindowCenter, dataset.WindowWidth = CENTER, WIDTH
    dataset.PixelData = stored.astype("<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def expected_display(stored: np.ndarray, photometric: str = "MONOCHROME1", *, rescale: bool = True,
                     window: bool = True) -> np.ndarray:
    """PS3.3 C.11.1 then C.11.2.1.2.1 by hand, as brightness in [0, 1] (1 = white = bone).

    rescale=False / window=False give what a reader that skips that step would show.
    """
    modality = stored.astype(np.float64) * SLOPE + INTERCEPT if rescale else stored.astype(np.float64)
    if window:                                                        # VOI LUT function LINEAR
        center, width = CENTER - 0.5, WIDTH - 1.0
        voi = np.clip((modality - center) / width + 0.5, 0.0, 1.0)
        voi[modality <= center - width / 2] = 0.0
        voi[modality > center + width / 2] = 1.0
    else:
        voi = modality
    voi = normalise(voi)
    # MONOCHROME1: the lowest value is displayed white, so brightness is the inverse.
    return 1.0 - voi if photometric == "MONOCHROME1" else voi


def normalise(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_the_test_image_exercises_every_step():
    """Guards the test itself: a reader that skips any one step gives a clearly different image."""
    stored = stored_values()
    display = expected_display(stored)
    assert (display == 0).mean() > 0.05 and (display == 1).mean() > 0.05  # the window clips both ends
    for broken in (expected_display(stored, rescale=False), expected_display(stored, window=False),
                   expected_display(stored, "MONOCHROME2")):
        assert np.abs(broken - display).max() > 0.3


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_read_raw_image_applies_rescale_window_and_inversion(tmp_path, photometric):
    stored = stored_values()
    path = write_dicom(tmp_path / "known.dcm", stored, photometric)
    raw = common.read_raw_image(path)
    assert raw.shape == stored.shape
    # The window's output range (here 0..4095 rescaled) is the implementation's choice; the
    # brightness of each pixel within it is not.
    brightness = normalise(raw.astype(np.float64))
    expected = expected_display(stored, photometric)
    error = float(np.abs(brightness - expected).max())
    assert error < 1e-4, f"brightness off by up to {error:.3f} (of 1)"


def test_preprocess_image_gives_the_windowed_pixels_as_uint8(tmp_path):
    """The whole preprocessing path: at its own size, letterbox neither resizes nor pads."""
    stored = stored_values()
    square, box = common.preprocess_image(write_dicom(tmp_path / "known.dcm", stored), SIDE)
    assert box.scale == 1.0 and square.shape == (SIDE, SIDE)
    expected = np.clip(expected_display(stored) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    error = int(np.abs(square.astype(int) - expected.astype(int)).max())
    assert error <= 1, f"pixels off by up to {error} grey levels"
