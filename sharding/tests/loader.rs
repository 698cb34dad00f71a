//! The streaming loader against a real store: order, contents, world-size independence, resume, dequantisation,
//! the node-local cache and bad shards.

use std::path::Path;

use radit_sharding::ingest::{IngestOutcome, RunOptions, ingest};
use radit_sharding::layout::{Compression, StoreLayout};
use radit_sharding::loader::{
    Batch, CacheConfig, Inputs, Loader, LoaderConfig, ModelInput, NodeCache, Pass,
};
use radit_sharding::manifest::IngestSettings;
use radit_sharding::order::SampleOrder;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use radit_sharding::synth::{SynthConfig, generate};
use radit_sharding::table::TableConfig;

const SIZE: usize = 32;

fn store(dir: &Path, images: u64) -> String {
    let cfg = SynthConfig {
        images,
        seed: 2,
        sizes: vec![(32, 32), (40, 36)],
        ..SynthConfig::default()
    };
    let data = generate(&dir.join("data"), &cfg).unwrap();
    let settings = IngestSettings {
        layout: StoreLayout {
            image_size: SIZE as u32,
            shard_images: 8,
            compression: Compression::Zstd { level: 1 },
        },
        table: TableConfig::default(),
        ..IngestSettings::default()
    };
    let out = dir.join("store");
    let outcome = ingest(
        &data.table,
        &data.images,
        out.to_str().unwrap(),
        &settings,
        &RunOptions::default(),
    )
    .unwrap();
    assert!(matches!(outcome, IngestOutcome::Complete { .. }));
    out.to_str().unwrap().to_string()
}

fn config(world: u64, rank: u64) -> LoaderConfig {
    LoaderConfig {
        seed: 11,
        window_shards: 2,
        global_batch: 12,
        world,
        rank,
        output: ModelInput::U16,
        ..LoaderConfig::default()
    }
}

fn take(url: &str, cfg: LoaderConfig, from: u64, n: usize) -> Vec<Batch> {
    let mut loader = Loader::open(Storage::open_existing(url).unwrap(), cfg, from).unwrap();
    (0..n)
        .map(|_| loader.next_batch().unwrap().unwrap())
        .collect()
}

fn u16s(b: &Batch) -> &[u16] {
    match &b.inputs {
        Inputs::U16(p) => p,
        Inputs::F32(_) => panic!("expected u16 pixels"),
    }
}

#[test]
fn batches_follow_the_order_and_hold_the_stored_samples() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 100);
    let reader = StoreReader::open(Storage::open_existing(&url).unwrap()).unwrap();
    let all = reader.read_split(Split::Train).unwrap();
    let order = SampleOrder::new(reader.order_config(Split::Train, 11, 2, 12)).unwrap();
    // Past the end of the first epoch too.
    let steps = (all.rows / 12 + 3) as usize;
    for b in take(&url, config(1, 0), 0, steps) {
        assert_eq!(b.indices, order.global_batch(b.step));
        for (k, &i) in b.indices.iter().enumerate() {
            let i = i as usize;
            assert_eq!(b.image_ids[k], all.image_ids[i]);
            assert_eq!(
                &b.labels[k * 18..(k + 1) * 18],
                &all.labels[i * 18..(i + 1) * 18]
            );
            assert_eq!(b.age[k].to_bits(), all.age[i].to_bits());
            let px = SIZE * SIZE;
            assert_eq!(
                &u16s(&b)[k * px..(k + 1) * px],
                &all.images[i * px..(i + 1) * px]
            );
        }
    }
}

#[test]
fn any_world_size_sees_the_same_global_batches_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 90);
    let single = take(&url, config(1, 0), 0, 10);
    for world in [2u64, 3, 4] {
        // Resume at step 4 on this world size: must equal the uninterrupted single-rank run from step 4.
        let ranks: Vec<Vec<Batch>> = (0..world)
            .map(|r| take(&url, config(world, r), 4, 6))
            .collect();
        for (k, b) in single[4..].iter().enumerate() {
            let ids: Vec<String> = ranks.iter().flat_map(|r| r[k].image_ids.clone()).collect();
            let px: Vec<u16> = ranks.iter().flat_map(|r| u16s(&r[k]).to_vec()).collect();
            assert_eq!(ids, b.image_ids, "world {world}, step {}", b.step);
            assert_eq!(px, u16s(b), "world {world}, step {}", b.step);
        }
    }
    let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), config(2, 1), 7).unwrap();
    loader.next_batch().unwrap().unwrap();
    loader.next_batch().unwrap().unwrap();
    assert_eq!(loader.state().step, 9);
}

