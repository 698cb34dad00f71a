//! `radit model ...` and `radit sample`: thin argument parsing over radit_models and radit_jobs::sample.

use std::path::PathBuf;

use crate::rank_args::{PrecisionArg, device_or_gpu};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use radit_jobs::generate::{Conditions, read_latents};
use radit_jobs::sample::{Counterfactual, SampleRequest, decode_to, sample};
use radit_models::autoencoder::{self, Autoencoder, AutoencoderConfig, DecoderConfig};
use radit_models::model::{Precision, RadiT, RadiTConfig, save_weights};
use radit_models::network::Architecture;
use radit_models::sampler::Solver;
use radit_models::tch::{self, Device, nn::VarStore};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Parameter count, FLOPs per token and training-state memory per GPU of a preset.
    Info(InfoArgs),
    /// Write freshly initialised weights of a preset (DiT initialisation) as safetensors.
    Init(InitArgs),
    /// Forward+backward step time on this machine (compare with tests/python/radit_twin.py bench).
    Bench(ModelBenchArgs),
}

#[derive(Subcommand)]
pub enum VaeCommand {
    /// Parameter counts and latent shape of an autoencoder preset; with --weights, a strict load of a weights file
    /// (the original release's naming or diffusers'), naming every missing, unexpected or misshapen tensor.
    Info(VaeInfoArgs),
    /// Write randomly initialised weights of a preset (the original naming) as safetensors: a stand-in for the
    /// released file, to try `radit encode` and `radit decode` end to end.
    Init(InitArgs),
    /// Encoder throughput on this machine and its FLOPs per image (compare with tests/python/flux2_ae_twin.py
    /// bench; scripts/bench-vae.sh runs both and projects CXR7-1M's GPU-hours).
    Bench(VaeBenchArgs),
    /// Train an autoencoder (RadVAE (Scratch): `model.preset = "radvae"`) on a store's images with the
    /// reconstruction objective of [reconstruction]: `radit train` for a config whose model is an autoencoder.
    /// One rank here, or many under mpirun/srun; under `radit run` as a job of kind vae-train.
    Train(crate::train_cli::TrainArgs),
    /// Fine-tune a released autoencoder's decoder (RadVAE (LoRA): `[model.finetune]`, the encoder frozen) on a
    /// store's images with [reconstruction]; its best weights are a plain autoencoder file. `radit train` for such
    /// a config; under `radit run` as a job of kind vae-finetune.
    Finetune(crate::train_cli::TrainArgs),
}

#[derive(Args)]
pub struct VaeBenchArgs {
    #[arg(default_value = "flux2")]
    preset: String,
    /// encode (the encoder's mean), recon (encode then decode) or finetune (a step of the decoder fine-tune: LoRA
    /// (Up-Blocks, 8, 8) and the RGB head, L1, Adam; FLUX-family presets).
    #[arg(long, default_value = "encode")]
    mode: String,
    #[arg(long, default_value_t = 512)]
    image_size: i64,
    #[arg(long, default_value_t = 1)]
    batch: i64,
    #[arg(long, default_value_t = 2)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
}

/// The decoder that turns a latent model's samples into images, and how.
#[derive(Args)]
pub struct DecoderArgs {
    /// The decoder's architecture: auto (what the weights file says it is; FLUX.2's release says nothing and is
    /// flux2), flux2 or tiny.
    #[arg(long, default_value = "auto", alias = "vae-preset")]
    autoencoder: String,
    /// The store the model was trained on: its training latents' channel_mean and channel_std undo the
    /// standardisation the model learnt (without it the latents are decoded as they are).
    #[arg(long)]
    store: Option<String>,
    /// Latents decoded at once.
    #[arg(long, default_value_t = 4)]
    decode_batch: i64,
}

#[derive(Args)]
pub struct DecodeArgs {
    /// Latents from `radit sample` on a latent preset (`latents.safetensors`, tensor `latents` [N, C, H, W]).
    #[arg(long)]
    latents: PathBuf,
    /// The autoencoder's weights (the original release's naming or diffusers').
    #[arg(long)]
    decoder: PathBuf,
    #[command(flatten)]
    how: DecoderArgs,
    /// Output directory: decoded_NNNN.png (16-bit) and contact_sheet.png.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
}

