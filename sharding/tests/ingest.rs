//! Ingest end to end at library level: synthetic data -> store -> read back, resume, verify, bad input.

use std::collections::HashMap;
use std::path::Path;

use radit_sharding::ShardError;
use radit_sharding::image::{decode_dicom, decode_png, letterbox, normalise_full_range};
use radit_sharding::ingest::{IngestOutcome, RunOptions, ingest};
use radit_sharding::layout::{Compression, StoreLayout};
use radit_sharding::manifest::{IngestSettings, Manifest, verify};
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use radit_sharding::synth::{Defect, SynthConfig, SynthOutput, generate};
use radit_sharding::table::{TableConfig, read_table};

fn settings(size: u32, shard: u32) -> IngestSettings {
    IngestSettings {
        layout: StoreLayout {
            image_size: size,
            shard_images: shard,
            compression: Compression::Zstd { level: 3 },
        },
        table: TableConfig::default(),
        ..IngestSettings::default()
    }
}

fn synth(dir: &Path, images: u64, defects: bool) -> SynthOutput {
    let cfg = SynthConfig {
        images,
        seed: 7,
        sizes: vec![(32, 32), (48, 40), (30, 52), (96, 80)],
        defects,
        split_column: false,
    };
    generate(dir, &cfg).unwrap()
}

fn ingest_complete(data: &SynthOutput, out: &Path, s: &IngestSettings) -> Manifest {
    complete(
        ingest(
            &data.table,
            &data.images,
            out.to_str().unwrap(),
            s,
            &RunOptions::default(),
        )
        .unwrap(),
    )
}

fn complete(outcome: IngestOutcome) -> Manifest {
    match outcome {
        IngestOutcome::Complete { manifest, .. } => *manifest,
        IngestOutcome::Interrupted { .. } => panic!("ingest did not complete"),
    }
}

#[test]
fn store_holds_exactly_the_encoded_table_and_the_normalised_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 60, false);
    let out = dir.path().join("store");
    let s = settings(32, 8);
    let m = ingest_complete(&data, &out, &s);
    assert_eq!(m.counts.table_rows, 60);
    assert_eq!(m.counts.accepted, 60);
    assert!(m.rejected.is_empty(), "{:?}", m.rejected);
    assert!(m.image_notes.resized > 0, "some inputs are not 32x32");

    let table = read_table(&data.table, &s.table).unwrap();
    let by_id: HashMap<_, _> = table.rows.iter().map(|r| (r.image_id.clone(), r)).collect();
    let reader = StoreReader::open(Storage::open(out.to_str().unwrap()).unwrap()).unwrap();
    let mut seen = 0;
    for split in Split::ALL {
        let all = reader.read_split(split).unwrap();
        for (i, id) in all.image_ids.iter().enumerate() {
            let row = by_id[id];
            assert_eq!(row.split, split);
            assert_eq!(&all.labels[i * 18..(i + 1) * 18], &row.labels);
            assert_eq!(all.age[i].to_bits(), row.age.to_bits());
            assert_eq!(all.patient_ids[i], row.patient_id);
            let img = &all.images[i * 1024..(i + 1) * 1024];
            let (mut src, _) =
                decode_png(&std::fs::read(data.images.join(&row.path)).unwrap()).unwrap();
            if (src.width, src.height) == (32, 32) {
                normalise_full_range(&mut src).unwrap();
                assert_eq!(
                    img,
                    &src.pixels[..],
                    "{id}: a 32x32 input is stored exactly, normalised"
                );
            } else {
                assert!(
                    *img.iter().max().unwrap() > 50_000,
                    "{id}: resized content keeps its range"
                );
            }
            seen += 1;
        }
        // Table order within a split.
        let lines: Vec<u64> = all.image_ids.iter().map(|id| by_id[id].line).collect();
        assert!(lines.windows(2).all(|w| w[0] < w[1]));
    }
    assert_eq!(seen, 60);
    let report = verify(&Storage::open(out.to_str().unwrap()).unwrap()).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.objects_checked as usize, m.objects.len());
}

