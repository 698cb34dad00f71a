//! The file writers every source's fixture uses: deterministic pixels, 16-bit PNGs, DICOMs, gzip, and files
//! written with their directories.

use std::path::Path;

use radit_dicom::fixture::Fixture;

/// Pixels of a small image that is not constant, different per `seed`.
pub fn pixels(width: u16, height: u16, bits: u32, seed: u16) -> Vec<u16> {
    let max = (1u32 << bits) - 1;
    (0..u32::from(width) * u32::from(height))
        .map(|i| {
            let (x, y) = (i % u32::from(width), i / u32::from(width));
            ((x * 37 + y * 11 + u32::from(seed) * 101) * 97 % (max + 1)) as u16
        })
        .collect()
}

/// Writes `bytes` at `path`, creating its folders.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes)
}

/// A 24x20 16-bit PNG at `path`.
pub fn png(path: &Path, seed: u16) -> std::io::Result<()> {
    write(
        path,
        &radit_sharding::image::encode_png16(24, 20, &pixels(24, 20, 16, seed)),
    )
}

/// A 24x20 12-bit MONOCHROME2 DICOM, to be adjusted by `edit`, at `path`.
pub fn dicom(path: &Path, seed: u16, edit: impl FnOnce(&mut Fixture)) -> std::io::Result<()> {
    let mut f = Fixture::grey(20, 24, 12, pixels(24, 20, 12, seed));
    edit(&mut f);
    write(path, &f.to_bytes())
}

/// `text` gzipped.
pub fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(text.as_bytes()).expect("writing to memory");
    e.finish().expect("writing to memory")
}
