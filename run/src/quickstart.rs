//! `radit quickstart`, as a library call: a synthetic dataset, sharded into a store and verified, then the
//! embedded default job run with `radit run` (or, `latent`, random weights of the tiny autoencoder, an encode job
//! and a latent training job). Each stage is reported as it starts; the caller prints.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

use radit_coordinator::RestartPolicy;
use radit_jobs::encode::EncodeConfig;
use radit_jobs::train::{TrainConfig, TrainError};
use radit_sharding::ShardError;
use radit_sharding::ingest::{IngestOutcome, RunOptions, ingest};
use radit_sharding::layout::StoreLayout;
use radit_sharding::manifest::{IngestSettings, verify};
use radit_sharding::store::Storage;
use radit_sharding::synth::{SynthConfig, generate};

use crate::job::{
    CoordinatorSpec, Job, JobError, JobKind, JobSection, JobSpec, LauncherKind, LauncherSpec,
    MonitoringSpec, Resources, SampleSpec, SlurmSpec, Work,
};
use crate::workflow::{RunEnd, RunError, run_job};

/// What `radit quickstart` makes, and where.
#[derive(Debug, Clone)]
pub struct Quickstart {
    /// Working directory for the synthetic dataset, the store, the jobs and their runs.
    pub dir: PathBuf,
    pub images: u64,
    /// Side of the stored images (the model's input size).
    pub image_size: u32,
    pub steps: u64,
    /// CPU ranks.
    pub ranks: u32,
    /// The latent path (autoencoder, encode job, latent training).
    pub latent: bool,
    /// Stop once the store is verified.
    pub no_train: bool,
}

/// What the quickstart has to say as it goes.
#[derive(Debug)]
pub enum Said<'a> {
    /// A stage starting, or a result ("done: ...").
    Stage(String),
    /// A job's end, as `radit run` reports it.
    RunEnded(&'a RunEnd),
}

