//! Writing `<split>/latents` into a finished store (the encode job's storage side).
//!
//! ```text
//! <split>/latents/c/<shard>/0/0/0     float16 [S, C, H, W] per shard, inner chunks [1, C, H, W]: one per encoded shard
//! .encode/journal/<split>/<shard>.json   its commit record: the object's checksum and the shard's channel moments
//! <split>/latents/zarr.json          written once every shard is committed, with the training split's
//!                                    channel_mean / channel_std
//! manifest.json                      rewritten last, with a `latents` section and the new objects
//! ```
//! Any number of writers may encode disjoint shards at once; a journal record is a shard's commit point, so a
//! killed writer loses at most the shard it was writing. Until the manifest names the encoder, readers treat the
//! latents as absent or unfinished and say so.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zarrs::array::codec::{ShardingCodecOptions, SubchunkWriteOrder};
use zarrs::array::{Array, ArrayBuilder, CodecSpecificOptions, IntoArrayBytes, data_type};
use zarrs::storage::store::MemoryStore;

use crate::error::ShardError;
use crate::layout::StoreLayout;
pub use crate::manifest::{EncoderId, LatentsEntry, latents_metadata_key};
use crate::manifest::{MANIFEST_KEY, Manifest, ObjectEntry};
use crate::split::Split;
use crate::store::Storage;

pub const JOURNAL_PREFIX: &str = ".encode/journal";

/// Per-channel count, mean and sum of squared deviations of a set of latents (Chan et al.'s parallel form:
/// shards merge in any order without the cancellation of a sum of squares).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelMoments {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl ChannelMoments {
    pub fn empty(channels: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    /// The moments of `values` laid out `[rows, channels, plane]`.
    pub fn of(values: &[half::f16], channels: usize, plane: usize) -> Self {
        let mut all = Self::empty(channels);
        if channels == 0 || plane == 0 {
            return all;
        }
        let rows = values.len() / (channels * plane);
        for c in 0..channels {
            let channel = (0..rows).flat_map(|r| {
                let start = (r * channels + c) * plane;
                values[start..start + plane].iter().map(|v| f64::from(*v))
            });
            let n = (rows * plane) as f64;
            let sum: f64 = channel.clone().sum();
            let mean = sum / n.max(1.0);
            all.mean[c] = mean;
            all.m2[c] = channel.map(|v| (v - mean) * (v - mean)).sum();
        }
        all.count = (rows * plane) as u64;
        all
    }

    pub fn merge(&mut self, other: &ChannelMoments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for c in 0..self.mean.len().min(other.mean.len()) {
            let delta = other.mean[c] - self.mean[c];
            self.mean[c] += delta * nb / n;
            self.m2[c] += other.m2[c] + delta * delta * na * nb / n;
        }
        self.count += other.count;
    }

    /// Each channel's mean and (population) standard deviation.
    pub fn mean_std(&self) -> (Vec<f32>, Vec<f32>) {
        let n = self.count.max(1) as f64;
        (
            self.mean.iter().map(|&m| m as f32).collect(),
            self.m2.iter().map(|&m2| (m2 / n).sqrt() as f32).collect(),
        )
    }
}

/// One committed shard of latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodeRecord {
    pub split: Split,
    pub shard: u64,
    pub rows: u64,
    pub encoder: String,
    pub object: ObjectEntry,
    pub moments: ChannelMoments,
}

impl EncodeRecord {
    pub fn key(split: Split, shard: u64) -> String {
        format!("{JOURNAL_PREFIX}/{}/{shard:08}.json", split.name())
    }
}

/// Where a store's latents stand for one encoder.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodeState {
    /// The manifest names this encoder: nothing to do.
    Finished,
    /// Shards still to encode (possibly all of them).
    Pending,
}

/// The writer of one store's latents, for one encoder and latent shape.
pub struct LatentWriter {
    storage: Storage,
    manifest: Manifest,
    encoder: EncoderId,
    sample_shape: [u64; 3],
}

