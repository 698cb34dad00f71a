//! The generative-fidelity row of the paper's tables for one (model, reference, network): FD, KD, precision,
//! recall, density and coverage of generated features against real ones, optionally over several random draws of
//! the reference set (Table 13's sensitivity test: mean and standard deviation over the draws).

use serde::{Deserialize, Serialize};

use crate::fd::{Moments, frechet_distance};
use crate::kd::{Kd, KdConfig, kernel_distance};
use crate::prdc::{Prdc, prdc};
use crate::{EvalError, Features, SplitMix, same_width};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidelityConfig {
    /// Neighbours for PRDC (5 in CheXGenBench and the paper).
    pub k: usize,
    pub kd: KdConfig,
    /// Draws of the reference set (without replacement) and their size; `None`: the whole set once.
    pub draws: Option<(usize, usize)>,
    pub seed: u64,
}

impl Default for FidelityConfig {
    fn default() -> Self {
        Self {
            k: 5,
            kd: KdConfig::default(),
            draws: None,
            seed: 0,
        }
    }
}

/// One comparison: the metrics of `fake` against one reference set, and the seconds each took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub n_real: usize,
    pub n_fake: usize,
    pub fd: f64,
    pub kd: Kd,
    pub prdc: Prdc,
    pub seconds: Timings,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timings {
    /// The reference's moments and the distance (the fake set's moments are computed once, before).
    pub fd: f64,
    pub kd: f64,
    pub prdc: f64,
}

/// The row: every draw, and the mean and (population) std of each metric over them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fidelity {
    pub real: String,
    pub fake: String,
    pub dim: usize,
    pub draws: Vec<Comparison>,
    pub mean: Summary,
    pub std: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Summary {
    pub fd: f64,
    pub kd: f64,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
}

impl Summary {
    fn of(c: &Comparison) -> Self {
        Self {
            fd: c.fd,
            kd: c.kd.mean,
            precision: c.prdc.precision,
            recall: c.prdc.recall,
            density: c.prdc.density,
            coverage: c.prdc.coverage,
        }
    }

    fn fields(&self) -> [f64; 6] {
        [
            self.fd,
            self.kd,
            self.precision,
            self.recall,
            self.density,
            self.coverage,
        ]
    }

    fn from_fields(f: [f64; 6]) -> Self {
        Self {
            fd: f[0],
            kd: f[1],
            precision: f[2],
            recall: f[3],
            density: f[4],
            coverage: f[5],
        }
    }
}

fn compare(
    real: &Features,
    fake: &Features,
    fake_moments: &Moments,
    cfg: &FidelityConfig,
) -> Result<Comparison, EvalError> {
    let clock = std::time::Instant::now();
    let fd = frechet_distance(&Moments::of(real)?, fake_moments)?;
    let fd_seconds = clock.elapsed().as_secs_f64();
    let kd = kernel_distance(real, fake, &cfg.kd)?;
    let kd_seconds = clock.elapsed().as_secs_f64() - fd_seconds;
    let prdc = prdc(real, fake, cfg.k)?;
    Ok(Comparison {
        n_real: real.rows(),
        n_fake: fake.rows(),
        fd,
        kd,
        prdc,
        seconds: Timings {
            fd: fd_seconds,
            kd: kd_seconds,
            prdc: clock.elapsed().as_secs_f64() - fd_seconds - kd_seconds,
        },
    })
}

