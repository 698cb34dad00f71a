//! Synthetic releases in each source's native layout, for tests and for `radit harmonise fixtures`: the exact file
//! names and headers of shared/design/sources.md, the awkward cases it lists, and small decodable images (16-bit
//! PNGs, DICOMs of several photometric and VOI kinds) so that the harmonised tables shard with no image rejected.
//! Each source's module has its `write_fixture` (over the file writers of [`crate::fixture_files`]); [`write_all`]
//! lays out all seven side by side.

use std::path::{Path, PathBuf};

/// Where [`write_all`] put each release.
#[derive(Debug, Clone)]
pub struct Releases {
    pub mimic: PathBuf,
    pub mimic_iv: PathBuf,
    pub chexpert_plus: PathBuf,
    pub rexgradient: PathBuf,
    pub padchest: PathBuf,
    pub vindr: PathBuf,
    pub nih: PathBuf,
    pub brax: PathBuf,
}

impl Releases {
    /// The folders under `dir`, named as the releases are.
    pub fn under(dir: &Path) -> Self {
        Self {
            mimic: dir.join("mimic-cxr"),
            mimic_iv: dir.join("mimiciv"),
            chexpert_plus: dir.join("chexpert-plus"),
            rexgradient: dir.join("rexgradient-160k"),
            padchest: dir.join("padchest"),
            vindr: dir.join("vindr-cxr"),
            nih: dir.join("chestxray14"),
            brax: dir.join("brax"),
        }
    }
}

/// Every source's synthetic release under `dir`.
pub fn write_all(dir: &Path) -> std::io::Result<Releases> {
    let r = Releases::under(dir);
    crate::mimic::write_fixture(&r.mimic, &r.mimic_iv)?;
    crate::chexpert_plus::write_fixture(&r.chexpert_plus)?;
    crate::rexgradient::write_fixture(&r.rexgradient)?;
    crate::padchest::write_fixture(&r.padchest)?;
    crate::vindr::write_fixture(&r.vindr)?;
    crate::nih::write_fixture(&r.nih)?;
    crate::brax::write_fixture(&r.brax)?;
    Ok(r)
}

/// [`write_all`], and `sources.toml` beside the releases naming each (roots relative to `dir`): what
/// `radit harmonise all --config` reads. Returns that file.
pub fn write_all_with_config(dir: &Path) -> std::io::Result<PathBuf> {
    let r = write_all(dir)?;
    let rel = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    let config = format!(
        "# The synthetic releases `radit harmonise fixtures` wrote; roots are relative to --images {}.\n\
         [mimic]\nroot = \"{}\"\nmimic_iv = \"{}\"\n\n[chexpert_plus]\nroot = \"{}\"\n\n\
         [rexgradient]\nroot = \"{}\"\nlabels = \"{}/{}\"\n\n[padchest]\nroot = \"{}\"\n\n\
         [vindr]\nroot = \"{}\"\n\n[nih]\nroot = \"{}\"\n\n[brax]\nroot = \"{}\"\n",
        dir.display(),
        rel(&r.mimic),
        rel(&r.mimic_iv),
        rel(&r.chexpert_plus),
        rel(&r.rexgradient),
        rel(&r.rexgradient),
        crate::rexgradient::FIXTURE_LABELS,
        rel(&r.padchest),
        rel(&r.vindr),
        rel(&r.nih),
        rel(&r.brax),
    );
    let path = dir.join("sources.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// The rows whose image is missing, does not decode as `radit shard` decodes it (DICOM or PNG by content), is not
/// 24x20 or is constant, with why: empty when the fixture keeps its promise that its tables shard with no image
/// rejected.
pub fn undecodable(root: &Path, rows: &[crate::output::HarmonisedRow]) -> Vec<String> {
    use radit_sharding::image::{decode_dicom, decode_png};
    rows.iter()
        .filter_map(|r| {
            let bytes = std::fs::read(root.join(&r.path)).map_err(|e| e.to_string());
            let decoded = bytes.and_then(|b| {
                if radit_dicom::is_dicom(&b) {
                    decode_dicom(&b, &radit_dicom::DicomOptions::default())
                } else {
                    decode_png(&b)
                }
                .map_err(|e| format!("{e:?}"))
            });
            let why = match decoded {
                Err(e) => e,
                Ok((img, _)) if (img.width, img.height) != (24, 20) => {
                    format!("{}x{}", img.width, img.height)
                }
                Ok((img, _)) if img.pixels.iter().all(|&p| p == img.pixels[0]) => "constant".into(),
                Ok(_) => return None,
            };
            Some(format!("{}: {why}", r.path))
        })
        .collect()
}
