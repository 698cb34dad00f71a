//! Image preprocessing: PNG (8- or 16-bit greyscale) or DICOM (through `radit_dicom`: modality LUT, VOI, MONOCHROME1)
//! -> full-range 16-bit -> aspect-preserving resize with centre padding to a square canvas. The format is told by
//! the file's content, not its name (`.dcm`, `.dicom`, no extension at all).

use std::io::Cursor;

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::U16;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};

/// Refuse images whose decoded size exceeds this (a decompression bomb or a corrupt header).
const MAX_DECODED_BYTES: usize = 1 << 30;
/// 16k x 16k: far above any radiograph.
const MAX_PIXELS: u64 = 1 << 28;

/// A decoded greyscale image with 16-bit samples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Grey16 {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u16>,
}

/// Why an image could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageProblem {
    #[error("zero-size file (0 bytes)")]
    EmptyFile,
    #[error("not a readable PNG: {0}")]
    Decode(String),
    #[error("zero-size image ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("colour image ({0}); expected greyscale")]
    Colour(String),
    #[error("constant image (every pixel is {0}); nothing to normalise")]
    Constant(u16),
    #[error(transparent)]
    Dicom(#[from] radit_dicom::DicomProblem),
}

/// Notes about an accepted image that the report counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageNotes {
    pub was_8bit: bool,
    /// Stored as RGB(A) with equal channels and converted to grey.
    pub grey_stored_as_rgb: bool,
    pub resized: bool,
    /// A DICOM file, and what its pixel pipeline did.
    pub dicom: Option<DicomNotes>,
}

/// What the DICOM pipeline did to one image, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DicomNotes {
    pub monochrome1: bool,
    pub windowed: bool,
    pub voi_lut: bool,
    /// The window could not be used; the image was stretched instead.
    pub bad_window: bool,
    /// Its padding pixels were masked.
    pub padding_masked: bool,
}

/// Decodes a PNG into 16-bit greyscale. 8-bit samples are widened (v * 257); palette and low bit depths are expanded.
pub fn decode_png(bytes: &[u8]) -> Result<(Grey16, ImageNotes), ImageProblem> {
    if bytes.is_empty() {
        return Err(ImageProblem::EmptyFile);
    }
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: MAX_DECODED_BYTES,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder
        .read_info()
        .map_err(|e| ImageProblem::Decode(e.to_string()))?;
    let (width, height) = {
        let info = reader.info();
        (info.width, info.height)
    };
    if width == 0 || height == 0 {
        return Err(ImageProblem::ZeroSize { width, height });
    }
    // The header alone decides the buffer size: refuse absurd sizes before allocating (a corrupt header or a
    // decompression bomb would otherwise abort the process).
    let too_large =
        || ImageProblem::Decode(format!("image of {width}x{height} is too large to decode"));
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(too_large());
    }
    let size = reader
        .output_buffer_size()
        .filter(|s| *s <= MAX_DECODED_BYTES)
        .ok_or_else(too_large)?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(size).map_err(|_| too_large())?;
    buf.resize(size, 0);
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| ImageProblem::Decode(e.to_string()))?;
    buf.truncate(frame.buffer_size());
    let channels = frame.color_type.samples();
    let sixteen = frame.bit_depth == png::BitDepth::Sixteen;
    let sample = |i: usize| -> u16 {
        if sixteen {
            u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])
        } else {
            u16::from(buf[i]) * 257
        }
    };
    let n = width as usize * height as usize;
    let mut notes = ImageNotes {
        was_8bit: !sixteen,
        ..ImageNotes::default()
    };
    let pixels: Vec<u16> = match frame.color_type {
        png::ColorType::Grayscale => (0..n).map(sample).collect(),
        png::ColorType::GrayscaleAlpha => (0..n).map(|p| sample(p * 2)).collect(),
        png::ColorType::Rgb | png::ColorType::Rgba => {
            let name = if channels == 3 { "RGB" } else { "RGBA" };
            let mut grey = Vec::with_capacity(n);
            for p in 0..n {
                let (r, g, b) = (
                    sample(p * channels),
                    sample(p * channels + 1),
                    sample(p * channels + 2),
                );
                if r != g || g != b {
                    return Err(ImageProblem::Colour(format!(
                        "{name} with differing channels"
                    )));
                }
                grey.push(r);
            }
            notes.grey_stored_as_rgb = true;
            grey
        }
        png::ColorType::Indexed => return Err(ImageProblem::Colour("palette not expanded".into())),
    };
    Ok((
        Grey16 {
            width,
            height,
            pixels,
        },
        notes,
    ))
}

