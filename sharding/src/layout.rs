//! The Zarr v3 layout of a CXR7 store: which arrays exist per split, their shapes, chunking and codecs.
//!
//! ```text
//! <root>/zarr.json                  group; attributes.radit = vocabulary, settings, source
//! <root>/<split>/images             uint16 [N, T, T]; shard [S, T, T] of inner chunks [1, T, T]
//! <root>/<split>/labels             uint8  [N, 18]
//! <root>/<split>/age                float32 [N] (NaN = missing)
//! <root>/<split>/image_id, patient_id  string [N]
//! <root>/manifest.json              written last
//! ```
//! Every array is chunked by S rows along axis 0, so one ingest shard writes exactly one object per array.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zarrs::array::codec::{BloscCodec, ShardingCodecOptions, SubchunkWriteOrder, ZstdCodec};
use zarrs::array::{
    Array, ArrayBuilder, ArrayBytes, ArrayToBytesCodecTraits, BytesToBytesCodecTraits,
    CodecOptions, CodecSpecificOptions, data_type,
};
use zarrs::storage::store::MemoryStore;

use crate::error::ShardError;
use crate::schema::NUM_LABELS;
use crate::split::Split;

/// Compression of every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Compression {
    /// Zstandard at `level`.
    Zstd { level: i32 },
    /// Blosc with zstd and bit-shuffle: smaller for real 12-bit radiographs.
    BloscZstd { level: u8 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, level) = s.split_once(':').map_or((s, None), |(n, l)| (n, Some(l)));
        let level = |default: i32| -> Result<i32, String> {
            level.map_or(Ok(default), |l| {
                l.parse()
                    .map_err(|_| format!("compression level '{l}' is not a number"))
            })
        };
        match name {
            "zstd" => Ok(Compression::Zstd { level: level(3)? }),
            "blosc-zstd" => Ok(Compression::BloscZstd {
                level: u8::try_from(level(5)?)
                    .map_err(|_| "blosc level must be 0..=9".to_string())?,
            }),
            other => Err(format!(
                "unknown compression '{other}' (expected zstd[:LEVEL] or blosc-zstd[:LEVEL])"
            )),
        }
    }
}

/// The arrays of one split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArrayKind {
    Images,
    Labels,
    Age,
    ImageId,
    PatientId,
}

impl ArrayKind {
    pub const ALL: [ArrayKind; 5] = [
        ArrayKind::Images,
        ArrayKind::Labels,
        ArrayKind::Age,
        ArrayKind::ImageId,
        ArrayKind::PatientId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ArrayKind::Images => "images",
            ArrayKind::Labels => "labels",
            ArrayKind::Age => "age",
            ArrayKind::ImageId => "image_id",
            ArrayKind::PatientId => "patient_id",
        }
    }
}

/// Shapes and codecs of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreLayout {
    /// Side of the square images (512 for CXR7-1M).
    pub image_size: u32,
    /// Images per shard (S): one object per S images.
    pub shard_images: u32,
    pub compression: Compression,
}

impl Default for StoreLayout {
    fn default() -> Self {
        Self {
            image_size: 512,
            shard_images: 64,
            compression: Compression::default(),
        }
    }
}

pub fn array_path(split: Split, kind: ArrayKind) -> String {
    format!("{}/{}", split.name(), kind.name())
}

