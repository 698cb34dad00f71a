//! The job kinds that are one section of the job file (`[encode]`, `[generate]`, `[features]`, `[scm]`,
//! `[recon]`, `[edit]`): what
//! `radit run` needs of each, in one trait. Adding such a kind is its config type in `radit-jobs`, an impl here,
//! a variant of `JobKind` and `Work` in `job.rs`, and its rank's CLI file. Training, whose work is
//! several sections validated into one config, stays in `job.rs`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use radit_jobs::edit_job::EditConfig;
use radit_jobs::encode::EncodeConfig;
use radit_jobs::features_job::FeaturesConfig;
use radit_jobs::generate_job::GenerateConfig;
use radit_jobs::recon_job::ReconConfig;
use radit_jobs::scm_fit::ScmTrainConfig;
use radit_protocol::ConfigError;

/// A planning error (reading the store to count its units).
pub type PlanError = Box<dyn std::error::Error + Send + Sync>;

/// A job kind whose work is one section, read by its own config type.
pub trait SectionJob: std::fmt::Debug {
    /// The section's name, which is also the kind's name in `[job] kind`.
    fn section(&self) -> &'static str;
    /// The radit (sub)command every rank runs, given `--config FILE` with this section.
    fn rank_command(&self) -> &'static [&'static str];
    /// The section as a table, `{section = {...}}`.
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error>;
    /// Makes the section's paths and store URLs absolute (relative ones are relative to the job file).
    fn make_paths_absolute(&mut self, folder: &JobFolder);
    /// Checks everything that needs no store, naming the field.
    fn validate(&self) -> Result<(), ConfigError>;
    /// Why `[samples]` (a training job's preview) does not belong in this kind's job file.
    fn why_no_samples(&self) -> &'static str;
    /// Whether a relaunch resumes where the last one stopped (its journal or checkpoint).
    fn resumable(&self) -> bool;
    /// The steps of the rank with the most work over `world` ranks (may read the store).
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError>;
    /// The dry run's lines about the work and how it is sliced over `world` ranks.
    fn describe(&self, world: u32, o: &mut String);
    /// What every rank checks at its start, checked once before they start (reads the store and the weights'
    /// headers); a line saying what was checked.
    fn check_before_launch(&self, world: u64) -> Result<String, PlanError> {
        Ok(format!(
            "store opened: {} steps for the rank with the most work",
            self.planned_steps(world)?
        ))
    }
}

/// A job file's folder, which its relative paths and store URLs are relative to (so a copied or moved job
/// folder uses its own data, not the original's).
#[derive(Debug, Clone)]
pub struct JobFolder(pub PathBuf);

impl JobFolder {
    /// The folder of `file`, made absolute.
    pub fn of(file: &Path) -> Self {
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self(std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf()))
    }

    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_relative() {
            self.0.join(p)
        } else {
            p.to_path_buf()
        }
    }

    /// A store URL: a plain relative path becomes this folder's; URLs (`s3://`, `file:///`) stay as they are.
    pub fn url(&self, url: &str) -> String {
        if url.contains("://") || url.starts_with("memory:") {
            url.to_string()
        } else {
            self.path(Path::new(url)).display().to_string()
        }
    }
}

/// `{name = value}`.
fn one_section<T: serde::Serialize>(
    name: &str,
    value: &T,
) -> Result<toml::Table, toml::ser::Error> {
    let mut t = toml::Table::new();
    t.insert(name.into(), toml::Value::try_from(value)?);
    Ok(t)
}

/// Reads a kind's one section from what is left of the job file once the job's own sections are taken; any other
/// section is named.
pub fn read_section<T: serde::de::DeserializeOwned>(
    mut rest: toml::Table,
    section: &str,
    a_job: &str,
) -> Result<T, String> {
    let wrong = |e: String| format!("{a_job} has [{section}] besides the job's own sections: {e}");
    if let Some(other) = rest.keys().find(|k| *k != section) {
        return Err(wrong(format!(
            "unknown field `{other}`, expected `{section}`"
        )));
    }
    let value = rest
        .remove(section)
        .ok_or_else(|| wrong(format!("missing field `{section}`")))?;
    value
        .try_into()
        .map_err(|e: toml::de::Error| wrong(e.to_string()))
}

