//! `radit synth`: a deterministic synthetic CXR-like dataset (harmonised CSV + 16-bit PNGs).
//!
//! The pictures are cartoons of chest radiographs whose content depends visibly on the metadata, so a model trained
//! on them can be checked for having learned the conditioning:
//! - heart: a bright ellipse, much larger with cardiomegaly (and magnified in AP views);
//! - pleural effusion: the lower lung fields turn bright with a meniscus;
//! - support devices: a thin bright tube down the midline and a small bright box;
//! - opacities (consolidation, edema, pneumonia, lung opacity): hazy bright patches in the lungs;
//! - view: AP/PA are frontal (two lungs, clavicles higher in AP), Lateral shows one lung field and a posterior spine;
//! - sex and age: body width and breast shadows by sex; lung lucency and body width by age.
//!
//! Sizes vary (some non-square, some above 512) so resizing is exercised. With `defects`, extra rows carry the
//! realistic problems the ingest must survive; `defects.json` lists each with the outcome a test should expect.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ShardError;
use crate::image::{encode_png8, encode_png16};
use crate::rng::SplitMix64;
use crate::schema::{DATASET_CLASSES, FINDINGS, RACE_CLASSES};
use crate::table::REQUIRED_COLUMNS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub images: u64,
    pub seed: u64,
    /// Image sizes (width, height) to draw from; the first is the most common.
    pub sizes: Vec<(u32, u32)>,
    /// Add rows with realistic defects (and a `split` column for the split-conflict case).
    pub defects: bool,
    /// Write an explicit `split` column (empty for most rows) even without defects.
    pub split_column: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            images: 256,
            seed: 0,
            sizes: vec![(512, 512), (640, 560), (480, 600), (1024, 1200)],
            defects: false,
            split_column: false,
        }
    }
}

/// Parses `512x512,640x480`.
pub fn parse_sizes(s: &str) -> Result<Vec<(u32, u32)>, String> {
    s.split(',')
        .map(|part| {
            let (w, h) = part
                .trim()
                .split_once('x')
                .ok_or_else(|| format!("size '{part}' is not WIDTHxHEIGHT"))?;
            let parse = |v: &str| v.parse::<u32>().ok().filter(|v| (4..=8192).contains(v));
            match (parse(w), parse(h)) {
                (Some(w), Some(h)) => Ok((w, h)),
                _ => Err(format!("size '{part}' must have sides in 4..=8192")),
            }
        })
        .collect()
}

/// One synthetic row's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthRow {
    pub image_id: String,
    pub patient_id: String,
    pub dataset: &'static str,
    pub path: String,
    pub age: Option<f32>,
    pub sex: &'static str,
    pub race: &'static str,
    pub view: &'static str,
    /// "1", "0", "-1" or "" per finding.
    pub findings: [&'static str; 14],
    pub split: &'static str,
    pub width: u32,
    pub height: u32,
}

impl SynthRow {
    fn positive(&self, name: &str) -> bool {
        FINDINGS
            .iter()
            .position(|f| *f == name)
            .is_some_and(|i| self.findings[i] == "1")
    }
}

/// A defect row and what ingesting it should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Defect {
    pub kind: String,
    /// 1-based CSV line (the header is line 1).
    pub line: u64,
    pub image_id: String,
    /// `rejected`, `accepted`, or `accepted-with-warning`.
    pub expect: String,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    pub table: PathBuf,
    pub images: PathBuf,
    pub rows: u64,
    pub defects: Vec<Defect>,
}

/// Per-image random streams over the project's PRNG.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Rng(SplitMix64::stream(&[seed, stream]))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn unit(&mut self) -> f32 {
        self.0.unit_f32()
    }
    fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.0.below(items.len() as u64) as usize]
    }
}

/// Prevalence of each finding (positive), in schema order.
const PREVALENCE: [f32; 14] = [
    0.15, 0.18, 0.06, 0.10, 0.05, 0.03, 0.05, 0.20, 0.0, 0.18, 0.02, 0.05, 0.04, 0.22,
];

