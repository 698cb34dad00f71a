//! `manifest.json`: written last, it makes a store complete. It records counts, every object with its checksum,
//! what was rejected and why, and the settings. [`verify`] re-checks a store against it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ShardError;
use crate::layout::{ArrayKind, StoreLayout, array_path};
use crate::schema::Vocabulary;
use crate::split::Split;
use crate::store::Storage;
use crate::table::{Rejection, TableConfig, Warnings};

pub const MANIFEST_KEY: &str = "manifest.json";
pub const FORMAT: &str = "radit-cxr-zarr";

/// Everything that decides the bytes of a store; its hash is the ingest fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct IngestSettings {
    pub table: TableConfig,
    pub layout: StoreLayout,
    /// The DICOM pixel pipeline's settings; left out at their defaults, so stores made before DICOM keep their
    /// fingerprint (and resume).
    #[serde(default, skip_serializing_if = "radit_dicom::DicomOptions::is_default")]
    pub dicom: radit_dicom::DicomOptions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub table: String,
    pub table_sha256: String,
    pub images: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub images: u64,
    pub shards: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Data rows in the table; always `accepted + rejected`.
    pub table_rows: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Rejected while reading the table (malformed rows, duplicates, split conflicts...).
    pub rejected_in_table: u64,
    /// Rejected while reading images (missing, corrupt, colour...).
    pub rejected_images: u64,
    pub splits: BTreeMap<Split, SplitCounts>,
}

