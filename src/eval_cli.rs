//! `radit eval ...`: thin argument parsing over radit_eval.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use radit_eval::fidelity::{CSV_HEADER, FidelityConfig, fidelity};
use radit_eval::io::read_npy;
use radit_eval::kd::KdConfig;
use radit_trainer::validate::features_network;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// FD, KD, precision, recall, density and coverage of generated features against real ones: JSON on stdout and
    /// (with --csv) one row per (model, reference, network) appended to a table.
    Fidelity(FidelityArgs),
    /// Features of a store split's images through a feature network (a DINOv2-family snapshot such as Rad-DINO, or
    /// a TorchScript module with its own preprocessing): an [N, D] float32 .npy and the image ids beside it (OUT
    /// with .ids.txt).
    Features(FeaturesArgs),
}

#[derive(Args)]
pub struct FeaturesArgs {
    /// The store (a path or URL) whose split's images to embed.
    #[arg(long, required_unless_present = "samples", conflicts_with = "samples")]
    store: Option<String>,
    /// Or the samples of a finished `radit generate` (its output directory), in samples.csv's order; their ids are
    /// the profiles' image ids (`ID#k` for the k-th sample of a profile, k > 0).
    #[arg(long)]
    samples: Option<PathBuf>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// The network: a directory is a Hugging Face snapshot of a DINOv2 model (config.json, model.safetensors,
    /// preprocessor_config.json; Rad-DINO is one), whose CLS token after the final LayerNorm is the feature; a
    /// file is a TorchScript module, [B, 3, S, S] in [0, 1] -> [B, D].
    #[arg(long)]
    net: PathBuf,
    /// A TorchScript module's input side S (images are resized to it, bilinear, when they differ).
    #[arg(long)]
    input_size: Option<i64>,
    /// A DINOv2 snapshot's preprocessing: `processor` (its image processor, exactly) or `chexgenbench`
    /// (CheXGenBench's 299 x 299 8-bit step before it).
    #[arg(long, default_value = "processor")]
    preprocessing: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    out: PathBuf,
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
    match cmd {
        EvalCommand::Fidelity(a) => run_fidelity(a),
        EvalCommand::Features(a) => run_features(a),
    }
}

/// Reads one chunk of images to embed: (ids, 16-bit pixels `[n, side, side]`, side).
type ImageChunk = Box<dyn FnOnce() -> anyhow::Result<(Vec<String>, Vec<u16>, i64)>>;

fn run_features(a: FeaturesArgs) -> anyhow::Result<u8> {
    use radit_sharding::reader::StoreReader;
    use radit_sharding::store::Storage;
    use radit_trainer::tch::Tensor;
    crate::exit::ensure_usage!(a.batch > 0, "--batch must be positive");
    let split: radit_sharding::split::Split = a
        .split
        .parse()
        .map_err(|e| crate::exit::usage!("--split: {e}"))?;
    let device = crate::model_cli::device_or_gpu(a.device.as_deref())?;
    let net = radit_trainer::features::load_net(&a.net, a.input_size, &a.preprocessing, device)?;
    // The images as chunks of (ids, 16-bit pixels, side): a store's shards, or the generated files in batches.
    let mut chunks: Vec<ImageChunk> = Vec::new();
    let source = match (&a.store, &a.samples) {
        (Some(store), _) => {
            let reader = std::sync::Arc::new(StoreReader::open(Storage::open_existing(store)?)?);
            let side = i64::from(reader.layout().image_size);
            for k in 0..reader.shards(split) {
                let reader = reader.clone();
                chunks.push(Box::new(move || {
                    let shard = reader.read_shard(split, k)?;
                    Ok((shard.image_ids, shard.images, side))
                }));
            }
            format!("{store} ({} split)", split.name())
        }
        (None, Some(dir)) => {
            let samples = radit_trainer::generate_job::read_samples(dir)?;
            for batch in samples.chunks(a.batch.max(1)) {
                let batch = batch.to_vec();
                chunks.push(Box::new(move || {
                    let (mut ids, mut pixels, mut side) = (Vec::new(), Vec::new(), None);
                    for (path, id, k) in batch {
                        let bytes = std::fs::read(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        let (img, _) = radit_sharding::image::decode_png(&bytes)
                            .map_err(|e| crate::exit::usage!("{}: {e}", path.display()))?;
                        let s = i64::from(img.width);
                        crate::exit::ensure_usage!(
                            img.width == img.height && side.is_none_or(|x| x == s),
                            "{}: {}x{}; the samples must be square and of one size",
                            path.display(),
                            img.width,
                            img.height
                        );
                        side = Some(s);
                        pixels.extend(img.pixels);
                        ids.push(if k == 0 { id } else { format!("{id}#{k}") });
                    }
                    Ok((ids, pixels, side.unwrap_or(0)))
                }));
            }
            format!("{} (generated samples)", dir.display())
        }
        (None, None) => crate::exit::bail_usage!("give --store or --samples"),
    };
    let started = std::time::Instant::now();
    let (mut values, mut ids, mut dim) = (Vec::<f32>::new(), Vec::<String>::new(), 0);
    for chunk in chunks {
        let (chunk_ids, images, side) = chunk()?;
        let pixels = (side * side) as usize;
        let rows = chunk_ids.len();
        for start in (0..rows).step_by(a.batch) {
            let n = (rows - start).min(a.batch);
            let x: Vec<f32> = images[start * pixels..(start + n) * pixels]
                .iter()
                .map(|&v| f32::from(v) / 65535.0)
                .collect();
            let x = Tensor::from_slice(&x).view([n as i64, 1, side, side]);
            let f = net.features(&x)?;
            dim = f.size()[1] as usize;
            values.extend(Vec::<f32>::try_from(f.flatten(0, -1))?);
        }
        ids.extend(chunk_ids);
    }
    crate::exit::ensure_usage!(!ids.is_empty(), "{source}: no images");
    radit_eval::io::write_npy(&a.out, &values, ids.len(), dim)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let ids_path = a.out.with_extension("ids.txt");
    std::fs::write(&ids_path, ids.join("\n") + "\n")
        .with_context(|| format!("writing {}", ids_path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "out": a.out, "ids": ids_path, "rows": ids.len(), "dim": dim, "network": net.id(),
        "source": source, "seconds": seconds,
        "images_per_second": ids.len() as f64 / seconds,
    });
    // What the features are of, beside them: training's mini-FD and `radit eval fidelity` refuse to compare
    // features of different networks or preprocessing.
    let meta = a.out.with_extension("json");
    std::fs::write(&meta, format!("{report}\n"))
        .with_context(|| format!("writing {}", meta.display()))?;
    println!("{report}");
    Ok(0)
}

fn run_fidelity(a: FidelityArgs) -> anyhow::Result<u8> {
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
    // Features of different networks (or preprocessing) are not comparable: refuse what the files say apart.
    if let (Some(r), Some(f)) = (features_network(&a.real), features_network(&a.fake))
        && r != f
    {
        return Err(crate::exit::usage!(
            "{} holds features of `{r}` but {} of `{f}`: compute both with the same network and preprocessing",
            a.real.display(),
            a.fake.display()
        ));
    }
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