impl SectionJob for EncodeConfig {
    fn section(&self) -> &'static str {
        "encode"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["encode"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.store = folder.url(&self.store);
        self.weights = folder.path(&self.weights);
    }
    fn validate(&self) -> Result<(), ConfigError> {
        EncodeConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "an encode job draws no samples: remove [samples]"
    }
    fn resumable(&self) -> bool {
        // The store's encode journal is the checkpoint.
        true
    }
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError> {
        Ok(radit_jobs::encode::planned_steps(self, world)?)
    }
    fn check_before_launch(&self, _world: u64) -> Result<String, PlanError> {
        Ok(radit_jobs::encode::check_before_launch(self)?)
    }
    fn describe(&self, world: u32, o: &mut String) {
        let e = self;
        let _ = writeln!(
            o,
            "encode: {} with the {} autoencoder ({}), {} images per pass, {}",
            e.store,
            e.autoencoder,
            e.weights.display(),
            e.batch,
            if e.overwrite {
                "replacing latents of another encoder"
            } else {
                "refusing to replace latents of another encoder"
            }
        );
        let _ = writeln!(
            o,
            "data slices: the store's shards (train, val, test) in {world} contiguous ranges, one per rank; a step \
             is one shard, committed to the journal (.encode/journal), so a relaunch resumes at the next",
        );
    }
}

impl SectionJob for GenerateConfig {
    fn section(&self) -> &'static str {
        "generate"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["generate"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.profiles = folder.url(&self.profiles);
        self.weights = folder.path(&self.weights);
        self.out = folder.path(&self.out);
        self.ids = self.ids.as_deref().map(|p| folder.path(p));
        if let Some(d) = &mut self.decoder {
            d.weights = folder.path(&d.weights);
        }
    }
    fn validate(&self) -> Result<(), ConfigError> {
        GenerateConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "a generate job's samples are its [generate] section: remove [samples]"
    }
    fn resumable(&self) -> bool {
        true
    }
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError> {
        Ok(radit_jobs::generate_job::planned_steps(self, world)?)
    }
    fn describe(&self, world: u32, o: &mut String) {
        let g = self;
        let _ = writeln!(
            o,
            "generate: {} sample(s) per profile of the {} split of {}{}{}, seed {}, solver {:?}, from {} into {}",
            g.per_profile,
            g.split.name(),
            g.profiles,
            g.ids
                .as_ref()
                .map_or(String::new(), |p| format!(" (ids in {})", p.display())),
            g.limit.map_or(String::new(), |l| format!(" (first {l})")),
            g.seed,
            g.solver,
            g.weights.display(),
            g.out.display()
        );
        let _ = writeln!(
            o,
            "data slices: units of {} profiles in {world} contiguous ranges, one per rank; a step is one unit, \
             committed to the journal (.generate/journal), so a relaunch resumes at the next",
            g.unit_profiles
        );
    }
}

impl SectionJob for FeaturesConfig {
    fn section(&self) -> &'static str {
        "features"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["eval", "features"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.store = self.store.as_deref().map(|u| folder.url(u));
        self.net = folder.path(&self.net);
        self.out = folder.path(&self.out);
        self.samples = self.samples.as_deref().map(|p| folder.path(p));
        self.ids = self.ids.as_deref().map(|p| folder.path(p));
        self.cache = self.cache.as_deref().map(|p| folder.path(p));
    }
    fn validate(&self) -> Result<(), ConfigError> {
        FeaturesConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "a features job draws no samples: remove [samples]"
    }
    fn resumable(&self) -> bool {
        true
    }
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError> {
        Ok(radit_jobs::features_job::planned_steps(self, world)?)
    }
    fn describe(&self, world: u32, o: &mut String) {
        let f = self;
        let source = match (&f.store, &f.samples) {
            (Some(store), _) => format!(
                "the {} split of {store}{}",
                f.split.name(),
                f.ids
                    .as_ref()
                    .map_or(String::new(), |p| format!(" (ids in {})", p.display()))
            ),
            (None, Some(dir)) => format!("the samples in {}", dir.display()),
            (None, None) => "nothing".into(),
        };
        let _ = writeln!(
            o,
            "features: {source} through {} ({}) into {}{}",
            f.net.display(),
            f.preprocessing,
            f.out.display(),
            f.cache
                .as_ref()
                .map_or(String::new(), |c| format!(", cached in {}", c.display()))
        );
        let _ = writeln!(
            o,
            "data slices: units (a store's shards, or {} samples) in {world} contiguous ranges, one per rank; a \
             step is one unit, committed as a part file, so a relaunch resumes at the next",
            f.unit_images
        );
    }
}