/// Stretches intensities linearly so the darkest pixel is 0 and the brightest 65535.
pub fn normalise_full_range(img: &mut Grey16) -> Result<(), ImageProblem> {
    let (lo, hi) = img
        .pixels
        .iter()
        .fold((u16::MAX, 0u16), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if lo == hi {
        return Err(ImageProblem::Constant(lo));
    }
    if lo == 0 && hi == u16::MAX {
        return Ok(());
    }
    let range = u32::from(hi - lo);
    for v in &mut img.pixels {
        // Rounded integer rescale: exact at both ends.
        *v = ((u32::from(*v - lo) * 65_535 + range / 2) / range) as u16;
    }
    Ok(())
}

/// Resizes keeping the aspect ratio so the longer side is `target`, then centres it on a zeroed `target` square.
pub fn letterbox(img: &Grey16, target: u32, resizer: &mut Resizer) -> Vec<u16> {
    let (w, h) = (img.width, img.height);
    if w == target && h == target {
        return img.pixels.clone();
    }
    let scale = f64::from(target) / f64::from(w.max(h));
    let nw = ((f64::from(w) * scale).round() as u32).clamp(1, target);
    let nh = ((f64::from(h) * scale).round() as u32).clamp(1, target);
    let src: Vec<U16> = img.pixels.iter().map(|&v| U16::new(v)).collect();
    let src = TypedImageRef::new(w, h, &src).expect("pixel count matches the dimensions");
    let mut dst = TypedImage::<U16>::new(nw, nh);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    resizer
        .resize_typed(&src, &mut dst, &options)
        .expect("same pixel type, non-empty images");
    let mut canvas = vec![0u16; target as usize * target as usize];
    let (x0, y0) = (((target - nw) / 2) as usize, ((target - nh) / 2) as usize);
    for (y, row) in dst.pixels().chunks_exact(nw as usize).enumerate() {
        let start = (y0 + y) * target as usize + x0;
        for (out, px) in canvas[start..start + nw as usize].iter_mut().zip(row) {
            *out = px.0;
        }
    }
    canvas
}

/// Decodes a DICOM file through its pixel pipeline (already full range).
pub fn decode_dicom(
    bytes: &[u8],
    opts: &radit_dicom::DicomOptions,
) -> Result<(Grey16, ImageNotes), ImageProblem> {
    let d = radit_dicom::decode(bytes, opts)?;
    let notes = ImageNotes {
        was_8bit: false,
        grey_stored_as_rgb: false,
        resized: false,
        dicom: Some(DicomNotes {
            monochrome1: d.notes.monochrome1,
            windowed: matches!(d.notes.voi, radit_dicom::AppliedVoi::Window(_)),
            voi_lut: d.notes.voi == radit_dicom::AppliedVoi::Lut,
            bad_window: d.notes.bad_window,
            padding_masked: d.notes.padding_masked,
        }),
    };
    let img = Grey16 {
        width: d.width,
        height: d.height,
        pixels: d.pixels,
    };
    Ok((img, notes))
}

/// Decode, normalise and letterbox one image file's bytes (PNG or DICOM) into a `target` x `target` image.
pub fn preprocess(
    bytes: &[u8],
    target: u32,
    resizer: &mut Resizer,
    dicom: &radit_dicom::DicomOptions,
) -> Result<(Vec<u16>, ImageNotes), ImageProblem> {
    let (img, mut notes) = if radit_dicom::is_dicom(bytes) {
        // The DICOM pipeline ends with its own full-range stretch: no second pass over the pixels.
        decode_dicom(bytes, dicom)?
    } else {
        let (mut img, notes) = decode_png(bytes)?;
        normalise_full_range(&mut img)?;
        (img, notes)
    };
    notes.resized = img.width != target || img.height != target;
    Ok((letterbox(&img, target, resizer), notes))
}

/// Encodes 16-bit greyscale pixels as a PNG (used by `radit synth` and the tests).
pub fn encode_png16(width: u32, height: u32, pixels: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header().expect("writing to a Vec cannot fail");
        let data: Vec<u8> = pixels.iter().flat_map(|v| v.to_be_bytes()).collect();
        writer
            .write_image_data(&data)
            .expect("pixel count matches the dimensions");
    }
    out
}