/// Why the quickstart could not finish.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error("--image-size {0}: the tiny autoencoder halves it, so --latent needs an even size")]
    OddLatentSize(u32),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the synthetic dataset or its store")]
    Store(#[from] ShardError),
    #[error("ingest stopped before completing")]
    Incomplete,
    #[error("store {store} has {} problem(s): {}", problems.len(), problems.join("; "))]
    Unverified {
        store: String,
        problems: Vec<String>,
    },
    #[error("the embedded job")]
    Spec(#[from] TrainError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("writing the job file {}", path.display())]
    JobFile {
        path: PathBuf,
        #[source]
        source: toml::ser::Error,
    },
    #[error("the tiny autoencoder's weights")]
    Weights(#[from] radit_models::model::ModelError),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Runs the quickstart; `radit` is the binary its jobs' ranks run, `signal` as for [`run_job`]. Returns the exit
/// code of its last stage (a job that fails or is stopped ends it early).
pub fn quickstart(
    q: &Quickstart,
    radit: &Path,
    signal: &AtomicUsize,
    say: &mut dyn FnMut(Said),
) -> Result<u8, QuickstartError> {
    if q.latent && !q.image_size.is_multiple_of(2) {
        return Err(QuickstartError::OddLatentSize(q.image_size));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QuickstartError::Io { path, source }
    };
    std::fs::create_dir_all(&q.dir).map_err(io(&q.dir))?;
    let dir = std::fs::canonicalize(&q.dir).map_err(io(&q.dir))?;
    let (data, store) = (dir.join("synthetic"), dir.join("store"));
    let store_url = store.display().to_string();
    let of = if q.latent { 6 } else { 4 };
    say(Said::Stage(format!(
        "1/{of} synthesising {} images into {}",
        q.images,
        data.display()
    )));
    let cfg = SynthConfig {
        images: q.images,
        ..SynthConfig::default()
    };
    let out = generate(&data, &cfg)?;
    say(Said::Stage(format!(
        "2/{of} sharding into {}",
        store.display()
    )));
    let settings = IngestSettings {
        layout: StoreLayout {
            image_size: q.image_size,
            shard_images: 16,
            ..StoreLayout::default()
        },
        ..IngestSettings::default()
    };
    let opts = RunOptions {
        progress: true,
        ..RunOptions::default()
    };
    let IngestOutcome::Complete { manifest, .. } =
        ingest(&out.table, &out.images, &store_url, &settings, &opts)?
    else {
        return Err(QuickstartError::Incomplete);
    };
    say(Said::Stage(manifest.summary().trim_end().to_string()));
    say(Said::Stage(format!("3/{of} verifying")));
    let storage = Storage::open_existing(&store_url).map_err(ShardError::from)?;
    let report = verify(&storage)?;
    if !report.ok() {
        return Err(QuickstartError::Unverified {
            store: store_url,
            problems: report.problems,
        });
    }
    say(Said::Stage(format!(
        "store {} verified: {} objects, {:.1} MiB match the manifest",
        storage.url(),
        report.objects_checked,
        report.bytes_checked as f64 / 1048576.0
    )));
    let run = |spec: &JobSpec, file: &Path, say: &mut dyn FnMut(Said)| {
        let text = format!(
            "# Written by `radit quickstart`: an embedded default job. Run it again with `radit run {}`.\n{}",
            file.display(),
            spec.to_toml().map_err(|source| QuickstartError::JobFile {
                path: file.to_path_buf(),
                source
            })?
        );
        std::fs::write(file, text).map_err(io(file))?;
        let end = run_job(&Job::load(file)?, radit, false, signal)?;
        say(Said::RunEnded(&end));
        Ok::<u8, QuickstartError>(end.exit_code())
    };
    if q.latent {
        let weights = dir.join("tiny-ae.safetensors");
        say(Said::Stage(format!(
            "4/6 random weights of the tiny autoencoder (FLUX.2's topology) in {}",
            weights.display()
        )));
        radit_models::autoencoder::write_random(
            &radit_models::autoencoder::AeConfig::tiny().into(),
            0,
            &weights,
        )?;
        // Relative to the job files beside it, as every path they hold: the folder can be copied or moved.
        let (encode, train) = latent_specs(
            q.image_size,
            q.steps,
            q.ranks,
            Path::new("tiny-ae.safetensors"),
        )?;
        let (encode_job, train_job) = (dir.join("encode-job.toml"), dir.join("latent-job.toml"));
        say(Said::Stage(format!(
            "5/6 encoding {} with `radit run {}` ({} CPU ranks)",
            store.display(),
            encode_job.display(),
            q.ranks
        )));
        let code = run(&encode, &encode_job, say)?;
        if code != 0 {
            return Ok(code);
        }
        say(Said::Stage(format!(
            "6/6 training tiny-latent with `radit run {}` ({} CPU ranks, {} steps)",
            train_job.display(),
            q.ranks,
            q.steps
        )));
        let code = run(&train, &train_job, say)?;
        if code == 0 {
            say(Said::Stage(format!(
                "done: decoded samples in {} (latents.safetensors beside them), decoded sheets drawn while \
                 training in {}. The autoencoder's weights are random, so the decoded images are noise: this \
                 shows the latent path working end to end, not what a trained RadVAE decodes",
                dir.join("run-latent/samples").display(),
                dir.join("run-latent/samples/progress").display(),
            )));
        }
        return Ok(code);
    }
    if q.no_train {
        say(Said::Stage(format!(
            "done: the store is {} (--no-train)",
            store.display()
        )));
        return Ok(0);
    }
    let job = dir.join("job.toml");
    let spec = train_spec(q.image_size, q.steps, q.ranks)?;
    say(Said::Stage(format!(
        "4/4 training with `radit run {}` ({} CPU ranks, {} steps)",
        job.display(),
        q.ranks,
        q.steps
    )));
    let code = run(&spec, &job, say)?;
    if code == 0 {
        say(Said::Stage(format!(
            "done: samples in {}, sheets drawn while training in {}; the store opens with zarr-python: \
             zarr.open_group('{}', mode='r')",
            dir.join("run/samples/contact_sheet.png").display(),
            dir.join("run/samples/progress").display(),
            store.display()
        )));
    }
    Ok(code)
}

/// The embedded default job of `radit quickstart`: a small RadiT on the synthetic store `dir/store`, `ranks` CPU
/// ranks on this machine, checkpoints in `dir/checkpoints`, the run in `dir/run`.
pub fn train_spec(image_size: u32, steps: u64, ranks: u32) -> Result<JobSpec, TrainError> {
    use radit_engine::checkpoint::CheckpointConfig;
    use radit_engine::fsdp::{AdamConfig, EngineConfig};
    use radit_jobs::train::{DataConfig, LoopConfig, ModelChoice};
    use radit_models::flow::FlowConfig;
    use radit_models::model::RadiTConfig;
    let model = RadiTConfig {
        input_size: i64::from(image_size),
        ..RadiTConfig::preset("tiny")?
    };
    Ok(JobSpec {
        work: Work::Train(Box::new(TrainConfig {
            data: DataConfig {
                window_shards: 4,
                ..DataConfig::new("store")
            },
            model: ModelChoice {
                preset: None,
                config: Some(model),
                unet: None,
                vae: None,
                finetune: None,
                predictor: None,
                input_size: None,
            },
            flow: FlowConfig {
                shift: 3.0,
                ..FlowConfig::default()
            },
            reconstruction: None,
            // A short run: the EMA has to forget the initial weights within a few hundred steps (the XL run
            // uses 0.9999).
            engine: EngineConfig {
                ema_decay: 0.99,
                adam: AdamConfig {
                    lr: 0.002,
                    ..AdamConfig::default()
                },
                ..EngineConfig::default()
            },
            train: LoopConfig {
                steps,
                global_batch: 32,
                micro_batches: 1,
                seed: 1,
                log_every: 50,
                rollback_after_skips: 3,
            },
            checkpoint: Some(CheckpointConfig {
                url: "checkpoints".into(),
                every: 100,
                keep: 2,
            }),
            preview: None,
            // The validation split's loss every 100 steps (in metrics.csv and the logs): whether it generalises.
            validation: Some(radit_jobs::train::validate::ValidationConfig {
                every: 100,
                images: 0,
                batch: 32,
                times: 8,
                seed: 0,
                split: radit_sharding::split::Split::Val,
                ema: true,
                fd: None,
                best: None,
            }),
        })),
        job: JobSection {
            name: "quickstart".into(),
            kind: JobKind::Train,
            run_dir: "run".into(),
        },
        resources: Resources {
            nodes: 1,
            gpus_per_node: None,
            cpu_ranks: Some(ranks),
            threads_per_rank: Some(1),
            cpus_per_task: None,
        },
        launcher: LauncherSpec {
            kind: LauncherKind::Local,
            mpirun_args: Vec::new(),
            slurm: SlurmSpec::default(),
        },
        restart: RestartPolicy {
            max_restarts: 2,
            heartbeat_seconds: 1.0,
            hang_min_seconds: 60.0,
            ..RestartPolicy::default()
        },
        coordinator: CoordinatorSpec::default(),
        monitoring: MonitoringSpec {
            progress_seconds: 5.0,
            ..MonitoringSpec::default()
        },
        // A contact sheet of the EMA's samples every 100 steps (samples/progress/), to watch it learn.
        samples: SampleSpec {
            count: 16,
            steps: 32,
            every: 100,
            decoder: None,
        },
    })
}

/// The latent quickstart's two jobs on the store `store` of `image_size` images: an encode job with the tiny
/// autoencoder's `weights` on `ranks` CPU ranks, then `tiny-latent` trained on its latents (the autoencoder halves
/// the side), with the same autoencoder decoding the sheets and samples. Runs in `run-encode` and `run-latent`; every
/// path relative to the job files' folder.
pub fn latent_specs(
    image_size: u32,
    steps: u64,
    ranks: u32,
    weights: &Path,
) -> Result<(JobSpec, JobSpec), TrainError> {
    use radit_models::autoencoder::DecoderConfig;
    use radit_models::model::RadiTConfig;
    let mut train = train_spec(image_size, steps, ranks)?;
    let Work::Train(t) = &mut train.work else {
        unreachable!("quickstart is a training job")
    };
    t.model.config = Some(RadiTConfig {
        input_size: i64::from(image_size / 2),
        ..RadiTConfig::preset("tiny-latent")?
    });
    // Table 11: no time shift for the latent models.
    t.flow.shift = 1.0;
    if let Some(c) = &mut t.checkpoint {
        c.url = "checkpoints-latent".into();
    }
    train.job = JobSection {
        name: "quickstart-latent".into(),
        kind: JobKind::Train,
        run_dir: "run-latent".into(),
    };
    train.samples.decoder = Some(DecoderConfig {
        weights: weights.to_path_buf(),
        autoencoder: "tiny".into(),
        batch: 8,
    });
    let encode = JobSpec {
        work: Work::Encode(EncodeConfig {
            autoencoder: "tiny".into(),
            batch: 8,
            ..EncodeConfig::new("store", weights)
        }),
        job: JobSection {
            name: "quickstart-encode".into(),
            kind: JobKind::Encode,
            run_dir: "run-encode".into(),
        },
        samples: SampleSpec::default(),
        ..train.clone()
    };
    Ok((encode, train))
}
