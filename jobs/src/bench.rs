//! The benches: [`model_step`] (`radit model bench`), a plain unsharded step of the model alone, the floor the
//! engine is compared with; [`encoder_step`] (`radit vae bench`), the autoencoder's encoder throughput; and `radit engine bench`: step time, throughput, MFU and communication volume of the FSDP engine on synthetic
//! inputs (no data loading), optionally a checkpoint's stall and write bandwidth against the disk's raw write
//! bandwidth, measured in the same run. On a GPU it also reports the caching allocator's peak over the timed steps
//! and the driver's view of device memory.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::train::MicroBatch;
use radit_engine::checkpoint::{CheckpointConfig, Checkpointer, RunState, step_dir};
use radit_engine::collective::Collective;
use radit_engine::collective::counting::Counting;
use radit_engine::fsdp::{EngineConfig, EngineError, Initial};
use radit_engine::training::TrainingEngine;
use radit_models::model::RadiTConfig;
use radit_models::network::Architecture;

/// The paper's RadiT-XL training rate: 1M tokens/s on 32 GH200s (about 19 % MFU at 6.04 GFLOP per token).
pub const PAPER_XL_TOKENS_PER_SECOND_PER_GPU: f64 = 1.0e6 / 32.0;

/// What to measure.
#[derive(Debug, Clone)]
pub struct EngineBench {
    pub model: Architecture,
    pub engine: EngineConfig,
    /// Samples per rank per step.
    pub batch: i64,
    pub steps: usize,
    pub warmup: usize,
    /// Dense peak of one device in TFLOP/s, for MFU (989 for an H100/GH200 in bf16).
    pub peak_tflops: f64,
    /// Save one checkpoint here after the timed steps.
    pub checkpoint_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointBench {
    pub bytes_per_rank: u64,
    /// Time training is held up by a save: the device-to-host copy and handing off to the writer (the second save,
    /// whose host buffer is already mapped, as for every save of a run after its first).
    pub stall_seconds: f64,
    /// The same for the first save, which maps its host buffer.
    pub first_stall_seconds: f64,
    /// Time until this rank's object is written.
    pub write_seconds: f64,
    pub write_mb_per_second: f64,
    /// The same bytes written to a file in the same directory by one plain `write` (buffered, not flushed).
    pub raw_disk_mb_per_second: f64,
    /// The same, flushed to the device with fsync.
    pub raw_disk_synced_mb_per_second: f64,
    /// Loading the checkpoint back (list, manifest, read, sha256, into the engine) with this rank's object out of
    /// the page cache.
    pub restore_seconds: f64,
    /// Reading the object back with one plain `read`, out of the page cache.
    pub raw_read_cold_mb_per_second: f64,
}

/// Drops a file's pages from the page cache (what a cold read after a restart finds), without privileges.
fn drop_cached(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub world: usize,
    pub rank: usize,
    pub batch_per_rank: i64,
    pub step_seconds_median: f64,
    pub step_seconds_min: f64,
    /// Of a step: the clip, Adam and EMA over this rank's slices (with the loss and norm all-reduces).
    pub optimizer_seconds_median: f64,
    /// Over the whole world.
    pub tokens_per_second: f64,
    /// Per rank (one GPU each on a cluster).
    pub tokens_per_second_per_device: f64,
    /// For RadiT-XL latent: the paper's rate per GPU (1M tokens/s on 32 GH200s) and this run's share of it.
    pub paper_tokens_per_second_per_gpu: Option<f64>,
    pub vs_paper: Option<f64>,
    pub images_per_second: f64,
    pub mfu: f64,
    pub parameters: i64,
    /// Logical collective payload per step on this rank (gathered outputs + reduce-scatter inputs + small
    /// all-reduces).
    pub bytes_per_step: u64,
    /// ZeRO-3's textbook volume: 3 x parameter bytes in the compute dtype (gather for forward, gather for backward,
    /// reduce-scatter of gradients).
    pub zero3_theory_bytes_per_step: u64,
    pub mode: radit_engine::fsdp::ShardingMode,
    /// The driver's view (what nvidia-smi shows: the allocator's reserve, the context, other processes), sampled
    /// after each step.
    pub peak_device_bytes: Option<u64>,
    /// The caching allocator's peak over the timed steps: the memory the steps really needed at their high point
    /// (`torch.cuda.max_memory_allocated`), and what it held from the driver (`max_memory_reserved`).
    pub peak_allocated_bytes: Option<u64>,
    pub peak_reserved_bytes: Option<u64>,
    /// The largest rank's peak resident memory over the timed steps (Linux's VmHWM, reset before them), measured
    /// as the PyTorch peer measures its own.
    pub peak_rss_bytes: Option<u64>,
    pub checkpoint: Option<CheckpointBench>,
}

/// Restarts the peak resident set (VmHWM) from the current one: writing 5 to `clear_refs` needs no privileges.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_bytes() -> Option<u64> {
    radit_engine::runtime::proc_kib_field("/proc/self/status", "VmHWM:")
}