/// `radit decode`: a latent model's samples through the autoencoder's decoder into 16-bit PNGs and a contact sheet.
pub fn run_decode(a: DecodeArgs) -> anyhow::Result<u8> {
    let device = device_or_gpu(a.device.as_deref())?;
    let latents =
        read_latents(&a.latents).with_context(|| format!("reading {}", a.latents.display()))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (files, sheet) = decode_to(
        &latents,
        &a.how.config(a.decoder.clone()),
        a.how.store.as_deref(),
        device,
        &a.out,
    )
    .with_context(|| format!("the latents of {}", a.latents.display()))?;
    println!(
        "decoded {} latents ({}) into 16-bit PNGs and {}",
        files.len(),
        if a.how.store.is_some() {
            "de-standardised with the store's statistics"
        } else {
            "as they are"
        },
        sheet.display()
    );
    Ok(0)
}

impl DecoderArgs {
    /// The decoder of these flags with the weights in `weights`.
    fn config(&self, weights: PathBuf) -> DecoderConfig {
        DecoderConfig {
            weights,
            autoencoder: self.autoencoder.clone(),
            batch: self.decode_batch,
        }
    }
}

#[derive(Args)]
pub struct VaeInfoArgs {
    /// flux2 (FLUX.2's autoencoder), tiny (the same topology, small), radvae (RadVAE (Scratch), 512x512) or
    /// radvae-tiny.
    #[arg(default_value = "flux2")]
    preset: String,
    /// A weights file to load strictly into the preset.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The image side the latent shape is given for (default: RadVAE's own, else 512).
    #[arg(long)]
    image_size: Option<i64>,
    #[arg(long)]
    json: bool,
}

pub fn run_vae(cmd: VaeCommand) -> anyhow::Result<u8> {
    match cmd {
        VaeCommand::Info(a) => vae_info(a),
        VaeCommand::Init(a) => vae_init(a),
        VaeCommand::Bench(a) => vae_bench(a),
        VaeCommand::Train(a) => crate::train_cli::run_train_of(
            a,
            |m| matches!(m, Architecture::RadVae(_)),
            "RadVAE ([model] preset = \"radvae\" or [model.vae])",
        ),
        VaeCommand::Finetune(a) => crate::train_cli::run_train_of(
            a,
            |m| matches!(m, Architecture::VaeFinetune(_)),
            "a decoder fine-tune ([model.finetune])",
        ),
    }
}

fn vae_bench(a: VaeBenchArgs) -> anyhow::Result<u8> {
    let cfg = AutoencoderConfig::preset(&a.preset)?;
    crate::exit::ensure_usage!(
        a.batch > 0 && a.steps > 0 && a.threads > 0 && a.image_size % cfg.downsampling() == 0,
        "--batch, --steps and --threads must be positive and --image-size a multiple of {}",
        cfg.downsampling()
    );
    use radit_jobs::bench::AeBenchMode;
    let mode = match a.mode.as_str() {
        "encode" => AeBenchMode::Encode,
        "recon" => AeBenchMode::Recon,
        "finetune" => AeBenchMode::Finetune,
        other => crate::exit::bail_usage!("--mode {other}: encode, recon or finetune"),
    };
    let report = radit_jobs::bench::encoder_step(&radit_jobs::bench::EncoderBench {
        mode,
        preset: a.preset,
        image_size: a.image_size,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        threads: a.threads,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

fn vae_init(a: InitArgs) -> anyhow::Result<u8> {
    let cfg = AutoencoderConfig::preset(&a.preset)?;
    autoencoder::write_random(&cfg, a.seed, &a.out)?;
    println!(
        "wrote {} (random {} autoencoder, {} parameters)",
        a.out.display(),
        a.preset,
        cfg.parameters()
    );
    Ok(0)
}

fn vae_info(a: VaeInfoArgs) -> anyhow::Result<u8> {
    let cfg = AutoencoderConfig::preset(&a.preset)?;
    let f = cfg.downsampling();
    // RadVAE is built for one side: its own, unless asked for another.
    let image_size = match (cfg.image_side(), a.image_size) {
        (Some(own), None) => own,
        (_, Some(side)) => side,
        (None, None) => 512,
    };
    crate::exit::ensure_usage!(
        image_size > 0 && image_size % f == 0,
        "--image-size {}: a positive multiple of {f}",
        image_size
    );
    let cfg = match cfg {
        AutoencoderConfig::RadVae(c) => {
            AutoencoderConfig::RadVae(radit_models::unet::vae::RadVaeConfig {
                img_resolution: image_size,
                ..c
            })
        }
        flux => flux,
    };
    let latent = [cfg.z_channels(), image_size / f, image_size / f];
    let (encoder, decoder, quant) = match &cfg {
        AutoencoderConfig::Flux(c) => c.parameter_counts(),
        AutoencoderConfig::RadVae(c) => {
            let (e, d) = c.parameter_split();
            (e as i64, d as i64, 0)
        }
    };
    if let Some(path) = &a.weights {
        autoencoder::resolve(&a.preset, path)?;
        let vs = VarStore::new(Device::Cpu);
        let _ae = Autoencoder::new(&vs.root(), &cfg)?;
        autoencoder::load(&vs, &cfg, path)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "preset": a.preset, "config": cfg, "parameters": {
                    "encoder": encoder, "decoder": decoder, "quant_convs": quant,
                    "total": encoder + decoder + quant,
                },
                "latent": latent, "weights_loaded": a.weights,
            })
        );
    } else {
        println!(
            "autoencoder {}: {} parameters (encoder {encoder}, decoder {decoder}, quant convs {quant}); {}x{} \
             greyscale -> latent {}x{}x{}",
            a.preset,
            encoder + decoder + quant,
            image_size,
            image_size,
            latent[0],
            latent[1],
            latent[2]
        );
        if let Some(path) = &a.weights {
            println!(
                "{}: every tensor present with its shape, none left over",
                path.display()
            );
        }
    }
    Ok(0)
}