#[test]
fn interrupted_ingest_resumes_to_the_same_store_as_a_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 70, true);
    let s = settings(32, 4);
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    let a = ingest_complete(&data, &straight, &s);
    let mut written = 0;
    for _ in 0..3 {
        let opts = RunOptions {
            stop_after_shards: Some(5),
            ..RunOptions::default()
        };
        match ingest(
            &data.table,
            &data.images,
            resumed.to_str().unwrap(),
            &s,
            &opts,
        )
        .unwrap()
        {
            IngestOutcome::Interrupted { written_shards } => written += written_shards,
            IngestOutcome::Complete { .. } => {
                panic!("70 rows in shards of 4 need more than 15 shards")
            }
        }
        assert!(
            !resumed.join("manifest.json").exists(),
            "no manifest before the ingest completes"
        );
    }
    assert_eq!(written, 15);
    let b = match ingest(
        &data.table,
        &data.images,
        resumed.to_str().unwrap(),
        &s,
        &RunOptions::default(),
    )
    .unwrap()
    {
        IngestOutcome::Complete {
            manifest,
            resumed_shards,
            ..
        } => {
            assert_eq!(resumed_shards, 15);
            *manifest
        }
        IngestOutcome::Interrupted { .. } => panic!("not interrupted"),
    };
    assert_eq!(a.counts, b.counts);
    assert_eq!(a.rejected, b.rejected);
    assert_eq!(
        a.objects, b.objects,
        "byte-identical objects: nothing duplicated or dropped"
    );
    // Running again on a complete store changes nothing.
    let c = ingest_complete(&data, &resumed, &s);
    assert_eq!(c, b);
}

#[test]
fn resuming_with_other_settings_or_another_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 20, false);
    let out = dir.path().join("store");
    let s = settings(32, 4);
    let opts = RunOptions {
        stop_after_shards: Some(1),
        ..RunOptions::default()
    };
    ingest(&data.table, &data.images, out.to_str().unwrap(), &s, &opts).unwrap();
    let other = settings(32, 8);
    let e = ingest(
        &data.table,
        &data.images,
        out.to_str().unwrap(),
        &other,
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ShardError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("settings"), "{e}");
    let mut csv = std::fs::read(&data.table).unwrap();
    csv.extend_from_slice(b"\n");
    let table2 = dir.path().join("table2.csv");
    std::fs::write(&table2, csv).unwrap();
    let e = ingest(
        &table2,
        &data.images,
        out.to_str().unwrap(),
        &s,
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("table contents"), "{e}");
    // The partial store is untouched and still resumes with the original inputs.
    ingest_complete(&data, &out, &s);
}

#[test]
fn verify_reports_corrupt_and_missing_objects() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 24, false);
    let out = dir.path().join("store");
    let s = settings(32, 8);
    let m = ingest_complete(&data, &out, &s);
    let chunk = m
        .objects
        .iter()
        .find(|o| o.key.contains("/images/c/"))
        .unwrap();
    let path = out.join(&chunk.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let label = m
        .objects
        .iter()
        .find(|o| o.key.contains("/labels/c/"))
        .unwrap();
    std::fs::remove_file(out.join(&label.key)).unwrap();
    let report = verify(&Storage::open(out.to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&chunk.key) && p.contains("checksum"))
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&label.key) && p.contains("missing"))
    );
    // Without a manifest the store is incomplete.
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let e = verify(&Storage::open(out.to_str().unwrap()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("incomplete"), "{e}");
}

