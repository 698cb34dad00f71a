//! `radit data batches`: the audit of which images each rank sees at each step.

mod common;

use common::*;

fn batches(store: &str, world: u64, rank: u64, from: u64, steps: u64) -> Vec<(u64, Vec<String>)> {
    let out = run_ok(
        radit()
            .args([
                "data",
                "batches",
                store,
                "--seed",
                "5",
                "--global-batch",
                "12",
            ])
            .args([
                "--window-shards",
                "2",
                "--world",
                &world.to_string(),
                "--rank",
                &rank.to_string(),
                "--from-step",
                &from.to_string(),
                "--steps",
                &steps.to_string(),
            ]),
    );
    stdout(&out)
        .lines()
        .map(|l| {
            let (step, ids) = l.split_once(": ").expect("`step K: ids`");
            let step = step
                .strip_prefix("step ")
                .expect("starts with step")
                .parse()
                .expect("step number");
            (step, ids.split(' ').map(String::from).collect())
        })
        .collect()
}

#[test]
fn every_world_size_sees_the_same_global_batches_and_an_epoch_covers_the_split_once() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 120, "64x64", &["--split-column"]);
    let store = shard_into(dir.path(), &table, &images);
    let store = store.to_str().unwrap();
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open(store).unwrap(),
    )
    .unwrap();
    let train = reader
        .read_split(radit_sharding::split::Split::Train)
        .unwrap()
        .image_ids;

    let single = batches(store, 1, 0, 3, 4);
    assert_eq!(
        single.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    for world in [2u64, 3, 4] {
        let per_rank: Vec<_> = (0..world).map(|r| batches(store, world, r, 3, 4)).collect();
        for (i, (step, ids)) in single.iter().enumerate() {
            let joined: Vec<String> = per_rank.iter().flat_map(|r| r[i].1.clone()).collect();
            assert_eq!(&joined, ids, "world {world}, step {step}");
            assert!(per_rank.iter().all(|r| r[i].1.len() == 12 / world as usize));
        }
    }
    // One epoch of steps covers every training image; the ids are the store's.
    let steps = (train.len() as u64).div_ceil(12);
    let mut seen: Vec<String> = batches(store, 1, 0, 0, steps)
        .into_iter()
        .flat_map(|s| s.1)
        .collect();
    seen.truncate(train.len());
    seen.sort();
    let mut expected = train.clone();
    expected.sort();
    assert_eq!(seen, expected);
}

#[test]
fn a_batch_that_does_not_divide_by_the_world_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 20, "64x64", &[]);
    let store = shard_into(dir.path(), &table, &images);
    let out = radit()
        .args([
            "data",
            "batches",
            store.to_str().unwrap(),
            "--seed",
            "1",
            "--global-batch",
            "12",
            "--world",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("divisible by the world size (5)"),
        "{}",
        stderr(&out)
    );
}
