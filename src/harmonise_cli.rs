//! `radit harmonise SOURCE`: a public dataset as released -> the harmonised table `radit shard` reads, with an audit
//! report beside it (`<out>.report.json` and `.report.txt`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use radit_sources::SourceOptions;
use radit_sources::audit::Audit;
use radit_sources::nih::{self, NihOptions};
use radit_sources::output::{HarmonisedRow, write_table};
use radit_sources::{brax, padchest};

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
    };
    write_out(c, harmonised)
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
fn write_out(c: &CommonArgs, (rows, audit): (Vec<HarmonisedRow>, Audit)) -> anyhow::Result<u8> {
    write_table(&c.out, &rows)?;
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