impl SectionJob for ScmTrainConfig {
    fn section(&self) -> &'static str {
        "scm"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["scm", "train"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.store = folder.url(&self.store);
        self.out = folder.path(&self.out);
        self.graph = self.graph.as_deref().map(|p| folder.path(p));
        self.checkpoint_dir = self.checkpoint_dir.as_deref().map(|p| folder.path(p));
    }
    fn validate(&self) -> Result<(), ConfigError> {
        ScmTrainConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "an scm job draws no image samples: remove [samples]"
    }
    fn resumable(&self) -> bool {
        // It always checkpoints (`checkpoint_dir`, else beside `out`).
        true
    }
    fn planned_steps(&self, _world: u64) -> Result<u64, PlanError> {
        Ok(self.steps)
    }
    fn describe(&self, world: u32, o: &mut String) {
        let f = self;
        let _ = writeln!(
            o,
            "scm: the {} split's profiles of {} ({} graph), {} steps of {} profiles ({} per rank), lr {}, \
             EMA {}, into {}, checkpoints in {}",
            f.split.name(),
            f.store,
            f.graph
                .as_ref()
                .map_or("the built-in".to_string(), |g| g.display().to_string()),
            f.steps,
            f.batch,
            f.batch / u64::from(world).max(1),
            f.lr,
            f.ema,
            f.out.display(),
            f.checkpoints().display()
        );
    }
}

impl SectionJob for ReconConfig {
    fn section(&self) -> &'static str {
        "recon"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["eval", "recon"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.store = folder.url(&self.store);
        self.weights = folder.path(&self.weights);
        self.out = folder.path(&self.out);
    }
    fn validate(&self) -> Result<(), ConfigError> {
        ReconConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "a recon job's images are its reconstructions: remove [samples]"
    }
    fn resumable(&self) -> bool {
        true
    }
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError> {
        Ok(radit_jobs::recon_job::planned_steps(self, world)?)
    }
    fn check_before_launch(&self, world: u64) -> Result<String, PlanError> {
        let ae = self.autoencoder_config()?;
        Ok(format!(
            "store opened: {} steps for the rank with the most work; weights {}: the {} autoencoder",
            radit_jobs::recon_job::planned_steps(self, world)?,
            self.weights.display(),
            ae.preset_name().unwrap_or("custom")
        ))
    }
    fn describe(&self, world: u32, o: &mut String) {
        let r = self;
        let _ = writeln!(
            o,
            "recon: the {} split of {}{} through the autoencoder {} ({}), {} images at once, into {}",
            r.split.name(),
            r.store,
            r.limit.map_or(String::new(), |l| format!(" (first {l})")),
            r.weights.display(),
            r.autoencoder,
            r.batch,
            r.out.display()
        );
        let _ = writeln!(
            o,
            "data slices: the split's shards in {world} contiguous ranges, one per rank; a step is one shard, \
             committed to the journal (.recon/journal) with its PSNR and SSIM, so a relaunch resumes at the next",
        );
    }
}

impl SectionJob for EditConfig {
    fn section(&self) -> &'static str {
        "edit"
    }
    fn rank_command(&self) -> &'static [&'static str] {
        &["edit"]
    }
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        one_section(self.section(), self)
    }
    fn make_paths_absolute(&mut self, folder: &JobFolder) {
        self.store = folder.url(&self.store);
        self.weights = folder.path(&self.weights);
        self.scm = folder.path(&self.scm);
        self.out = folder.path(&self.out);
        if let Some(d) = self.decoder.as_mut() {
            d.weights = folder.path(&d.weights);
        }
    }
    fn validate(&self) -> Result<(), ConfigError> {
        EditConfig::validate(self)
    }
    fn why_no_samples(&self) -> &'static str {
        "an edit job's images are its edits: remove [samples]"
    }
    fn resumable(&self) -> bool {
        true
    }
    fn planned_steps(&self, world: u64) -> Result<u64, PlanError> {
        Ok(radit_jobs::edit_job::planned_steps(self, world)?)
    }
    fn describe(&self, world: u32, o: &mut String) {
        let e = self;
        let _ = writeln!(
            o,
            "edit: {} patients of the {} split of {} (seed {}), interventions {}, {} through {} and the SCM {} \
             ({:?}), {} images at once, into {}",
            e.patients,
            e.split.name(),
            e.store,
            e.seed,
            e.interventions.join(", "),
            if e.from_noise {
                "random samples of a fixed noise (the baseline)"
            } else {
                "abducted images"
            },
            e.weights.display(),
            e.scm.display(),
            e.solver,
            e.batch,
            e.out.display()
        );
        let _ = writeln!(
            o,
            "data slices: units (one batch of one intervention) in {world} contiguous ranges, one per rank; a \
             step is one unit, committed to the journal (.edit/journal), so a relaunch resumes at the next",
        );
    }
}
