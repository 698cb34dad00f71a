//! `radit eval reader-study prepare|score`: the expert reader study (fidelity.md; the paper's §5.2, Figure 2).
//!
//! `prepare` draws N real images of a store split and N samples of a finished `radit generate`, both with a seed,
//! and writes them as 8-bit PNGs (round(v / 257)) under opaque names, one shuffled order per presentation as a
//! response sheet, and the key (which image is real) in `sealed/`, its sha256 recorded in `study.json` so that
//! `score` notices a key that was changed. The readers fill in `reader` and `answer` (real or synthetic).
//!
//! `score` reads the filled sheets and reports per reader its accuracy with an exact binomial test against chance,
//! its agreement with itself across presentations, and Cohen's κ of every pair of readers
//! ([`radit_eval::reader_study`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radit_eval::reader_study::{ReaderStudyScore, Response};
use radit_sharding::reader::StoreReader;
use radit_sharding::rng::SplitMix64;
use radit_sharding::select::{Selection, select};
use radit_sharding::split::{Split, id_key};
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::journal::{RankError, io_error, write_atomic};

/// What `prepare` is asked for.
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub store: String,
    pub split: Split,
    /// A finished `radit generate` output directory.
    pub samples: PathBuf,
    /// Real images, and as many synthetic ones.
    pub count: u64,
    pub presentations: u32,
    pub seed: u64,
    pub out: PathBuf,
}

/// `study.json`: what the readers' folder holds (no answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    pub images: u64,
    pub presentations: u32,
    pub seed: u64,
    pub key_sha256: String,
    pub answers: String,
}

const KEY: &str = "sealed/key.csv";
const STUDY: &str = "study.json";

/// A sheet's file name.
pub fn sheet_name(presentation: u32) -> String {
    format!("presentation-{presentation}.csv")
}

fn to_8bit(levels: &[u16]) -> Vec<u8> {
    levels
        .iter()
        .map(|&v| ((f64::from(v) / 257.0).round()).clamp(0.0, 255.0) as u8)
        .collect()
}

/// One image of the study before it is named: (synthetic, where it came from, side, 8-bit pixels).
type Item = (bool, String, u32, Vec<u8>);

/// The real images of `ids` (8-bit, square).
fn real_images(reader: &StoreReader, split: Split, ids: &[String]) -> Result<Vec<Item>, RankError> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let side = reader.layout().image_size;
    let pixels = (side * side) as usize;
    let mut out = Vec::new();
    for (split, k) in radit_sharding::select::locate(reader, split.into(), ids)?.shards {
        let shard = reader.read_shard(split, k)?;
        for (i, id) in shard.image_ids.iter().enumerate() {
            if wanted.contains(id.as_str()) {
                let levels = &shard.images[i * pixels..(i + 1) * pixels];
                out.push((false, format!("{split}:{id}"), side, to_8bit(levels)));
            }
        }
    }
    Ok(out)
}

/// `count` samples of the generate output `dir`, drawn with `seed` (8-bit, square).
fn synthetic_images(dir: &Path, count: u64, seed: u64) -> Result<Vec<Item>, RankError> {
    let mut all = crate::generate_job::read_samples(dir).map_err(|e| {
        RankError::unusable(dir.display(), radit_engine::membership::chain_text(&e))
    })?;
    if (all.len() as u64) < count {
        return Err(RankError::unusable(
            dir.display(),
            format!(
                "has {} samples and the study asks for {count}: generate more, or lower --count",
                all.len()
            ),
        ));
    }
    all.sort_by_key(|(_, id, k)| id_key(seed ^ 0x5eed_5a3e, &format!("{id}#{k}")));
    all.truncate(count as usize);
    let mut out = Vec::new();
    for (path, id, k) in all {
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let (img, _) = radit_sharding::image::decode_png(&bytes)
            .map_err(|e| RankError::unusable(path.display(), e.to_string()))?;
        if img.width != img.height {
            return Err(RankError::unusable(
                path.display(),
                format!("{}x{}: samples are square", img.width, img.height),
            ));
        }
        out.push((
            true,
            format!("sample:{id}#{k}"),
            img.width,
            to_8bit(&img.pixels),
        ));
    }
    Ok(out)
}

