"""The pydicom twin of radit's DICOM pixel pipeline, written from ../shared/design/sources.md (section B) and DICOM
PS3.3 C.11 independently of the Rust code.

    python dicom_twin.py DIR

writes DIR/<case>.dcm with pydicom (the native syntaxes, pydicom's own RLE Lossless encoder, JPEG baseline from
Pillow, and 12-bit JPEG Extended from DCMTK's dcmcjpeg), decodes each file the pydicom way (pixel_array -> apply_modality_lut -> apply_voi_lut(prefer_lut=True)
-> MONOCHROME1 negated -> min-max stretch to 0..65535, numpy rint) into DIR/<case>.u16 (little-endian, row-major),
and lists the cases with their shapes and tolerances in DIR/index.json. tests/dicom_twin.rs decodes the same files
with radit and compares to 1 LSB (two 8-bit steps for the lossy JPEG case).
"""

import json
import subprocess
import sys
from pathlib import Path

import io

import numpy as np
import pydicom
from PIL import Image
import pydicom.encaps
from pydicom.encaps import encapsulate
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    DigitalXRayImageStorageForPresentation,
    generate_uid,
)


def radiograph(rows, cols, bits, signed, seed):
    """A smooth CXR-like field with noise, spanning most of the stored range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    field = np.sin(x / cols * 3.0) * np.cos(y / rows * 2.0) + 0.3 * rng.standard_normal((rows, cols))
    field = (field - field.min()) / (field.max() - field.min())
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    return np.round(lo + field * (hi - lo)).astype(np.int32)


def dataset(values, bits_allocated, bits_stored, signed, photometric):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(bits_allocated, signed)]
    ds.PixelData = values.astype(dtype).tobytes()
    return ds


def cases():
    """(name, dataset, transfer syntax) for every kind the pipeline handles."""
    out = []

    def add(name, rows, cols, bits_allocated, bits_stored, signed, photometric, seed, syntax=ExplicitVRLittleEndian,
            **attrs):
        ds = dataset(radiograph(rows, cols, bits_stored, signed, seed), bits_allocated, bits_stored, signed,
                     photometric)
        for k, v in attrs.items():
            setattr(ds, k, v)
        out.append((name, ds, syntax))

    add("m2_u12_plain", 37, 29, 16, 12, False, "MONOCHROME2", 1)
    add("m1_u12_linear", 41, 33, 16, 12, False, "MONOCHROME1", 2, WindowCenter=1800, WindowWidth=2200)
    add("m2_u16_linear_exact", 30, 44, 16, 16, False, "MONOCHROME2", 3, WindowCenter=30000, WindowWidth=40000,
        VOILUTFunction="LINEAR_EXACT")
    add("m2_s12_sigmoid_rescale", 33, 35, 16, 12, True, "MONOCHROME2", 4, RescaleSlope=0.5, RescaleIntercept=-100,
        WindowCenter=-150, WindowWidth=700, VOILUTFunction="SIGMOID")
    add("m1_u14_two_windows", 29, 31, 16, 14, False, "MONOCHROME1", 5, WindowCenter=[8000, 4000],
        WindowWidth=[9000, 3000])
    add("m2_u8_linear", 27, 39, 8, 8, False, "MONOCHROME2", 6, WindowCenter=120, WindowWidth=150)
    add("m2_u12_rescale_no_window", 25, 26, 16, 12, False, "MONOCHROME2", 7, RescaleSlope=2, RescaleIntercept=-1024)
    add("m2_u12_implicit", 31, 23, 16, 12, False, "MONOCHROME2", 8, syntax=ImplicitVRLittleEndian,
        WindowCenter=2000, WindowWidth=3500)
    add("m1_u12_rle", 41, 33, 16, 12, False, "MONOCHROME1", 9, syntax=RLELossless, WindowCenter=1800,
        WindowWidth=2200)
    add("m2_s12_rle_sigmoid", 33, 35, 16, 12, True, "MONOCHROME2", 10, syntax=RLELossless, RescaleSlope=0.5,
        RescaleIntercept=-100, WindowCenter=-150, WindowWidth=700, VOILUTFunction="SIGMOID")
    # A VOI LUT (an S-shaped 12-bit table over the stored range) beside a window: the LUT is preferred.
    lut_item = Dataset()
    first, n = 0, 4096
    t = np.arange(n)
    # Both attributes have two possible VRs (US or SS, US or OW): say which.
    lut_item.add_new((0x0028, 0x3002), "US", [n, first, 12])
    lut_item.add_new((0x0028, 0x3006), "US",
                     np.round(4095 / (1 + np.exp(-(t - 2048) / 400))).astype(np.uint16).tolist())
    add("m2_u12_voi_lut", 35, 37, 16, 12, False, "MONOCHROME2", 11, WindowCenter=2048, WindowWidth=4096,
        VOILUTSequence=Sequence([lut_item]))
    # Padding outside the body (a collimated border at the largest stored value), masked with --dicom-padding mask.
    add("m1_u12_padding_masked", 36, 30, 16, 12, False, "MONOCHROME1", 13, WindowCenter=1800, WindowWidth=2600,
        PixelPaddingValue=4095, PixelPaddingRangeLimit=4000)
    ds = out[-1][1]
    border = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns).copy()
    border[:3, :], border[-3:, :], border[:, :2] = 4095, 4000, 4050
    ds.PixelData = border.tobytes()
    # JPEG baseline (lossy, 8-bit): Pillow's libjpeg encodes, pydicom decodes with Pillow, radit with jpeg-decoder;
    # the two IDCTs may differ by one 8-bit step, so this case is compared with that tolerance.
    add("m2_u8_jpeg_baseline", 40, 48, 8, 8, False, "MONOCHROME2", 12, syntax=JPEGBaseline8Bit)
    # JPEG Extended (lossy, 12-bit, as older CR and DX archives hold): DCMTK's dcmcjpeg encodes, pydicom decodes with
    # pylibjpeg-libjpeg, radit with libjpeg-turbo: three toolkits. Compared within the two IDCTs' 12-bit rounding.
    add("m1_u12_jpeg_extended", 47, 53, 16, 12, False, "MONOCHROME1", 14, syntax=JPEGExtended12Bit)
    add("m2_s12_jpeg_extended_rescale", 42, 38, 16, 12, True, "MONOCHROME2", 15, syntax=JPEGExtended12Bit,
        RescaleSlope=0.5, RescaleIntercept=-100)
    return out


def codec_cases():
    """The syntaxes behind radit's cargo features (JPEG 2000 and JPEG-LS, lossless), encoded by pydicom's plugins
    (pylibjpeg-openjpeg, pyjpegls): `python dicom_twin.py --codecs DIR`."""
    out = []
    for name, bits, signed, photometric, seed, syntax, attrs in [
        ("m1_u12_j2k", 12, False, "MONOCHROME1", 21, JPEG2000Lossless, {"WindowCenter": 1800, "WindowWidth": 2200}),
        ("m2_u16_j2k", 16, False, "MONOCHROME2", 22, JPEG2000Lossless, {}),
        ("m1_u12_jls", 12, False, "MONOCHROME1", 23, JPEGLSLossless, {"WindowCenter": 2000, "WindowWidth": 3000}),
        ("m2_s12_jls_rescale", 12, True, "MONOCHROME2", 24, JPEGLSLossless,
         {"RescaleSlope": 0.5, "RescaleIntercept": -100}),
    ]:
        ds = dataset(radiograph(43, 37, bits, signed, seed), 16, bits, signed, photometric)
        for k, v in attrs.items():
            setattr(ds, k, v)
        out.append((name, ds, syntax))
    return out


def jpeg_encapsulate(ds):
    """Replaces ds's native 8-bit pixels by one JPEG baseline fragment (pydicom has no JPEG encoder of its own)."""
    values = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns)
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"