fn device_used_bytes(device: Device) -> Option<u64> {
    radit_engine::runtime::device_memory(device).map(|(used, _)| used)
}

/// [`run`], with an allocation failure anywhere in it (a panic inside tch, or an error whose chain says so) as
/// the outer error: an [`OutOfMemory`](radit_engine::out_of_memory::OutOfMemory) report naming the `preset`,
/// `mode` and batch, with advice. The inner result is the bench's own.
pub fn run_guarded(
    b: &EngineBench,
    comm: Box<dyn Collective>,
    device: Device,
    (preset, mode): (&str, &str),
) -> Result<Result<EngineBenchReport, EngineError>, Box<radit_engine::out_of_memory::OutOfMemory>> {
    use radit_engine::out_of_memory::{OutOfMemory, guard, in_chain};
    let oom = |e: Box<dyn std::error::Error + Send + Sync>| {
        Box::new(OutOfMemory::new(
            e,
            "the benchmark's steps",
            device,
            format!(
                "model {preset} ({} parameters), --batch {} per rank, precision {:?}, mode {mode}",
                b.model.parameters(),
                b.batch,
                b.engine.precision,
            ),
            "lower --batch, or run on more ranks (each holds 1/world of the training state)",
        ))
    };
    match guard(|| run(b, comm, device)) {
        Err(failed) => Err(oom(failed.into())),
        Ok(Err(e)) if in_chain(&e) => Err(oom(e.into())),
        Ok(r) => Ok(r),
    }
}

pub fn run(
    b: &EngineBench,
    comm: Box<dyn Collective>,
    device: Device,
) -> Result<EngineBenchReport, EngineError> {
    // CPU ranks overlap their collectives on a communication thread, as training does.
    let (counted, traffic) = Counting::new(radit_engine::collective::threaded::overlapping(
        comm, device,
    )?);
    let (rank, world) = (counted.rank(), counted.world());
    let mut engine = radit_engine::training::build(
        &b.model,
        b.engine.clone(),
        Box::new(counted),
        device,
        Initial::Seed(0),
    )?;
    let cfg = &b.model;
    let (channels, side) = (cfg.in_channels(), cfg.input_size());
    let shape = [b.batch, channels, side, side];
    let x1 = Tensor::randn(shape, (Kind::Float, device));
    let x0 = Tensor::randn(shape, (Kind::Float, device));
    let t = Tensor::rand([b.batch], (Kind::Float, device));
    let labels = Tensor::ones([b.batch, cfg.classes().len() as i64], (Kind::Int64, device));
    let age = Tensor::full([b.batch], 0.5, (Kind::Float, device));
    // Dropout (a U-Net's) as training draws it.
    let keys = radit_models::unet::dropout::keys(0, 0, &(0..b.batch as u64).collect::<Vec<_>>());
    let mb = MicroBatch {
        x1: &x1,
        x0: &x0,
        t: &t,
        labels: &labels,
        age: &age,
        keys: Some(&keys),
    };
    let mut times = Vec::new();
    let mut optimizer_times = Vec::new();
    let mut bytes = Vec::new();
    let mut peak = device_used_bytes(device);
    for i in 0..b.warmup + b.steps {
        if i == b.warmup {
            radit_engine::runtime::reset_allocator_peak(device);
            reset_peak_rss();
        }
        engine.collective().barrier()?;
        let before = traffic.bytes();
        let start = Instant::now();
        let loss = mb.forward_backward(engine.as_mut(), 1.0 / world as f64)?;
        let optimizer_start = Instant::now();
        engine.optimizer_step(loss, b.engine.adam.lr)?;
        let optimizer_seconds = optimizer_start.elapsed().as_secs_f64();
        if device != Device::Cpu {
            tch::Cuda::synchronize(match device {
                Device::Cuda(i) => i as i64,
                _ => 0,
            });
        }
        if i >= b.warmup {
            times.push(start.elapsed().as_secs_f64());
            optimizer_times.push(optimizer_seconds);
            bytes.push(traffic.bytes() - before);
        }
        peak = peak.max(device_used_bytes(device));
    }
    let allocator = radit_engine::runtime::allocator_stats(device);
    // The largest rank's, so that rank 0's report stands for the world.
    let peak_rss = engine
        .collective()
        .all_reduce_max_f64(peak_rss_bytes().unwrap_or(0) as f64)?;
    let peak_rss = (peak_rss > 0.0).then_some(peak_rss as u64);
    times.sort_by(f64::total_cmp);
    optimizer_times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (b.batch as u64 * world as u64 * cfg.tokens_per_image()) as f64 / median;
    let per_device = tokens / world as f64;
    let flops_per_device = cfg.training_flops_per_token() * per_device;
    let paper = (RadiTConfig::preset("xl-latent")
        .ok()
        .map(Architecture::RadiT)
        .as_ref()
        == Some(cfg))
    .then_some(PAPER_XL_TOKENS_PER_SECOND_PER_GPU);
    let params = cfg.parameters() as i64;
    let elt = b.engine.precision.compute_kind().elt_size_in_bytes() as u64;
    let checkpoint = match &b.checkpoint_dir {
        Some(dir) => Some(checkpoint_bench(engine.as_mut(), cfg, dir)?),
        None => None,
    };
    Ok(EngineBenchReport {
        world,
        rank,
        batch_per_rank: b.batch,
        step_seconds_median: median,
        step_seconds_min: times[0],
        optimizer_seconds_median: optimizer_times[optimizer_times.len() / 2],
        tokens_per_second: tokens,
        tokens_per_second_per_device: per_device,
        paper_tokens_per_second_per_gpu: paper,
        vs_paper: paper.map(|p| per_device / p),
        images_per_second: (b.batch * world as i64) as f64 / median,
        mfu: flops_per_device / (b.peak_tflops * 1e12),
        parameters: params,
        bytes_per_step: bytes[bytes.len() / 2],
        zero3_theory_bytes_per_step: 3 * params as u64 * elt,
        mode: b.engine.mode,
        peak_device_bytes: peak,
        peak_allocated_bytes: allocator.map(|a| a.allocated_peak),
        peak_reserved_bytes: allocator.map(|a| a.reserved_peak),
        peak_rss_bytes: peak_rss,
        checkpoint,
    })
}

