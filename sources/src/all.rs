//! `radit harmonise all`: every configured source harmonised and concatenated into one table for `radit shard`.
//! Each source's root lies under one images folder, and paths are rewritten relative to it; ids are already
//! namespaced by dataset (`<dataset>:<native id>`, since raw patient ids collide across datasets), and their
//! uniqueness is checked across the whole table. The sources and their knobs come from one TOML file, one table per
//! source, validated before anything is read:
//!
//! ```toml
//! [nih]
//! root = "chestxray14"            # relative to --images
//! [vindr]
//! root = "vindr-cxr"
//! min_votes = 2
//! [mimic]
//! root = "mimic-cxr"
//! mimic_iv = "mimiciv"            # relative to --images too
//! ```

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::audit::Audit;
use crate::output::HarmonisedRow;
use crate::{
    SourceError, SourceOptions, brax, chexpert_plus, mimic, nih, padchest, rexgradient, vindr,
};

/// Declares a source's section: the knobs every source has, then its own.
macro_rules! section {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The release's folder, relative to the images folder.
            pub root: PathBuf,
            pub table: Option<PathBuf>,
            pub labelmap: Option<PathBuf>,
            pub age_min: Option<f64>,
            pub age_max: Option<f64>,
            pub check_files: Option<bool>,
            $(pub $field: $ty,)*
        }

        impl $name {
            fn common(&self) -> Common<'_> {
                Common {
                    root: &self.root,
                    table: self.table.as_deref(),
                    labelmap: self.labelmap.as_deref(),
                    age_min: self.age_min,
                    age_max: self.age_max,
                    check_files: self.check_files,
                }
            }
        }
    };
}

section!(NihSection {
    opacity_includes_children: Option<bool>
});
section!(PadChestSection {});
section!(BraxSection {
    image: Option<String>,
    age_range: Option<String>,
});
section!(VindrSection {
    min_votes: Option<u32>,
    default_view: Option<String>,
    zero_age_missing: Option<bool>,
});
section!(MimicSection {
    mimic_iv: PathBuf,
    labels: Option<PathBuf>,
    release_labels: Option<String>,
    image: Option<String>,
    race_conflict: Option<String>,
});
section!(ChexpertPlusSection {
    labels: Option<PathBuf>,
    image: Option<String>,
    dicom_dir: Option<PathBuf>,
    png_dir: Option<PathBuf>,
});
section!(RexGradientSection {
    labels: Option<PathBuf>,
    labels_key: Option<String>,
});

/// The sources to harmonise (`sources.toml`); a source left out is not read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllConfig {
    pub mimic: Option<MimicSection>,
    pub chexpert_plus: Option<ChexpertPlusSection>,
    pub rexgradient: Option<RexGradientSection>,
    pub padchest: Option<PadChestSection>,
    pub vindr: Option<VindrSection>,
    pub nih: Option<NihSection>,
    pub brax: Option<BraxSection>,
}

struct Common<'a> {
    root: &'a Path,
    table: Option<&'a Path>,
    labelmap: Option<&'a Path>,
    age_min: Option<f64>,
    age_max: Option<f64>,
    check_files: Option<bool>,
}

/// A source's validated options, ready to run.
enum Planned {
    Mimic(mimic::MimicOptions),
    ChexpertPlus(chexpert_plus::ChexpertPlusOptions),
    RexGradient(rexgradient::RexGradientOptions),
    PadChest(SourceOptions),
    Vindr(vindr::VindrOptions),
    Nih(nih::NihOptions),
    Brax(brax::BraxOptions),
}

impl Planned {
    fn run(&self) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
        match self {
            Planned::Mimic(o) => mimic::harmonise(o),
            Planned::ChexpertPlus(o) => chexpert_plus::harmonise(o),
            Planned::RexGradient(o) => rexgradient::harmonise(o),
            Planned::PadChest(o) => padchest::harmonise(o),
            Planned::Vindr(o) => vindr::harmonise(o),
            Planned::Nih(o) => nih::harmonise(o),
            Planned::Brax(o) => brax::harmonise(o),
        }
    }
}

/// One source's part of the combined table.
#[derive(Debug)]
pub struct SourcePart {
    /// The section's name in sources.toml (`vindr`), also the report's file name part.
    pub name: &'static str,
    /// The source's root relative to the images folder, prefixed to its paths.
    pub prefix: PathBuf,
    pub audit: Audit,
    pub rows: usize,
}

