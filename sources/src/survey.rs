//! `radit dicom survey DIR|URL`: the header fields of every DICOM under a folder or an object-store prefix,
//! tabulated without decoding a pixel (shared/design/sources.md B.2: what to check before ingesting a release):
//! transfer syntaxes (and whether this build decodes them), photometric interpretations, bit depths, rescales,
//! windows, VOI functions and LUTs, views, age formats and sexes. Only each file's first 64 KiB are read (all of it
//! when the header is longer), so a survey of a release on S3 costs a fraction of a download.

use std::collections::BTreeMap;

use radit_dicom::{DicomHeader, DicomProblem, read_header};
use radit_sharding::store::{Storage, StorageError};
use serde::Serialize;

/// Bytes read first from each file.
const PREFIX: u64 = 64 << 10;
/// Problems kept in full in the report; the counts are complete.
const KEPT: usize = 50;

/// What to survey and how.
#[derive(Debug, Clone)]
pub struct SurveyOptions {
    /// Survey at most this many DICOM candidates (the first in key order).
    pub limit: Option<usize>,
    pub threads: usize,
}

impl Default for SurveyOptions {
    fn default() -> Self {
        Self {
            limit: None,
            threads: 8,
        }
    }
}

/// A file that could not be surveyed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

/// The survey: for each header field, each value and how many files have it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Survey {
    pub location: String,
    /// Files listed, files skipped by their extension (images and tables of the release), DICOMs read.
    pub listed: u64,
    pub skipped: u64,
    pub dicom: u64,
    /// Candidates that are not DICOM Part 10 or could not be read.
    pub unreadable_count: u64,
    pub unreadable: Vec<Unreadable>,
    /// Field -> value -> files.
    pub fields: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Whether a key may be a DICOM: `.dcm`, `.dicom`, or no extension (many releases have bare SOP instance UIDs).
fn candidate(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    match name.rsplit_once('.') {
        None => true,
        Some((_, ext)) => {
            let ext = ext.to_ascii_lowercase();
            // A bare UID has dots and digit-only "extensions".
            ext == "dcm" || ext == "dicom" || ext.chars().all(|c| c.is_ascii_digit())
        }
    }
}

/// How a PatientAge is written: `nnnY` (an Age String in years), `nnnM`/`nnnW`/`nnnD`, a plain number, `000Y`,
/// absent, or other.
fn age_format(age: Option<&str>) -> String {
    let Some(a) = age else {
        return "(absent)".into();
    };
    let b = a.as_bytes();
    if b.len() == 4 && b[..3].iter().all(u8::is_ascii_digit) && b"YMWD".contains(&b[3]) {
        if &b[..3] == b"000" {
            return format!("000{}", char::from(b[3]));
        }
        return format!("nnn{}", char::from(b[3]));
    }
    if a.parse::<f64>().is_ok() {
        return "a plain number".into();
    }
    format!("other: `{a}`")
}

fn shown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "(absent)".into())
}

fn shown_int(v: Option<i64>) -> String {
    v.map_or_else(|| "(absent)".into(), |n| n.to_string())
}

impl Survey {
    fn count(&mut self, field: &str, value: String) {
        *self
            .fields
            .entry(field.into())
            .or_default()
            .entry(value)
            .or_default() += 1;
    }