#[test]
fn dequantised_pixels_are_reproducible_and_stay_in_their_bin() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 40);
    let f32_cfg = LoaderConfig {
        output: ModelInput::Dequantised,
        ..config(1, 0)
    };
    let a = take(&url, f32_cfg.clone(), 2, 2);
    let b = take(&url, f32_cfg, 2, 2);
    let raw = take(&url, config(1, 0), 2, 2);
    assert_eq!(a, b, "same (seed, step) gives the same noise");
    for (d, r) in a.iter().zip(&raw) {
        let Inputs::F32(x) = &d.inputs else {
            panic!("f32 expected")
        };
        let mut fractional = 0.0f64;
        for (v, n) in x.iter().zip(u16s(r)) {
            assert!((-1.0..1.0).contains(v));
            let back = (f64::from(*v) + 1.0) * 32768.0; // = n + u, to f32 precision (8 fractional bits near 65535)
            assert!(
                (back - (f64::from(*n) + 0.5)).abs() <= 0.5 + 1.0 / 128.0,
                "{back} vs {n}"
            );
            fractional += back - back.floor();
        }
        let mean = fractional / x.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "u ~ U[0,1): mean {mean}");
    }
    let (s2, s3) = (&a[0], &a[1]);
    let Inputs::F32(x2) = &s2.inputs else {
        unreachable!()
    };
    let Inputs::F32(x3) = &s3.inputs else {
        unreachable!()
    };
    assert_ne!(x2[..16], x3[..16], "fresh noise every step");

    // The noise belongs to the sample, not the rank: two ranks resumed at step 2 join to the same inputs.
    let halves: Vec<Batch> = (0..2)
        .map(|r| {
            let cfg = LoaderConfig {
                output: ModelInput::Dequantised,
                ..config(2, r)
            };
            take(&url, cfg, 2, 1).remove(0)
        })
        .collect();
    let joined: Vec<f32> = halves
        .iter()
        .flat_map(|b| match &b.inputs {
            Inputs::F32(x) => x.clone(),
            Inputs::U16(_) => unreachable!(),
        })
        .collect();
    assert!(joined == *x2, "world 2 dequantises exactly like world 1");
}

/// A node cache of 1 GiB in `dir/cache`, and the one-rank loader config that uses it.
fn cached(dir: &Path) -> (CacheConfig, LoaderConfig) {
    let cache = CacheConfig {
        dir: dir.join("cache"),
        max_bytes: 1 << 30,
    };
    let cfg = LoaderConfig {
        cache: Some(cache.clone()),
        ..config(1, 0)
    };
    (cache, cfg)
}

#[test]
fn the_second_epoch_reads_from_the_node_local_cache() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 64);
    let (_, cfg) = cached(dir.path());
    let epoch_steps = 64u64.div_ceil(12) as usize + 1;
    let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), cfg.clone(), 0).unwrap();
    for _ in 0..epoch_steps {
        loader.next_batch().unwrap().unwrap();
    }
    let first = loader.stats();
    assert!(first.bytes_read > 0 && first.cache_misses > 0);
    drop(loader);
    // A new process on the same node: everything is local now.
    let mut again = Loader::open(Storage::open_existing(&url).unwrap(), cfg, 0).unwrap();
    for _ in 0..epoch_steps {
        again.next_batch().unwrap().unwrap();
    }
    let second = again.stats();
    assert_eq!(second.bytes_read, 0, "{second:?}");
    assert_eq!(second.cache_hit_ratio(), 1.0);
    assert_eq!(second.steps, epoch_steps as u64);

    // A small limit evicts: the cache never holds more than it may.
    let small = CacheConfig {
        dir: dir.path().join("small"),
        max_bytes: 20_000,
    };
    let mut tight = Loader::open(
        Storage::open_existing(&url).unwrap(),
        LoaderConfig {
            cache: Some(small.clone()),
            ..config(1, 0)
        },
        0,
    )
    .unwrap();
    for _ in 0..epoch_steps {
        tight.next_batch().unwrap().unwrap();
    }
    // Dropping the loader waits for its prefetch thread, so the directory is settled.
    drop(tight);
    let used = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    assert!(used(&small.dir) <= small.max_bytes, "{}", used(&small.dir));
    // A restart with a smaller limit trims what earlier processes left.
    let smaller = CacheConfig {
        max_bytes: 8_000,
        ..small
    };
    let before = used(&smaller.dir);
    assert!(
        before > smaller.max_bytes,
        "the test needs a cache above the new limit ({before})"
    );
    let reopened = NodeCache::open(smaller.clone()).unwrap();
    assert!(reopened.used_bytes() <= smaller.max_bytes);
    assert_eq!(used(&smaller.dir), reopened.used_bytes());
}

#[test]
fn a_missing_shard_is_named_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 48);
    std::fs::remove_file(Path::new(&url).join("train/images/c/1/0/0")).unwrap();
    let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), config(1, 0), 0).unwrap();
    let mut error = None;
    for _ in 0..8 {
        if let Err(e) = loader.next_batch() {
            error = Some(e.to_string());
            break;
        }
    }
    let error = error.expect("a batch touching shard 1 fails");
    assert!(error.contains("train/images/c/1/0/0"), "{error}");

    let skip = LoaderConfig {
        skip_bad_shards: true,
        ..config(1, 0)
    };
    let batches = take(&url, skip, 0, 8);
    let skipped: u64 = batches.iter().map(|b| b.skipped).sum();
    let reader = StoreReader::open(Storage::open_existing(&url).unwrap()).unwrap();
    let order = SampleOrder::new(reader.order_config(Split::Train, 11, 2, 12)).unwrap();
    let expected = (0..8)
        .flat_map(|s| order.global_batch(s))
        .filter(|i| i / 8 == 1)
        .count() as u64;
    assert!(expected > 0);
    assert_eq!(
        skipped, expected,
        "every sample of shard 1 is skipped and counted"
    );
    assert!(batches.iter().all(|b| b.indices.iter().all(|i| i / 8 != 1)));
}