def dcmtk_jpeg_extended(path):
    """Re-encodes a native 12-bit file in place as JPEG Extended with 12 bits a sample, by DCMTK's dcmcjpeg."""
    tmp = path.with_suffix(".jpeg.dcm")
    subprocess.run(["dcmcjpeg", "--encode-extended", "--bits-force-12", "--quality", "95", str(path), str(tmp)],
                   check=True)
    tmp.replace(path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit, ds.file_meta.TransferSyntaxUID
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    sof = frame.find(b"\xff\xc1")
    assert sof > 0 and frame[sof + 4] == 12, "dcmcjpeg wrote a 12-bit SOF1 frame"


def twin(path, mask_padding=False):
    """The pydicom pipeline: the reference radit's pixels are compared to. With mask_padding, stored values from
    PixelPaddingValue to PixelPaddingRangeLimit (PS3.3 C.7.5.1.1.2) are left out of the stretch and made black."""
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    padding = np.zeros(a.shape, dtype=bool)
    if mask_padding and "PixelPaddingValue" in ds:
        v = ds.PixelPaddingValue
        limit = ds.get("PixelPaddingRangeLimit", v)
        padding = (a >= min(v, limit)) & (a <= max(v, limit))
    a = apply_modality_lut(a, ds)
    a = apply_voi_lut(a, ds, index=0, prefer_lut=True)
    a = np.asarray(a, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = -a
    body = a[~padding]
    lo, hi = body.min(), body.max()
    out = np.rint((a - lo) / (hi - lo) * 65535)
    out[padding] = 0
    return out.astype("<u2")


def main():
    codecs = "--codecs" in sys.argv[1:]
    out = Path([a for a in sys.argv[1:] if a != "--codecs"][0])
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for name, ds, syntax in codec_cases() if codecs else cases():
        path = out / f"{name}.dcm"
        tolerance = 1
        if syntax == RLELossless:
            ds.compress(RLELossless)
        elif syntax in (JPEG2000Lossless, JPEGLSLossless):
            ds.compress(syntax)
        elif syntax == JPEGBaseline8Bit:
            jpeg_encapsulate(ds)
            tolerance = 2 * 257 + 1
        else:
            # dcmcjpeg re-encodes a native file
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == JPEGExtended12Bit else syntax
        ds.save_as(path, enforce_file_format=True)
        if syntax == JPEGExtended12Bit:
            dcmtk_jpeg_extended(path)
            ds = pydicom.dcmread(path)
            # Two 12-bit steps (the IDCTs of libjpeg-turbo and Richter's libjpeg may round apart) after the stretch.
            stored = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1))
            tolerance = int(np.ceil(2 * 65535 * float(ds.get("RescaleSlope", 1)) / np.ptp(stored))) + 1
        mask_padding = name.endswith("_padding_masked")
        pixels = twin(path, mask_padding)
        (out / f"{name}.u16").write_bytes(pixels.tobytes())
        index.append({"name": name, "rows": int(ds.Rows), "columns": int(ds.Columns), "transfer_syntax": str(syntax),
                      "tolerance": tolerance, "padding": "mask" if mask_padding else "ignore"})
    (out / "index.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    main()
