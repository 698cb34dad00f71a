//! `radit engine bench`: step time, throughput, MFU and communication volume of the FSDP engine on synthetic
//! inputs (no data loading), optionally a checkpoint's stall and write bandwidth against the disk's raw write
//! bandwidth, measured in the same run. On a GPU it also reports the caching allocator's peak over the timed steps
//! and the driver's view of device memory.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{EngineConfig, EngineError, Fsdp, Initial};
use crate::checkpoint::{CheckpointConfig, Checkpointer, RunState, step_dir};
use crate::collective::Collective;
use crate::collective::counting::Counting;
use crate::flow::MicroBatch;
use crate::model::RadiTConfig;

/// What to measure.
#[derive(Debug, Clone)]
pub struct EngineBench {
    pub model: RadiTConfig,
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
    /// Time training is held up: the device-to-host copy and handing off to the writer.
    pub stall_seconds: f64,
    /// Time until this rank's object is written.
    pub write_seconds: f64,
    pub write_mb_per_second: f64,
    /// The same number of bytes written to a file in the same directory (buffered, as the checkpoint object is).
    pub raw_disk_mb_per_second: f64,
    /// The same, flushed to the device with fsync.
    pub raw_disk_synced_mb_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub world: usize,
    pub rank: usize,
    pub batch_per_rank: i64,
    pub step_seconds_median: f64,
    pub step_seconds_min: f64,
    /// Over the whole world.
    pub tokens_per_second: f64,
    pub images_per_second: f64,
    pub mfu: f64,
    pub parameters: i64,
    /// Logical collective payload per step on this rank (gathered outputs + reduce-scatter inputs + small
    /// all-reduces).
    pub bytes_per_step: u64,
    /// ZeRO-3's textbook volume: 3 x parameter bytes in the compute dtype (gather for forward, gather for backward,
    /// reduce-scatter of gradients).
    pub zero3_theory_bytes_per_step: u64,
    /// The driver's view (what nvidia-smi shows: the allocator's reserve, the context, other processes), sampled
    /// after each step.
    pub peak_device_bytes: Option<u64>,
    /// The caching allocator's peak over the timed steps: the memory the steps really needed at their high point
    /// (`torch.cuda.max_memory_allocated`), and what it held from the driver (`max_memory_reserved`).
    pub peak_allocated_bytes: Option<u64>,
    pub peak_reserved_bytes: Option<u64>,
    pub checkpoint: Option<CheckpointBench>,
}

fn device_used_bytes(device: Device) -> Option<u64> {
    crate::runtime::device_memory(device).map(|(used, _)| used)
}

