//! DICOM radiographs to full-range 16-bit greyscale, for radit's ingest. dicom-rs parses the file and decodes the
//! stored samples (uncompressed, deflated, RLE, JPEG baseline and lossless by default, 12-bit JPEG Extended by
//! libjpeg-turbo ([`jpeg12`]); JPEG 2000 and JPEG-LS behind
//! the `j2k` and `jls` features); the pixel pipeline after that is ours and exactly specified ([`voi`]):
//!
//! 1. stored values (unused high bits masked, sign-extended when PixelRepresentation is 1);
//! 2. the modality LUT: a Modality LUT Sequence, else RescaleSlope/RescaleIntercept;
//! 3. the VOI: the VOI LUT Sequence, else the window (WindowCenter/WindowWidth with VOILUTFunction LINEAR,
//!    LINEAR_EXACT or SIGMOID), else none ([`VoiChoice`] picks);
//! 4. MONOCHROME1 inverted (negated, so that after the stretch bright is dense);
//! 5. stretched to 0..=65535.
//!
//! dicom-pixeldata can apply LUTs itself, but it truncates instead of rounding, shifts VOI LUT entries instead of
//! scaling them, takes unknown VOI functions for LINEAR and clamps invalid widths silently; the pydicom twin in
//! tests/python checks this pipeline to 1 LSB.

pub mod fixture;
pub mod header;
mod jpeg12;
pub mod voi;

use std::borrow::Cow;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTable;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde::{Deserialize, Serialize};

pub use header::{DicomHeader, read_header};
pub use voi::{Lut, WindowFunction};

/// 16k x 16k: far above any radiograph; refused before any pixel is decoded.
const MAX_PIXELS: u64 = 1 << 28;

/// A setting's spelling (its serde name) parsed, or an error listing the spellings (`expected`).
fn parse_setting<T: serde::de::DeserializeOwned>(s: &str, expected: &str) -> Result<T, String> {
    use serde::de::IntoDeserializer;
    T::deserialize(s.into_deserializer())
        .map_err(|_: serde::de::value::Error| format!("`{s}`: expected {expected}"))
}

/// Which VOI transform to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoiChoice {
    /// The VOI LUT Sequence if there is one, else the window, else none (pydicom's `prefer_lut=True`).
    #[default]
    Auto,
    /// The window even when a VOI LUT is present.
    Window,
    /// The VOI LUT only (no window).
    Lut,
    /// No VOI: the modality values stretched as they are.
    None,
}

impl std::str::FromStr for VoiChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_setting(s, "auto, window, lut or none")
    }
}

/// What to do with a window that cannot be used (a width the function does not allow, a centre without a width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadWindow {
    /// Fall back to no VOI (the stretch), and count it.
    #[default]
    Minmax,
    /// Reject the image.
    Reject,
}

impl std::str::FromStr for BadWindow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_setting(s, "minmax or reject")
    }
}

/// What to do with the pixels PixelPaddingValue (to PixelPaddingRangeLimit) marks as padding, outside the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Treat them like any pixel (the paper's "normalised to the full range" over the whole image).
    #[default]
    Ignore,
    /// Leave them out of the stretch's minimum and maximum and make them black.
    Mask,
}

impl std::str::FromStr for Padding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_setting(s, "ignore or mask")
    }
}

/// The settings of the pixel pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomOptions {
    #[serde(default)]
    pub voi: VoiChoice,
    /// Which window or VOI LUT when a file has several (0: the first).
    #[serde(default)]
    pub voi_index: usize,
    #[serde(default)]
    pub bad_window: BadWindow,
    #[serde(default)]
    pub padding: Padding,
}

impl DicomOptions {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The VOI transform an image got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum AppliedVoi {
    #[default]
    None,
    Window(WindowFunction),
    Lut,
}

/// Notes about an accepted image that the ingest report counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DicomNotes {
    pub transfer_syntax: String,
    pub monochrome1: bool,
    pub voi: AppliedVoi,
    /// The window could not be used and the image was stretched instead.
    pub bad_window: bool,
    /// The file has more than one frame; the first was used.
    pub multiframe: bool,
    /// Pixels marked as padding were masked ([`Padding::Mask`] and a PixelPaddingValue).
    pub padding_masked: bool,
}