    fn add(&mut self, h: &DicomHeader) {
        self.dicom += 1;
        let decodable = if h.decodable {
            ""
        } else {
            ", NOT decodable by this build"
        };
        self.count(
            "transfer syntax",
            format!(
                "{} ({}){decodable}",
                h.transfer_syntax, h.transfer_syntax_name
            ),
        );
        self.count("photometric interpretation", shown(&h.photometric));
        self.count("samples per pixel", shown_int(h.samples_per_pixel));
        self.count(
            "bits allocated / stored, pixel representation",
            format!(
                "{} / {}, {}",
                shown_int(h.bits_allocated),
                shown_int(h.bits_stored),
                match h.pixel_representation {
                    Some(1) => "signed",
                    Some(0) | None => "unsigned",
                    Some(_) => "other",
                }
            ),
        );
        self.count(
            "rescale slope / intercept",
            match (&h.rescale_slope, &h.rescale_intercept) {
                (None, None) => "(absent)".into(),
                (s, i) => format!("{} / {}", shown(s), shown(i)),
            },
        );
        self.count(
            "windows (centre/width pairs)",
            if h.window_centers.len() == h.window_widths.len() {
                h.window_centers.len().to_string()
            } else {
                format!(
                    "{} centres, {} widths",
                    h.window_centers.len(),
                    h.window_widths.len()
                )
            },
        );
        self.count("VOI LUT function", shown(&h.voi_function));
        self.count("VOI LUT sequence items", h.voi_lut_items.to_string());
        self.count("modality LUT sequence", h.modality_lut.to_string());
        self.count("presentation LUT shape", shown(&h.presentation_lut_shape));
        self.count("frames", shown_int(h.frames.or(Some(1))));
        self.count("modality", shown(&h.modality));
        self.count("view position", shown(&h.view_position));
        self.count("patient age format", age_format(h.patient_age.as_deref()));
        self.count("patient sex", shown(&h.patient_sex));
    }

    fn unreadable(&mut self, key: &str, reason: String) {
        self.unreadable_count += 1;
        if self.unreadable.len() < KEPT {
            self.unreadable.push(Unreadable {
                key: key.into(),
                reason,
            });
        }
    }

    /// The readable table.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} files listed, {} skipped by extension, {} DICOM headers read, {} unreadable\n",
            self.location, self.listed, self.skipped, self.dicom, self.unreadable_count
        );
        for (field, values) in &self.fields {
            s.push_str(&format!("  {field}:\n"));
            for (value, n) in values {
                s.push_str(&format!("    {value}: {n}\n"));
            }
        }
        for u in self.unreadable.iter().take(10) {
            s.push_str(&format!("  unreadable {}: {}\n", u.key, u.reason));
        }
        s
    }
}

/// One candidate's header: from its first bytes, or the whole object when the header runs past them.
fn header(store: &Storage, key: &str) -> Result<DicomHeader, String> {
    let prefix = store.get_prefix(key, PREFIX).map_err(|e| e.to_string())?;
    match read_header(&prefix) {
        Ok(h) => Ok(h),
        Err(DicomProblem::Unreadable(_)) if prefix.len() as u64 == PREFIX => {
            let whole = store.get(key).map_err(|e| e.to_string())?;
            read_header(&whole).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Surveys every DICOM candidate under `location` (a folder, `file://`, `s3://` or `memory://` URL).
pub fn survey(location: &str, opts: &SurveyOptions) -> Result<Survey, StorageError> {
    let store = Storage::open_existing(location)?;
    let keys = store.list("")?;
    let mut out = Survey {
        location: store.url().to_string(),
        listed: keys.len() as u64,
        ..Survey::default()
    };
    let mut candidates: Vec<String> = keys.into_iter().filter(|k| candidate(k)).collect();
    out.skipped = out.listed - candidates.len() as u64;
    if let Some(limit) = opts.limit {
        candidates.truncate(limit);
    }
    let headers = crate::parallel_map(&candidates, opts.threads, |k| header(&store, k));
    for (key, h) in candidates.iter().zip(headers) {
        match h {
            Ok(h) => out.add(&h),
            Err(reason) => out.unreadable(key, reason),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_by_extension() {
        assert!(candidate("a/b/image-1.dcm"));
        assert!(candidate("train/x.dicom"));
        assert!(candidate("files/1.2.840.113619.2.55"));
        assert!(candidate("noext"));
        assert!(!candidate("a/b.png"));
        assert!(!candidate("annotations/labels.csv"));
    }

    #[test]
    fn age_formats() {
        assert_eq!(age_format(Some("045Y")), "nnnY");
        assert_eq!(age_format(Some("000Y")), "000Y");
        assert_eq!(age_format(Some("006M")), "nnnM");
        assert_eq!(age_format(Some("45")), "a plain number");
        assert_eq!(age_format(None), "(absent)");
        assert_eq!(age_format(Some("45 years")), "other: `45 years`");
    }
}