/// The combined table and each source's audit.
#[derive(Debug)]
pub struct Combined {
    pub rows: Vec<HarmonisedRow>,
    pub parts: Vec<SourcePart>,
}

/// Reads and validates `sources.toml`.
pub fn load_config(path: &Path) -> Result<AllConfig, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SourceError::InvalidConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `path` relative to `images` when it lies under it (as given relative, or absolute below it).
fn under(images: &Path, path: &Path, what: &str, config: &Path) -> Result<PathBuf, SourceError> {
    let bad = |reason: String| SourceError::InvalidConfig {
        path: config.to_path_buf(),
        reason: format!("{what} `{}`: {reason}", path.display()),
    };
    let relative = if path.is_absolute() {
        path.strip_prefix(images)
            .map_err(|_| bad(format!("not under the images folder {}", images.display())))?
            .to_path_buf()
    } else {
        path.to_path_buf()
    };
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad("must lie under the images folder (no `..`)".into()));
    }
    Ok(relative)
}

/// A knob's text value parsed by its type, or an error naming `[section] key`.
fn knob<T: std::str::FromStr<Err = String>>(
    value: &Option<String>,
    section: &str,
    key: &str,
    config: &Path,
) -> Result<Option<T>, SourceError> {
    value
        .as_deref()
        .map(|v| {
            v.parse().map_err(|e: String| SourceError::InvalidConfig {
                path: config.to_path_buf(),
                reason: format!("[{section}] {key}: {e}"),
            })
        })
        .transpose()
}

/// Validates every section and plans the runs: (section name, root relative to `images`, options).
fn plan(
    config: &AllConfig,
    images: &Path,
    path: &Path,
) -> Result<Vec<(&'static str, PathBuf, Planned)>, SourceError> {
    let source = |name: &str, c: Common<'_>| -> Result<(PathBuf, SourceOptions), SourceError> {
        let relative = under(images, c.root, &format!("[{name}] root"), path)?;
        let mut o = SourceOptions::new(&images.join(&relative));
        o.table = c.table.map(|t| images.join(t));
        o.labelmap = c.labelmap.map(Path::to_path_buf);
        o.age_min = c.age_min.unwrap_or(o.age_min);
        o.age_max = c.age_max.unwrap_or(o.age_max);
        o.check_files = c.check_files.unwrap_or(o.check_files);
        if !(o.age_min.is_finite() && o.age_max.is_finite() && o.age_min <= o.age_max) {
            return Err(SourceError::InvalidConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "[{name}] age_min {} and age_max {}: expected finite numbers, the first not above the second",
                    o.age_min, o.age_max
                ),
            });
        }
        Ok((relative, o))
    };
    let mut planned = Vec::new();
    if let Some(s) = &config.mimic {
        let (rel, o) = source("mimic", s.common())?;
        let iv = under(images, &s.mimic_iv, "[mimic] mimic_iv", path)?;
        let mut m = mimic::MimicOptions::new(&o.root, &images.join(iv));
        m.source = o;
        m.labels = s.labels.as_ref().map(|l| images.join(l));
        m.release_labels =
            knob(&s.release_labels, "mimic", "release_labels", path)?.unwrap_or(m.release_labels);
        m.image = knob(&s.image, "mimic", "image", path)?.unwrap_or(m.image);
        m.race_conflict =
            knob(&s.race_conflict, "mimic", "race_conflict", path)?.unwrap_or(m.race_conflict);
        planned.push(("mimic", rel, Planned::Mimic(m)));
    }
    if let Some(s) = &config.chexpert_plus {
        let (rel, o) = source("chexpert_plus", s.common())?;
        let mut c = chexpert_plus::ChexpertPlusOptions::new(&o.root);
        c.source = o;
        c.labels = s.labels.as_ref().map(|l| images.join(l));
        c.image = knob(&s.image, "chexpert_plus", "image", path)?.unwrap_or(c.image);
        c.dicom_dir = s.dicom_dir.clone().unwrap_or(c.dicom_dir);
        c.png_dir = s.png_dir.clone().unwrap_or(c.png_dir);
        planned.push(("chexpert_plus", rel, Planned::ChexpertPlus(c)));
    }
    if let Some(s) = &config.rexgradient {
        let (rel, o) = source("rexgradient", s.common())?;
        let mut r = rexgradient::RexGradientOptions::new(&o.root);
        r.source = o;
        r.labels = s.labels.as_ref().map(|l| images.join(l));
        r.labels_key = s.labels_key.clone().unwrap_or(r.labels_key);
        planned.push(("rexgradient", rel, Planned::RexGradient(r)));
    }
    if let Some(s) = &config.padchest {
        let (rel, o) = source("padchest", s.common())?;
        planned.push(("padchest", rel, Planned::PadChest(o)));
    }
    if let Some(s) = &config.vindr {
        let (rel, o) = source("vindr", s.common())?;
        let mut v = vindr::VindrOptions::new(&o.root);
        v.source = o;
        v.min_votes = s.min_votes.unwrap_or(v.min_votes);
        if v.min_votes == 0 {
            return Err(SourceError::InvalidConfig {
                path: path.to_path_buf(),
                reason: "[vindr] min_votes: at least 1".into(),
            });
        }
        if let Some(view) = &s.default_view {
            v.default_view =
                vindr::parse_default_view(view).map_err(|e| SourceError::InvalidConfig {
                    path: path.to_path_buf(),
                    reason: format!("[vindr] default_view: {e}"),
                })?;
        }
        v.zero_age_missing = s.zero_age_missing.unwrap_or(v.zero_age_missing);
        planned.push(("vindr", rel, Planned::Vindr(v)));
    }
    if let Some(s) = &config.nih {
        let (rel, o) = source("nih", s.common())?;
        let n = nih::NihOptions {
            source: o,
            opacity_includes_children: s.opacity_includes_children.unwrap_or(false),
        };
        planned.push(("nih", rel, Planned::Nih(n)));
    }
    if let Some(s) = &config.brax {
        let (rel, o) = source("brax", s.common())?;
        let mut b = brax::BraxOptions::new(&o.root);
        b.source = o;
        b.image = knob(&s.image, "brax", "image", path)?.unwrap_or(b.image);
        b.age_range = knob(&s.age_range, "brax", "age_range", path)?.unwrap_or(b.age_range);
        planned.push(("brax", rel, Planned::Brax(b)));
    }
    if planned.is_empty() {
        return Err(SourceError::InvalidConfig {
            path: path.to_path_buf(),
            reason: "no source configured (expected one or more of [mimic], [chexpert_plus], [rexgradient], \
                     [padchest], [vindr], [nih], [brax])"
                .into(),
        });
    }
    Ok(planned)
}