impl LatentWriter {
    /// Opens a finished store (it must have its manifest) for latents of `sample_shape` `[C, H, W]`.
    pub fn open(
        storage: Storage,
        encoder: EncoderId,
        sample_shape: [u64; 3],
    ) -> Result<Self, ShardError> {
        let manifest = Manifest::load(&storage)?;
        Ok(Self {
            storage,
            manifest,
            encoder,
            sample_shape,
        })
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.manifest.settings.layout
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Every shard of the store, train then val then test: the work list that ranks divide.
    pub fn shards(&self) -> Vec<(Split, u64)> {
        Split::ALL
            .iter()
            .flat_map(|&split| (0..self.manifest.shards(split)).map(move |k| (split, k)))
            .collect()
    }

    /// Rows in shard `index` of `split`.
    pub fn shard_rows(&self, split: Split, index: u64) -> u64 {
        let s = u64::from(self.layout().shard_images);
        self.manifest.images(split).saturating_sub(index * s).min(s)
    }

    /// Where the store stands, after dealing with latents of another encoder: refused unless `overwrite`, in
    /// which case they are retracted (the manifest first, so that no reader ever sees a mixture) and removed.
    /// Run by one writer before any writes; the others call [`LatentWriter::state`].
    pub fn prepare(&mut self, overwrite: bool) -> Result<EncodeState, ShardError> {
        let url = self.storage.url().to_string();
        let conflict = |existing: String| ShardError::LatentsConflict {
            url: url.clone(),
            existing,
            requested: self.encoder.description.clone(),
        };
        if let Some(l) = &self.manifest.latents {
            if l.encoder.fingerprint == self.encoder.fingerprint {
                return Ok(EncodeState::Finished);
            }
            if !overwrite {
                return Err(conflict(format!(
                    "latents made by {}",
                    l.encoder.description
                )));
            }
            let mut retracted = self.manifest.clone();
            retracted.latents = None;
            retracted.objects.retain(|o| !is_latents_key(&o.key));
            put_manifest(&self.storage, &retracted)?;
            self.manifest = retracted;
        }
        for split in Split::ALL {
            self.storage.delete(&latents_metadata_key(split))?;
        }
        let stale: Vec<EncodeRecord> = self
            .records()?
            .into_iter()
            .filter(|r| r.encoder != self.encoder.fingerprint)
            .collect();
        if let Some(r) = stale.first() {
            if !overwrite {
                return Err(conflict(format!(
                    "an unfinished encode by another encoder (fingerprint {})",
                    r.encoder
                )));
            }
            for r in &stale {
                self.storage.delete(&EncodeRecord::key(r.split, r.shard))?;
            }
        }
        Ok(EncodeState::Pending)
    }

    /// Where the store stands (re-reading the manifest): for the writers that did not [`LatentWriter::prepare`].
    pub fn state(&mut self) -> Result<EncodeState, ShardError> {
        self.manifest = Manifest::load(&self.storage)?;
        Ok(match &self.manifest.latents {
            Some(l) if l.encoder.fingerprint == self.encoder.fingerprint => EncodeState::Finished,
            _ => EncodeState::Pending,
        })
    }

    /// Every journal record, whoever wrote it.
    fn records(&self) -> Result<Vec<EncodeRecord>, ShardError> {
        let keys = self.storage.list(JOURNAL_PREFIX)?;
        keys.iter()
            .zip(self.storage.get_many(&keys))
            .map(|(key, got)| {
                serde_json::from_slice(&got?).map_err(|e| ShardError::InvalidStore {
                    url: self.storage.describe(key),
                    problem: format!(
                        "has an unreadable encode journal record ({e}); delete it and run the encode job again"
                    ),
                })
            })
            .collect()
    }

    /// The shards this encoder has committed.
    pub fn committed(&self) -> Result<BTreeMap<(Split, u64), EncodeRecord>, ShardError> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|r| r.encoder == self.encoder.fingerprint)
            .map(|r| ((r.split, r.shard), r))
            .collect())
    }

    fn array(&self, split: Split) -> Result<Array<MemoryStore>, ShardError> {
        latents_array(
            self.layout(),
            split,
            self.manifest.images(split),
            self.sample_shape,
            None,
        )
    }

    /// Writes shard `index` of `split` (`values` `[rows, C, H, W]`) and returns the record that commits it
    /// ([`LatentWriter::commit`]); until then the shard counts as not written.
    pub fn write_object(
        &self,
        split: Split,
        index: u64,
        values: &[half::f16],
    ) -> Result<EncodeRecord, ShardError> {
        let rows = self.shard_rows(split, index);
        let per: u64 = self.sample_shape.iter().product();
        if rows == 0 || values.len() as u64 != rows * per {
            return Err(ShardError::Internal(format!(
                "{split} shard {index}: {} latent values for {rows} rows of {per}",
                values.len()
            )));
        }
        let s = u64::from(self.layout().shard_images);
        let mut padded = values.to_vec();
        padded.resize((s * per) as usize, half::f16::ZERO);
        let array = self.array(split)?;
        let data = padded
            .into_array_bytes(array.data_type())
            .map_err(|e| ShardError::Encode {
                what: format!("{split}/latents shard {index}"),
                reason: e.to_string(),
            })?;
        let (key, bytes) = self.layout().encode_chunk(&array, index, data)?;
        let key = key.trim_start_matches('/').to_string();
        let object = ObjectEntry::of(&key, &bytes);
        self.storage.put(&key, Bytes::from(bytes))?;
        let plane = (self.sample_shape[1] * self.sample_shape[2]) as usize;
        let record = EncodeRecord {
            split,
            shard: index,
            rows,
            encoder: self.encoder.fingerprint.clone(),
            object,
            moments: ChannelMoments::of(values, self.sample_shape[0] as usize, plane),
        };
        Ok(record)
    }

    /// The journal record, which commits the shard written by [`LatentWriter::write_object`].
    pub fn commit(&self, record: &EncodeRecord) -> Result<(), ShardError> {
        let json = serde_json::to_vec(record).expect("journal records serialise");
        self.storage.put(
            &EncodeRecord::key(record.split, record.shard),
            Bytes::from(json),
        )?;
        Ok(())
    }

    /// Once every shard is committed: each split's `zarr.json` with the training split's channel statistics, then
    /// the manifest. Names the missing shards otherwise.
    pub fn finalise(&mut self) -> Result<LatentsEntry, ShardError> {
        let committed = self.committed()?;
        let missing: Vec<String> = self
            .shards()
            .into_iter()
            .filter(|k| !committed.contains_key(k))
            .map(|(split, k)| format!("{split} {k}"))
            .collect();
        if !missing.is_empty() {
            return Err(ShardError::InvalidStore {
                url: self.storage.url().to_string(),
                problem: format!(
                    "cannot finish its latents: {} shard(s) are not encoded yet (first: {}); run the encode job again",
                    missing.len(),
                    missing[..missing.len().min(5)].join(", ")
                ),
            });
        }
        let channels = self.sample_shape[0] as usize;
        let mut train = ChannelMoments::empty(channels);
        for r in committed.values().filter(|r| r.split == Split::Train) {
            train.merge(&r.moments);
        }
        let (mean, std) = train.mean_std();
        if train.count == 0
            || mean.iter().chain(&std).any(|v| !v.is_finite())
            || std.iter().any(|&s| s <= 0.0)
        {
            return Err(ShardError::InvalidStore {
                url: self.storage.url().to_string(),
                problem: format!(
                    "has unusable training latents: {} values, channel means {mean:?}, stds {std:?} (the encoder \
                     produced non-finite or constant latents; check its weights and precision)",
                    train.count
                ),
            });
        }
        let mut objects: Vec<ObjectEntry> = self
            .manifest
            .objects
            .iter()
            .filter(|o| !is_latents_key(&o.key))
            .cloned()
            .collect();
        objects.extend(committed.values().map(|r| r.object.clone()));
        for split in Split::ALL {
            let array = latents_array(
                self.layout(),
                split,
                self.manifest.images(split),
                self.sample_shape,
                Some((&mean, &std)),
            )?;
            let json = serde_json::to_vec_pretty(array.metadata()).map_err(|e| {
                ShardError::Internal(format!("latents metadata does not serialise: {e}"))
            })?;
            let key = latents_metadata_key(split);
            objects.push(ObjectEntry::of(&key, &json));
            self.storage.put(&key, Bytes::from(json))?;
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let entry = LatentsEntry {
            encoder: self.encoder.clone(),
            sample_shape: self.sample_shape,
            data_type: "float16".into(),
            channel_mean: mean,
            channel_std: std,
        };
        let mut manifest = self.manifest.clone();
        manifest.objects = objects;
        manifest.latents = Some(entry.clone());
        put_manifest(&self.storage, &manifest)?;
        self.manifest = manifest;
        Ok(entry)
    }
}

