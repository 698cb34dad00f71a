//! Reading a complete store shard by shard: one object per array per shard, fetched whole and decoded here.
//!
//! Refuses stores without `manifest.json`; the layout comes from the manifest, so a reader never guesses it.

use std::borrow::Cow;
use std::sync::Arc;

use zarrs::array::{Array, ArrayToBytesCodecTraits, CodecOptions, ElementOwned, FromArrayBytes};
use zarrs::storage::store::MemoryStore;

use crate::error::ShardError;
use crate::layout::{ArrayKind, StoreLayout};
use crate::manifest::Manifest;
use crate::order::OrderConfig;
use crate::schema::NUM_LABELS;
use crate::split::Split;
use crate::store::Storage;

/// How a reader gets an object's bytes (directly, or through a cache with retries).
pub type Fetch<'a> = &'a (dyn Fn(&str) -> Result<bytes::Bytes, ShardError> + Sync);

/// The rows of one shard, trimmed to the rows that exist.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub rows: usize,
    /// `[rows, T, T]` row-major.
    pub images: Vec<u16>,
    /// `[rows, 18]`.
    pub labels: Vec<u8>,
    pub age: Vec<f32>,
    pub image_ids: Vec<String>,
    pub patient_ids: Vec<String>,
    /// `[rows, C, H, W]` as f32, standardised per channel with the array's statistics; empty unless
    /// the shard was read for a latent model.
    pub latents: Vec<f32>,
}

/// Element type of a latents array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LatentType {
    F16,
    BF16,
    F32,
}

/// The optional `<split>/latents` array (precomputed VAE latents), written after ingest by an encoder job.
///
/// Contract, checked when it is opened: 4-D `[N, C, H, W]` float16, bfloat16 or float32 with N equal to the
/// split's rows (or padded up to whole shards), one chunk (or shard) per `shard_images` rows spanning all of C,
/// H and W, so a loader reads one object per shard as for images. Attributes `channel_mean` and `channel_std`
/// (C finite numbers each, stds positive) standardise every channel on read.
pub struct LatentArray {
    array: Array<MemoryStore>,
    element: LatentType,
    /// `[C, H, W]`.
    pub sample_shape: [usize; 3],
    /// Per-channel (mean, std) applied on read.
    pub channel_mean: Vec<f32>,
    pub channel_std: Vec<f32>,
}

pub struct StoreReader {
    storage: Storage,
    manifest: Manifest,
}

impl StoreReader {
    pub fn open(storage: Storage) -> Result<Self, ShardError> {
        let manifest = Manifest::load(&storage)?;
        manifest
            .settings
            .layout
            .validate()
            .map_err(|problem| ShardError::InvalidStore {
                url: storage.url().to_string(),
                problem: format!("has an unusable layout in manifest.json: {problem}"),
            })?;
        Ok(Self { storage, manifest })
    }

    /// The store's URL, for messages.
    pub fn describe(&self) -> &str {
        self.storage.url()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.manifest.settings.layout
    }

    /// Images in `split`.
    pub fn len(&self, split: Split) -> u64 {
        self.manifest.images(split)
    }

    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    /// The training order over `split` with this store's sizes and the run's settings.
    pub fn order_config(
        &self,
        split: Split,
        seed: u64,
        window_shards: u64,
        global_batch: u64,
    ) -> OrderConfig {
        OrderConfig {
            seed,
            samples: self.len(split),
            shard_size: u64::from(self.layout().shard_images),
            window_shards,
            global_batch,
        }
    }

    pub fn shards(&self, split: Split) -> u64 {
        self.manifest.shards(split)
    }

    fn read_array<T: ElementOwned>(
        &self,
        array: &Array<MemoryStore>,
        index: u64,
        fetch: Fetch<'_>,
    ) -> Result<Vec<T>, ShardError> {
        let mut indices = vec![0u64; array.dimensionality()];
        indices[0] = index;
        let key = array.chunk_key(&indices).to_string();
        let key = key.trim_start_matches('/');
        let bytes = fetch(key)?;
        let corrupt = |e: &dyn std::fmt::Display| ShardError::InvalidStore {
            url: self.storage.describe(key),
            problem: format!("cannot be decoded: {e}"),
        };
        let shape = array.chunk_shape(&indices).map_err(|e| corrupt(&e))?;
        let decoded = array
            .codecs()
            .decode(
                Cow::Borrowed(&bytes[..]),
                &shape,
                array.data_type(),
                array.fill_value(),
                &CodecOptions::default(),
            )
            .map_err(|e| corrupt(&e))?;
        let dims: Vec<u64> = shape.iter().map(|d| d.get()).collect();
        Vec::<T>::from_array_bytes(decoded.into_owned(), &dims, array.data_type())
            .map_err(|e| corrupt(&e))
    }

    /// Shard `index` of `split` without its images or latents: rows, labels, age and ids (small objects; the
    /// profiles of matched sampling).
    pub fn read_metadata_of(&self, split: Split, index: u64) -> Result<Shard, ShardError> {
        self.read_metadata(split, index, &|k| Ok(self.storage.get(k)?))
    }