#[test]
fn every_defect_is_handled_as_expected_and_the_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 30, true);
    let defects: Vec<Defect> =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/defects.json")).unwrap())
            .unwrap();
    assert_eq!(defects, data.defects);
    let out = dir.path().join("store");
    let m = ingest_complete(&data, &out, &settings(32, 8));
    let c = &m.counts;
    assert_eq!(c.table_rows, 30 + defects.len() as u64);
    assert_eq!(c.accepted + c.rejected, c.table_rows);
    assert_eq!(c.rejected as usize, m.rejected.len());
    assert_eq!(c.splits.values().map(|s| s.images).sum::<u64>(), c.accepted);
    let reader = StoreReader::open(Storage::open(out.to_str().unwrap()).unwrap()).unwrap();
    let stored: Vec<String> = Split::ALL
        .iter()
        .flat_map(|s| reader.read_split(*s).unwrap().image_ids)
        .collect();
    for d in &defects {
        let rejection = m.rejected.iter().find(|r| r.line == d.line);
        match d.expect.as_str() {
            "rejected" => {
                let r = rejection
                    .unwrap_or_else(|| panic!("{} (line {}) should be rejected", d.kind, d.line));
                let expected = match d.kind.as_str() {
                    "missing_file" => "not found",
                    "truncated_png" | "corrupt_png" => "not a readable PNG",
                    "rgb_png" => "colour image",
                    "zero_size_file" => "zero-size",
                    "blank_image" => "constant image",
                    "duplicate_image_id" => "duplicate image_id",
                    "split_conflict_train" | "split_conflict_test" => "more than one split",
                    "malformed_row" => "malformed row",
                    "non_utf8" => "not valid UTF-8",
                    other => panic!("no expectation for {other}"),
                };
                assert!(r.reason.contains(expected), "{}: {r}", d.kind);
                if r.file.is_some() {
                    assert!(
                        r.to_string().contains(".png"),
                        "image problems name the file: {r}"
                    );
                }
            }
            _ => {
                assert!(
                    rejection.is_none(),
                    "{} should be accepted: {rejection:?}",
                    d.kind
                );
                assert!(stored.contains(&d.image_id), "{} is in the store", d.kind);
            }
        }
    }
    assert_eq!(
        m.image_notes.eight_bit, 2,
        "the 8-bit PNG and the grey-as-RGB one"
    );
    assert_eq!(m.image_notes.grey_stored_as_rgb, 1);
    for kind in [
        "unknown_sex",
        "unknown_race",
        "unknown_view",
        "non_numeric_age",
        "implausible_age",
    ] {
        let w = &m.warnings.0[kind];
        assert_eq!(w.count, 1, "{kind}");
        assert!(w.examples[0].contains("line "), "{kind}: {:?}", w.examples);
    }
}

#[test]
fn whole_input_problems_fail_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 4, false);
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("store");
    let e = ingest(
        &empty,
        &data.images,
        out.to_str().unwrap(),
        &settings(32, 4),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("empty.csv") && e.to_string().contains("empty"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written for an unusable table");
    // An output that cannot be written: a path below a regular file.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = ingest(
        &data.table,
        &data.images,
        blocker.join("store").to_str().unwrap(),
        &settings(32, 4),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ShardError::Storage(radit_sharding::store::StorageError::Unwritable { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("file/store"), "{e}");
    let e = ingest(
        &data.table,
        &dir.path().join("nope"),
        out.to_str().unwrap(),
        &settings(32, 4),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn a_one_thread_pool_completes_with_many_shards_in_flight() {
    // Regression: the producer once blocked a pool thread on the writer's channel while the writer waited for a
    // pool thread to encode, which deadlocked a one-thread pool.
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 40, false);
    let out = dir.path().join("store");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opts = RunOptions {
            threads: Some(1),
            ..RunOptions::default()
        };
        let r = ingest(
            &data.table,
            &data.images,
            out.to_str().unwrap(),
            &settings(32, 2),
            &opts,
        );
        let _ = tx.send(r.map(complete));
    });
    let m = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("ingest finished within 120 s")
        .unwrap();
    assert_eq!(m.counts.accepted, 40);
}

#[test]
fn a_wrong_images_root_is_an_error_not_a_store_of_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 30, false);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.path().join("store");
    let e = ingest(
        &data.table,
        &empty,
        out.to_str().unwrap(),
        &settings(32, 8),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("is this the images root"), "{e}");
    assert!(!out.join("manifest.json").exists());
    // The right root then works on the same output.
    ingest_complete(&data, &out, &settings(32, 8));
}