fn checkpoint_bench(
    engine: &mut dyn TrainingEngine,
    cfg: &Architecture,
    dir: &std::path::Path,
) -> Result<CheckpointBench, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::StateMismatch(format!("checkpoint bench in {}: {e}", dir.display()))
    };
    let ckpt_err =
        |e: radit_engine::checkpoint::CheckpointError| EngineError::StateMismatch(format!("{e:#}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let url = dir.join("ckpt");
    let mut ckpt = Checkpointer::open(CheckpointConfig {
        url: url.display().to_string(),
        every: 1,
        keep: 1,
    })
    .map_err(ckpt_err)?;
    // Two saves: the first maps its host buffer, the second reuses it, as every later save of a run does.
    let mut timed = Vec::new();
    let last_step = 2;
    for step in 1..=last_step {
        engine.collective().barrier()?;
        let start = Instant::now();
        ckpt.save(engine, RunState::synthetic(step, engine.adam_steps(), cfg))
            .map_err(ckpt_err)?;
        let stall = start.elapsed().as_secs_f64();
        while ckpt.busy() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        timed.push((stall, start.elapsed().as_secs_f64()));
        ckpt.finish(engine.collective()).map_err(ckpt_err)?;
    }
    let (first_stall, _) = timed[0];
    let (stall, write) = timed[1];
    let rank = engine.collective().rank();
    let object = url
        .join(step_dir(last_step))
        .join(format!("rank-{rank:05}.bin"));
    let bytes = std::fs::metadata(&object).map_err(io)?.len();
    drop_cached(&object).map_err(io)?;
    engine.collective().barrier()?;
    let restore_started = Instant::now();
    let restored = ckpt.load_latest(engine, cfg).map_err(ckpt_err)?;
    let restore = restore_started.elapsed().as_secs_f64();
    if restored.map(|r| r.step) != Some(last_step) {
        return Err(EngineError::StateMismatch(
            "the checkpoint bench did not load the checkpoint it wrote".into(),
        ));
    }
    // The disk's raw bandwidth, same bytes (the object's own: floats, not a pattern a virtual disk could squeeze),
    // same directory, same memory in use: the object read back cold, then written to a new file and flushed.
    drop_cached(&object).map_err(io)?;
    let read_start = Instant::now();
    let data = std::fs::read(&object).map_err(io)?;
    let raw_read = read_start.elapsed().as_secs_f64();
    let raw_path = dir.join(format!("raw-{rank}.bin"));
    let raw_start = Instant::now();
    let (raw, synced) = {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw_path).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        let buffered = raw_start.elapsed().as_secs_f64();
        f.sync_all().map_err(io)?;
        (buffered, raw_start.elapsed().as_secs_f64())
    };
    drop(data);
    let _ = std::fs::remove_file(&raw_path);
    let mb = bytes as f64 / 1e6;
    Ok(CheckpointBench {
        bytes_per_rank: bytes,
        stall_seconds: stall,
        first_stall_seconds: first_stall,
        write_seconds: write,
        write_mb_per_second: mb / write,
        raw_disk_mb_per_second: mb / raw,
        raw_disk_synced_mb_per_second: mb / synced,
        restore_seconds: restore,
        raw_read_cold_mb_per_second: mb / raw_read,
    })
}

