//! `radit dicom survey` over synthetic releases: every header field tabulated from the files' first bytes, a
//! syntax this build cannot decode flagged, files that are not DICOM listed, other files skipped by extension.

use radit_dicom::fixture::Fixture;
use radit_sources::survey::{SurveyOptions, survey};

#[test]
fn a_folder_of_releases_is_tabulated() {
    let dir = tempfile::tempdir().unwrap();
    radit_sources::vindr::write_fixture(&dir.path().join("vindr")).unwrap();
    radit_sources::brax::write_fixture(&dir.path().join("brax")).unwrap();
    let j2k =
        Fixture::grey(4, 4, 12, (0..16).collect()).to_bytes_declaring("1.2.840.10008.1.2.4.90");
    std::fs::write(dir.path().join("j2k.dcm"), j2k).unwrap();
    std::fs::write(dir.path().join("broken.dcm"), b"not a DICOM at all").unwrap();
    // As a path and as a file:// URL.
    let url = format!("file://{}", dir.path().display());
    for location in [dir.path().to_str().unwrap(), url.as_str()] {
        let s = survey(location, &SurveyOptions::default()).unwrap();
        // 6 VinDr + 4 BRAX DICOMs + the J2K one; the broken one unreadable; tables and PNGs skipped.
        assert_eq!(s.dicom, 11, "{}", s.summary());
        assert_eq!(s.unreadable_count, 1);
        assert_eq!(s.unreadable[0].key, "broken.dcm");
        assert!(
            s.unreadable[0].reason.contains("no DICM"),
            "{:?}",
            s.unreadable
        );
        assert_eq!(
            s.skipped,
            4 + 2 + 1,
            "BRAX's PNGs and table, VinDr's two tables"
        );
        let f = |field: &str, value: &str| s.fields[field].get(value).copied().unwrap_or(0);
        assert_eq!(
            f(
                "transfer syntax",
                "1.2.840.10008.1.2.1 (Explicit VR Little Endian)"
            ),
            10
        );
        let j2k_key = s.fields["transfer syntax"]
            .keys()
            .find(|k| k.starts_with("1.2.840.10008.1.2.4.90"))
            .unwrap();
        assert!(j2k_key.contains("NOT decodable"), "{j2k_key}");
        assert_eq!(f("photometric interpretation", "MONOCHROME1"), 2);
        assert_eq!(f("photometric interpretation", "MONOCHROME2"), 9);
        assert_eq!(f("patient age format", "000Y"), 1);
        assert_eq!(f("patient age format", "nnnY"), 4);
        assert_eq!(f("patient sex", "O"), 1);
        assert_eq!(f("view position", "LL"), 1);
        assert_eq!(f("windows (centre/width pairs)", "1"), 2);
        assert_eq!(
            f(
                "bits allocated / stored, pixel representation",
                "16 / 12, unsigned"
            ),
            11
        );
    }
    let limited = survey(
        dir.path().to_str().unwrap(),
        &SurveyOptions {
            limit: Some(3),
            threads: 2,
        },
    )
    .unwrap();
    assert_eq!(limited.dicom + limited.unreadable_count, 3);
    let missing = survey(
        dir.path().join("nowhere").to_str().unwrap(),
        &SurveyOptions::default(),
    );
    assert!(missing.unwrap_err().to_string().contains("nowhere"));
}