/// DICOM files are told by their content (here they keep the synthetic `.png` names): decoded through the pixel
/// pipeline, stored as `letterbox` of that, counted in the manifest; a syntax without a decoder and a colour DICOM
/// are rejected naming the file, the row and what is wrong.
#[test]
fn dicom_images_are_decoded_by_content_and_unusable_ones_are_rejected_with_the_reason() {
    use radit_dicom::fixture::Fixture;
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 12, false);
    let s = settings(32, 4);
    let table = read_table(&data.table, &s.table).unwrap();
    let rows = &table.rows;
    // The first four rows' images become DICOMs with the same stored samples, 12 bits in 16.
    let as_dicom = |row: usize, edit: &dyn Fn(&mut Fixture)| {
        let path = data.images.join(&rows[row].path);
        let (png, _) = decode_png(&std::fs::read(&path).unwrap()).unwrap();
        let pixels = png.pixels.iter().map(|&v| v >> 4).collect();
        let mut f = Fixture::grey(png.height as u16, png.width as u16, 12, pixels);
        f.windows = vec![(2048.0, 3000.0)];
        edit(&mut f);
        std::fs::write(&path, f.to_bytes()).unwrap();
    };
    as_dicom(0, &|_| {});
    as_dicom(1, &|f| f.photometric = "MONOCHROME1".into());
    let j2k = data.images.join(&rows[2].path);
    as_dicom(2, &|_| {});
    let bytes = std::fs::read(&j2k).unwrap();
    let declared = radit_dicom::decode(&bytes, &Default::default()).unwrap();
    assert_eq!(declared.notes.transfer_syntax, "1.2.840.10008.1.2.1");
    let (png, _) = decode_png(&std::fs::read(data.images.join(&rows[4].path)).unwrap()).unwrap();
    std::fs::write(
        &j2k,
        Fixture::grey(
            png.height as u16,
            png.width as u16,
            12,
            vec![1; png.pixels.len()],
        )
        .to_bytes_declaring("1.2.840.10008.1.2.4.90"),
    )
    .unwrap();
    as_dicom(3, &|f| {
        f.photometric = "RGB".into();
        f.samples_per_pixel = 3;
    });

    let out = dir.path().join("store");
    let m = ingest_complete(&data, &out, &s);
    assert_eq!(m.counts.accepted, 10, "{:?}", m.rejected);
    assert_eq!(
        (m.image_notes.dicom, m.image_notes.dicom_monochrome1),
        (2, 1)
    );
    assert_eq!(m.image_notes.dicom_windowed, 2);
    assert!(
        m.summary()
            .contains("DICOM: 2 files, 1 MONOCHROME1 inverted, 2 windowed")
    );
    let reasons: HashMap<_, _> = m
        .rejected
        .iter()
        .map(|r| (r.image_id.clone().unwrap(), r.to_string()))
        .collect();
    let j2k_reason = &reasons[&rows[2].image_id];
    if !cfg!(feature = "dicom-j2k") {
        assert!(
            j2k_reason.contains("1.2.840.10008.1.2.4.90")
                && j2k_reason.contains(&format!("line {}", rows[2].line))
                && j2k_reason.contains(&rows[2].path),
            "{j2k_reason}"
        );
    }
    assert!(
        reasons[&rows[3].image_id].contains("colour DICOM"),
        "{reasons:?}"
    );

    // What the store holds for the DICOM rows is the pipeline's image, letterboxed.
    let reader = StoreReader::open(Storage::open(out.to_str().unwrap()).unwrap()).unwrap();
    let mut resizer = fast_image_resize::Resizer::new();
    let mut checked = 0;
    for split in Split::ALL {
        let all = reader.read_split(split).unwrap();
        for (i, id) in all.image_ids.iter().enumerate() {
            let Some(row) = rows[..2].iter().find(|r| &r.image_id == id) else {
                continue;
            };
            let bytes = std::fs::read(data.images.join(&row.path)).unwrap();
            let (img, notes) = decode_dicom(&bytes, &Default::default()).unwrap();
            assert!(notes.dicom.is_some());
            assert_eq!(
                &all.images[i * 1024..(i + 1) * 1024],
                &letterbox(&img, 32, &mut resizer)[..]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2);
}

#[test]
fn the_ceiling_does_the_pixel_work_of_ingest_and_compresses_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("data"), 40, false);
    let s = settings(32, 8);
    let manifest = ingest_complete(&data, &dir.path().join("store"), &s);
    for threads in [1, 2] {
        let c =
            radit_sharding::ingest::measure_ceiling(&data.table, &data.images, &s, Some(threads))
                .unwrap();
        assert_eq!(c.images, manifest.counts.accepted, "{threads} threads");
        // Every pixel block compresses to exactly the bytes ingest stored for it.
        let images_objects: Vec<_> = manifest
            .objects
            .iter()
            .filter(|o| o.key.contains("/images/c/"))
            .collect();
        assert_eq!(c.shards, images_objects.len() as u64);
        assert_eq!(
            c.stored_bytes,
            images_objects.iter().map(|o| o.bytes).sum::<u64>()
        );
        assert!(c.images_per_second() > 0.0);
    }
}