#[test]
fn evaluation_covers_the_split_once_and_every_rank_runs_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 100);
    let reader = StoreReader::open(Storage::open_existing(&url).unwrap()).unwrap();
    let all = reader.read_split(Split::Train).unwrap();
    for world in [1u64, 2, 3, 4] {
        let mut seen: Vec<String> = Vec::new();
        let mut steps = Vec::new();
        let mut per_step: Vec<Vec<String>> = Vec::new();
        for rank in 0..world {
            let cfg = LoaderConfig {
                pass: Pass::Eval,
                ..config(world, rank)
            };
            let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), cfg, 0).unwrap();
            let mut n = 0;
            while let Some(b) = loader.next_batch().unwrap() {
                assert_eq!(
                    b.len() as u64,
                    12 / world,
                    "every step is full on every rank"
                );
                if per_step.len() <= n {
                    per_step.push(Vec::new());
                }
                for (id, real) in b.image_ids.iter().zip(&b.valid) {
                    if *real {
                        per_step[n].push(id.clone());
                    }
                }
                n += 1;
            }
            assert!(
                loader.next_batch().unwrap().is_none(),
                "the pass stays ended"
            );
            assert_eq!(Some(n as u64), loader.eval_steps());
            steps.push(n);
        }
        assert!(
            steps.iter().all(|&n| n == steps[0]),
            "world {world}: {steps:?}"
        );
        for ids in per_step {
            seen.extend(ids);
        }
        // Stored order, each image exactly once.
        assert_eq!(seen, all.image_ids, "world {world}");
    }
}

/// Flips one bit in the middle of `path`: same size, so only the checksum can tell.
fn flip_a_bit(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x04;
    std::fs::write(path, data).unwrap();
}

/// The first `n` batches' (indices, pixels).
fn contents(batches: &[Batch]) -> Vec<(Vec<u64>, Vec<u16>)> {
    batches
        .iter()
        .map(|b| (b.indices.clone(), u16s(b).to_vec()))
        .collect()
}

#[test]
fn a_damaged_shard_is_named_by_its_checksum_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 48);
    flip_a_bit(&Path::new(&url).join("train/images/c/1/0/0"));
    let quick = LoaderConfig {
        object_attempts: 2,
        ..config(1, 0)
    };
    let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), quick.clone(), 0).unwrap();
    let error = (0..8)
        .find_map(|_| loader.next_batch().err())
        .expect("a batch touching shard 1 fails")
        .to_string();
    assert!(
        error.contains("train/images/c/1/0/0")
            && error.contains("fails its sha256 check")
            && error.contains("after 2 attempt(s)"),
        "{error}"
    );
    let skip = LoaderConfig {
        skip_bad_shards: true,
        ..quick
    };
    let batches = take(&url, skip, 0, 8);
    assert!(batches.iter().map(|b| b.skipped).sum::<u64>() > 0);
    assert!(batches.iter().all(|b| b.indices.iter().all(|i| i / 8 != 1)));
}

#[test]
fn a_shard_missing_for_a_moment_is_read_again_and_the_batches_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 48);
    let straight = contents(&take(&url, config(1, 0), 0, 8));
    // Shard 1 disappears and comes back 0.3 s later (an object being rewritten, a flaky mount): the loader's
    // second or third read finds it.
    let shard = Path::new(&url).join("train/images/c/1/0/0");
    let aside = dir.path().join("aside");
    std::fs::rename(&shard, &aside).unwrap();
    let restore = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::rename(&aside, &shard).unwrap();
    });
    let again = contents(&take(&url, config(1, 0), 0, 8));
    restore.join().unwrap();
    assert_eq!(again, straight);
}

#[test]
fn a_damaged_cached_copy_is_evicted_and_read_again_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path(), 48);
    let (cache, cfg) = cached(dir.path());
    let straight = contents(&take(&url, cfg.clone(), 0, 8));
    let cached = cache.dir.join("train%images%c%1%0%0");
    assert!(cached.exists(), "the cache holds shard 1");
    flip_a_bit(&cached);
    let mut loader = Loader::open(Storage::open_existing(&url).unwrap(), cfg, 0).unwrap();
    let again: Vec<Batch> = (0..8)
        .map(|_| loader.next_batch().unwrap().unwrap())
        .collect();
    assert_eq!(contents(&again), straight);
    // Only the damaged copy was read from the store again, and the cache now holds a good one.
    let stats = loader.stats();
    assert_eq!(
        stats.bytes_read,
        std::fs::metadata(Path::new(&url).join("train/images/c/1/0/0"))
            .unwrap()
            .len(),
        "{stats:?}"
    );
}