/// Harmonises every source of `config` (read from `path`) under `images` and concatenates them, paths relative to
/// `images`. Every section is validated before any source is read.
pub fn harmonise_all(
    config: &AllConfig,
    images: &Path,
    path: &Path,
) -> Result<Combined, SourceError> {
    let planned = plan(config, images, path)?;
    let mut rows = Vec::new();
    let mut parts = Vec::new();
    for (name, prefix, run) in planned {
        let _span = tracing::info_span!("harmonise", source = name).entered();
        let (source_rows, audit) = run.run()?;
        let n = source_rows.len();
        rows.extend(source_rows.into_iter().map(|mut r| {
            r.path = join(&prefix, &r.path);
            r
        }));
        parts.push(SourcePart {
            name,
            prefix,
            audit,
            rows: n,
        });
    }
    check_unique(&rows)?;
    Ok(Combined { rows, parts })
}

/// `prefix/path` with `/` separators, as the table stores paths.
fn join(prefix: &Path, path: &str) -> String {
    let prefix = prefix.to_string_lossy().replace('\\', "/");
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() || prefix == "." {
        path.to_string()
    } else {
        format!("{prefix}/{path}")
    }
}

/// Every image id once; else an error listing the first duplicates.
pub fn check_unique(rows: &[HarmonisedRow]) -> Result<(), SourceError> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    let mut duplicates = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if let Some(first) = seen.insert(r.image_id.as_str(), i) {
            duplicates.push(format!(
                "`{}` (rows {} and {})",
                r.image_id,
                first + 1,
                i + 1
            ));
        }
    }
    if duplicates.is_empty() {
        Ok(())
    } else {
        let n = duplicates.len();
        duplicates.truncate(10);
        Err(SourceError::DuplicateIds {
            count: n,
            first: duplicates.join(", "),
        })
    }
}

/// What `--hold-out` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HoldOut {
    /// Rows put in the test split.
    pub matched: usize,
    /// Listed ids that are in no row (the first few).
    pub unknown: Vec<String>,
    pub unknown_count: usize,
}