/// A decoded radiograph: `width` x `height` full-range 16-bit samples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u16>,
    pub notes: DicomNotes,
}

/// Why a DICOM file could not be used; the message names the attribute or the transfer syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DicomProblem {
    #[error("not a DICOM file (no DICM marker at byte 128)")]
    NotDicom,
    #[error("unreadable DICOM: {0}")]
    Unreadable(String),
    /// The file ends inside its data set: a copy or download cut short.
    #[error("truncated DICOM: the file ends inside its data set ({0}); copy or download it again")]
    Truncated(String),
    /// A DICOM object that holds no image (a report, a presentation state, a key object selection).
    #[error("a DICOM object without pixel data (SOP class {sop_class}): not an image")]
    NoPixelData { sop_class: String },
    #[error("unknown DICOM transfer syntax {uid}")]
    UnknownSyntax { uid: String },
    #[error("unsupported DICOM transfer syntax {uid} ({name}): no decoder compiled in{hint}")]
    UnsupportedSyntax {
        uid: String,
        name: String,
        hint: &'static str,
    },
    #[error("DICOM attribute {attribute}: {reason}")]
    Attribute {
        attribute: &'static str,
        reason: String,
    },
    #[error("colour DICOM ({0}); expected a greyscale radiograph")]
    Colour(String),
    #[error("{rows}x{columns} pixels is too large")]
    TooLarge { rows: u32, columns: u32 },
    #[error("cannot decode the pixel data ({syntax}): {reason}")]
    Decode { syntax: String, reason: String },
    #[error("window {attribute}: {reason}")]
    BadWindow {
        attribute: &'static str,
        reason: String,
    },
    #[error("constant image: nothing to stretch")]
    Constant,
}

/// Whether `bytes` start like a DICOM Part 10 file.
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

/// Decodes one DICOM file's bytes into a full-range 16-bit image.
pub fn decode(bytes: &[u8], opts: &DicomOptions) -> Result<DicomImage, DicomProblem> {
    if !is_dicom(bytes) {
        return Err(DicomProblem::NotDicom);
    }
    // The transfer syntax first, from the meta group alone: a file whose pixel data has no decoder here is named
    // by its syntax, whatever else is in it.
    let meta = FileMetaTable::from_reader(&bytes[128..])
        .map_err(|e| DicomProblem::Unreadable(e.to_string()))?;
    let uid = meta.transfer_syntax().to_string();
    let syntax = TransferSyntaxRegistry
        .get(&uid)
        .ok_or_else(|| DicomProblem::UnknownSyntax { uid: uid.clone() })?;
    if !syntax.can_decode_all() {
        return Err(DicomProblem::UnsupportedSyntax {
            hint: feature_hint(&uid),
            name: syntax.name().to_string(),
            uid,
        });
    }
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&bytes[128..])
        .map_err(|e| unreadable(&bytes[128..], e))?;
    if obj.element(tags::PIXEL_DATA).is_err() {
        return Err(DicomProblem::NoPixelData {
            sop_class: meta
                .media_storage_sop_class_uid()
                .trim_end_matches('\0')
                .to_string(),
        });
    }
    let header = Header::read(&obj)?;
    // 12-bit JPEG Extended by libjpeg-turbo; everything else (8-bit JPEG Extended too) by dicom-rs.
    let twelve_bit = match uid.as_str() {
        jpeg12::JPEG_EXTENDED => match first_frame_jpeg(&obj) {
            Some(jpeg) => jpeg12::decode(&jpeg).map_err(|e| decode_error(&uid, e))?,
            None => None,
        },
        _ => None,
    };
    let decoded;
    let data: Cow<[u8]> = match twelve_bit {
        Some(frame) => {
            if (frame.width, frame.height) != (header.columns as usize, header.rows as usize) {
                return Err(decode_error(
                    &uid,
                    format!(
                        "the JPEG frame is {}x{} samples, the header says {}x{}",
                        frame.width, frame.height, header.columns, header.rows
                    ),
                ));
            }
            if header.bits_allocated != 16 {
                return Err(decode_error(
                    &uid,
                    format!("12-bit samples in BitsAllocated {}", header.bits_allocated),
                ));
            }
            Cow::Owned(frame.samples.iter().flat_map(|s| s.to_ne_bytes()).collect())
        }
        None => {
            decoded = obj
                .decode_pixel_data_frame(0)
                .map_err(|e| decode_error(&uid, e))?;
            Cow::Borrowed(decoded.frame_data(0).map_err(|e| decode_error(&uid, e))?)
        }
    };
    let n = header.rows as usize * header.columns as usize;
    let bytes_per_sample = usize::from(header.bits_allocated / 8);
    if data.len() < n * bytes_per_sample {
        return Err(DicomProblem::Decode {
            syntax: uid,
            reason: format!(
                "{} bytes of pixel data for {}x{} samples of {} bits",
                data.len(),
                header.rows,
                header.columns,
                header.bits_allocated
            ),
        });
    }
    let raw = data[..n * bytes_per_sample]
        .chunks_exact(bytes_per_sample)
        .map(|c| match c {
            [b] => u32::from(*b),
            [a, b] => u32::from(u16::from_ne_bytes([*a, *b])),
            _ => 0,
        });
    let stored = raw.map(|r| voi::stored_value(r, header.bits_stored.into(), header.signed));
    let padding = header.padding.filter(|_| opts.padding == Padding::Mask);
    let mut notes = DicomNotes {
        transfer_syntax: uid,
        monochrome1: header.monochrome1,
        multiframe: header.frames > 1,
        padding_masked: padding.is_some(),
        ..DicomNotes::default()
    };
    let modality = header.modality.clone();
    // The padding mask is of stored values (PS3.3 C.7.5.1.1.2), taken in the same pass.
    let mut mask = Vec::new();
    let values: Vec<f64> = stored
        .map(|s| {
            if let Some((lo, hi)) = padding {
                mask.push((lo..=hi).contains(&s));
            }
            modality.apply(s)
        })
        .collect();
    let mut values = apply_voi(values, &header, opts, &mut notes)?;
    if header.monochrome1 {
        values.iter_mut().for_each(|v| *v = -*v);
    }
    let mask = padding.map(|_| &mask[..]);
    let pixels = voi::stretch_except(&values, mask).ok_or(DicomProblem::Constant)?;
    Ok(DicomImage {
        width: header.columns,
        height: header.rows,
        pixels,
        notes,
    })
}

