//! `radit eval ...`: thin argument parsing over radit_eval.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use radit_eval::fidelity::{CSV_HEADER, FidelityConfig, fidelity};
use radit_eval::io::read_npy;
use radit_eval::kd::KdConfig;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// FD, KD, precision, recall, density and coverage of generated features against real ones: JSON on stdout and
    /// (with --csv) one row per (model, reference, network) appended to a table.
    Fidelity(FidelityArgs),
}

#[derive(Args)]
pub struct FidelityArgs {
    /// Real (reference) features: an [N, D] float32 or float64 .npy.
    #[arg(long)]
    real: PathBuf,
    /// Generated features, of the same network.
    #[arg(long)]
    fake: PathBuf,
    /// Neighbours for precision, recall, density and coverage.
    #[arg(long, default_value_t = 5)]
    k: usize,
    #[arg(long, default_value_t = 100)]
    kd_subsets: usize,
    /// Rows per KD subset, or `min` for the smaller set's size (CheXGenBench: every subset is the full set).
    #[arg(long, default_value = "1000")]
    kd_subset_size: String,
    /// Draws of the reference set (Table 13's sensitivity test), each of --draw-size rows.
    #[arg(long, requires = "draw_size")]
    reference_draws: Option<usize>,
    #[arg(long, requires = "reference_draws")]
    draw_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Names for the CSV row.
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long, default_value = "")]
    reference: String,
    #[arg(long, default_value = "")]
    network: String,
    /// Append the row to this CSV (the header is written when the file is new).
    #[arg(long)]
    csv: Option<PathBuf>,
}

pub fn run_eval(cmd: EvalCommand) -> anyhow::Result<u8> {
    let EvalCommand::Fidelity(a) = cmd;
    let subset_size = match a.kd_subset_size.as_str() {
        "min" => None,
        n => Some(n.parse::<usize>().map_err(|_| {
            crate::exit::usage!("--kd-subset-size `{n}`: a number of rows, or min")
        })?),
    };
    let cfg = FidelityConfig {
        k: a.k,
        kd: KdConfig {
            subsets: a.kd_subsets,
            subset_size,
            seed: a.seed,
        },
        draws: a.reference_draws.zip(a.draw_size),
        seed: a.seed,
    };
    let real = read_npy(&a.real)?;
    let fake = read_npy(&a.fake)?;
    let started = std::time::Instant::now();
    let result = fidelity(&real, &fake, &cfg)?;
    let mut report = serde_json::to_value(&result)?;
    report["seconds"] = started.elapsed().as_secs_f64().into();
    report["config"] = serde_json::to_value(&cfg)?;
    println!("{report}");
    if let Some(path) = &a.csv {
        let new = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(file, "{CSV_HEADER}")?;
        }
        writeln!(
            file,
            "{}",
            result.csv_row(&a.model, &a.reference, &a.network, &cfg)
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}
