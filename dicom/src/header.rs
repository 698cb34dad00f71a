//! A DICOM file's header without its pixels: the fields an operator surveys before ingesting a release (transfer
//! syntax, photometric interpretation, bits, rescale, windows, VOI function, LUTs) and the demographics a source
//! without a table needs (age, sex, view). Reading stops at PixelData, so a header costs a few kilobytes.

use std::borrow::Cow;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde::Serialize;

use crate::{DicomProblem, is_dicom};

/// The header fields of one file, as written (trimmed); `None` where the attribute is absent.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DicomHeader {
    pub transfer_syntax: String,
    /// The syntax's name, and whether this build decodes it.
    pub transfer_syntax_name: String,
    pub decodable: bool,
    pub modality: Option<String>,
    pub photometric: Option<String>,
    pub samples_per_pixel: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub frames: Option<i64>,
    pub bits_allocated: Option<i64>,
    pub bits_stored: Option<i64>,
    pub pixel_representation: Option<i64>,
    pub rescale_slope: Option<String>,
    pub rescale_intercept: Option<String>,
    /// WindowCenter values (the VM is the number of windows).
    pub window_centers: Vec<String>,
    pub window_widths: Vec<String>,
    pub voi_function: Option<String>,
    pub voi_lut_items: usize,
    pub modality_lut: bool,
    pub presentation_lut_shape: Option<String>,
    pub view_position: Option<String>,
    pub patient_age: Option<String>,
    pub patient_sex: Option<String>,
}

/// Reads the header of a DICOM Part 10 file from its first bytes (all of them, or a prefix that reaches PixelData).
pub fn read_header(bytes: &[u8]) -> Result<DicomHeader, DicomProblem> {
    if !is_dicom(bytes) {
        return Err(DicomProblem::NotDicom);
    }
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(&bytes[128..])
        .map_err(|e| DicomProblem::Unreadable(e.to_string()))?;
    let uid = obj.meta().transfer_syntax().to_string();
    let (name, decodable) = match TransferSyntaxRegistry.get(&uid) {
        Some(ts) => (ts.name().to_string(), ts.can_decode_all()),
        None => ("(unknown)".to_string(), false),
    };
    let o: &InMemDicomObject = &obj;
    let items = |tag: Tag| {
        o.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.items().map(<[_]>::len))
            .unwrap_or(0)
    };
    Ok(DicomHeader {
        transfer_syntax: uid,
        transfer_syntax_name: name,
        decodable,
        modality: text(o, tags::MODALITY),
        photometric: text(o, tags::PHOTOMETRIC_INTERPRETATION),
        samples_per_pixel: int(o, tags::SAMPLES_PER_PIXEL),
        rows: int(o, tags::ROWS),
        columns: int(o, tags::COLUMNS),
        frames: int(o, tags::NUMBER_OF_FRAMES),
        bits_allocated: int(o, tags::BITS_ALLOCATED),
        bits_stored: int(o, tags::BITS_STORED),
        pixel_representation: int(o, tags::PIXEL_REPRESENTATION),
        rescale_slope: text(o, tags::RESCALE_SLOPE),
        rescale_intercept: text(o, tags::RESCALE_INTERCEPT),
        window_centers: multi(o, tags::WINDOW_CENTER),
        window_widths: multi(o, tags::WINDOW_WIDTH),
        voi_function: text(o, tags::VOILUT_FUNCTION),
        voi_lut_items: items(tags::VOILUT_SEQUENCE),
        modality_lut: items(tags::MODALITY_LUT_SEQUENCE) > 0,
        presentation_lut_shape: text(o, tags::PRESENTATION_LUT_SHAPE),
        view_position: text(o, tags::VIEW_POSITION),
        patient_age: text(o, tags::PATIENT_AGE),
        patient_sex: text(o, tags::PATIENT_SEX),
    })
}

/// A text attribute, trimmed; absent or empty is `None`.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.to_str().ok().map(Cow::into_owned)?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

/// The values of a multi-valued text attribute (`\`-separated).
fn multi(obj: &InMemDicomObject, tag: Tag) -> Vec<String> {
    text(obj, tag)
        .map(|s| s.split('\\').map(|v| v.trim().to_string()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::Fixture;

    #[test]
    fn the_survey_fields_of_a_fixture() {
        let mut f = Fixture::grey(4, 3, 12, (0..12).collect());
        f.photometric = "MONOCHROME1".into();
        f.windows = vec![(2048.0, 4096.0), (1000.0, 500.0)];
        f.function = Some("SIGMOID".into());
        f.rescale = Some((1.0, -1024.0));
        f.patient_age = Some("045Y".into());
        f.patient_sex = Some("F".into());
        f.view_position = Some("PA".into());
        let h = read_header(&f.to_bytes()).unwrap();
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert!(h.decodable);
        assert_eq!(h.photometric.as_deref(), Some("MONOCHROME1"));
        assert_eq!((h.rows, h.columns), (Some(4), Some(3)));
        assert_eq!((h.bits_allocated, h.bits_stored), (Some(16), Some(12)));
        assert_eq!(h.window_centers, ["2048", "1000"]);
        assert_eq!(h.window_widths.len(), 2);
        assert_eq!(h.voi_function.as_deref(), Some("SIGMOID"));
        assert_eq!(h.rescale_intercept.as_deref(), Some("-1024"));
        assert_eq!(h.patient_age.as_deref(), Some("045Y"));
        assert_eq!(h.patient_sex.as_deref(), Some("F"));
        assert_eq!(h.view_position.as_deref(), Some("PA"));
        assert_eq!(h.voi_lut_items, 0);
    }

    #[test]
    fn a_prefix_that_reaches_the_pixels_is_enough() {
        let f = Fixture::grey(64, 64, 16, (0..4096).collect());
        let bytes = f.to_bytes();
        let whole = read_header(&bytes).unwrap();
        // The pixel data is the last 8 KiB: the first part of it is not needed.
        let prefix = read_header(&bytes[..bytes.len() - 4096]).unwrap();
        assert_eq!(whole, prefix);
    }

    #[test]
    fn not_dicom_and_unknown_syntaxes() {
        assert_eq!(read_header(b"png"), Err(DicomProblem::NotDicom));
        let f = Fixture::grey(2, 2, 12, vec![1, 2, 3, 4]);
        let h = read_header(&f.to_bytes_declaring("1.2.840.10008.1.2.4.90")).unwrap();
        assert_eq!(
            h.decodable,
            cfg!(feature = "j2k"),
            "JPEG 2000 only with `j2k`"
        );
        assert!(h.transfer_syntax_name.contains("JPEG 2000"), "{h:?}");
    }
}
