//! `radit harmonise SOURCE`: a public dataset as released -> the harmonised table `radit shard` reads, with an audit
//! report beside it (`<out>.report.json` and `.report.txt`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use radit_sources::SourceOptions;
use radit_sources::audit::Audit;
use radit_sources::nih::{self, NihOptions};
use radit_sources::output::{HarmonisedRow, write_table};
use radit_sources::{all, brax, chexpert_plus, fixtures, mimic, padchest, rexgradient, vindr};

#[derive(Subcommand)]
pub enum HarmoniseCommand {
    /// NIH ChestX-ray14: Data_Entry_2017_v2020.csv (or .csv.gz, or Data_Entry_2017.csv) and the images_00N/images
    /// (or images/) folders of PNGs under --root.
    Nih(NihArgs),
    /// PadChest: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (or .csv.gz) and the numbered image folders
    /// under --root.
    Padchest(PadChestArgs),
    /// BRAX: master_spreadsheet_update.csv (or master_spreadsheet.csv) and Anonymized_DICOMs/ (or the PNGs under
    /// images/) under --root.
    Brax(BraxArgs),
    /// VinDr-CXR: annotations/image_labels_train.csv (three readers per image, voted) and image_labels_test.csv,
    /// and the train/ and test/ DICOMs under --root, whose headers give age, sex and view.
    Vindr(VindrArgs),
    /// MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv.gz and a label CSV under --root, files/p../p<subject>/s<study>/
    /// <dicom_id>.dcm, and MIMIC-IV's hosp/patients and hosp/admissions (--mimic-iv) for age and race.
    Mimic(MimicArgs),
    /// CheXpert-Plus: df_chexpert_plus_240401.csv, the CheXbert labels (JSON lines) and the DICOM (or PNG) images
    /// under --root.
    ChexpertPlus(ChexpertPlusArgs),
    /// ReXGradient-160K: metadata/{train,valid,test}_metadata_view_position.json and the deid_png/ images under
    /// --root; labels from a CheXbert CSV (--labels).
    Rexgradient(RexGradientArgs),
    /// Every source of a sources.toml, concatenated into one table with paths relative to --images; image ids are
    /// checked unique across datasets.
    All(AllArgs),
    /// Write synthetic releases of all seven sources in their native layouts (the awkward cases included) under
    /// --out, and a sources.toml for `radit harmonise all`.
    Fixtures(FixturesArgs),
}

/// What every source takes.
#[derive(Args)]
pub struct CommonArgs {
    /// The release's folder, as downloaded.
    #[arg(long)]
    root: PathBuf,
    /// The harmonised table to write; its `path` column is relative to --root (pass --root as `radit shard
    /// --images`).
    #[arg(long)]
    out: PathBuf,
    /// A label map (TOML) instead of the built-in one (sources/labelmaps/).
    #[arg(long)]
    labelmap: Option<PathBuf>,
    /// Plausible ages in years; others are written as missing and counted in the report.
    #[arg(long, default_value_t = 0.0)]
    age_min: f64,
    #[arg(long, default_value_t = 100.0)]
    age_max: f64,
    /// Do not look for the images (paths are written as the release lays them out by default).
    #[arg(long)]
    no_check_files: bool,
    /// Image ids to put in the test split, one per line (table ids such as `MIMIC-CXR:<dicom_id>`, or native ids);
    /// the shard then keeps each one's patient entirely in test.
    #[arg(long)]
    hold_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct VindrArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Readers (of three) who must mark a label for it to count.
    #[arg(long, default_value_t = 2)]
    min_votes: u32,
    /// The view of an image whose header has no ViewPosition: PA, AP or none.
    #[arg(long, default_value = "PA")]
    default_view: String,
    /// Read a PatientAge of 000Y as a newborn rather than as missing.
    #[arg(long)]
    zero_age_is_newborn: bool,
    /// Threads reading DICOM headers.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

#[derive(Args)]
pub struct MimicArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The metadata table, if not mimic-cxr-2.0.0-metadata.csv.gz in --root.
    #[arg(long)]
    table: Option<PathBuf>,
    /// MIMIC-IV's folder (hosp/patients.csv.gz and hosp/admissions.csv.gz).
    #[arg(long)]
    mimic_iv: PathBuf,
    /// A CheXbert label CSV (subject_id, study_id and the 14 CheXpert columns) instead of the release's own.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Which of the release's label files without --labels: chexpert or negbio.
    #[arg(long, default_value = "chexpert")]
    release_labels: mimic::MimicLabels,
    /// dcm (MIMIC-CXR) or jpg (MIMIC-CXR-JPG).
    #[arg(long, default_value = "dcm")]
    image: mimic::MimicImage,
    /// A subject whose admissions disagree on race: missing (race left missing) or reject (its images dropped).
    #[arg(long, default_value = "missing")]
    race_conflict: mimic::RaceConflict,
}