fn put_manifest(storage: &Storage, manifest: &Manifest) -> Result<(), ShardError> {
    let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    storage.put(MANIFEST_KEY, Bytes::from(json))?;
    Ok(())
}

fn is_latents_key(key: &str) -> bool {
    Split::ALL
        .iter()
        .any(|s| key.starts_with(&format!("{}/latents/", s.name())))
}

/// The `<split>/latents` array of a store with `layout`: float16 `[rows, C, H, W]`, one shard per `shard_images`
/// rows of inner chunks `[1, C, H, W]` (what the loader reads), with the channel statistics as attributes.
pub fn latents_array(
    layout: &StoreLayout,
    split: Split,
    rows: u64,
    [c, h, w]: [u64; 3],
    stats: Option<(&[f32], &[f32])>,
) -> Result<Array<MemoryStore>, ShardError> {
    let s = u64::from(layout.shard_images);
    let mut b = ArrayBuilder::new(
        vec![rows, c, h, w],
        vec![s, c, h, w],
        data_type::float16(),
        half::f16::ZERO,
    );
    b.subchunk_shape(vec![1, c, h, w])
        .dimension_names(Some(["image", "channel", "y", "x"]))
        .bytes_to_bytes_codecs(vec![layout.compressor(2)?]);
    let in_order = ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C);
    b.codec_specific_options(CodecSpecificOptions::default().with_option(in_order));
    if let Some((mean, std)) = stats {
        let mut attributes = serde_json::Map::new();
        attributes.insert("channel_mean".into(), serde_json::json!(mean));
        attributes.insert("channel_std".into(), serde_json::json!(std));
        b.attributes(attributes);
    }
    let path = format!("/{}/latents", split.name());
    b.build(Arc::new(MemoryStore::new()), &path)
        .map_err(|e| ShardError::Encode {
            what: path,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_moments_equal_the_moments_of_the_whole() {
        let values: Vec<half::f16> = (0..2 * 3 * 4)
            .map(|i| half::f16::from_f32((i as f32 * 0.37).sin() * 3.0 + i as f32 * 0.1))
            .collect();
        let whole = ChannelMoments::of(&values, 3, 4);
        let mut parts = ChannelMoments::of(&values[..12], 3, 4);
        parts.merge(&ChannelMoments::of(&values[12..], 3, 4));
        assert_eq!(whole.count, parts.count);
        for c in 0..3 {
            assert!((whole.mean[c] - parts.mean[c]).abs() < 1e-12);
            assert!((whole.m2[c] - parts.m2[c]).abs() < 1e-9);
            // By hand: channel c of both rows.
            let xs: Vec<f64> = [0, 1]
                .iter()
                .flat_map(|r| (0..4).map(move |p| (r * 3 + c) * 4 + p))
                .map(|i| f64::from(values[i]))
                .collect();
            let mean = xs.iter().sum::<f64>() / 8.0;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 8.0;
            let (m, s) = whole.mean_std();
            assert!((f64::from(m[c]) - mean).abs() < 1e-6);
            assert!((f64::from(s[c]) - var.sqrt()).abs() < 1e-6);
        }
    }
}