/// Writes the study (see the module note); `out` must not hold one already (a sealed key is never replaced).
pub fn prepare(cfg: &PrepareConfig) -> Result<Study, RankError> {
    if cfg.count == 0 || cfg.presentations == 0 {
        return Err(RankError::unusable(
            "the study",
            "count and presentations must be positive",
        ));
    }
    if cfg.out.join(STUDY).exists() || cfg.out.join(KEY).exists() {
        return Err(RankError::unusable(
            cfg.out.display(),
            "already holds a reader study: its sealed key is kept; write the new study elsewhere",
        ));
    }
    let reader = StoreReader::open(
        Storage::open_existing(&cfg.store).map_err(radit_sharding::ShardError::from)?,
    )?;
    let ids = select(
        &reader,
        &Selection {
            split: cfg.split,
            datasets: vec![],
            count: cfg.count,
            seed: cfg.seed,
        },
    )
    .map_err(|e| RankError::unusable(&cfg.store, e.to_string()))?;
    let mut items = real_images(&reader, cfg.split, &ids)?;
    let synthetic = synthetic_images(&cfg.samples, cfg.count, cfg.seed)?;
    let (real_side, fake_side) = (items[0].2, synthetic[0].2);
    if let Some(other) = synthetic.iter().find(|s| s.2 != real_side) {
        return Err(RankError::unusable(
            cfg.samples.display(),
            format!(
                "its samples are {fake_side}x{fake_side} (first: {}) but the store's images are {real_side}x{real_side}: \
                 readers could tell them apart by size; use samples of the store's size",
                other.1
            ),
        ));
    }
    items.extend(synthetic);
    // Names in a seeded shuffled order, so that neither the name nor its number says real or synthetic.
    SplitMix64::stream(&[cfg.seed, 0x0a9e_7e57]).shuffle(&mut items);
    let images_dir = cfg.out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(io_error(&images_dir))?;
    std::fs::create_dir_all(cfg.out.join("sealed")).map_err(io_error(&cfg.out))?;
    let width = items.len().to_string().len().max(3);
    let mut key = String::from("image,truth,source\n");
    let mut names = Vec::with_capacity(items.len());
    for (i, (synthetic, source, side, pixels)) in items.iter().enumerate() {
        let name = format!("image-{:0width$}.png", i + 1);
        let png =
            radit_sharding::image::encode_png8(*side, *side, png::ColorType::Grayscale, pixels);
        let path = images_dir.join(&name);
        write_atomic(&path, |tmp| std::fs::write(tmp, &png))?;
        key += &format!(
            "{name},{},{source}\n",
            if *synthetic { "synthetic" } else { "real" }
        );
        names.push(name);
    }
    for p in 1..=cfg.presentations {
        let mut order = names.clone();
        SplitMix64::stream(&[cfg.seed, 0x0a9e_7e57, u64::from(p)]).shuffle(&mut order);
        let mut sheet = String::from("reader,presentation,position,image,answer\n");
        for (i, name) in order.iter().enumerate() {
            sheet += &format!(",{p},{},{name},\n", i + 1);
        }
        let path = cfg.out.join(sheet_name(p));
        write_atomic(&path, |tmp| std::fs::write(tmp, &sheet))?;
    }
    let key_path = cfg.out.join(KEY);
    write_atomic(&key_path, |tmp| std::fs::write(tmp, &key))?;
    let study = Study {
        images: items.len() as u64,
        presentations: cfg.presentations,
        seed: cfg.seed,
        key_sha256: hex::encode(Sha256::digest(key.as_bytes())),
        answers: "fill in reader (your name) and answer (real or synthetic) on every row of each \
                  presentation's sheet, one presentation at a time, in its order"
            .into(),
    };
    let path = cfg.out.join(STUDY);
    let text = serde_json::to_string_pretty(&study)
        .map_err(|e| RankError::unusable("study.json", e.to_string()))?;
    write_atomic(&path, |tmp| std::fs::write(tmp, text))?;
    Ok(study)
}

/// The key of the study in `dir` (image -> synthetic), checked against the sha256 `study.json` recorded.
pub fn read_key(dir: &Path) -> Result<BTreeMap<String, bool>, RankError> {
    let study_path = dir.join(STUDY);
    let study: Study =
        serde_json::from_str(&std::fs::read_to_string(&study_path).map_err(io_error(&study_path))?)
            .map_err(|e| RankError::unusable(study_path.display(), e.to_string()))?;
    let key_path = dir.join(KEY);
    let text = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
    if hex::encode(Sha256::digest(text.as_bytes())) != study.key_sha256 {
        return Err(RankError::unusable(
            key_path.display(),
            "is not the key this study was prepared with (its sha256 differs from study.json's)",
        ));
    }
    let mut key = BTreeMap::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let mut cells = line.split(',');
        let (Some(image), Some(truth)) = (cells.next(), cells.next()) else {
            return Err(RankError::unusable(
                key_path.display(),
                format!("line {}: not image,truth,source", i + 1),
            ));
        };
        key.insert(image.to_string(), truth == "synthetic");
    }
    Ok(key)
}