/// What `radit model bench` measures: the model's plain forward+backward (autograd, no engine) on this machine's
/// CPU, and its forward alone (what per-block activation checkpointing adds to a step).
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub preset: String,
    pub batch: i64,
    pub threads: i32,
    pub steps: usize,
    pub warmup: usize,
    pub precision: radit_models::model::Precision,
}

/// Seconds per step of a [`ModelBench`], sorted.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub preset: String,
    pub batch: i64,
    pub threads: i32,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub forward_median_s: f64,
}

/// Runs a [`ModelBench`] (compare with tests/python/radit_twin.py bench).
pub fn model_step(b: &ModelBench) -> Result<ModelBenchReport, radit_models::model::ModelError> {
    use radit_models::model::ModelError;
    let cfg = Architecture::preset(&b.preset)?;
    if b.batch <= 0 || b.steps == 0 || b.threads <= 0 {
        return Err(ModelError::BadInput {
            input: "--batch, --steps, --threads",
            reason: "must be positive".into(),
        });
    }
    tch::set_num_threads(b.threads);
    // As the CPU engine does, so the plain floor is measured under the same allocator.
    radit_engine::runtime::retain_large_cpu_buffers();
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let mut model = cfg.build(&vs.root())?;
    model.set_precision(b.precision);
    // Move the zero-initialised layers so the backward does real work everywhere, as the twins' benches do.
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("adaLN_modulation") || name.starts_with("final_layer") {
                let _ = v.normal_(0.0, 0.02);
            } else if name.ends_with("gain") {
                let _ = v.fill_(1.0);
            }
        }
    });
    let n = b.batch;
    let (channels, side) = (cfg.in_channels(), cfg.input_size());
    let shape = [n, channels, side, side];
    let x1 = Tensor::randn(shape, tch::kind::FLOAT_CPU);
    let x0 = Tensor::randn(shape, tch::kind::FLOAT_CPU);
    let t = Tensor::rand([n], tch::kind::FLOAT_CPU);
    let labels = Tensor::stack(
        &cfg.classes()
            .iter()
            .map(|&k| Tensor::randint(k, [n], (Kind::Int64, Device::Cpu)))
            .collect::<Vec<_>>(),
        1,
    );
    let age = Tensor::rand([n], tch::kind::FLOAT_CPU);
    let params = vs.trainable_variables();
    let mut times = Vec::new();
    for i in 0..b.warmup + b.steps {
        let start = Instant::now();
        // Fresh gradients every step (like PyTorch's zero_grad(set_to_none=True)); the engine takes them this way.
        let loss = radit_models::flow::loss(model.as_ref(), &x1, &x0, &t, &labels, &age)?;
        let grads = Tensor::run_backward(&[&loss], &params, false, false);
        drop(grads);
        if i >= b.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let mut forward = Vec::new();
    for i in 0..b.warmup + b.steps {
        let start = Instant::now();
        let loss =
            tch::no_grad(|| radit_models::flow::loss(model.as_ref(), &x1, &x0, &t, &labels, &age))?;
        drop(loss);
        if i >= b.warmup {
            forward.push(start.elapsed().as_secs_f64());
        }
    }
    forward.sort_by(f64::total_cmp);
    Ok(ModelBenchReport {
        implementation: "radit",
        preset: b.preset.clone(),
        batch: n,
        threads: b.threads,
        steps: b.steps,
        median_s: times[times.len() / 2],
        min_s: times[0],
        forward_median_s: forward[forward.len() / 2],
    })
}

/// What `radit vae bench` times per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AeBenchMode {
    /// The encoder's mean (what `radit encode` runs).
    #[default]
    Encode,
    /// The encoder's mean, then the decoder (what `radit eval recon` runs).
    Recon,
    /// One step of the decoder fine-tune (`radit vae finetune`): the frozen encoder's mean, the decoder with the
    /// paper's LoRA (Up-Blocks, 8, 8) and its RGB head in full, L1 loss, backward, Adam; the perceptual
    /// network's share is not in it.
    Finetune,
}

