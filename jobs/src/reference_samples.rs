//! Samples drawn for real rows of a store, laid out for a person: each sample is conditioned on one row's 19
//! variables (so every tile says what it was asked for), shown beside that row's real image, and a few rows drawn
//! again with one variable flipped from the same noise (what that variable does, all else equal). What a finished
//! run leaves in `run_dir/samples`:
//!
//! - `sample_NNNN.png` (16-bit; a latent model: `latents.safetensors` and `decoded_NNNN.png`), `contact_sheet.png`
//!   captioned with each sample's conditions;
//! - `real_vs_generated.png`: the row's real image, then its sample;
//! - `by_sex.png`: rows drawn as Female and as Male from the same noise;
//! - `samples.json`: for every sample its file, the row's image id and the conditions.

use std::path::{Path, PathBuf};

use radit_models::autoencoder::LatentDecoder;
use radit_models::model::ModelError;
use radit_models::sampler::{SolveStats, Solver};
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::generate::{
    Conditions, Sampler, WrittenSamples, from_level, preview, sample_sheet, write_png16,
    write_sheet,
};
use crate::sheet::Tile;

/// A row of a store: its split and id, its conditions and its real image `[S, S]` in [-1, 1].
pub struct Reference {
    pub split: Split,
    pub image_id: String,
    pub conditions: Conditions,
    pub image: Tensor,
}

/// The first `n` rows of the validation split of the store at `url`, then of the test and training splits when
/// it has fewer: what the final samples are drawn for.
pub fn read_references(url: &str, n: usize) -> Result<Vec<Reference>, ModelError> {
    let bad = |reason: String| ModelError::BadInput {
        input: "store",
        reason: format!("{url}: {reason}"),
    };
    let storage = Storage::open_existing(url).map_err(|e| bad(e.to_string()))?;
    let reader = StoreReader::open(storage).map_err(|e| bad(e.to_string()))?;
    let side = reader.layout().image_size as usize;
    let mut out = Vec::new();
    for split in [Split::Val, Split::Test, Split::Train] {
        for k in 0..reader.shards(split) {
            let shard = reader
                .read_shard(split, k)
                .map_err(|e| bad(e.to_string()))?;
            for i in 0..shard.rows {
                if out.len() == n {
                    return Ok(out);
                }
                let pixels: Vec<f32> = shard.images[i * side * side..(i + 1) * side * side]
                    .iter()
                    .map(|&v| from_level(v))
                    .collect();
                out.push(Reference {
                    split,
                    image_id: shard.image_ids[i].clone(),
                    conditions: Conditions::of_row(&shard, i),
                    image: Tensor::from_slice(&pixels).view([side as i64, side as i64]),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(bad("every split is empty".into()));
    }
    Ok(out)
}

/// One sample of `samples.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRecord {
    pub index: usize,
    pub file: PathBuf,
    /// The row whose conditions it was drawn for.
    pub split: String,
    pub image_id: String,
    pub conditions: String,
}

/// How samples are drawn and shown: the model, the decoder of a latent model's samples, the noise seed, the
/// solver, and the sheets' title.
pub struct Drawing<'a> {
    pub sampler: &'a Sampler,
    pub decoder: Option<&'a LatentDecoder>,
    pub seed: u64,
    pub solver: Solver,
    pub title: String,
}

/// Draws one sample per reference (sample i from the noise stream (seed, i), in fixed batches of 8),
/// writes them and the sheets of the module docs into `out`.
pub fn write_reference_samples(
    how: &Drawing<'_>,
    references: &[Reference],
    out: &Path,
) -> Result<WrittenSamples, ModelError> {
    let Drawing {
        sampler,
        decoder,
        seed,
        solver,
        ref title,
    } = *how;
    std::fs::create_dir_all(out).map_err(|source| ModelError::Io {
        path: out.display().to_string(),
        source,
    })?;
    if references.is_empty() {
        return Err(ModelError::BadInput {
            input: "samples",
            reason: "no rows to draw samples for".into(),
        });
    }
    let conditions: Vec<&Conditions> = references.iter().map(|r| &r.conditions).collect();
    let indices: Vec<u64> = (0..references.len() as u64).collect();
    let (raw, solves) = draw(sampler, &conditions, &indices, seed, solver)?;
    let latent = sampler.network.in_channels() != 1;
    let mut files = Vec::new();
    if latent {
        let path = out.join("latents.safetensors");
        Tensor::write_safetensors(&[("latents", &raw)], &path)?;
        files.push(path);
    }
    let images = match decoder {
        Some(d) => Some(d.decode(&raw)?),
        None if latent => None,
        None => Some(raw.shallow_clone()),
    };
    let shown = images.as_ref().unwrap_or(&raw);
    let pngs = match &images {
        Some(images) => write_png16(images, out, if latent { "decoded" } else { "sample" })?,
        None => Vec::new(),
    };
    files.extend(pngs.iter().cloned());
    let captions: Vec<String> = references.iter().map(|r| r.conditions.caption()).collect();
    let contact_sheet = out.join("contact_sheet.png");
    let max_tile = 256.min(shown.size()[3]);
    let note = if images.is_none() {
        " (latent channel 0: give [samples.decoder] to see images)"
    } else {
        ""
    };
    sample_sheet(
        shown,
        max_tile,
        &format!("{title}: one sample per row, for its conditions{note}"),
        &captions,
        &[&contact_sheet],
    )?;
    if let Some(images) = &images
        && images.size()[3] == references[0].image.size()[0]
    {
        let pairs: Vec<Tile> = references
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                [
                    Tile::new(
                        r.image.shallow_clone(),
                        format!("#{i} real ({})\n{}", r.split, r.image_id),
                    ),
                    Tile::new(preview(&images.get(i as i64)), format!("#{i} generated")),
                ]
            })
            .collect();
        write_sheet(
            &format!("{title}: each row's real image, then a sample for its conditions"),
            &pairs,
            4.min(pairs.len()),
            max_tile,
            &[&out.join("real_vs_generated.png")],
        )?;
    }
    by_variable(how, references, "sex", &["Female", "Male"], out)?;
    let records: Vec<SampleRecord> = references
        .iter()
        .enumerate()
        .map(|(i, r)| SampleRecord {
            index: i,
            file: pngs.get(i).or(files.first()).cloned().unwrap_or_default(),
            split: r.split.name().to_string(),
            image_id: r.image_id.clone(),
            conditions: r.conditions.describe(),
        })
        .collect();
    let json = serde_json::json!({
        "seed": seed, "solver": solver, "samples": records,
    });
    let path = out.join("samples.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()).map_err(
        |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        },
    )?;
    Ok(WrittenSamples {
        files,
        contact_sheet,
        solves,
    })
}

