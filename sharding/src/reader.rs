//! Reading a complete store shard by shard: one object per array per shard, fetched whole and decoded here.
//!
//! Refuses stores without `manifest.json`; the layout comes from the manifest, so a reader never guesses it.

use std::borrow::Cow;

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

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.manifest.settings.layout
    }

    /// Images in `split`.
    pub fn len(&self, split: Split) -> u64 {
        self.manifest
            .counts
            .splits
            .get(&split)
            .map_or(0, |s| s.images)
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
        self.len(split)
            .div_ceil(u64::from(self.layout().shard_images))
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
                Cow::Owned(bytes.to_vec()),
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

    /// The `image_id`s of shard `index` of `split` (one small object; for audits).
    pub fn read_image_ids(&self, split: Split, index: u64) -> Result<Vec<String>, ShardError> {
        let rows = self.rows_in_shard(split, index)?;
        let array = self.layout().array(
            split,
            ArrayKind::ImageId,
            self.shards(split) * u64::from(self.layout().shard_images),
        )?;
        let mut ids: Vec<String> = self.read_array(&array, index, &|k| self.storage.get(k))?;
        ids.truncate(rows);
        Ok(ids)
    }

    fn rows_in_shard(&self, split: Split, index: u64) -> Result<usize, ShardError> {
        let s = u64::from(self.layout().shard_images);
        let total = self.len(split);
        if index.checked_mul(s).is_none_or(|first| first >= total) {
            return Err(ShardError::NotFound {
                url: self.storage.describe(&format!("{split} shard {index}")),
            });
        }
        Ok((total - index * s).min(s) as usize)
    }

    /// Reads shard `index` of `split` (every array), trimmed to its real rows.
    pub fn read_shard(&self, split: Split, index: u64) -> Result<Shard, ShardError> {
        self.read_shard_with(split, index, &|k| self.storage.get(k))
    }

    /// [`StoreReader::read_shard`] with objects fetched by `fetch`.
    pub fn read_shard_with(
        &self,
        split: Split,
        index: u64,
        fetch: Fetch<'_>,
    ) -> Result<Shard, ShardError> {
        let s = u64::from(self.layout().shard_images);
        let total = self.len(split);
        if index.checked_mul(s).is_none_or(|first| first >= total) {
            return Err(ShardError::NotFound {
                url: self.storage.describe(&format!("{split} shard {index}")),
            });
        }
        let rows = (total - index * s).min(s) as usize;
        let capacity = self.shards(split) * s;
        let array = |kind| self.layout().array(split, kind, capacity);
        let pixels = (self.layout().image_size as usize).pow(2);
        let mut images: Vec<u16> = self.read_array(&array(ArrayKind::Images)?, index, fetch)?;
        let mut labels: Vec<u8> = self.read_array(&array(ArrayKind::Labels)?, index, fetch)?;
        let mut age: Vec<f32> = self.read_array(&array(ArrayKind::Age)?, index, fetch)?;
        let mut image_ids: Vec<String> =
            self.read_array(&array(ArrayKind::ImageId)?, index, fetch)?;
        let mut patient_ids: Vec<String> =
            self.read_array(&array(ArrayKind::PatientId)?, index, fetch)?;
        images.truncate(rows * pixels);
        labels.truncate(rows * NUM_LABELS);
        age.truncate(rows);
        image_ids.truncate(rows);
        patient_ids.truncate(rows);
        Ok(Shard {
            rows,
            images,
            labels,
            age,
            image_ids,
            patient_ids,
        })
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
