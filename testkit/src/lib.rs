//! Helpers shared by the test suites of radit's crates (a dev-dependency only, never linked into the binary).

use std::path::Path;

/// Compares `text` with the golden file `crate_dir/tests/golden/NAME` (pass `env!("CARGO_MANIFEST_DIR")`);
/// `UPDATE_GOLDEN=1` rewrites the file instead (review the diff before committing it).
pub fn assert_golden(crate_dir: &str, name: &str, text: &str) {
    let path = Path::new(crate_dir).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("writable");
        std::fs::write(&path, text).expect("writable");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing: run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        text,
        want,
        "{} changed: review, then UPDATE_GOLDEN=1",
        path.display()
    );
}

/// A process environment made of `pairs`, for functions that read variables through a closure.
pub fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}