/// The JPEG stream of the first frame of encapsulated pixel data: all fragments when the file has one frame, else
/// the fragments the Basic Offset Table gives the first frame (or the first fragment, one frame per fragment).
fn first_frame_jpeg(obj: &Object) -> Option<Vec<u8>> {
    let value = obj.element(tags::PIXEL_DATA).ok()?.value();
    let fragments = value.fragments()?;
    let frames = int(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames")
        .ok()
        .flatten()
        .unwrap_or(1);
    if frames <= 1 {
        return Some(fragments.concat());
    }
    let table = value.offset_table().unwrap_or(&[]);
    match table.get(1) {
        // Offsets count each fragment's 8-byte item header.
        Some(&end) => {
            let mut taken = 0u64;
            let mut jpeg = Vec::new();
            for f in fragments {
                if taken >= u64::from(end) {
                    break;
                }
                jpeg.extend_from_slice(f);
                taken += f.len() as u64 + 8;
            }
            Some(jpeg)
        }
        None => fragments.first().cloned(),
    }
}

/// A data set that cannot be parsed: truncated when everything up to the pixel data reads and the pixel data does
/// not (the usual copy cut short: the pixel data is most of the file), else unreadable.
fn unreadable(data: &[u8], e: impl std::fmt::Display) -> DicomProblem {
    let header_reads = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(data)
        .is_ok();
    if header_reads {
        DicomProblem::Truncated(format!(
            "its {} bytes end inside the pixel data: {e}",
            data.len() + 128
        ))
    } else {
        DicomProblem::Unreadable(format!(
            "{e} (the data set before the pixel data is damaged, or the file is cut short there)"
        ))
    }
}

fn decode_error(uid: &str, e: impl std::fmt::Display) -> DicomProblem {
    DicomProblem::Decode {
        syntax: uid.to_string(),
        reason: e.to_string(),
    }
}

/// Which cargo feature would decode a transfer syntax that is not compiled in.
fn feature_hint(uid: &str) -> &'static str {
    match uid {
        "1.2.840.10008.1.2.4.90"
        | "1.2.840.10008.1.2.4.91"
        | "1.2.840.10008.1.2.4.92"
        | "1.2.840.10008.1.2.4.93"
        | "1.2.840.10008.1.2.4.201"
        | "1.2.840.10008.1.2.4.202"
        | "1.2.840.10008.1.2.4.203" => "; rebuild radit with --features dicom-j2k",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => {
            "; rebuild radit with --features dicom-jls"
        }
        _ => "",
    }
}

