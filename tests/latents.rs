//! Latent models: a store gains `<split>/latents` from a Python encoder job (zarr-python), and the loader hands
//! out those latents, standardised per channel, with the same order and metadata as the images.

mod common;

use common::*;
use radit_sharding::loader::{Inputs, Loader, LoaderConfig, ModelInput, Pass};
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;

/// The values tests/python/write_latents.py writes, rounded to float16 as numpy does.
fn expected(n: u64, c: usize, h: usize, w: usize, size: usize) -> f32 {
    let pos = (h * size + w) as f64;
    let v = ((n as f64) + 0.1 * c as f64 + 0.01 * pos).sin() * (c as f64 + 1.0) + c as f64;
    f32::from(half::f16::from_f64(v))
}

fn write_latents(store: &std::path::Path, extra: &[&str]) {
    run_ok(
        python()
            .arg(repo().join("tests/python/write_latents.py"))
            .arg("--store")
            .arg(store)
            .args(extra),
    );
}

#[test]
fn the_loader_reads_latents_written_by_zarr_python() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 60, "64x64", &[]);
    let store = shard_into(dir.path(), &table, &images);
    let url = store.to_str().unwrap();

    // Before the encoder ran, a latent model is told what is missing.
    let latents_cfg = LoaderConfig {
        output: ModelInput::Latents,
        global_batch: 8,
        seed: 4,
        window_shards: 2,
        ..LoaderConfig::default()
    };
    let err = Loader::open(Storage::open_existing(url).unwrap(), latents_cfg.clone(), 0)
        .err()
        .expect("no latents yet")
        .to_string();
    assert!(err.contains("train/latents"), "{err}");

    write_latents(&store, &["--channels", "4", "--size", "8"]);
    let reader = StoreReader::open(Storage::open_existing(url).unwrap()).unwrap();
    let rows = reader.len(Split::Train);
    let (mean, std) = {
        let l = reader.latents(Split::Train).unwrap().expect("latents");
        assert_eq!(l.sample_shape, [4, 8, 8]);
        (l.channel_mean.clone(), l.channel_std.clone())
    };
    let all = reader.read_split(Split::Train).unwrap();

    // Training pass: the same samples as the image loader, inputs are the standardised latents.
    let mut loader =
        Loader::open(Storage::open_existing(url).unwrap(), latents_cfg.clone(), 0).unwrap();
    let mut images = Loader::open(
        Storage::open_existing(url).unwrap(),
        LoaderConfig {
            output: ModelInput::U16,
            ..latents_cfg.clone()
        },
        0,
    )
    .unwrap();
    assert_eq!(loader.sample_shape(), [4, 8, 8]);
    let mut sum = [0f64; 4];
    let mut count = 0usize;
    for _ in 0..rows.div_ceil(8) + 2 {
        let b = loader.next_batch().unwrap().unwrap();
        let twin = images.next_batch().unwrap().unwrap();
        assert_eq!(b.indices, twin.indices);
        assert_eq!(b.labels, twin.labels);
        assert_eq!(b.sample_shape, [4, 8, 8]);
        let Inputs::F32(x) = &b.inputs else {
            panic!("latents are f32")
        };
        assert_eq!(x.len(), b.len() * 4 * 64);
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.image_ids[k], all.image_ids[i as usize]);
            for c in 0..4 {
                for p in 0..64 {
                    let stored = expected(i, c, p / 8, p % 8, 8);
                    let want = (stored - mean[c]) / std[c];
                    let got = x[k * 256 + c * 64 + p];
                    // Exact ties may round to either neighbouring f16 (numpy and `half` differ there).
                    let ulp = stored.abs().max(1e-4) / 1024.0 / std[c];
                    assert!(
                        (got - want).abs() <= ulp + 1e-5,
                        "sample {i} c{c} p{p}: {got} vs {want}"
                    );
                    sum[c] += f64::from(got);
                }
            }
            count += 1;
        }
    }
    // Standardised with the statistics of the stored values: about zero mean per channel.
    for s in sum {
        assert!((s / (count as f64 * 64.0)).abs() < 0.2, "{sum:?}");
    }

    // An evaluation pass over latents covers the split once.
    let mut eval = Loader::open(
        Storage::open_existing(url).unwrap(),
        LoaderConfig {
            pass: Pass::Eval,
            ..latents_cfg.clone()
        },
        0,
    )
    .unwrap();
    let mut seen = 0;
    while let Some(b) = eval.next_batch().unwrap() {
        seen += b.valid.iter().filter(|v| **v).count() as u64;
    }
    assert_eq!(seen, rows);
}

#[test]
fn latents_chunked_across_channels_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 24, "64x64", &[]);
    let store = shard_into(dir.path(), &table, &images);
    write_latents(&store, &["--bad-chunks"]);
    let err = latents_open_error(&store);
    assert!(
        err.contains("train/latents/zarr.json") && err.contains("chunked"),
        "{err}"
    );
}