/// Puts the images listed in `file` into the test split: one id per line (`#` comments and blank lines skipped),
/// either a table id (`MIMIC-CXR:<dicom_id>`) or a native id, matched in every dataset. The shard then keeps each
/// listed image's patient entirely in test.
pub fn hold_out(rows: &mut [HarmonisedRow], file: &Path) -> Result<HoldOut, SourceError> {
    let text = std::fs::read_to_string(file).map_err(|source| SourceError::ReadInput {
        path: file.to_path_buf(),
        source,
    })?;
    let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_id.entry(r.image_id.as_str()).or_default().push(i);
        if let Some((_, native)) = r.image_id.split_once(':') {
            by_id.entry(native).or_default().push(i);
        }
    }
    let mut chosen = std::collections::BTreeSet::new();
    let mut out = HoldOut::default();
    for line in text.lines() {
        let id = line.split('#').next().unwrap_or_default().trim();
        if id.is_empty() {
            continue;
        }
        match by_id.get(id) {
            Some(hits) => chosen.extend(hits.iter().copied()),
            None => {
                out.unknown_count += 1;
                if out.unknown.len() < 10 {
                    out.unknown.push(id.to_string());
                }
            }
        }
    }
    // A list of which nothing matched is a list of the wrong ids (another id format, another dataset), not a
    // hold-out that happened to be empty: the test split would silently lack every image it names.
    if chosen.is_empty() && out.unknown_count > 0 {
        let example = rows
            .first()
            .map_or("MIMIC-CXR:<dicom_id>", |r| r.image_id.as_str());
        return Err(SourceError::InvalidConfig {
            path: file.to_path_buf(),
            reason: format!(
                "none of its {} ids is an image of the table (first: {}); ids are table ids like `{example}` or \
                 their native part after the colon",
                out.unknown_count,
                out.unknown.first().map_or("", String::as_str)
            ),
        });
    }
    for &i in &chosen {
        rows[i].split = Some("test");
    }
    out.matched = chosen.len();
    Ok(out)
}

/// What `radit harmonise all` wrote, for the caller to print.
#[derive(Debug)]
pub struct AllReport {
    /// Each source's audit summary and rows, the hold-out, the total (also written to `<out>.report.txt`).
    pub summary: String,
    pub rows: usize,
}

/// `radit harmonise all`: every source `config` names, from under `images`, into one table `out` with a report per
/// source beside it (`<out>.<source>.report.json`) and the summary in `<out>.report.txt`; the images listed in
/// `hold_out` go to the test split.
pub fn write_all(
    config: &Path,
    images: &Path,
    out: &Path,
    hold_out_file: Option<&Path>,
) -> Result<AllReport, SourceError> {
    let sources = load_config(config)?;
    let mut combined = harmonise_all(&sources, images, config)?;
    let held = hold_out_file
        .map(|f| hold_out(&mut combined.rows, f))
        .transpose()?;
    crate::output::write_table(out, &combined.rows)?;
    let mut summary = String::new();
    for part in &combined.parts {
        // `cxr7.vindr.csv` -> `cxr7.vindr.report.json`: one report per source beside the table.
        part.audit
            .write_beside(&out.with_extension(format!("{}.csv", part.name)))?;
        summary.push_str(&part.audit.summary());
        summary.push_str(&format!(
            "  -> {} rows, paths under {}/\n",
            part.rows,
            part.prefix.display()
        ));
    }
    if let Some(h) = &held {
        summary.push_str(&h.line());
    }
    let (read, rejected) = combined.parts.iter().fold((0, 0), |(r, x), p| {
        (r + p.audit.rows.read, x + p.audit.rows.rejected)
    });
    summary.push_str(&format!(
        "all: {} rows from {} sources, image ids unique ({read} read, {rejected} rejected: see each source's \
         report)\n",
        combined.rows.len(),
        combined.parts.len()
    ));
    let txt = out.with_extension("report.txt");
    std::fs::write(&txt, &summary).map_err(|source| SourceError::Write { path: txt, source })?;
    Ok(AllReport {
        summary,
        rows: combined.rows.len(),
    })
}

impl HoldOut {
    /// The report's line.
    pub fn line(&self) -> String {
        let mut line = format!("held out for test: {} images", self.matched);
        if self.unknown_count > 0 {
            line.push_str(&format!(
                "; {} listed ids match no row (first: {})",
                self.unknown_count,
                self.unknown.join(", ")
            ));
        }
        line + "\n"
    }
}