/// What `radit vae bench` measures: the autoencoder's encoder mean, a reconstruction or a fine-tuning step on
/// random images on this machine's CPU.
#[derive(Debug, Clone)]
pub struct EncoderBench {
    pub mode: AeBenchMode,
    pub preset: String,
    pub image_size: i64,
    pub batch: i64,
    pub steps: usize,
    pub warmup: usize,
    pub threads: i32,
}

/// Seconds per batch of an [`EncoderBench`] and the rates they give.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderBenchReport {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub mode: AeBenchMode,
    pub preset: String,
    pub image_size: i64,
    pub batch: i64,
    pub threads: i32,
    pub median_s: f64,
    pub images_per_s: f64,
    pub gflop_per_image: f64,
    pub cpu_gflop_per_s: f64,
}

/// Runs an [`EncoderBench`] (compare with tests/python/flux2_ae_twin.py bench).
pub fn encoder_step(
    b: &EncoderBench,
) -> Result<EncoderBenchReport, radit_models::model::ModelError> {
    use radit_models::autoencoder::{Autoencoder, AutoencoderConfig};
    use radit_models::model::ModelError;
    let cfg = AutoencoderConfig::preset(&b.preset)?;
    if b.batch <= 0 || b.steps == 0 || b.threads <= 0 || b.image_size % cfg.downsampling() != 0 {
        return Err(ModelError::BadInput {
            input: "--batch, --steps, --threads, --image-size",
            reason: format!(
                "must be positive, and the image size a multiple of {}",
                cfg.downsampling()
            ),
        });
    }
    tch::set_num_threads(b.threads);
    tch::manual_seed(0);
    let x = Tensor::rand(
        [b.batch, 1, b.image_size, b.image_size],
        tch::kind::FLOAT_CPU,
    ) * 2
        - 1;
    let side = b.image_size;
    let (encoder, decoder) = match &cfg {
        AutoencoderConfig::Flux(c) => (c.encoder_flops(side), c.decoder_flops(side)),
        AutoencoderConfig::RadVae(c) => (c.encoder_flops(), c.decoder_flops()),
    };
    let mut times = Vec::new();
    let mut time = |i: usize, step: &mut dyn FnMut() -> Result<(), ModelError>| {
        let start = Instant::now();
        step()?;
        if i >= b.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
        Ok::<(), ModelError>(())
    };
    let flops = match b.mode {
        AeBenchMode::Encode | AeBenchMode::Recon => {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let ae = Autoencoder::new(&vs.root(), &cfg)?;
            for i in 0..b.warmup + b.steps {
                time(i, &mut || {
                    let z = tch::no_grad(|| ae.encode_mean(&x))?;
                    if b.mode == AeBenchMode::Recon {
                        let _ = tch::no_grad(|| ae.decode(&z))?;
                    }
                    Ok(())
                })?;
            }
            match b.mode {
                AeBenchMode::Recon => encoder + decoder,
                _ => encoder,
            }
        }
        AeBenchMode::Finetune => {
            use radit_models::autoencoder::finetune::DecoderFinetune;
            use tch::nn::OptimizerConfig;
            let base = std::env::temp_dir().join(format!(
                "radit-bench-base-{}.safetensors",
                std::process::id()
            ));
            radit_models::autoencoder::write_random(&cfg, 0, &base)?;
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let built = DecoderFinetune::new(
                &vs.root(),
                &radit_models::autoencoder::finetune::FinetuneConfig::lora_up_8_8(&base, side),
            );
            let _ = std::fs::remove_file(&base);
            let ft = built?;
            let mut adam = tch::nn::Adam::default().build(&vs, 2e-5)?;
            for i in 0..b.warmup + b.steps {
                time(i, &mut || {
                    let loss = (ft.reconstruct(&x) - &x).abs().mean(tch::Kind::Float);
                    adam.backward_step(&loss);
                    Ok(())
                })?;
            }
            // The decoder's backward reaches every activation (about its forward again) and a few weights.
            encoder + 2.0 * decoder
        }
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(EncoderBenchReport {
        implementation: "radit",
        mode: b.mode,
        preset: b.preset.clone(),
        image_size: b.image_size,
        batch: b.batch,
        threads: b.threads,
        median_s: median,
        images_per_s: b.batch as f64 / median,
        gflop_per_image: flops / 1e9,
        cpu_gflop_per_s: flops * b.batch as f64 / median / 1e9,
    })
}