impl StoreLayout {
    pub fn validate(&self) -> Result<(), String> {
        if !(8..=8192).contains(&self.image_size) {
            return Err(format!(
                "layout.image_size must be in 8..=8192 (got {})",
                self.image_size
            ));
        }
        if self.shard_images == 0 || self.shard_images > 4096 {
            return Err(format!(
                "layout.shard_images must be in 1..=4096 (got {})",
                self.shard_images
            ));
        }
        match self.compression {
            Compression::Zstd { level } if !(-7..=22).contains(&level) => Err(format!(
                "layout.compression zstd level must be in -7..=22 (got {level})"
            )),
            Compression::BloscZstd { level } if level > 9 => Err(format!(
                "layout.compression blosc level must be in 0..=9 (got {level})"
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn compressor(
        &self,
        element_bytes: usize,
    ) -> Result<Arc<dyn BytesToBytesCodecTraits>, ShardError> {
        Ok(match self.compression {
            Compression::Zstd { level } => Arc::new(ZstdCodec::new(level, false)),
            Compression::BloscZstd { level } => {
                let config = serde_json::json!({
                    "cname": "zstd", "clevel": level, "shuffle": "bitshuffle",
                    "typesize": element_bytes, "blocksize": 0
                });
                let config = serde_json::from_value(config)
                    .map_err(|e| encode_err("blosc configuration", e))?;
                Arc::new(
                    BloscCodec::new_with_configuration(&config)
                        .map_err(|e| encode_err("blosc codec", e))?,
                )
            }
        })
    }

    /// The array `kind` of a split holding `rows` images (the shape; chunking does not depend on it).
    pub fn array(
        &self,
        split: Split,
        kind: ArrayKind,
        rows: u64,
    ) -> Result<Array<MemoryStore>, ShardError> {
        let s = u64::from(self.shard_images);
        let t = u64::from(self.image_size);
        let mut builder = match kind {
            ArrayKind::Images => {
                let mut b =
                    ArrayBuilder::new(vec![rows, t, t], vec![s, t, t], data_type::uint16(), 0u16);
                b.subchunk_shape(vec![1, t, t])
                    .dimension_names(Some(["image", "y", "x"]));
                b
            }
            ArrayKind::Labels => {
                let n = NUM_LABELS as u64;
                let mut b = ArrayBuilder::new(vec![rows, n], vec![s, n], data_type::uint8(), 0u8);
                b.dimension_names(Some(["image", "variable"]));
                b
            }
            ArrayKind::Age => {
                let mut b = ArrayBuilder::new(vec![rows], vec![s], data_type::float32(), f32::NAN);
                b.dimension_names(Some(["image"]));
                b
            }
            ArrayKind::ImageId | ArrayKind::PatientId => {
                let mut b = ArrayBuilder::new(vec![rows], vec![s], data_type::string(), "");
                b.dimension_names(Some(["image"]));
                b
            }
        };
        let element_bytes = match kind {
            ArrayKind::Images => 2,
            ArrayKind::Age => 4,
            _ => 1,
        };
        builder.bytes_to_bytes_codecs(vec![self.compressor(element_bytes)?]);
        // Inner chunks in row-major order, not completion order: the same input always gives the same bytes (so a
        // resumed ingest is byte-identical to a straight one) and a sequential read of a shard is in image order.
        let in_order =
            ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C);
        builder.codec_specific_options(CodecSpecificOptions::default().with_option(in_order));
        builder
            .build(
                Arc::new(MemoryStore::new()),
                &format!("/{}", array_path(split, kind)),
            )
            .map_err(|e| encode_err(&array_path(split, kind), e))
    }

    /// Encodes chunk `index` of `array` (exactly S rows, padded by the caller) into the bytes of its object.
    pub fn encode_chunk(
        &self,
        array: &Array<MemoryStore>,
        index: u64,
        data: ArrayBytes<'_>,
    ) -> Result<(String, Vec<u8>), ShardError> {
        let mut indices = vec![0u64; array.dimensionality()];
        indices[0] = index;
        let what = || format!("{} chunk {index}", array.path());
        let shape = array
            .chunk_shape(&indices)
            .map_err(|e| encode_err(&what(), e))?;
        let encoded = array
            .codecs()
            .encode(
                data,
                &shape,
                array.data_type(),
                array.fill_value(),
                &CodecOptions::default(),
            )
            .map_err(|e| encode_err(&what(), e))?;
        let key = array.chunk_key(&indices).to_string();
        Ok((key, encoded.into_owned()))
    }
}

fn encode_err(what: &str, e: impl std::fmt::Display) -> ShardError {
    ShardError::Encode {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// The `zarr.json` of array `kind` holding `rows` rows.
pub fn array_metadata_json(
    layout: &StoreLayout,
    split: Split,
    kind: ArrayKind,
    rows: u64,
) -> Result<Vec<u8>, ShardError> {
    let array = layout.array(split, kind, rows)?;
    serde_json::to_vec_pretty(array.metadata()).map_err(|e| encode_err("array metadata", e))
}

/// The `zarr.json` of a group with `attributes`.
pub fn group_metadata_json(attributes: serde_json::Value) -> Vec<u8> {
    let doc =
        serde_json::json!({ "zarr_format": 3, "node_type": "group", "attributes": attributes });
    serde_json::to_vec_pretty(&doc).expect("JSON values always serialise")
}