    /// The `image_id`s of shard `index` of `split` (one small object; for audits).
    pub fn read_image_ids(&self, split: Split, index: u64) -> Result<Vec<String>, ShardError> {
        let rows = self.rows_in_shard(split, index)?;
        let array = self.layout().array(
            split,
            ArrayKind::ImageId,
            self.shards(split) * u64::from(self.layout().shard_images),
        )?;
        let mut ids: Vec<String> =
            self.read_array(&array, index, &|k| Ok(self.storage.get(k)?))?;
        ids.truncate(rows);
        Ok(ids)
    }

    fn rows_in_shard(&self, split: Split, index: u64) -> Result<usize, ShardError> {
        let s = u64::from(self.layout().shard_images);
        let total = self.len(split);
        if index.checked_mul(s).is_none_or(|first| first >= total) {
            return Err(crate::store::StorageError::NotFound {
                url: self.storage.describe(&format!("{split} shard {index}")),
            }
            .into());
        }
        Ok((total - index * s).min(s) as usize)
    }

    /// Reads shard `index` of `split` (every array), trimmed to its real rows.
    pub fn read_shard(&self, split: Split, index: u64) -> Result<Shard, ShardError> {
        self.read_shard_with(split, index, &|k| Ok(self.storage.get(k)?))
    }

    /// [`StoreReader::read_shard`] with objects fetched by `fetch`.
    pub fn read_shard_with(
        &self,
        split: Split,
        index: u64,
        fetch: Fetch<'_>,
    ) -> Result<Shard, ShardError> {
        let mut shard = self.read_metadata(split, index, fetch)?;
        let capacity = self.shards(split) * u64::from(self.layout().shard_images);
        let images = self.layout().array(split, ArrayKind::Images, capacity)?;
        let pixels = (self.layout().image_size as usize).pow(2);
        shard.images = self.read_array(&images, index, fetch)?;
        shard.images.truncate(shard.rows * pixels);
        Ok(shard)
    }

    /// Shard `index` of `split` without its model inputs: labels, age and ids, trimmed to its real rows.
    fn read_metadata(
        &self,
        split: Split,
        index: u64,
        fetch: Fetch<'_>,
    ) -> Result<Shard, ShardError> {
        let rows = self.rows_in_shard(split, index)?;
        let capacity = self.shards(split) * u64::from(self.layout().shard_images);
        let array = |kind| self.layout().array(split, kind, capacity);
        let mut labels: Vec<u8> = self.read_array(&array(ArrayKind::Labels)?, index, fetch)?;
        let mut age: Vec<f32> = self.read_array(&array(ArrayKind::Age)?, index, fetch)?;
        let mut image_ids: Vec<String> =
            self.read_array(&array(ArrayKind::ImageId)?, index, fetch)?;
        let mut patient_ids: Vec<String> =
            self.read_array(&array(ArrayKind::PatientId)?, index, fetch)?;
        labels.truncate(rows * NUM_LABELS);
        age.truncate(rows);
        image_ids.truncate(rows);
        patient_ids.truncate(rows);
        Ok(Shard {
            rows,
            images: Vec::new(),
            labels,
            age,
            image_ids,
            patient_ids,
            latents: Vec::new(),
        })
    }