/// The answers of filled sheets; a row without a reader or answer, or an answer other than real or synthetic,
/// is an error naming the file and line.
pub fn read_responses(files: &[PathBuf]) -> Result<Vec<Response>, RankError> {
    let mut out = Vec::new();
    for file in files {
        let bad = |line: u64, reason: String| {
            RankError::unusable(file.display(), format!("line {line}: {reason}"))
        };
        let mut reader = csv::Reader::from_path(file)
            .map_err(|e| RankError::unusable(file.display(), e.to_string()))?;
        let headers = reader
            .headers()
            .map_err(|e| RankError::unusable(file.display(), e.to_string()))?
            .clone();
        let col = |name: &str| {
            headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
                RankError::unusable(
                    file.display(),
                    format!("has no '{name}' column (a sheet has reader,presentation,position,image,answer)"),
                )
            })
        };
        let (c_reader, c_pres, c_image, c_answer) = (
            col("reader")?,
            col("presentation")?,
            col("image")?,
            col("answer")?,
        );
        for record in reader.records() {
            let record = record.map_err(|e| RankError::unusable(file.display(), e.to_string()))?;
            let line = record.position().map_or(0, |p| p.line());
            let cell = |c: usize| record.get(c).unwrap_or("").trim();
            let reader_name = cell(c_reader);
            if reader_name.is_empty() {
                return Err(bad(line, "no reader: fill in the reader's name".into()));
            }
            let presentation: u32 = cell(c_pres).parse().map_err(|_| {
                bad(
                    line,
                    format!("presentation '{}' is not a number", cell(c_pres)),
                )
            })?;
            let synthetic = match cell(c_answer).to_ascii_lowercase().as_str() {
                "real" | "r" => false,
                "synthetic" | "s" | "fake" | "generated" => true,
                "" => return Err(bad(line, format!("{} has no answer", cell(c_image)))),
                other => {
                    return Err(bad(
                        line,
                        format!("answer '{other}' is not real or synthetic"),
                    ));
                }
            };
            out.push(Response {
                reader: reader_name.to_string(),
                presentation,
                image: cell(c_image).to_string(),
                synthetic,
            });
        }
    }
    Ok(out)
}

/// Scores the filled sheets `files` of the study in `dir`.
pub fn score(dir: &Path, files: &[PathBuf]) -> Result<ReaderStudyScore, RankError> {
    let key = read_key(dir)?;
    let responses = read_responses(files)?;
    radit_eval::reader_study::score(&key, &responses)
        .map_err(|e| RankError::unusable("the responses", e.to_string()))
}

/// The score as a table for a terminal.
pub fn table(s: &ReaderStudyScore) -> String {
    let mut out = format!(
        "{} images ({} synthetic)\n{:<16} {:>6} {:>8} {:>9} {:>10}  {}\n",
        s.images,
        s.synthetic,
        "reader",
        "n",
        "correct",
        "accuracy",
        "p (vs 0.5)",
        "intra-rater: % agree, kappa"
    );
    for r in &s.readers {
        let intra = r.intra_rater.as_ref().map_or("-".to_string(), |a| {
            format!("{:.1} %, {:.3}", a.percent, a.kappa)
        });
        out += &format!(
            "{:<16} {:>6} {:>8} {:>9.3} {:>10.4}  {intra}\n",
            r.reader, r.overall.answered, r.overall.correct, r.overall.accuracy, r.overall.p_value
        );
        for (p, a) in &r.presentations {
            out += &format!(
                "  presentation {p:<2} {:>6} {:>8} {:>9.3} {:>10.4}\n",
                a.answered, a.correct, a.accuracy, a.p_value
            );
        }
    }
    if !s.pairs.is_empty() {
        out += "pairwise Cohen's kappa\n";
        for p in &s.pairs {
            out += &format!(
                "  {} / {}, presentation {}: {:.3} ({:.1} % agree, {} images)\n",
                p.readers[0],
                p.readers[1],
                p.presentation,
                p.agreement.kappa,
                p.agreement.percent,
                p.agreement.images
            );
        }
    }
    out
}