fn sample_rows(cfg: &SynthConfig) -> Vec<SynthRow> {
    let mut rows = Vec::with_capacity(cfg.images as usize);
    let mut patient = 0u64;
    let mut rng = Rng::new(cfg.seed, u64::MAX);
    let mut left_for_patient = 0u32;
    let (mut sex, mut race, mut dataset, mut base_age) = ("", "", "", None);
    for i in 0..cfg.images {
        if left_for_patient == 0 {
            patient += 1;
            left_for_patient = 1 + (rng.next() % 3) as u32;
            sex = if rng.chance(0.02) {
                ""
            } else {
                rng.pick(&["Male", "Female"])
            };
            race = if rng.chance(0.2) {
                ""
            } else {
                rng.pick(&RACE_CLASSES[1..])
            };
            dataset = rng.pick(&DATASET_CLASSES[1..]);
            base_age = if rng.chance(0.05) {
                None
            } else {
                Some(18.0 + (rng.unit() * 77.0).floor())
            };
        }
        left_for_patient -= 1;
        let mut r = Rng::new(cfg.seed, i);
        let view = r.pick(&["PA", "PA", "PA", "AP", "AP", "Lateral", ""]);
        let mut findings = [""; 14];
        let mut any = false;
        for (k, p) in PREVALENCE.iter().enumerate() {
            if FINDINGS[k] == "no_finding" {
                continue;
            }
            let u = r.unit();
            findings[k] = if u < *p {
                any = true;
                "1"
            } else if u < p + 0.04 {
                "-1"
            } else if u < p + 0.5 {
                "0"
            } else {
                ""
            };
        }
        // No finding: positive when nothing else is; with a finding, negative on every other image and blank on
        // the rest, as real tables have both (so the negative class is seen too). Not drawn from the stream, which
        // would move every later draw of the row.
        findings[8] = match (any, i % 2) {
            (false, _) => "1",
            (true, 0) => "0",
            (true, _) => "",
        };
        let (width, height) = if r.chance(0.6) {
            cfg.sizes[0]
        } else {
            r.pick(&cfg.sizes)
        };
        let image_id = format!("synth-{:07}", i);
        let patient_id = format!("P{:06}", patient);
        rows.push(SynthRow {
            path: format!("{}/{image_id}.png", &patient_id[..patient_id.len() - 2]),
            image_id,
            patient_id,
            dataset,
            age: base_age.map(|a: f32| (a + (i % 3) as f32).min(99.0)),
            sex,
            race,
            view,
            findings,
            split: "",
            width,
            height,
        });
    }
    rows
}