#[derive(Args)]
pub struct ChexpertPlusArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The table, if not df_chexpert_plus_240401.csv in --root.
    #[arg(long)]
    table: Option<PathBuf>,
    /// The CheXbert labels (JSON lines), if not chexbert_labels/report_fixed.json in --root.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// dicom (path_to_dcm under --dicom-dir) or png (path_to_image as .png under --png-dir).
    #[arg(long, default_value = "dicom")]
    image: chexpert_plus::PlusImage,
    #[arg(long, default_value = "DICOM")]
    dicom_dir: PathBuf,
    #[arg(long, default_value = "PNG")]
    png_dir: PathBuf,
}

#[derive(Args)]
pub struct RexGradientArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A CheXbert label CSV keyed by --labels-key and the 14 CheXpert columns (without it, findings are missing).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, default_value = "StudyInstanceUid")]
    labels_key: String,
}

#[derive(Args)]
pub struct AllArgs {
    /// The sources and their knobs: one table per source ([mimic], [chexpert_plus], [rexgradient], [padchest],
    /// [vindr], [nih], [brax]) with `root` relative to --images and the source's options.
    #[arg(long)]
    config: PathBuf,
    /// The folder holding every release (pass it as `radit shard --images`).
    #[arg(long)]
    images: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Image ids to put in the test split, one per line (see `radit harmonise nih --help`).
    #[arg(long)]
    hold_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct FixturesArgs {
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct NihArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The table, if not Data_Entry_2017_v2020.csv(.gz) or Data_Entry_2017.csv(.gz) in --root.
    #[arg(long)]
    table: Option<PathBuf>,
    /// Lung opacity also from Consolidation, Atelectasis, Edema and Pneumonia (CheXpert's hierarchy).
    #[arg(long)]
    opacity_includes_children: bool,
}

#[derive(Args)]
pub struct PadChestArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The table, if not PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) in --root.
    #[arg(long)]
    table: Option<PathBuf>,
}

#[derive(Args)]
pub struct BraxArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The table, if not master_spreadsheet_update.csv or master_spreadsheet.csv in --root.
    #[arg(long)]
    table: Option<PathBuf>,
    /// Which copy of each image the table points at: dicom (DicomPath) or png (PngPath).
    #[arg(long, default_value = "dicom")]
    image: brax::BraxImage,
    /// An age range such as 60-64 becomes its midpoint or its lower bound.
    #[arg(long, default_value = "midpoint")]
    age_range: brax::AgeRange,
}

pub fn run_harmonise(cmd: HarmoniseCommand) -> anyhow::Result<u8> {
    let (c, harmonised) = match &cmd {
        HarmoniseCommand::Nih(a) => {
            let opts = NihOptions {
                source: options(&a.common, &a.table)?,
                opacity_includes_children: a.opacity_includes_children,
            };
            (&a.common, nih::harmonise(&opts)?)
        }
        HarmoniseCommand::Brax(a) => {
            let opts = brax::BraxOptions {
                source: options(&a.common, &a.table)?,
                image: a.image,
                age_range: a.age_range,
            };
            (&a.common, brax::harmonise(&opts)?)
        }
        HarmoniseCommand::Padchest(a) => (
            &a.common,
            padchest::harmonise(&options(&a.common, &a.table)?)?,
        ),
        HarmoniseCommand::Vindr(a) => {
            crate::exit::ensure_usage!(a.min_votes >= 1, "--min-votes: at least 1");
            let default_view = vindr::parse_default_view(&a.default_view)
                .map_err(|e| crate::exit::usage!("--default-view {e}"))?;
            let opts = vindr::VindrOptions {
                source: options(&a.common, &None)?,
                min_votes: a.min_votes,
                default_view,
                zero_age_missing: !a.zero_age_is_newborn,
                threads: a.threads.max(1),
            };
            (&a.common, vindr::harmonise(&opts)?)
        }
        HarmoniseCommand::Mimic(a) => {
            let mut opts = mimic::MimicOptions::new(&a.common.root, &a.mimic_iv);
            opts.source = options(&a.common, &a.table)?;
            opts.labels = a.labels.clone();
            opts.release_labels = a.release_labels;
            opts.image = a.image;
            opts.race_conflict = a.race_conflict;
            (&a.common, mimic::harmonise(&opts)?)
        }
        HarmoniseCommand::ChexpertPlus(a) => {
            let mut opts = chexpert_plus::ChexpertPlusOptions::new(&a.common.root);
            opts.source = options(&a.common, &a.table)?;
            opts.labels = a.labels.clone();
            opts.image = a.image;
            opts.dicom_dir = a.dicom_dir.clone();
            opts.png_dir = a.png_dir.clone();
            (&a.common, chexpert_plus::harmonise(&opts)?)
        }
        HarmoniseCommand::Rexgradient(a) => {
            let mut opts = rexgradient::RexGradientOptions::new(&a.common.root);
            opts.source = options(&a.common, &None)?;
            opts.labels = a.labels.clone();
            opts.labels_key = a.labels_key.clone();
            (&a.common, rexgradient::harmonise(&opts)?)
        }
        HarmoniseCommand::All(a) => return run_all(a),
        HarmoniseCommand::Fixtures(a) => return write_fixtures(a),
    };
    write_out(c, harmonised)
}

