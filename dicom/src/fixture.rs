//! Writes small DICOM Part 10 files in the native (uncompressed) syntaxes, for tests and synthetic source layouts:
//! any photometric interpretation, bit depth, rescale, windows and VOI function, VOI LUT and header fields.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTable;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use crate::Lut;

/// One single-frame greyscale image and the attributes the pipeline reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixture {
    pub rows: u16,
    pub columns: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub photometric: String,
    pub samples_per_pixel: u16,
    /// Stored sample words, row-major (the low byte only when 8 bits are allocated).
    pub pixels: Vec<u16>,
    pub rescale: Option<(f64, f64)>,
    /// (centre, width) pairs.
    pub windows: Vec<(f64, f64)>,
    pub function: Option<String>,
    pub voi_lut: Option<Lut>,
    pub transfer_syntax: String,
    pub patient_age: Option<String>,
    pub patient_sex: Option<String>,
    pub view_position: Option<String>,
    /// PixelPaddingValue and PixelPaddingRangeLimit (stored values, US).
    pub padding: Option<(u16, Option<u16>)>,
}

impl Fixture {
    /// A MONOCHROME2 image of unsigned 16-bit samples with `bits_stored` significant bits, explicit VR little endian.
    pub fn grey(rows: u16, columns: u16, bits_stored: u16, pixels: Vec<u16>) -> Self {
        Self {
            rows,
            columns,
            bits_allocated: 16,
            bits_stored,
            signed: false,
            photometric: "MONOCHROME2".into(),
            samples_per_pixel: 1,
            pixels,
            rescale: None,
            windows: Vec::new(),
            function: None,
            voi_lut: None,
            transfer_syntax: uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            patient_age: None,
            patient_sex: None,
            view_position: None,
            padding: None,
        }
    }

    /// The file's bytes (preamble, DICM, meta group, data set).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = InMemDicomObject::new_empty();
        let us = |o: &mut InMemDicomObject, tag, v: u16| {
            o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
        };
        let text = |o: &mut InMemDicomObject, tag, vr, v: &str| {
            o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        text(
            &mut o,
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        );
        text(
            &mut o,
            tags::SOP_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.543.1",
        );
        text(&mut o, tags::MODALITY, VR::CS, "DX");
        us(&mut o, tags::SAMPLES_PER_PIXEL, self.samples_per_pixel);
        text(
            &mut o,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            &self.photometric,
        );
        us(&mut o, tags::ROWS, self.rows);
        us(&mut o, tags::COLUMNS, self.columns);
        us(&mut o, tags::BITS_ALLOCATED, self.bits_allocated);
        us(&mut o, tags::BITS_STORED, self.bits_stored);
        us(&mut o, tags::HIGH_BIT, self.bits_stored.saturating_sub(1));
        us(&mut o, tags::PIXEL_REPRESENTATION, u16::from(self.signed));
        if let Some((slope, intercept)) = self.rescale {
            text(&mut o, tags::RESCALE_SLOPE, VR::DS, &slope.to_string());
            text(
                &mut o,
                tags::RESCALE_INTERCEPT,
                VR::DS,
                &intercept.to_string(),
            );
        }
        if !self.windows.is_empty() {
            let join = |f: fn(&(f64, f64)) -> f64| {
                self.windows
                    .iter()
                    .map(|w| f(w).to_string())
                    .collect::<Vec<_>>()
                    .join("\\")
            };
            text(&mut o, tags::WINDOW_CENTER, VR::DS, &join(|w| w.0));
            text(&mut o, tags::WINDOW_WIDTH, VR::DS, &join(|w| w.1));
        }
        if let Some((value, limit)) = self.padding {
            us(&mut o, tags::PIXEL_PADDING_VALUE, value);
            if let Some(limit) = limit {
                us(&mut o, tags::PIXEL_PADDING_RANGE_LIMIT, limit);
            }
        }
        if let Some(f) = &self.function {
            text(&mut o, tags::VOILUT_FUNCTION, VR::CS, f);
        }
        if let Some(l) = &self.voi_lut {
            let mut item = InMemDicomObject::new_empty();
            let n = if l.entries.len() == 65_536 {
                0
            } else {
                l.entries.len() as u16
            };
            item.put(DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16([n, l.first as u16, l.bits as u16].as_slice().into()),
            ));
            item.put(DataElement::new(
                tags::LUT_DATA,
                VR::US,
                PrimitiveValue::U16(l.entries.as_slice().into()),
            ));
            o.put(DataElement::new(
                tags::VOILUT_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ));
        }
        for (tag, value) in [
            (tags::PATIENT_AGE, &self.patient_age),
            (tags::PATIENT_SEX, &self.patient_sex),
            (tags::VIEW_POSITION, &self.view_position),
        ] {
            if let Some(v) = value {
                let vr = if tag == tags::PATIENT_AGE {
                    VR::AS
                } else {
                    VR::CS
                };
                text(&mut o, tag, vr, v);
            }
        }
        let pixel_data = if self.bits_allocated == 8 {
            let bytes: Vec<u8> = self.pixels.iter().map(|&p| p as u8).collect();
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.into()))
        } else {
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(self.pixels.as_slice().into()),
            )
        };
        o.put(pixel_data);
        let file = o
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(self.transfer_syntax.as_str()))
            .expect("a complete file meta group");
        let mut out = Vec::new();
        file.write_all(&mut out).expect("writing to memory");
        out
    }

    /// The bytes of [`Fixture::to_bytes`] with another transfer syntax declared in the meta group and the data set
    /// left as written: a file claiming a syntax whose pixel data cannot (or need not) be decoded.
    pub fn to_bytes_declaring(&self, transfer_syntax: &str) -> Vec<u8> {
        let bytes = self.to_bytes();
        let meta = FileMetaTable::from_reader(&bytes[128..]).expect("a meta group just written");
        // (0002,0000) UL: the meta group's length after its own 12 bytes, at 132 + 8.
        let group = u32::from_le_bytes(bytes[140..144].try_into().expect("4 bytes")) as usize;
        let data_set = &bytes[144 + group..];
        let declared = FileMetaTableBuilder::new()
            .transfer_syntax(transfer_syntax)
            .media_storage_sop_class_uid(meta.media_storage_sop_class_uid())
            .media_storage_sop_instance_uid(meta.media_storage_sop_instance_uid())
            .build()
            .expect("a complete file meta group");
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        declared.write(&mut out).expect("writing to memory");
        out.extend_from_slice(data_set);
        out
    }
}

/// Little-endian 16-bit samples, as the pydicom twin writes its decoded images.
pub fn samples_le(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The largest difference between two images' samples, `None` when they do not have the same number: how radit's
/// pixels are compared with the twin's.
pub fn max_difference(a: &[u16], b: &[u16]) -> Option<u16> {
    (a.len() == b.len()).then(|| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x.abs_diff(y))
            .max()
            .unwrap_or(0)
    })
}