/// The modality transform of one file.
#[derive(Debug, Clone, PartialEq)]
enum Modality {
    Lut(Lut),
    Rescale { slope: f64, intercept: f64 },
}

impl Modality {
    fn apply(&self, stored: i64) -> f64 {
        match self {
            Modality::Lut(l) => l.apply(stored as f64),
            Modality::Rescale { slope, intercept } => slope * stored as f64 + intercept,
        }
    }
}

/// What the pipeline reads from the header.
#[derive(Debug, Clone)]
struct Header {
    rows: u32,
    columns: u32,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    monochrome1: bool,
    frames: u32,
    modality: Modality,
    voi_luts: Vec<Lut>,
    /// Stored values that are padding: PixelPaddingValue to PixelPaddingRangeLimit, in order.
    padding: Option<(i64, i64)>,
    centres: Vec<f64>,
    widths: Vec<f64>,
    functions: Vec<String>,
}

type Object = InMemDicomObject;

fn text(obj: &Object, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    e.to_str().ok().map(Cow::into_owned)
}

fn int(obj: &Object, tag: Tag, attribute: &'static str) -> Result<Option<i64>, DicomProblem> {
    let Some(e) = obj.element_opt(tag).ok().flatten() else {
        return Ok(None);
    };
    e.to_int::<i64>()
        .map(Some)
        .map_err(|err| DicomProblem::Attribute {
            attribute,
            reason: err.to_string(),
        })
}

fn required(obj: &Object, tag: Tag, attribute: &'static str) -> Result<i64, DicomProblem> {
    int(obj, tag, attribute)?.ok_or(DicomProblem::Attribute {
        attribute,
        reason: "missing".into(),
    })
}

fn floats(obj: &Object, tag: Tag, attribute: &'static str) -> Result<Vec<f64>, DicomProblem> {
    match obj.element_opt(tag).ok().flatten() {
        None => Ok(Vec::new()),
        Some(e) => e.to_multi_float64().map_err(|err| DicomProblem::Attribute {
            attribute,
            reason: err.to_string(),
        }),
    }
}

/// A LUT item of a Modality or VOI LUT Sequence: LUTDescriptor [entries (0: 65536), first mapped, bits], LUTData.
fn lut(item: &Object, attribute: &'static str) -> Result<Lut, DicomProblem> {
    let bad = |reason: String| DicomProblem::Attribute { attribute, reason };
    let descriptor = item
        .element_opt(tags::LUT_DESCRIPTOR)
        .ok()
        .flatten()
        .ok_or_else(|| bad("an item without LUTDescriptor".into()))?
        .to_multi_int::<i64>()
        .map_err(|e| bad(format!("LUTDescriptor: {e}")))?;
    let [n, first, bits] = descriptor[..] else {
        return Err(bad(format!(
            "LUTDescriptor has {} values, expected 3",
            descriptor.len()
        )));
    };
    let n = if n == 0 { 65_536 } else { n as usize };
    // The first mapped value is US or SS by the data's PixelRepresentation; read as US it may need its sign.
    let first = if first > 32_767 {
        first - 65_536
    } else {
        first
    };
    let entries: Vec<u16> = item
        .element_opt(tags::LUT_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| bad("an item without LUTData".into()))?
        .to_multi_int::<i64>()
        .map_err(|e| bad(format!("LUTData: {e}")))?
        .into_iter()
        .map(|v| v as u16)
        .collect();
    if entries.len() < n || !(1..=16).contains(&bits) {
        return Err(bad(format!(
            "LUTDescriptor says {n} entries of {bits} bits, LUTData has {}",
            entries.len()
        )));
    }
    Ok(Lut {
        first,
        bits: bits as u32,
        entries: entries[..n].to_vec(),
    })
}

