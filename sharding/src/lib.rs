//! The dataset side of radit: the CXR7-1M schema and vocabulary, ingest of the harmonised table and images into a
//! Zarr v3 store on any object store, verification, and the synthetic dataset used by demos and tests.
//!
//! Main entry points: [`ingest::ingest`] (`radit shard`), [`manifest::verify`] (`radit shard --verify`),
//! [`synth::generate`] (`radit synth`).
//!
//! ```no_run
//! use radit_sharding::{ingest, manifest::IngestSettings};
//! let outcome = ingest::ingest(
//!     "table.csv".as_ref(), "images".as_ref(), "file:///data/cxr7", &IngestSettings::default(),
//!     &ingest::RunOptions::default(),
//! )?;
//! # Ok::<(), radit_sharding::ShardError>(())
//! ```

pub mod audit;
pub mod error;
pub mod image;
pub mod ingest;
pub mod latents;
pub mod layout;
pub mod loader;
pub mod manifest;
pub mod order;
pub mod reader;
pub mod rng;
pub mod schema;
pub mod select;
pub mod split;
pub mod stats;
pub mod store;
pub mod synth;
pub mod table;
pub mod throughput;

pub use error::ShardError;
