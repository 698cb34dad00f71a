//! radit's DICOM pixel pipeline against its pydicom twin (tests/python/dicom_twin.py): files written by pydicom in
//! the native syntaxes, RLE Lossless and JPEG baseline, of every photometric interpretation, bit depth, sign, rescale, window
//! function, several windows and a VOI LUT; radit's pixels equal the twin's to 1 LSB (numpy rounds half to even).

mod common;

use common::{python, repo, run_ok};

/// One fixture of the twin's index.json.
struct Case {
    name: String,
    rows: u32,
    columns: u32,
    transfer_syntax: String,
    /// Largest difference allowed, in 16-bit steps: 1 for lossless syntaxes (numpy rounds half to even); two 8-bit
    /// steps for JPEG baseline, whose IDCT differs between libjpeg and jpeg-decoder; two 12-bit steps, stretched, for
    /// 12-bit JPEG Extended (libjpeg-turbo against pylibjpeg-libjpeg).
    tolerance: u16,
    /// Decoded with padding masked (`--dicom-padding mask`).
    mask_padding: bool,
}

impl Case {
    fn of(v: &serde_json::Value) -> Self {
        Self {
            name: v["name"].as_str().unwrap().into(),
            rows: v["rows"].as_u64().unwrap() as u32,
            columns: v["columns"].as_u64().unwrap() as u32,
            transfer_syntax: v["transfer_syntax"].as_str().unwrap().into(),
            tolerance: v["tolerance"].as_u64().unwrap() as u16,
            mask_padding: v["padding"] == "mask",
        }
    }
}

#[test]
fn radit_decodes_every_twin_fixture_to_within_one_lsb_of_pydicom() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        python()
            .arg(repo().join("tests/python/dicom_twin.py"))
            .arg(dir.path()),
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
            .unwrap();
    let index: Vec<Case> = index.as_array().unwrap().iter().map(Case::of).collect();
    assert!(index.len() >= 11, "every kind of fixture is written");
    let mut syntaxes = std::collections::BTreeSet::new();
    let mut voi = std::collections::BTreeSet::new();
    for case in &index {
        let bytes = std::fs::read(dir.path().join(format!("{}.dcm", case.name))).unwrap();
        let opts = radit_dicom::DicomOptions {
            padding: if case.mask_padding {
                radit_dicom::Padding::Mask
            } else {
                radit_dicom::Padding::Ignore
            },
            ..radit_dicom::DicomOptions::default()
        };
        let img =
            radit_dicom::decode(&bytes, &opts).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(img.notes.padding_masked, case.mask_padding, "{}", case.name);
        assert_eq!(
            (img.width, img.height),
            (case.columns, case.rows),
            "{}",
            case.name
        );
        assert_eq!(
            img.notes.transfer_syntax, case.transfer_syntax,
            "{}",
            case.name
        );
        let bytes = std::fs::read(dir.path().join(format!("{}.u16", case.name))).unwrap();
        let twin = radit_dicom::fixture::samples_le(&bytes);
        let worst = radit_dicom::fixture::max_difference(&img.pixels, &twin)
            .unwrap_or_else(|| panic!("{}: the twin's image is not radit's size", case.name));
        assert!(
            worst <= case.tolerance,
            "{}: radit and pydicom differ by {worst} LSB",
            case.name
        );
        // A lossy case must still agree closely on average, not only within its tolerance.
        let mean = img
            .pixels
            .iter()
            .zip(&twin)
            .map(|(&a, &b)| f64::from(a.abs_diff(b)))
            .sum::<f64>()
            / twin.len() as f64;
        assert!(mean <= 64.0, "{}: mean difference {mean}", case.name);
        eprintln!("{}: worst {worst} LSB, mean {mean:.2}", case.name);
        syntaxes.insert(case.transfer_syntax.clone());
        voi.insert(format!("{:?}", img.notes.voi));
    }
    // The fixtures cover what they claim: five syntaxes (explicit, implicit, RLE, JPEG baseline, 12-bit JPEG
    // Extended), every VOI kind.
    assert_eq!(syntaxes.len(), 5, "{syntaxes:?}");
    assert_eq!(voi.len(), 5, "{voi:?}");
}