/// `radit harmonise all`: every configured source, one table, a report per source and a combined summary.
fn run_all(a: &AllArgs) -> anyhow::Result<u8> {
    let report = all::write_all(&a.config, &a.images, &a.out, a.hold_out.as_deref())?;
    print!("{}", report.summary);
    println!(
        "wrote {} ({} rows); per-source reports {}",
        a.out.display(),
        report.rows,
        a.out.with_extension("<source>.report.json").display()
    );
    Ok(0)
}

/// `radit harmonise fixtures`: every source's synthetic release and a sources.toml naming them.
fn write_fixtures(a: &FixturesArgs) -> anyhow::Result<u8> {
    let path = fixtures::write_all_with_config(&a.out)
        .with_context(|| format!("writing the fixtures under {}", a.out.display()))?;
    println!(
        "wrote the seven synthetic releases under {} and {}; next: radit harmonise all --config {} --images {} \
         --out table.csv",
        a.out.display(),
        path.display(),
        path.display(),
        a.out.display()
    );
    Ok(0)
}

/// The options every source takes, checked.
fn options(c: &CommonArgs, table: &Option<PathBuf>) -> anyhow::Result<SourceOptions> {
    crate::exit::ensure_usage!(
        c.age_min.is_finite() && c.age_max.is_finite() && c.age_min <= c.age_max,
        "--age-min {} and --age-max {}: expected finite numbers, the first not above the second",
        c.age_min,
        c.age_max
    );
    Ok(SourceOptions {
        root: c.root.clone(),
        table: table.clone(),
        labelmap: c.labelmap.clone(),
        age_min: c.age_min,
        age_max: c.age_max,
        check_files: !c.no_check_files,
    })
}

/// Writes the table and its report, and prints the summary.
fn write_out(c: &CommonArgs, (mut rows, audit): (Vec<HarmonisedRow>, Audit)) -> anyhow::Result<u8> {
    let held = c
        .hold_out
        .as_deref()
        .map(|f| all::hold_out(&mut rows, f))
        .transpose()?;
    write_table(&c.out, &rows)?;
    if let Some(h) = &held {
        print!("{}", h.line());
    }
    let (json, _) = audit
        .write_beside(&c.out)
        .with_context(|| format!("writing the report beside {}", c.out.display()))?;
    print!("{}", audit.summary());
    println!(
        "wrote {} ({} rows) and its report {}",
        c.out.display(),
        rows.len(),
        json.display()
    );
    Ok(0)
}

#[derive(Subcommand)]
pub enum DicomCommand {
    /// Tabulate the header fields of every DICOM under a folder or URL (transfer syntaxes and whether this build
    /// decodes them, photometric interpretations, bits, rescales, windows, VOI functions and LUTs, views, age
    /// formats, sexes) without decoding pixels: each file's first 64 KiB are read.
    Survey(SurveyArgs),
}

#[derive(Args)]
pub struct SurveyArgs {
    /// A folder, or a file://, s3:// or memory:// URL.
    location: String,
    /// Survey only the first N DICOM candidates (in key order).
    #[arg(long)]
    limit: Option<usize>,
    /// Also write the survey as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Concurrent reads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

pub fn run_dicom(cmd: DicomCommand) -> anyhow::Result<u8> {
    let DicomCommand::Survey(a) = cmd;
    let opts = radit_sources::survey::SurveyOptions {
        limit: a.limit,
        threads: a.threads.max(1),
    };
    let survey = radit_sources::survey::survey(&a.location, &opts)?;
    if let Some(path) = &a.json {
        let json = serde_json::to_vec_pretty(&survey).context("serialising the survey")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", survey.summary());
    Ok(0)
}