/// Accepted images that needed conversion, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageNoteCounts {
    pub eight_bit: u64,
    pub grey_stored_as_rgb: u64,
    pub resized: u64,
    /// DICOM files, and of them: MONOCHROME1 (inverted), windowed, through a VOI LUT, with a window that could not
    /// be used (stretched instead), with padding masked. Left out when zero: manifests of PNG-only stores read as
    /// before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom_monochrome1: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom_windowed: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom_voi_lut: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom_bad_window: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dicom_padding_masked: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ImageNoteCounts {
    pub fn add(&mut self, other: &ImageNoteCounts) {
        self.eight_bit += other.eight_bit;
        self.grey_stored_as_rgb += other.grey_stored_as_rgb;
        self.resized += other.resized;
        self.dicom += other.dicom;
        self.dicom_monochrome1 += other.dicom_monochrome1;
        self.dicom_windowed += other.dicom_windowed;
        self.dicom_voi_lut += other.dicom_voi_lut;
        self.dicom_bad_window += other.dicom_bad_window;
        self.dicom_padding_masked += other.dicom_padding_masked;
    }

    /// Counts one accepted image.
    pub fn count(&mut self, n: &crate::image::ImageNotes) {
        self.eight_bit += u64::from(n.was_8bit);
        self.grey_stored_as_rgb += u64::from(n.grey_stored_as_rgb);
        self.resized += u64::from(n.resized);
        if let Some(d) = &n.dicom {
            self.dicom += 1;
            self.dicom_monochrome1 += u64::from(d.monochrome1);
            self.dicom_windowed += u64::from(d.windowed);
            self.dicom_voi_lut += u64::from(d.voi_lut);
            self.dicom_bad_window += u64::from(d.bad_window);
            self.dicom_padding_masked += u64::from(d.padding_masked);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

impl ObjectEntry {
    pub fn of(key: &str, data: &[u8]) -> Self {
        Self {
            key: key.to_string(),
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub schema_version: u32,
    pub created_by: String,
    /// Hash of the table contents and the settings: a re-run with the same fingerprint resumes this store.
    pub fingerprint: String,
    pub source: Source,
    pub settings: IngestSettings,
    pub vocabulary: Vocabulary,
    pub counts: Counts,
    pub image_notes: ImageNoteCounts,
    pub warnings: Warnings,
    pub ignored_columns: Vec<String>,
    pub rejected: Vec<Rejection>,
    /// Every object of the store except this manifest (chunks and `zarr.json` files), sorted by key.
    pub objects: Vec<ObjectEntry>,
    /// The latents an encode job added (`<split>/latents`), written with them; absent before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<LatentsEntry>,
}

impl Manifest {
    pub fn load(storage: &Storage) -> Result<Manifest, ShardError> {
        let bytes = storage.get_opt(MANIFEST_KEY)?.ok_or_else(|| ShardError::InvalidStore {
            url: storage.url().to_string(),
            problem: "is incomplete: it has no manifest.json (the ingest did not finish); do not train on it".into(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ShardError::InvalidStore {
            url: storage.url().to_string(),
            problem: format!("has an unreadable manifest.json: {e}"),
        })
    }

    /// Images in `split`.
    pub fn images(&self, split: Split) -> u64 {
        self.counts.splits.get(&split).map_or(0, |s| s.images)
    }

    /// Shards of `split`: `shard_images` rows each, the last one possibly shorter.
    pub fn shards(&self, split: Split) -> u64 {
        self.images(split)
            .div_ceil(u64::from(self.settings.layout.shard_images))
    }

    /// A short human summary.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "{} rows: {} accepted, {} rejected ({} in the table, {} images)\n",
            c.table_rows, c.accepted, c.rejected, c.rejected_in_table, c.rejected_images
        );
        for (split, sc) in &c.splits {
            s.push_str(&format!(
                "  {split:<5} {:>9} images in {:>6} shards\n",
                sc.images, sc.shards
            ));
        }
        let stored: u64 = self.objects.iter().map(|o| o.bytes).sum();
        let raw = c.accepted * u64::from(self.settings.layout.image_size).pow(2) * 2;
        if raw > 0 {
            s.push_str(&format!(
                "  stored {:.1} MiB for {:.1} MiB of raw pixels (ratio {:.3})\n",
                stored as f64 / 1048576.0,
                raw as f64 / 1048576.0,
                stored as f64 / raw as f64
            ));
        }
        let n = &self.image_notes;
        s.push_str(&format!(
            "  converted: {} resized, {} from 8-bit, {} grey-as-RGB; {} values stored as missing\n",
            n.resized,
            n.eight_bit,
            n.grey_stored_as_rgb,
            self.warnings.total()
        ));
        if n.dicom > 0 {
            s.push_str(&format!(
                "  DICOM: {} files, {} MONOCHROME1 inverted, {} windowed, {} through a VOI LUT, {} with an unusable \
                 window (stretched instead), {} with padding masked\n",
                n.dicom,
                n.dicom_monochrome1,
                n.dicom_windowed,
                n.dicom_voi_lut,
                n.dicom_bad_window,
                n.dicom_padding_masked
            ));
        }
        s
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub objects_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Re-reads every object listed in the manifest and compares size and checksum; checks array shapes and counts.
pub fn verify(storage: &Storage) -> Result<VerifyReport, ShardError> {
    let manifest = Manifest::load(storage)?;
    let mut report = VerifyReport::default();
    if manifest.format != FORMAT {
        report.problems.push(format!(
            "manifest format is '{}', expected '{FORMAT}'",
            manifest.format
        ));
    }
    let c = &manifest.counts;
    if c.accepted.checked_add(c.rejected) != Some(c.table_rows) {
        report.problems.push(format!(
            "counts do not add up: {} accepted + {} rejected != {} table rows",
            c.accepted, c.rejected, c.table_rows
        ));
    }
    let split_total = c
        .splits
        .values()
        .fold(0u64, |t, s| t.saturating_add(s.images));
    if split_total != c.accepted {
        report.problems.push(format!(
            "splits hold {split_total} images but {} were accepted",
            c.accepted
        ));
    }
    // Check in batches of about 256 MiB so a million-image store is never held in memory at once.
    let mut start = 0;
    while start < manifest.objects.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < manifest.objects.len()
            && (end == start || bytes + manifest.objects[end].bytes <= 256 << 20)
        {
            bytes = bytes.saturating_add(manifest.objects[end].bytes);
            end += 1;
        }
        let batch = &manifest.objects[start..end];
        start = end;
        let keys: Vec<String> = batch.iter().map(|o| o.key.clone()).collect();
        for (entry, got) in batch.iter().zip(storage.get_many(&keys)) {
            match got {
                Err(crate::store::StorageError::NotFound { .. }) => {
                    report.problems.push(format!("{}: missing", entry.key))
                }
                Err(e) => report
                    .problems
                    .push(format!("{}: cannot read: {e}", entry.key)),
                Ok(data) => {
                    report.objects_checked += 1;
                    report.bytes_checked += data.len() as u64;
                    let actual = ObjectEntry::of(&entry.key, &data);
                    if actual.bytes != entry.bytes {
                        report.problems.push(format!(
                            "{}: {} bytes, manifest says {}",
                            entry.key, actual.bytes, entry.bytes
                        ));
                    } else if actual.sha256 != entry.sha256 {
                        report.problems.push(format!(
                            "{}: checksum mismatch (content changed or corrupt)",
                            entry.key
                        ));
                    }
                }
            }
        }
    }
    for split in Split::ALL {
        let expected = manifest.images(split);
        let latents = manifest
            .latents
            .as_ref()
            .map(|_| latents_metadata_key(split));
        let arrays = ArrayKind::ALL
            .iter()
            .map(|&kind| format!("{}/zarr.json", array_path(split, kind)))
            .chain(latents);
        for key in arrays {
            if let Some(doc) = storage.get_opt(&key)? {
                let shape0 = serde_json::from_slice::<serde_json::Value>(&doc)
                    .ok()
                    .and_then(|v| v.get("shape")?.get(0)?.as_u64());
                if shape0 != Some(expected) {
                    report.problems.push(format!(
                        "{key}: shape[0] is {shape0:?}, manifest counts {expected}"
                    ));
                }
            } else {
                report.problems.push(format!("{key}: missing"));
            }
        }
    }
    Ok(report)
}
/// What made a store's latents: the same fingerprint means the same values, so a job with it resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderId {
    /// sha256 over the weights, the architecture and the precision.
    pub fingerprint: String,
    /// For people: architecture, weights file, precision.
    pub description: String,
}

/// The manifest's account of a store's latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentsEntry {
    pub encoder: EncoderId,
    /// `[C, H, W]`.
    pub sample_shape: [u64; 3],
    pub data_type: String,
    /// Over the training split; every split's array carries them.
    pub channel_mean: Vec<f32>,
    pub channel_std: Vec<f32>,
}

/// Where split `split`'s latents array keeps its metadata.
pub fn latents_metadata_key(split: Split) -> String {
    format!("{}/latents/zarr.json", split.name())
}