/// Samples for `conditions[i]` from the noise streams `indices[i]`, in fixed batches of 8.
fn draw(
    sampler: &Sampler,
    conditions: &[&Conditions],
    indices: &[u64],
    seed: u64,
    solver: Solver,
) -> Result<(Tensor, Vec<SolveStats>), ModelError> {
    let mut out = Vec::new();
    let mut solves = Vec::new();
    for (c, i) in conditions.chunks(8).zip(indices.chunks(8)) {
        let (x, s) = tch::no_grad(|| sampler.generate_for(c, i, seed, solver))?;
        out.push(x);
        solves.push(s);
    }
    Ok((Tensor::cat(&out, 0), solves))
}

/// `by_<variable>.png`: the first four references drawn with `variable` set to each of `values`, each reference from
/// its own noise (the same for all its values), so the tiles of a pair differ in that variable alone.
fn by_variable(
    how: &Drawing<'_>,
    references: &[Reference],
    variable: &str,
    values: &[&str],
    out: &Path,
) -> Result<(), ModelError> {
    let rows = &references[..references.len().min(4)];
    let mut conditions = Vec::new();
    let mut indices = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        for v in values {
            conditions.push(
                r.conditions
                    .clone()
                    .with(&format!("{variable}={v}"), None)?,
            );
            indices.push(i as u64);
        }
    }
    let refs: Vec<&Conditions> = conditions.iter().collect();
    let (raw, _) = draw(how.sampler, &refs, &indices, how.seed, how.solver)?;
    let shown = match how.decoder {
        Some(d) => d.decode(&raw)?,
        None => raw,
    };
    let tiles: Vec<Tile> = (0..conditions.len())
        .map(|k| {
            Tile::new(
                preview(&shown.get(k as i64)).to_kind(Kind::Float),
                format!(
                    "#{} {variable}={}",
                    k / values.len(),
                    values[k % values.len()]
                ),
            )
        })
        .collect();
    write_sheet(
        &format!(
            "{}: each pair from one noise, {variable} set to {}",
            how.title,
            values.join(" / ")
        ),
        &tiles,
        2 * values.len(),
        256.min(shown.size()[3]),
        &[&out.join(format!("by_{variable}.png"))],
    )
}