/// Renders one row's image: intensities in 0..1 before the detector mapping.
pub fn render(row: &SynthRow, seed: u64, stream: u64) -> Vec<u16> {
    let (w, h) = (row.width as usize, row.height as usize);
    let mut rng = Rng::new(seed ^ 0x5eed, stream);
    let scale = w.min(h) as f32;
    let male = row.sex == "Male";
    let age = row.age.unwrap_or(50.0);
    let age_f = (age - 50.0) / 50.0;
    let lateral = row.view == "Lateral";
    let ap = row.view == "AP";
    let cardio = row.positive("cardiomegaly");
    let effusion = row.positive("pleural_effusion");
    let devices = row.positive("support_devices");
    let opacity = ["consolidation", "edema", "pneumonia", "lung_opacity"]
        .iter()
        .any(|f| row.positive(f));
    let pneumothorax = row.positive("pneumothorax");
    let mediastinum = row.positive("enlarged_cardiomediastinum");
    let lesion = row.positive("lung_lesion");
    // Random but fixed per image: blob positions, a small pose jitter.
    let jx = (rng.unit() - 0.5) * 0.04;
    let jy = (rng.unit() - 0.5) * 0.04;
    let blobs: Vec<(f32, f32, f32)> = (0..3)
        .map(|_| {
            (
                (rng.unit() - 0.5) * 0.5,
                (rng.unit() - 0.3) * 0.4,
                0.04 + rng.unit() * 0.05,
            )
        })
        .collect();
    let side = if rng.chance(0.5) { 1.0 } else { -1.0 };
    let gain = 0.75 + rng.unit() * 0.2; // detector range varies per image, so normalisation matters
    let offset = 0.03 + rng.unit() * 0.05;

    let ell = |x: f32, y: f32, cx: f32, cy: f32, ax: f32, ay: f32| -> f32 {
        let d = ((x - cx) / ax).powi(2) + ((y - cy) / ay).powi(2);
        // Soft edge: 1 inside, 0 outside, smooth over ~5% of the radius.
        ((1.0 - d) * 10.0).clamp(0.0, 1.0)
    };
    let body_ax = (if male { 0.46 } else { 0.41 }) * (1.0 + 0.06 * age_f);
    let heart = if cardio { 1.55 } else { 1.0 } * if ap { 1.15 } else { 1.0 };
    let lung_dark = 0.20 - 0.05 * age_f.max(0.0);
    let mut out = vec![0u16; w * h];
    for py in 0..h {
        let y = (py as f32 - h as f32 / 2.0) / scale - jy;
        for px in 0..w {
            let x = (px as f32 - w as f32 / 2.0) / scale - jx;
            let mut v = 0.05f32;
            if lateral {
                let body = ell(x, y, 0.0, 0.05, 0.40, 0.56);
                v += 0.45 * body;
                let lung = ell(x, y, 0.02, -0.02, 0.26, 0.32);
                v -= (0.5 - lung_dark) * lung;
                v += 0.35 * ell(x, y, 0.30, 0.05, 0.05, 0.5); // spine, posterior
                v += 0.30 * ell(x, y, -0.10, 0.12, 0.11 * heart, 0.12 * heart);
                if effusion {
                    v += 0.35
                        * lung
                        * (((y - 0.17 - 0.06 * (x - 0.1).abs()) * 30.0).clamp(0.0, 1.0));
                }
            } else {
                let body = ell(x, y, 0.0, 0.06, body_ax, 0.56);
                v += 0.45 * body;
                let left = ell(x, y, -0.17, -0.02, 0.13, 0.30);
                let right = ell(x, y, 0.17, -0.02, 0.13, 0.30);
                let lungs = left.max(right);
                let ribs = 0.04 * ((y * 38.0).sin() * 0.5 + 0.5);
                v -= (0.5 - lung_dark - ribs) * lungs;
                if !male && row.sex == "Female" {
                    v += 0.08
                        * (ell(x, y, -0.2, 0.22, 0.12, 0.09) + ell(x, y, 0.2, 0.22, 0.12, 0.09));
                }
                let med = if mediastinum { 0.07 } else { 0.045 };
                v += 0.30 * ell(x, y, 0.0, -0.2, med, 0.22); // mediastinum / spine
                v += 0.32 * ell(x, y, 0.05, 0.12, 0.11 * heart, 0.12 * heart.sqrt());
                let cy = if ap { -0.36 } else { -0.31 };
                for sx in [-1.0f32, 1.0] {
                    let line = (y - cy - 0.08 * (x * sx - 0.15).powi(2)).abs() < 0.012
                        && (0.03..0.33).contains(&(x * sx));
                    if line {
                        v += 0.25;
                    }
                }
                if effusion {
                    let meniscus = ((y - 0.15 + 0.08 * (x.abs() - 0.17)) * 25.0).clamp(0.0, 1.0);
                    v += 0.38 * lungs * meniscus;
                }
                if pneumothorax {
                    let l = if side > 0.0 { right } else { left };
                    v -= 0.1 * l * ((x * side - 0.22) * 20.0).clamp(0.0, 1.0);
                }
                if devices {
                    if (x - 0.01).abs() < 0.006 && y < 0.02 {
                        v += 0.45;
                    }
                    if (x + 0.25).abs() < 0.03 && (y + 0.28).abs() < 0.02 {
                        v += 0.5;
                    }
                }
            }
            if opacity {
                for (bx, by, br) in &blobs {
                    let d2 = ((x - bx).powi(2) + (y - by).powi(2)) / (br * br);
                    v += 0.18 * (-d2).exp();
                }
            }
            if lesion {
                v += 0.3 * ell(x, y, blobs[0].0 * 0.8, blobs[0].1, 0.02, 0.02);
            }
            v += (rng.unit() + rng.unit() - 1.0) * 0.015;
            let detector = (offset + gain * v.clamp(0.0, 1.0)) * 4095.0; // a 12-bit detector in 16-bit words
            // Saturate like a real detector: the word must not wrap to dark.
            out[py * w + px] = (detector.round().min(4095.0) as u16) << 4;
        }
    }
    out
}