#[derive(Args)]
pub struct InfoArgs {
    /// b-pixel, b-latent, xl-latent, tiny or tiny-latent; or a RadUNet preset (unet-pixel, unet-latent,
    /// unet-small, unet-tiny): its counts and FLOPs per image.
    preset: String,
    /// Ranks the FSDP estimate shards over.
    #[arg(long, default_value_t = 32)]
    world: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InitArgs {
    preset: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

#[derive(Args)]
pub struct ModelBenchArgs {
    preset: String,
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum SolverArg {
    Dopri5,
    Euler,
}

/// The ODE solver's flags (`radit sample`, `radit generate`).
#[derive(Args)]
pub struct SolverArgs {
    #[arg(long, value_enum, default_value = "dopri5")]
    solver: SolverArg,
    /// dopri5 tolerances (the paper: 1e-5 for samples, 1e-6 for edits).
    #[arg(long)]
    atol: Option<f64>,
    #[arg(long)]
    rtol: Option<f64>,
    /// Euler steps and grid shift.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 1.0)]
    shift: f64,
}

impl SolverArgs {
    /// The solver the flags ask for (tolerances default to `default_tol`), validated.
    pub fn solver(&self, default_tol: f64) -> Result<Solver, radit_models::model::ModelError> {
        let solver = match self.solver {
            SolverArg::Dopri5 => Solver::Dopri5 {
                atol: self.atol.unwrap_or(default_tol),
                rtol: self.rtol.unwrap_or(default_tol),
            },
            SolverArg::Euler => Solver::Euler {
                steps: self.steps,
                shift: self.shift,
            },
        };
        solver.validate()?;
        Ok(solver)
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// Model weights (safetensors, from `radit export`, `radit model init` or the PyTorch twin).
    #[arg(long)]
    weights: PathBuf,
    /// Architecture for weights files without radit metadata.
    #[arg(long)]
    preset: Option<String>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Samples to generate (ignored with --edit).
    #[arg(short, long, default_value_t = 8)]
    n: u64,
    /// Metadata as name=value pairs, e.g. sex=Female,view=PA,cardiomegaly=positive (unset = missing).
    #[arg(long, default_value = "")]
    set: String,
    /// Age in years (unset = missing).
    #[arg(long)]
    age: Option<f32>,
    /// Counterfactual editing: these images (PNG) are edited from --from/--from-age to --set/--age, or to the
    /// counterfactual profile the SCM derives for --do.
    #[arg(long, num_args = 1..)]
    edit: Vec<PathBuf>,
    /// The edited images' own metadata (name=value pairs).
    #[arg(long, default_value = "")]
    from: String,
    #[arg(long)]
    from_age: Option<f32>,
    /// With --edit and --scm: interventions (name=value pairs, e.g. sex=Female or age=70); the SCM abducts the
    /// --from profile, applies them and predicts every downstream variable, and the image is edited to that profile.
    #[arg(long = "do", requires_all = ["scm", "edit"], conflicts_with_all = ["set", "age"])]
    interventions: Option<String>,
    /// The SCM (`radit scm train`'s output) that derives the counterfactual profile for --do.
    #[arg(long, requires = "interventions")]
    scm: Option<PathBuf>,
    /// With --do: draw a descendant that --from leaves missing (seeded by --seed) instead of keeping it missing,
    /// so that an intervention on its parent can change it.
    #[arg(long, requires = "interventions")]
    resample_missing: bool,
    #[command(flatten)]
    solver: SolverArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// For a latent preset: also decode the samples with this autoencoder (decoded_NNNN.png, and the contact
    /// sheet shows the decoded images).
    #[arg(long)]
    decoder: Option<PathBuf>,
    #[command(flatten)]
    decoding: DecoderArgs,
    /// Samples integrated together.
    #[arg(long, default_value_t = 8)]
    batch: u64,
    /// cpu, cuda (this process's GPU) or cuda:N (default: cuda when a GPU is visible).
    #[arg(long)]
    device: Option<String>,
    /// Default: fp32 on CPU, bf16 on GPU.
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
}

pub fn run_model(cmd: ModelCommand) -> anyhow::Result<u8> {
    match cmd {
        ModelCommand::Info(a) => info(a),
        ModelCommand::Init(a) => init(a),
        ModelCommand::Bench(a) => bench(a),
    }
}

fn info(a: InfoArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(
        !radit_models::unet::vae::RADVAE_PRESETS.contains(&a.preset.as_str()),
        "{} is an autoencoder: `radit vae info {}`",
        a.preset,
        a.preset
    );
    if radit_models::unet::UNET_PRESETS.contains(&a.preset.as_str()) {
        let cfg = radit_models::unet::UNetConfig::preset(&a.preset)?;
        println!("{}", cfg.report(&a.preset, a.json));
        return Ok(0);
    }
    let cfg = RadiTConfig::preset(&a.preset)?;
    crate::exit::ensure_usage!(a.world > 0, "--world must be positive");
    println!("{}", cfg.report(&a.preset, a.world, a.json));
    Ok(0)
}

fn init(a: InitArgs) -> anyhow::Result<u8> {
    let cfg = RadiTConfig::preset(&a.preset)?;
    tch::manual_seed(a.seed);
    let vs = VarStore::new(Device::Cpu);
    let _model = RadiT::new(&vs.root(), &cfg)?;
    save_weights(&vs, &cfg, &a.out)?;
    println!(
        "wrote {} ({} parameters)",
        a.out.display(),
        cfg.parameter_count().total()
    );
    Ok(0)
}

fn bench(a: ModelBenchArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(
        a.batch > 0 && a.steps > 0 && a.threads > 0,
        "--batch, --steps and --threads must be positive"
    );
    let report = radit_jobs::bench::model_step(&radit_jobs::bench::ModelBench {
        preset: a.preset,
        batch: a.batch,
        threads: a.threads,
        steps: a.steps,
        warmup: a.warmup,
        precision: a.precision.into(),
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

pub fn run_sample(a: SampleArgs) -> anyhow::Result<u8> {
    let device = device_or_gpu(a.device.as_deref())?;
    let editing = !a.edit.is_empty();
    let req = SampleRequest {
        weights: a.weights,
        preset: a.preset,
        out: a.out,
        target: Conditions::missing()
            .with(&a.set, a.age)
            .context("parsing --set/--age")?,
        from: Conditions::missing()
            .with(&a.from, a.from_age)
            .context("parsing --from/--from-age")?,
        counterfactual: a
            .interventions
            .zip(a.scm)
            .map(|(interventions, scm)| Counterfactual {
                scm,
                interventions,
                resample_missing: a.resample_missing.then_some(a.seed),
            }),
        edit: a.edit,
        n: a.n,
        batch: a.batch,
        seed: a.seed,
        solver: a.solver.solver(if editing { 1e-6 } else { 1e-5 })?,
        decoder: a
            .decoder
            .map(|weights| (a.decoding.config(weights), a.decoding.store.clone())),
        device,
        precision: a
            .precision
            .map_or(Precision::default_on(device), Precision::from),
    };
    let report = sample(&req)?;
    println!("{}", report.summary);
    println!("contact sheet: {}", report.sheet.display());
    Ok(0)
}