    /// The latents array of `split`, if the store has one; an error if it breaks the contract of [`LatentArray`].
    pub fn latents(&self, split: Split) -> Result<Option<LatentArray>, ShardError> {
        let path = format!("{}/latents", split.name());
        let key = format!("{path}/zarr.json");
        let bad = |problem: String| ShardError::InvalidStore {
            url: self.storage.describe(&key),
            problem,
        };
        let Some(json) = self.storage.get_opt(&key)? else {
            // Shards committed without the array: an encode job stopped part-way.
            let journal = format!("{}/{}/", crate::latents::JOURNAL_PREFIX, split.name());
            let done = self.storage.list(&journal)?.len();
            if done > 0 {
                return Err(bad(format!(
                    "is missing: the encode job stopped after {done} of {} {split} shards; run it again to resume",
                    self.shards(split)
                )));
            }
            return Ok(None);
        };
        if self.manifest.latents.is_none() {
            return Err(bad(
                "was written by an encode job that did not finish (the manifest does not list the latents); \
                 run it again to finish"
                    .into(),
            ));
        }
        let raw: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| bad(format!("is not JSON: {e}")))?;
        let metadata: zarrs::array::ArrayMetadata = serde_json::from_value(raw.clone())
            .map_err(|e| bad(format!("is not Zarr array metadata: {e}")))?;
        let element = match raw.get("data_type").and_then(|d| d.as_str()) {
            Some("float16") => LatentType::F16,
            Some("bfloat16") => LatentType::BF16,
            Some("float32") => LatentType::F32,
            other => {
                return Err(bad(format!(
                    "has data_type {other:?}; latents must be float16, bfloat16 or float32"
                )));
            }
        };
        let array =
            Array::new_with_metadata(Arc::new(MemoryStore::new()), &format!("/{path}"), metadata)
                .map_err(|e| bad(format!("cannot be opened: {e}")))?;
        let shape = array.shape().to_vec();
        let s = u64::from(self.layout().shard_images);
        let rows = self.len(split);
        if shape.len() != 4 {
            return Err(bad(format!(
                "has shape {shape:?}; latents must be [N, C, H, W]"
            )));
        }
        if shape[0] < rows || shape[0] > self.shards(split) * s {
            return Err(bad(format!(
                "has {} rows; the split has {rows} images (padding up to whole shards of {s} is allowed)",
                shape[0]
            )));
        }
        let chunk: Vec<u64> = array
            .chunk_shape(&[0, 0, 0, 0])
            .map_err(|e| bad(e.to_string()))?
            .iter()
            .map(|d| d.get())
            .collect();
        if chunk != [s, shape[1], shape[2], shape[3]] {
            return Err(bad(format!(
                "is chunked {chunk:?}; the loader needs one chunk (or shard) per {s} rows spanning C, H and W: \
                 [{s}, {}, {}, {}]",
                shape[1], shape[2], shape[3]
            )));
        }
        let channels = shape[1] as usize;
        let stat = |name: &str| -> Result<Option<Vec<f32>>, ShardError> {
            let Some(v) = array.attributes().get(name) else {
                return Ok(None);
            };
            let values: Vec<f32> = serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("attribute {name} is not a list of numbers: {e}")))?;
            if values.len() != channels || values.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!(
                    "attribute {name} must hold {channels} finite numbers (got {})",
                    values.len()
                )));
            }
            Ok(Some(values))
        };
        let (channel_mean, channel_std) = match (stat("channel_mean")?, stat("channel_std")?) {
            (Some(mean), Some(std)) => {
                if std.iter().any(|&x| x <= 0.0) {
                    return Err(bad("attribute channel_std must be positive".into()));
                }
                (mean, std)
            }
            (None, None) => {
                return Err(bad(
                    "has no channel_mean and channel_std attributes: a latent model learns standardised latents \
                     (`radit encode` writes them)"
                        .into(),
                ));
            }
            _ => {
                return Err(bad(
                    "has only one of channel_mean and channel_std; give both or neither".into(),
                ));
            }
        };
        Ok(Some(LatentArray {
            array,
            element,
            sample_shape: [channels, shape[2] as usize, shape[3] as usize],
            channel_mean,
            channel_std,
        }))
    }

    /// [`StoreReader::read_latent_shard_with`] from the store itself.
    pub fn read_latent_shard(
        &self,
        split: Split,
        index: u64,
        latents: &LatentArray,
    ) -> Result<Shard, ShardError> {
        self.read_latent_shard_with(split, index, latents, &|k| Ok(self.storage.get(k)?))
    }

    /// Reads shard `index` of `split` for a latent model: the latents instead of the images, plus the metadata.
    pub fn read_latent_shard_with(
        &self,
        split: Split,
        index: u64,
        latents: &LatentArray,
        fetch: Fetch<'_>,
    ) -> Result<Shard, ShardError> {
        let mut shard = self.read_metadata(split, index, fetch)?;
        let rows = shard.rows;
        let per: usize = latents.sample_shape.iter().product();
        let mut values: Vec<f32> = match latents.element {
            LatentType::F32 => self.read_array(&latents.array, index, fetch)?,
            LatentType::F16 => self
                .read_array::<half::f16>(&latents.array, index, fetch)?
                .into_iter()
                .map(f32::from)
                .collect(),
            LatentType::BF16 => self
                .read_array::<half::bf16>(&latents.array, index, fetch)?
                .into_iter()
                .map(f32::from)
                .collect(),
        };
        // The last shard may be shorter than a chunk when the array was not padded.
        values.truncate(rows * per);
        if values.len() != rows * per {
            return Err(ShardError::InvalidStore {
                url: self
                    .storage
                    .describe(&format!("{split}/latents shard {index}")),
                problem: format!(
                    "holds {} values; {rows} rows need {}",
                    values.len(),
                    rows * per
                ),
            });
        }
        let plane = latents.sample_shape[1] * latents.sample_shape[2];
        for (i, v) in values.iter_mut().enumerate() {
            let c = (i / plane) % latents.sample_shape[0];
            *v = (*v - latents.channel_mean[c]) / latents.channel_std[c];
        }
        shard.latents = values;
        Ok(shard)
    }

    /// Reads a whole split (for small stores, tests and tools).
    pub fn read_split(&self, split: Split) -> Result<Shard, ShardError> {
        let mut all = Shard {
            rows: 0,
            images: vec![],
            labels: vec![],
            age: vec![],
            image_ids: vec![],
            patient_ids: vec![],
            latents: vec![],
        };
        for k in 0..self.shards(split) {
            let s = self.read_shard(split, k)?;
            all.rows += s.rows;
            all.images.extend(s.images);
            all.labels.extend(s.labels);
            all.age.extend(s.age);
            all.image_ids.extend(s.image_ids);
            all.patient_ids.extend(s.patient_ids);
        }
        Ok(all)
    }
}