fn sequence_luts(
    obj: &Object,
    tag: Tag,
    attribute: &'static str,
) -> Result<Vec<Lut>, DicomProblem> {
    match obj.element_opt(tag).ok().flatten().and_then(|e| e.items()) {
        None => Ok(Vec::new()),
        Some(items) => items.iter().map(|i| lut(i, attribute)).collect(),
    }
}

impl Header {
    fn read(obj: &Object) -> Result<Self, DicomProblem> {
        let samples = int(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
        let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_default()
            .trim()
            .to_ascii_uppercase();
        if samples != 1 || !matches!(photometric.as_str(), "MONOCHROME1" | "MONOCHROME2") {
            return Err(DicomProblem::Colour(format!(
                "PhotometricInterpretation {photometric}, SamplesPerPixel {samples}"
            )));
        }
        let rows = required(obj, tags::ROWS, "Rows")?;
        let columns = required(obj, tags::COLUMNS, "Columns")?;
        if rows <= 0 || columns <= 0 || (rows as u64) * (columns as u64) > MAX_PIXELS {
            return Err(DicomProblem::TooLarge {
                rows: rows.max(0) as u32,
                columns: columns.max(0) as u32,
            });
        }
        let bits_allocated = required(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
        if !matches!(bits_allocated, 8 | 16) {
            return Err(DicomProblem::Attribute {
                attribute: "BitsAllocated",
                reason: format!("{bits_allocated}; expected 8 or 16"),
            });
        }
        let bits_stored = int(obj, tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
        if !(1..=bits_allocated).contains(&bits_stored) {
            return Err(DicomProblem::Attribute {
                attribute: "BitsStored",
                reason: format!("{bits_stored} with BitsAllocated {bits_allocated}"),
            });
        }
        let signed = int(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0) == 1;
        let frames = text(obj, tags::NUMBER_OF_FRAMES)
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(1);
        let modality = match sequence_luts(obj, tags::MODALITY_LUT_SEQUENCE, "ModalityLUTSequence")?
            .into_iter()
            .next()
        {
            Some(l) => Modality::Lut(l),
            None => Modality::Rescale {
                slope: floats(obj, tags::RESCALE_SLOPE, "RescaleSlope")?
                    .first()
                    .copied()
                    .unwrap_or(1.0),
                intercept: floats(obj, tags::RESCALE_INTERCEPT, "RescaleIntercept")?
                    .first()
                    .copied()
                    .unwrap_or(0.0),
            },
        };
        // US or SS by PixelRepresentation; read as US, a signed value needs its sign.
        let sample = |v: i64| if signed && v > 32_767 { v - 65_536 } else { v };
        let padding_value = int(obj, tags::PIXEL_PADDING_VALUE, "PixelPaddingValue")?.map(sample);
        let padding_limit = int(
            obj,
            tags::PIXEL_PADDING_RANGE_LIMIT,
            "PixelPaddingRangeLimit",
        )?
        .map(sample);
        let padding = padding_value.map(|v| {
            let l = padding_limit.unwrap_or(v);
            (v.min(l), v.max(l))
        });
        Ok(Self {
            rows: rows as u32,
            columns: columns as u32,
            bits_allocated: bits_allocated as u16,
            bits_stored: bits_stored as u16,
            signed,
            monochrome1: photometric == "MONOCHROME1",
            frames,
            modality,
            voi_luts: sequence_luts(obj, tags::VOILUT_SEQUENCE, "VOILUTSequence")?,
            padding,
            centres: floats(obj, tags::WINDOW_CENTER, "WindowCenter")?,
            widths: floats(obj, tags::WINDOW_WIDTH, "WindowWidth")?,
            functions: text(obj, tags::VOILUT_FUNCTION)
                .map(|t| t.split('\\').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
        })
    }
}

/// Step 3: the VOI LUT or window `opts` asks for, as values in [0, 1]; `values` unchanged when there is none.
fn apply_voi(
    values: Vec<f64>,
    h: &Header,
    opts: &DicomOptions,
    notes: &mut DicomNotes,
) -> Result<Vec<f64>, DicomProblem> {
    let i = opts.voi_index;
    let lut = h.voi_luts.get(i);
    let window = h.centres.get(i).copied().zip(h.widths.get(i).copied());
    let use_lut = matches!(opts.voi, VoiChoice::Auto | VoiChoice::Lut) && lut.is_some();
    if let (true, Some(l)) = (use_lut, lut) {
        notes.voi = AppliedVoi::Lut;
        let max = l.max();
        return Ok(values.into_iter().map(|x| l.apply(x) / max).collect());
    }
    if !matches!(opts.voi, VoiChoice::Auto | VoiChoice::Window) {
        return Ok(values);
    }
    let has_any = !h.centres.is_empty() || !h.widths.is_empty();
    let bad = |attribute: &'static str, reason: String, notes: &mut DicomNotes| {
        if opts.bad_window == BadWindow::Reject {
            return Err(DicomProblem::BadWindow { attribute, reason });
        }
        notes.bad_window = true;
        Ok(())
    };
    let Some((c, w)) = window else {
        if has_any || opts.voi == VoiChoice::Window {
            bad(
                "WindowCenter/WindowWidth",
                format!(
                    "no pair {i} ({} centres, {} widths)",
                    h.centres.len(),
                    h.widths.len()
                ),
                notes,
            )?;
        }
        return Ok(values);
    };
    let name = h
        .functions
        .get(i)
        .or(h.functions.first())
        .map_or("", String::as_str);
    let Some(function) = WindowFunction::parse(name) else {
        return Err(DicomProblem::BadWindow {
            attribute: "VOILUTFunction",
            reason: format!("`{name}` is not LINEAR, LINEAR_EXACT or SIGMOID"),
        });
    };
    if !(c.is_finite() && function.valid_width(w)) {
        bad(
            "WindowWidth",
            format!("{w} (centre {c}) cannot be used with {function:?}"),
            notes,
        )?;
        return Ok(values);
    }
    notes.voi = AppliedVoi::Window(function);
    Ok(values
        .into_iter()
        .map(|x| function.apply(x, c, w))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::Fixture;

    fn decoded(f: &Fixture) -> Result<DicomImage, DicomProblem> {
        decode(&f.to_bytes(), &DicomOptions::default())
    }

    /// A 12-bit ramp of `n` samples (2 rows), garbage in the unused top nibble.
    fn ramp(n: u16) -> Fixture {
        let pixels = (0..n).map(|i| 0xA000 | (i * 4095 / (n - 1))).collect();
        Fixture::grey(2, n / 2, 12, pixels)
    }

    #[test]
    fn a_plain_ramp_is_stretched_to_sixteen_bits_ignoring_unused_bits() {
        let img = decoded(&ramp(8)).unwrap();
        assert_eq!((img.width, img.height), (4, 2));
        assert_eq!(img.pixels[0], 0);
        assert_eq!(img.pixels[7], 65535);
        assert!(img.pixels.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(img.notes.voi, AppliedVoi::None);
        assert_eq!(img.notes.transfer_syntax, "1.2.840.10008.1.2.1");
    }

    #[test]
    fn monochrome1_is_the_exact_inverse_of_monochrome2() {
        let mut f = ramp(16);
        f.windows = vec![(2048.0, 3000.0)];
        let m2 = decoded(&f).unwrap();
        f.photometric = "MONOCHROME1".into();
        let m1 = decoded(&f).unwrap();
        assert!(m1.notes.monochrome1);
        let inverted: Vec<u16> = m2.pixels.iter().map(|&v| 65535 - v).collect();
        assert_eq!(m1.pixels, inverted);
    }

    #[test]
    fn windows_follow_their_function_and_the_index_picks_the_pair() {
        // Stored 0..=4095 over 16 samples; a LINEAR_EXACT window of [1000, 3000] clips both ends.
        let mut f = ramp(16);
        f.windows = vec![(2000.0, 2000.0), (2048.0, 4096.0)];
        f.function = Some("LINEAR_EXACT".into());
        let img = decoded(&f).unwrap();
        assert_eq!(
            img.notes.voi,
            AppliedVoi::Window(WindowFunction::LinearExact)
        );
        let stored: Vec<f64> = (0..16u16).map(|i| f64::from(i * 4095 / 15)).collect();
        let want: Vec<f64> = stored
            .iter()
            .map(|&x| WindowFunction::LinearExact.apply(x, 2000.0, 2000.0))
            .collect();
        assert_eq!(img.pixels, voi::stretch(&want).unwrap());
        assert_eq!(img.pixels[0], 0);
        assert_eq!(img.pixels[1], 0, "below the window: clipped");
        assert_eq!(img.pixels[15], 65535);
        assert_eq!(img.pixels[14], 65535, "above the window: clipped");
        let second = decode(
            &f.to_bytes(),
            &DicomOptions {
                voi_index: 1,
                ..DicomOptions::default()
            },
        )
        .unwrap();
        assert_ne!(second.pixels, img.pixels);
        f.function = Some("LOG".into());
        let e = decoded(&f).unwrap_err().to_string();
        assert!(e.contains("VOILUTFunction") && e.contains("LOG"), "{e}");
    }

    #[test]
    fn rescale_and_signed_samples_come_before_the_window() {
        // Signed 12-bit stored values -2048..=2047 with slope 0.5 and intercept -1024: a sigmoid around -1024.
        let pixels: Vec<u16> = (0..8u16)
            .map(|i| ((i as i16 * 512 - 2048) as u16) & 0x0FFF)
            .collect();
        let mut f = Fixture::grey(2, 4, 12, pixels);
        f.signed = true;
        f.rescale = Some((0.5, -1024.0));
        f.windows = vec![(-1024.0, 800.0)];
        f.function = Some("SIGMOID".into());
        let img = decoded(&f).unwrap();
        let want: Vec<f64> = (0..8)
            .map(|i| 0.5 * f64::from(i * 512 - 2048) - 1024.0)
            .map(|x| WindowFunction::Sigmoid.apply(x, -1024.0, 800.0))
            .collect();
        assert_eq!(img.pixels, voi::stretch(&want).unwrap());
        // A negative slope with no window reverses the order before the stretch.
        let mut g = ramp(8);
        g.rescale = Some((-1.0, 0.0));
        let img = decoded(&g).unwrap();
        assert_eq!((img.pixels[0], img.pixels[7]), (65535, 0));
    }

    #[test]
    fn a_voi_lut_is_preferred_to_the_window_unless_asked_otherwise() {
        let mut f = ramp(8);
        f.windows = vec![(2048.0, 4096.0)];
        // An inverting 12-bit LUT over the stored range.
        f.voi_lut = Some(Lut {
            first: 0,
            bits: 12,
            entries: (0..4096u16).rev().collect(),
        });
        let img = decoded(&f).unwrap();
        assert_eq!(img.notes.voi, AppliedVoi::Lut);
        assert_eq!((img.pixels[0], img.pixels[7]), (65535, 0));
        let windowed = decode(
            &f.to_bytes(),
            &DicomOptions {
                voi: VoiChoice::Window,
                ..DicomOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            windowed.notes.voi,
            AppliedVoi::Window(WindowFunction::Linear)
        );
        assert_eq!((windowed.pixels[0], windowed.pixels[7]), (0, 65535));
    }

    #[test]
    fn a_bad_window_falls_back_to_the_stretch_or_is_rejected() {
        let mut f = ramp(8);
        f.windows = vec![(2048.0, 0.5)];
        let img = decoded(&f).unwrap();
        assert!(img.notes.bad_window);
        assert_eq!(img.pixels, decoded(&ramp(8)).unwrap().pixels);
        let e = decode(
            &f.to_bytes(),
            &DicomOptions {
                bad_window: BadWindow::Reject,
                ..DicomOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("WindowWidth"), "{e}");
    }

    #[test]
    fn settings_parse_from_their_spellings() {
        assert_eq!("lut".parse::<VoiChoice>(), Ok(VoiChoice::Lut));
        assert_eq!("reject".parse::<BadWindow>(), Ok(BadWindow::Reject));
        assert_eq!("mask".parse::<Padding>(), Ok(Padding::Mask));
        assert_eq!(
            "Mask".parse::<Padding>(),
            Err("`Mask`: expected ignore or mask".to_string())
        );
        assert_eq!(
            "both".parse::<VoiChoice>(),
            Err("`both`: expected auto, window, lut or none".to_string())
        );
    }

    #[test]
    fn padding_is_masked_only_when_asked() {
        // Stored 0 and 4095 are padding (value 4095, limit 4090 given the other way round); the body is 100..=300.
        let mut f = Fixture::grey(1, 6, 12, vec![4095, 100, 200, 300, 4092, 0]);
        f.padding = Some((4095, Some(4090)));
        let mask = DicomOptions {
            padding: Padding::Mask,
            ..DicomOptions::default()
        };
        let img = decode(&f.to_bytes(), &mask).unwrap();
        assert!(img.notes.padding_masked);
        // 0 is not padding: it is the body's minimum now.
        assert_eq!(img.pixels, vec![0, 21_845, 43_690, 65_535, 0, 0]);
        let plain = decoded(&f).unwrap();
        assert!(!plain.notes.padding_masked);
        assert_eq!(
            plain.pixels[0], 65_535,
            "ignored by default: the padding is the maximum"
        );
        // MONOCHROME1: the body inverted, the padding still black.
        f.photometric = "MONOCHROME1".into();
        f.pixels[5] = 4091;
        let img = decode(&f.to_bytes(), &mask).unwrap();
        assert_eq!(img.pixels, vec![0, 65_535, 32_768, 0, 0, 0]);
    }

    #[test]
    fn eight_bit_and_implicit_little_endian_files_decode() {
        let mut f = Fixture::grey(1, 4, 8, vec![0, 10, 20, 255]);
        f.bits_allocated = 8;
        f.transfer_syntax = "1.2.840.10008.1.2".into();
        let img = decoded(&f).unwrap();
        assert_eq!(img.pixels, vec![0, 2570, 5140, 65535]);
    }

    #[test]
    fn unusable_files_are_refused_with_what_is_wrong() {
        assert_eq!(
            decode(b"not dicom", &DicomOptions::default()),
            Err(DicomProblem::NotDicom)
        );
        let bytes = ramp(8).to_bytes();
        // Cut short inside the pixel data (the usual broken copy): named as truncated.
        let e = decode(&bytes[..bytes.len() - 10], &DicomOptions::default()).unwrap_err();
        assert!(
            matches!(&e, DicomProblem::Truncated(t) if t.contains("end inside the pixel data")),
            "{e}"
        );
        // Cut just before the pixel data: a DICOM object without an image, named as such with its SOP class.
        let at = bytes
            .windows(4)
            .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])
            .unwrap();
        let e = decode(&bytes[..at], &DicomOptions::default()).unwrap_err();
        assert!(matches!(e, DicomProblem::NoPixelData { .. }), "{e}");
        assert!(e.to_string().contains("without pixel data"), "{e}");
        // Cut inside the file meta group: unreadable.
        let e = decode(&bytes[..200], &DicomOptions::default()).unwrap_err();
        assert!(matches!(e, DicomProblem::Unreadable(_)), "{e}");
        let mut rgb = ramp(8);
        rgb.photometric = "RGB".into();
        rgb.samples_per_pixel = 3;
        assert!(matches!(decoded(&rgb), Err(DicomProblem::Colour(_))));
        let mut palette = ramp(8);
        palette.photometric = "PALETTE COLOR".into();
        assert!(matches!(decoded(&palette), Err(DicomProblem::Colour(_))));
        let j2k = ramp(8).to_bytes_declaring("1.2.840.10008.1.2.4.90");
        let e = decode(&j2k, &DicomOptions::default())
            .unwrap_err()
            .to_string();
        if !cfg!(feature = "j2k") {
            assert!(
                e.contains("1.2.840.10008.1.2.4.90") && e.contains("dicom-j2k"),
                "{e}"
            );
        }
        let unknown = ramp(8).to_bytes_declaring("1.2.3.4");
        assert_eq!(
            decode(&unknown, &DicomOptions::default()),
            Err(DicomProblem::UnknownSyntax {
                uid: "1.2.3.4".into()
            })
        );
        let constant = Fixture::grey(2, 2, 12, vec![7; 4]);
        assert_eq!(decoded(&constant), Err(DicomProblem::Constant));
    }
}