pub fn run(
    b: &EngineBench,
    comm: Box<dyn Collective>,
    device: Device,
) -> Result<EngineBenchReport, EngineError> {
    let (counted, traffic) = Counting::new(comm);
    let (rank, world) = (counted.rank(), counted.world());
    let mut engine = Fsdp::new(
        crate::model::RadiT::builder(&b.model),
        b.engine.clone(),
        Box::new(counted),
        device,
        Initial::Seed(0),
    )?;
    let cfg = &b.model;
    let shape = [b.batch, cfg.in_channels, cfg.input_size, cfg.input_size];
    let x1 = Tensor::randn(shape, (Kind::Float, device));
    let x0 = Tensor::randn(shape, (Kind::Float, device));
    let t = Tensor::rand([b.batch], (Kind::Float, device));
    let labels = Tensor::ones([b.batch, cfg.classes.len() as i64], (Kind::Int64, device));
    let age = Tensor::full([b.batch], 0.5, (Kind::Float, device));
    let mb = MicroBatch {
        x1: &x1,
        x0: &x0,
        t: &t,
        labels: &labels,
        age: &age,
    };
    let mut times = Vec::new();
    let mut bytes = Vec::new();
    let mut peak = device_used_bytes(device);
    for i in 0..b.warmup + b.steps {
        if i == b.warmup {
            crate::runtime::reset_allocator_peak(device);
        }
        engine.collective().barrier()?;
        let before = traffic.bytes();
        let start = Instant::now();
        let loss = mb.forward_backward(&mut engine, 1.0 / world as f64)?;
        engine.optimizer_step(loss, b.engine.adam.lr)?;
        if device != Device::Cpu {
            tch::Cuda::synchronize(match device {
                Device::Cuda(i) => i as i64,
                _ => 0,
            });
        }
        if i >= b.warmup {
            times.push(start.elapsed().as_secs_f64());
            bytes.push(traffic.bytes() - before);
        }
        peak = peak.max(device_used_bytes(device));
    }
    let allocator = crate::runtime::allocator_stats(device);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (b.batch * world as i64 * cfg.tokens()) as f64 / median;
    let flops_per_device = cfg.training_flops_per_token() * tokens / world as f64;
    let params = cfg.parameter_count().total();
    let elt = b.engine.precision.compute_kind().elt_size_in_bytes() as u64;
    let checkpoint = match &b.checkpoint_dir {
        Some(dir) => Some(checkpoint_bench(&engine, cfg, dir)?),
        None => None,
    };
    Ok(EngineBenchReport {
        world,
        rank,
        batch_per_rank: b.batch,
        step_seconds_median: median,
        step_seconds_min: times[0],
        tokens_per_second: tokens,
        images_per_second: (b.batch * world as i64) as f64 / median,
        mfu: flops_per_device / (b.peak_tflops * 1e12),
        parameters: params,
        bytes_per_step: bytes[bytes.len() / 2],
        zero3_theory_bytes_per_step: 3 * params as u64 * elt,
        peak_device_bytes: peak,
        peak_allocated_bytes: allocator.map(|a| a.allocated_peak),
        peak_reserved_bytes: allocator.map(|a| a.reserved_peak),
        checkpoint,
    })
}

fn checkpoint_bench(
    engine: &Fsdp,
    cfg: &RadiTConfig,
    dir: &std::path::Path,
) -> Result<CheckpointBench, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::StateMismatch(format!("checkpoint bench in {}: {e}", dir.display()))
    };
    let ckpt_err =
        |e: crate::checkpoint::CheckpointError| EngineError::StateMismatch(format!("{e:#}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let url = dir.join("ckpt");
    let mut ckpt = Checkpointer::open(CheckpointConfig {
        url: url.display().to_string(),
        every: 1,
        keep: 1,
    })
    .map_err(ckpt_err)?;
    let state = RunState::synthetic(1, engine.adam_steps(), cfg);
    engine.collective().barrier()?;
    let start = Instant::now();
    ckpt.save(engine, state).map_err(ckpt_err)?;
    let stall = start.elapsed().as_secs_f64();
    while ckpt.busy() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let write = start.elapsed().as_secs_f64();
    ckpt.finish(engine.collective()).map_err(ckpt_err)?;
    let rank = engine.collective().rank();
    let object = url.join(step_dir(1)).join(format!("rank-{rank:05}.bin"));
    let bytes = std::fs::metadata(&object).map_err(io)?.len();
    // The disk's raw write bandwidth for the same size, same directory, flushed.
    let raw_path = dir.join(format!("raw-{rank}.bin"));
    let data = vec![7u8; bytes as usize];
    let raw_start = Instant::now();
    let raw_synced = {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw_path).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        let buffered = raw_start.elapsed().as_secs_f64();
        f.sync_all().map_err(io)?;
        (buffered, raw_start.elapsed().as_secs_f64())
    };
    let (raw, synced) = raw_synced;
    let _ = std::fs::remove_file(&raw_path);
    let mb = bytes as f64 / 1e6;
    Ok(CheckpointBench {
        bytes_per_rank: bytes,
        stall_seconds: stall,
        write_seconds: write,
        write_mb_per_second: mb / write,
        raw_disk_mb_per_second: mb / raw,
        raw_disk_synced_mb_per_second: mb / synced,
    })
}