fn csv_line(fields: &[Vec<u8>]) -> Vec<u8> {
    let mut line = fields.join(&b","[..]);
    line.push(b'\n');
    line
}

fn row_fields(r: &SynthRow, with_split: bool) -> Vec<Vec<u8>> {
    let mut f: Vec<Vec<u8>> = vec![
        r.image_id.clone().into_bytes(),
        r.patient_id.clone().into_bytes(),
        r.dataset.as_bytes().to_vec(),
        r.path.clone().into_bytes(),
        r.age.map_or(String::new(), |a| format!("{a}")).into_bytes(),
        r.sex.as_bytes().to_vec(),
        r.race.as_bytes().to_vec(),
        r.view.as_bytes().to_vec(),
    ];
    f.extend(r.findings.iter().map(|v| v.as_bytes().to_vec()));
    if with_split {
        f.push(r.split.as_bytes().to_vec());
    }
    f
}

/// Writes `<out>/table.csv` and `<out>/images/...`.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthOutput, ShardError> {
    if cfg.sizes.is_empty() {
        return Err(ShardError::InvalidConfig(
            "synth.sizes must name at least one size".into(),
        ));
    }
    let images = out.join("images");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShardError::ReadInput {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(&images).map_err(io(&images))?;
    let rows = sample_rows(cfg);
    rows.par_iter()
        .enumerate()
        .try_for_each(|(i, r)| -> Result<(), ShardError> {
            let px = render(r, cfg.seed, i as u64);
            let path = images.join(&r.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            std::fs::write(&path, encode_png16(r.width, r.height, &px)).map_err(io(&path))
        })?;

    let with_split = cfg.defects || cfg.split_column;
    let mut header: Vec<Vec<u8>> = REQUIRED_COLUMNS
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    header.extend(FINDINGS.iter().map(|c| c.as_bytes().to_vec()));
    if with_split {
        header.push(b"split".to_vec());
    }
    let mut csv = csv_line(&header);
    for r in &rows {
        csv.extend(csv_line(&row_fields(r, with_split)));
    }
    let mut defects = Vec::new();
    if cfg.defects {
        add_defects(
            &mut csv,
            &mut defects,
            &rows,
            &images,
            rows.len() as u64 + 2,
            cfg.seed,
        )?;
    }
    let table = out.join("table.csv");
    let mut f = std::fs::File::create(&table).map_err(io(&table))?;
    f.write_all(&csv).map_err(io(&table))?;
    if cfg.defects {
        let json = serde_json::to_vec_pretty(&defects).expect("defects serialise");
        std::fs::write(out.join("defects.json"), json).map_err(io(&out.join("defects.json")))?;
    }
    Ok(SynthOutput {
        table,
        images,
        rows: rows.len() as u64 + defects.len() as u64,
        defects,
    })
}

fn add_defects(
    csv: &mut Vec<u8>,
    defects: &mut Vec<Defect>,
    rows: &[SynthRow],
    images: &Path,
    mut line: u64,
    seed: u64,
) -> Result<(), ShardError> {
    let write = |rel: &str, bytes: &[u8]| -> Result<(), ShardError> {
        let path = images.join(rel);
        std::fs::create_dir_all(path.parent().expect("relative path has a parent"))
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|source| ShardError::ReadInput { path, source })
    };
    let template = rows
        .first()
        .cloned()
        .ok_or_else(|| ShardError::InvalidConfig("synth.images must be > 0".into()))?;
    let (w, h) = (template.width.min(256), template.height.min(256));
    let good_png = {
        let mut r = template.clone();
        r.width = w;
        r.height = h;
        encode_png16(w, h, &render(&r, seed, 999_999))
    };
    let grey8: Vec<u8> = (0..w * h).map(|i| ((i * 31) % 251) as u8).collect();
    let mut push = |kind: &str,
                    expect: &str,
                    mut row: SynthRow,
                    file: Option<Vec<u8>>,
                    raw: Option<Vec<u8>>|
     -> Result<(), ShardError> {
        if row.image_id.is_empty() {
            row.image_id = format!("defect-{kind}");
        }
        if row.path.is_empty() {
            row.path = format!("defects/{kind}.png");
        }
        if let Some(bytes) = file {
            write(&row.path, &bytes)?;
        }
        csv.extend(raw.unwrap_or_else(|| csv_line(&row_fields(&row, true))));
        defects.push(Defect {
            kind: kind.into(),
            line,
            image_id: row.image_id.clone(),
            expect: expect.into(),
        });
        line += 1;
        Ok(())
    };
    let base = |patient: &str| SynthRow {
        image_id: String::new(),
        patient_id: patient.into(),
        path: String::new(),
        ..template.clone()
    };
    push("missing_file", "rejected", base("PD01"), None, None)?;
    push(
        "truncated_png",
        "rejected",
        base("PD02"),
        Some(good_png[..good_png.len() / 2].to_vec()),
        None,
    )?;
    let mut corrupt = good_png[..8].to_vec();
    corrupt.extend((0..500u32).map(|i| (i * 7919 % 256) as u8));
    push("corrupt_png", "rejected", base("PD03"), Some(corrupt), None)?;
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| [(i % 256) as u8, 40, 200])
        .collect();
    push(
        "rgb_png",
        "rejected",
        base("PD04"),
        Some(encode_png8(w, h, png::ColorType::Rgb, &rgb)),
        None,
    )?;
    let rgb_grey: Vec<u8> = grey8.iter().flat_map(|&v| [v, v, v]).collect();
    push(
        "grey_stored_as_rgb",
        "accepted",
        base("PD05"),
        Some(encode_png8(w, h, png::ColorType::Rgb, &rgb_grey)),
        None,
    )?;
    push(
        "eight_bit_png",
        "accepted",
        base("PD06"),
        Some(encode_png8(w, h, png::ColorType::Grayscale, &grey8)),
        None,
    )?;
    push(
        "zero_size_file",
        "rejected",
        base("PD07"),
        Some(Vec::new()),
        None,
    )?;
    push(
        "blank_image",
        "rejected",
        base("PD08"),
        Some(encode_png16(w, h, &vec![1234; (w * h) as usize])),
        None,
    )?;
    // Duplicate of the first ordinary row's image_id.
    let mut dup = template.clone();
    dup.patient_id = "PD09".into();
    push("duplicate_image_id", "rejected", dup, None, None)?;
    for (kind, split) in [
        ("split_conflict_train", "train"),
        ("split_conflict_test", "test"),
    ] {
        let mut r = base("PD10");
        r.split = split;
        push(kind, "rejected", r, Some(good_png.clone()), None)?;
    }
    let mut odd = base("PD11");
    odd.sex = "X";
    odd.race = "Martian";
    odd.view = "oblique";
    push(
        "unknown_enum_values",
        "accepted-with-warning",
        odd,
        Some(good_png.clone()),
        None,
    )?;
    let mut age = base("PD12");
    age.image_id = "defect-non_numeric_age".into();
    age.path = "defects/non_numeric_age.png".into();
    let mut fields = row_fields(&age, true);
    fields[4] = b"sixty".to_vec();
    push(
        "non_numeric_age",
        "accepted-with-warning",
        age.clone(),
        Some(good_png.clone()),
        Some(csv_line(&fields)),
    )?;
    let mut old = base("PD13");
    old.age = Some(150.0);
    push(
        "implausible_age",
        "accepted-with-warning",
        old,
        Some(good_png.clone()),
        None,
    )?;
    let short = b"defect-malformed_row,PD14,MIMIC-CXR,defects/malformed_row.png,40\n".to_vec();
    push("malformed_row", "rejected", base("PD14"), None, Some(short))?;
    let mut bad = base("PD15");
    bad.image_id = "defect-non_utf8".into();
    bad.path = "defects/non_utf8.png".into();
    let mut fields = row_fields(&bad, true);
    fields[1] = b"PD\xff15".to_vec();
    push(
        "non_utf8",
        "rejected",
        bad,
        Some(good_png.clone()),
        Some(csv_line(&fields)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_row() -> SynthRow {
        SynthRow {
            image_id: "x".into(),
            patient_id: "p".into(),
            dataset: "BRAX",
            path: "x.png".into(),
            age: Some(50.0),
            sex: "Male",
            race: "",
            view: "PA",
            findings: ["0"; 14],
            split: "",
            width: 128,
            height: 128,
        }
    }

    fn with(finding: &str) -> SynthRow {
        let mut r = base_row();
        let i = FINDINGS.iter().position(|f| *f == finding).unwrap();
        r.findings[i] = "1";
        r
    }

    /// Mean intensity over a box given in the renderer's centred unit coordinates.
    fn mean(px: &[u16], w: usize, (x0, x1): (f32, f32), (y0, y1): (f32, f32)) -> f64 {
        let mut sum = 0.0;
        let mut n = 0.0;
        for py in 0..w {
            for qx in 0..w {
                let (x, y) = (qx as f32 / w as f32 - 0.5, py as f32 / w as f32 - 0.5);
                if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                    sum += f64::from(px[py * w + qx]);
                    n += 1.0;
                }
            }
        }
        sum / n
    }

    #[test]
    fn findings_change_the_picture_where_a_reader_would_look() {
        // Several noise/jitter streams, so the effects do not depend on one lucky draw.
        for stream in 0..6 {
            let normal = render(&base_row(), 1, stream);
            // Cardiomegaly: the region just outside a normal heart turns bright.
            let heart_edge = ((0.18, 0.24), (0.06, 0.18));
            let big = render(&with("cardiomegaly"), 1, stream);
            assert!(
                mean(&big, 128, heart_edge.0, heart_edge.1)
                    > mean(&normal, 128, heart_edge.0, heart_edge.1) + 3000.0
            );
            // Pleural effusion: the lower lung fields turn bright.
            let lower_lung = ((-0.25, -0.1), (0.2, 0.26));
            let eff = render(&with("pleural_effusion"), 1, stream);
            assert!(
                mean(&eff, 128, lower_lung.0, lower_lung.1)
                    > mean(&normal, 128, lower_lung.0, lower_lung.1) + 5000.0
            );
            // Support devices: a bright device box over the upper right lung field (the tube runs over the already
            // bright mediastinum, so the box is the robust thing to measure).
            let tube = ((-0.3, -0.2), (-0.33, -0.23));
            let dev = render(&with("support_devices"), 1, stream);
            assert!(mean(&dev, 128, tube.0, tube.1) > mean(&normal, 128, tube.0, tube.1) + 2000.0);
            // View: a lateral film has no dark right lung field where a frontal one has it.
            let mut lateral = base_row();
            lateral.view = "Lateral";
            let lat = render(&lateral, 1, stream);
            let left_lung = ((-0.22, -0.12), (-0.1, 0.1));
            assert!(
                (mean(&lat, 128, left_lung.0, left_lung.1)
                    - mean(&normal, 128, left_lung.0, left_lung.1))
                .abs()
                    > 2000.0
            );
            // Sex: a female body is narrower at the flanks.
            let mut female = base_row();
            female.sex = "Female";
            let fem = render(&female, 1, stream);
            let flank = ((-0.45, -0.42), (0.0, 0.1));
            assert!(
                mean(&normal, 128, flank.0, flank.1) > mean(&fem, 128, flank.0, flank.1) + 2000.0
            );
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let cfg = SynthConfig {
            images: 20,
            seed: 5,
            sizes: vec![(16, 16), (20, 12)],
            ..SynthConfig::default()
        };
        assert_eq!(sample_rows(&cfg), sample_rows(&cfg));
        let r = &sample_rows(&cfg)[3];
        assert_eq!(render(r, 5, 3), render(r, 5, 3));
        assert_ne!(render(r, 5, 3), render(r, 6, 3));
    }
}