/// Encodes 8-bit pixels as a PNG of the given colour type (used by `radit synth` and the tests).
pub fn encode_png8(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().expect("writing to a Vec cannot fail");
        writer
            .write_image_data(data)
            .expect("pixel count matches the dimensions");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> Vec<u16> {
        (0..w * h).map(|i| (i * 7 % 4000 + 1000) as u16).collect()
    }

    #[test]
    fn sixteen_bit_round_trips_and_is_stretched_to_full_range() {
        let px = ramp(40, 30);
        let (mut img, notes) = decode_png(&encode_png16(40, 30, &px)).unwrap();
        assert_eq!(img.pixels, px);
        assert!(!notes.was_8bit);
        normalise_full_range(&mut img).unwrap();
        assert_eq!(*img.pixels.iter().min().unwrap(), 0);
        assert_eq!(*img.pixels.iter().max().unwrap(), 65535);
    }

    #[test]
    fn eight_bit_is_widened_and_rgb_grey_is_accepted_but_colour_is_not() {
        let grey: Vec<u8> = (0..12).map(|i| i * 20).collect();
        let (img, notes) =
            decode_png(&encode_png8(4, 3, png::ColorType::Grayscale, &grey)).unwrap();
        assert!(notes.was_8bit);
        assert_eq!(img.pixels[1], 20 * 257);
        let rgb_grey: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
        let (img, notes) = decode_png(&encode_png8(4, 3, png::ColorType::Rgb, &rgb_grey)).unwrap();
        assert!(notes.grey_stored_as_rgb);
        assert_eq!(img.pixels[2], 40 * 257);
        let mut colour = rgb_grey.clone();
        colour[4] = 255;
        assert!(matches!(
            decode_png(&encode_png8(4, 3, png::ColorType::Rgb, &colour)),
            Err(ImageProblem::Colour(_))
        ));
    }

    #[test]
    fn broken_inputs_are_named_problems() {
        assert_eq!(decode_png(&[]), Err(ImageProblem::EmptyFile));
        assert!(matches!(
            decode_png(b"not a png at all"),
            Err(ImageProblem::Decode(_))
        ));
        let good = encode_png16(40, 30, &ramp(40, 30));
        assert!(matches!(
            decode_png(&good[..good.len() / 2]),
            Err(ImageProblem::Decode(_))
        ));
        let mut flat = Grey16 {
            width: 2,
            height: 2,
            pixels: vec![9; 4],
        };
        assert_eq!(
            normalise_full_range(&mut flat),
            Err(ImageProblem::Constant(9))
        );
    }

    /// A PNG whose header claims `width` x `height` (8-bit grey) followed by a tiny IDAT.
    fn png_header_only(width: u32, height: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = 0xffff_ffffu32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut out = (data.len() as u32).to_be_bytes().to_vec();
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
            out
        };
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(chunk(b"IEND", &[]));
        png
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_rejected_before_allocating() {
        let e = decode_png(&png_header_only(1_000_000, 1_000_000)).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        // A small one with the same trick only fails to decode its (empty) data.
        assert!(matches!(
            decode_png(&png_header_only(4, 4)),
            Err(ImageProblem::Decode(_))
        ));
    }

    #[test]
    fn letterbox_keeps_aspect_and_centres() {
        let mut resizer = Resizer::new();
        // 200 wide x 100 high, all bright: after resize to 64 the content is 64x32 centred vertically.
        let img = Grey16 {
            width: 200,
            height: 100,
            pixels: vec![60000; 200 * 100],
        };
        let out = letterbox(&img, 64, &mut resizer);
        assert_eq!(out.len(), 64 * 64);
        let row = |y: usize| &out[y * 64..(y + 1) * 64];
        assert!(row(0).iter().all(|&v| v == 0) && row(15).iter().all(|&v| v == 0));
        assert!(row(16).iter().all(|&v| v == 60000) && row(47).iter().all(|&v| v == 60000));
        assert!(row(48).iter().all(|&v| v == 0));
        // Already the target size: unchanged.
        let sq = Grey16 {
            width: 8,
            height: 8,
            pixels: (0..64).collect(),
        };
        assert_eq!(letterbox(&sq, 8, &mut resizer), sq.pixels);
    }
}