/// The metrics of `fake` against `real` (or against `cfg.draws` random draws of it).
pub fn fidelity(
    real: &Features,
    fake: &Features,
    cfg: &FidelityConfig,
) -> Result<Fidelity, EvalError> {
    same_width(real, fake)?;
    let fake_moments = Moments::of(fake)?;
    let draws = match cfg.draws {
        None => vec![compare(real, fake, &fake_moments, cfg)?],
        Some((count, size)) => {
            if count == 0 {
                return Err(EvalError::Undefined {
                    what: "reference draws".into(),
                    reason: "draw at least once".into(),
                });
            }
            real.require_rows(size, "a reference draw")?;
            (0..count as u64)
                .map(|d| {
                    let rows = SplitMix::new(cfg.seed, 1_000_003 + d).sample(real.rows(), size);
                    compare(&real.select(&rows), fake, &fake_moments, cfg)
                })
                .collect::<Result<_, _>>()?
        }
    };
    let n = draws.len() as f64;
    let all: Vec<[f64; 6]> = draws.iter().map(|c| Summary::of(c).fields()).collect();
    let mut mean = [0.0; 6];
    for f in &all {
        for (m, v) in mean.iter_mut().zip(f) {
            *m += v / n;
        }
    }
    let mut var = [0.0; 6];
    for f in &all {
        for ((s, v), m) in var.iter_mut().zip(f).zip(&mean) {
            *s += (v - m).powi(2) / n;
        }
    }
    Ok(Fidelity {
        real: real.name().into(),
        fake: fake.name().into(),
        dim: real.dim(),
        mean: Summary::from_fields(mean),
        std: Summary::from_fields(var.map(f64::sqrt)),
        draws,
    })
}

/// The CSV header of [`Fidelity::csv_row`].
pub const CSV_HEADER: &str = "model,reference,network,n_real,n_fake,dim,draws,fd,fd_std,kd,kd_std,kd_subset_std,\
precision,precision_std,recall,recall_std,density,density_std,coverage,coverage_std,k,kd_subsets,kd_subset_size";

impl Fidelity {
    /// One CSV row (see [`CSV_HEADER`]): means over the draws and their stds (0 for a single draw);
    /// `kd_subset_std` is KD's own spread over its subsets (of the first draw).
    pub fn csv_row(
        &self,
        model: &str,
        reference: &str,
        network: &str,
        cfg: &FidelityConfig,
    ) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let first = &self.draws[0];
        let (m, s) = (&self.mean, &self.std);
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            quote(model),
            quote(reference),
            quote(network),
            first.n_real,
            first.n_fake,
            self.dim,
            self.draws.len(),
            m.fd,
            s.fd,
            m.kd,
            s.kd,
            first.kd.std,
            m.precision,
            s.precision,
            m.recall,
            s.recall,
            m.density,
            s.density,
            m.coverage,
            s.coverage,
            cfg.k,
            first.kd.subsets,
            first.kd.subset_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_summarise_and_the_row_has_every_column() {
        let real = Features::new(
            "real",
            3,
            (0..300).map(|i| (i as f64 * 0.61).sin()).collect(),
        )
        .unwrap();
        let fake = Features::new(
            "fake",
            3,
            (0..150).map(|i| (i as f64 * 0.43).cos()).collect(),
        )
        .unwrap();
        let cfg = FidelityConfig {
            kd: KdConfig {
                subsets: 5,
                subset_size: Some(20),
                seed: 1,
            },
            draws: Some((3, 40)),
            ..FidelityConfig::default()
        };
        let f = fidelity(&real, &fake, &cfg).unwrap();
        assert_eq!(f.draws.len(), 3);
        assert!(f.draws.iter().all(|d| d.n_real == 40));
        let mean_fd = f.draws.iter().map(|d| d.fd).sum::<f64>() / 3.0;
        assert!((f.mean.fd - mean_fd).abs() < 1e-12);
        assert!(f.std.fd > 0.0);
        let row = f.csv_row("radit-xl", "cxr7 test, 3 draws", "rad-dino", &cfg);
        assert_eq!(
            row.split(',').count(),
            CSV_HEADER.split(',').count() + 1,
            "{row}"
        );
        assert!(
            row.starts_with("radit-xl,\"cxr7 test, 3 draws\",rad-dino,40,50,3,3,"),
            "{row}"
        );
        let err = fidelity(
            &real,
            &fake,
            &FidelityConfig {
                draws: Some((2, 500)),
                ..cfg
            },
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("real (a reference draw): 100 sample(s)"),
            "{err}"
        );
    }
}
