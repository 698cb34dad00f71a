//! `metrics.csv`: one row per logged step (step, loss, validation loss, mini-FD, gradient norm, learning rate,
//! images per second), for a person with a spreadsheet or pandas rather than Prometheus. Rank 0 appends; a resumed
//! run appends after the rows it had (steps logged after the last checkpoint appear again: the later row is the
//! one the run kept).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::StepLog;

/// The header, in the order of [`row`].
pub const HEADER: &str = "step,loss,val_loss,fd,grad_norm,lr,images_per_second,skipped";

/// The CSV row of one logged step (empty cells where nothing was measured).
pub fn row(log: &StepLog) -> String {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    format!(
        "{},{},{},{},{},{},{:.2},{}",
        log.step,
        log.report.loss,
        opt(log.val_loss),
        opt(log.fd),
        log.report.grad_norm,
        log.report.lr,
        log.images_per_second,
        u8::from(log.report.skipped)
    )
}

/// An open `metrics.csv`, appended to row by row (flushed each time, so a killed run keeps its rows).
pub struct MetricsCsv {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsCsv {
    /// Opens `path` for appending, writing the header when the file is new or empty.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            writeln!(file, "{HEADER}")?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, log: &StepLog) -> std::io::Result<()> {
        writeln!(self.file, "{}", row(log))?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_engine::fsdp::StepReport;

    #[test]
    fn rows_follow_the_header_and_leave_unmeasured_cells_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/metrics.csv");
        let log = |step, val_loss| StepLog {
            step,
            report: StepReport {
                loss: 0.5,
                grad_norm: 1.25,
                lr: 0.002,
                skipped: false,
            },
            loss_max: 0.6,
            images_per_second: 123.456,
            tokens_per_second: 0.0,
            data_wait_seconds: 0.0,
            val_loss,
            fd: None,
        };
        MetricsCsv::open(&path)
            .unwrap()
            .append(&log(50, None))
            .unwrap();
        // Reopened (a resumed run): no second header.
        MetricsCsv::open(&path)
            .unwrap()
            .append(&log(100, Some(0.75)))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("{HEADER}\n50,0.5,,,1.25,0.002,123.46,0\n100,0.5,0.75,,1.25,0.002,123.46,0\n")
        );
    }
}
