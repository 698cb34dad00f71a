//! The codecs behind the `j2k` and `jls` features against the pydicom twin: JPEG 2000 and JPEG-LS lossless files
//! written by pydicom's plugins decode to the twin's pixels within 1 LSB. Run by scripts/test.sh as
//! `cargo test -p radit-dicom --features j2k,jls --test codec_twin` (the project's virtualenv, RADIT_VENV, has the
//! plugins).
#![cfg(all(feature = "j2k", feature = "jls"))]

use std::path::PathBuf;

use radit_dicom::fixture;

#[test]
fn jpeg_2000_and_jpeg_ls_decode_like_pydicom() {
    let venv = std::env::var_os("RADIT_VENV")
        .map(PathBuf::from)
        .expect("RADIT_VENV names the project's virtualenv (source scripts/env.sh)");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/dicom_twin.py");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg("--codecs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let cases = index.as_array().unwrap();
    let mut syntaxes = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.path().join(format!("{name}.dcm"))).unwrap();
        let img = radit_dicom::decode(&bytes, &radit_dicom::DicomOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            img.notes.transfer_syntax,
            case["transfer_syntax"].as_str().unwrap()
        );
        let twin =
            fixture::samples_le(&std::fs::read(dir.path().join(format!("{name}.u16"))).unwrap());
        let worst =
            fixture::max_difference(&img.pixels, &twin).expect("the twin's image has radit's size");
        assert!(
            worst <= 1,
            "{name}: radit and pydicom differ by {worst} LSB"
        );
        syntaxes.insert(img.notes.transfer_syntax);
    }
    assert_eq!(syntaxes.len(), 2, "JPEG 2000 and JPEG-LS: {syntaxes:?}");
}
