//! Sweeps (fidelity.md, "Job specs and sweeps"): a `[sweep]` table in a job spec expands it into named runs, each
//! a job spec of its own with its own run directory, submitted as one Slurm array (or run one after another by
//! the local and mpirun launchers).
//!
//! ```toml
//! [sweep.grid]                       # every combination (or [sweep.list]: the i-th value of every key together)
//! "flow.shift" = [1.0, 3.0]
//! "engine.adam.lr" = [1e-4, 2e-4]
//! ```
//!
//! `radit run SWEEP --summary` (and the end of a local sweep) writes `<sweep dir>/sweep.csv`: per run its settings,
//! its last loss, validation loss and matched in-training FD, read from each run's `metrics.csv`.
//!
//! A run is named `<job name>-<key>-<value>...` by its settings (the last part of each key). `{run}` in any string
//! of the spec becomes the run's name (`url = "s3://bucket/ckpt/{run}"`); a run directory without it gets the
//! run's name appended. Keys of the job's own sections ([job], [resources], [launcher], ...) cannot be swept: the
//! runs of one Slurm array share their resources.

use std::path::{Path, PathBuf};

use radit_launch::slurm::{ArrayTask, SlurmJob};

use crate::job::{Job, JobError, JobSpec, ValidatedWork};

/// The placeholder for a run's name.
pub const RUN: &str = "{run}";

/// Whether a top-level section is the job's own (the same for every run of an array) or `[sweep]` itself.
fn fixed(section: &str) -> bool {
    section == "sweep" || (crate::job::RUN_SECTIONS.contains(&section) && section != "samples")
}

/// One run of a sweep: its name, the settings it changes, and its job spec.
#[derive(Debug, Clone)]
pub struct SweepRun {
    pub name: String,
    pub settings: Vec<(String, toml::Value)>,
    pub spec: toml::Table,
}

fn bad(reason: impl Into<String>) -> String {
    format!("[sweep]: {}", reason.into())
}

/// A value as it appears in a run's name: letters, digits, `.`, `_` and `-` only.
fn name_part(v: &toml::Value) -> String {
    let text = match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Sets `dotted` (`a.b.c`) in `table`, making the tables on the way; a table is never replaced by a value.
fn set(table: &mut toml::Table, dotted: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = dotted.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(format!(
            "'{dotted}' is not a dotted key such as flow.shift"
        )));
    }
    if fixed(parts[0]) {
        return Err(bad(format!(
            "'{dotted}' is in [{}], which every run of a sweep shares (one Slurm array): sweep the work's settings",
            parts[0]
        )));
    }
    let mut at = table;
    for p in &parts[..parts.len() - 1] {
        let next = at
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next
            .as_table_mut()
            .ok_or_else(|| bad(format!("'{dotted}': {p} is a value, not a table")))?;
    }
    let last = parts[parts.len() - 1];
    if at.get(last).is_some_and(toml::Value::is_table) {
        return Err(bad(format!("'{dotted}' is a table: sweep one of its keys")));
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// Replaces `{run}` in every string of `v`.
fn substitute(v: &mut toml::Value, name: &str) {
    match v {
        toml::Value::String(s) => *s = s.replace(RUN, name),
        toml::Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, name)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| substitute(x, name)),
        _ => {}
    }
}

/// The runs of a job spec's `[sweep]`, or `None` when it has none.
pub fn expand(text: &str) -> Result<Option<Vec<SweepRun>>, String> {
    expand_table(toml::from_str(text).map_err(|e| e.to_string())?)
}

/// [`expand`] of a parsed job spec.
fn expand_table(mut all: toml::Table) -> Result<Option<Vec<SweepRun>>, String> {
    let Some(sweep) = all.remove("sweep") else {
        return Ok(None);
    };
    let sweep = sweep
        .as_table()
        .ok_or_else(|| bad("must be a table with grid or list"))?;
    if let Some(other) = sweep.keys().find(|k| *k != "grid" && *k != "list") {
        return Err(bad(format!("'{other}' is not grid or list")));
    }
    let axes = |name: &str| -> Result<Vec<(String, Vec<toml::Value>)>, String> {
        let Some(t) = sweep.get(name) else {
            return Ok(vec![]);
        };
        let t = t
            .as_table()
            .ok_or_else(|| bad(format!("{name} must be a table of dotted keys and lists")))?;
        t.iter()
            .map(|(k, v)| match v.as_array() {
                Some(a) if !a.is_empty() => Ok((k.clone(), a.clone())),
                _ => Err(bad(format!(
                    "{name}.\"{k}\" must be a non-empty list of values"
                ))),
            })
            .collect()
    };
    let (grid, list) = (axes("grid")?, axes("list")?);
    if grid.is_empty() && list.is_empty() {
        return Err(bad(
            "give grid (every combination) or list (values taken together)",
        ));
    }
    // The list's i-th values together, then crossed with every combination of the grid.
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    if let Some((_, first)) = list.first() {
        if let Some((k, v)) = list.iter().find(|(_, v)| v.len() != first.len()) {
            return Err(bad(format!(
                "list.\"{k}\" has {} values and list.\"{}\" {}: a list's keys take their values together",
                v.len(),
                list[0].0,
                first.len()
            )));
        }
        combos = (0..first.len())
            .map(|i| {
                list.iter()
                    .map(|(k, v)| (k.clone(), v[i].clone()))
                    .collect()
            })
            .collect();
    }
    for (k, values) in &grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let base_name = all
        .get("job")
        .and_then(|j| j.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| bad("the job has no [job] name to name its runs by"))?
        .to_string();
    let mut runs: Vec<SweepRun> = Vec::new();
    for settings in combos {
        let mut spec = all.clone();
        for (k, v) in &settings {
            set(&mut spec, k, v.clone())?;
        }
        let suffix: Vec<String> = settings
            .iter()
            .map(|(k, v)| format!("{}-{}", k.rsplit('.').next().unwrap_or(k), name_part(v)))
            .collect();
        let name = format!("{base_name}-{}", suffix.join("-"));
        if runs.iter().any(|r| r.name == name) {
            return Err(bad(format!(
                "two runs would both be named {name}: a value is repeated"
            )));
        }
        let job = spec
            .get_mut("job")
            .and_then(|j| j.as_table_mut())
            .ok_or_else(|| bad("the job has no [job] section"))?;
        if let Some(dir) = job
            .get("run_dir")
            .and_then(|d| d.as_str().map(str::to_string))
            && !dir.contains(RUN)
        {
            job.insert(
                "run_dir".into(),
                toml::Value::String(format!("{dir}/{RUN}")),
            );
        }
        job.insert("name".into(), toml::Value::String(name.clone()));
        let mut value = toml::Value::Table(spec);
        substitute(&mut value, &name);
        let toml::Value::Table(spec) = value else {
            unreachable!("a table stays a table")
        };
        runs.push(SweepRun {
            name,
            settings,
            spec,
        });
    }
    Ok(Some(runs))
}

/// A sweep's runs, each loaded and validated as a job (relative paths against the sweep's file).
pub struct Sweep {
    pub file: PathBuf,
    /// The job's name before the runs' settings are added.
    pub name: String,
    /// Where the runs' job specs and the array script go: `<the sweep's run_dir>/sweep`.
    pub dir: PathBuf,
    pub runs: Vec<(SweepRun, Job)>,
}

impl Sweep {
    /// Loads the sweep in `file`, or `None` when the spec has no `[sweep]`.
    pub fn load(file: &Path) -> Result<Option<Self>, JobError> {
        let unreadable = |reason: String| JobError::Unreadable {
            file: file.into(),
            reason,
        };
        let text = std::fs::read_to_string(file).map_err(|e| unreadable(e.to_string()))?;
        let all: toml::Table = toml::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        let field = |f: &str| {
            all.get("job")
                .and_then(|j| j.get(f))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let (name, run_dir) = (field("name"), field("run_dir"));
        let Some(runs) = expand_table(all).map_err(unreadable)? else {
            return Ok(None);
        };
        let mut loaded = Vec::new();
        for run in runs {
            let text = toml::to_string(&run.spec).map_err(|e| unreadable(e.to_string()))?;
            let spec = JobSpec::from_toml(&text)
                .map_err(|reason| unreadable(format!("run {}: {reason}", run.name)))?;
            let job = Job::new(spec, file)?;
            loaded.push((run, job));
        }
        // Runs that would write to one place would overwrite each other's checkpoints.
        for (i, (a, ja)) in loaded.iter().enumerate() {
            for (b, jb) in &loaded[i + 1..] {
                if let (ValidatedWork::Train(ta), ValidatedWork::Train(tb)) = (&ja.work, &jb.work)
                    && let (Some(ca), Some(cb)) = (&ta.checkpoint, &tb.checkpoint)
                    && ca.url == cb.url
                {
                    return Err(unreadable(format!(
                        "[sweep]: runs {} and {} both keep checkpoints in {}: put {RUN} in [checkpoint] url",
                        a.name, b.name, ca.url
                    )));
                }
            }
        }
        // The sweep's own folder: the run directory up to `{run}` (which the runs fill in).
        let base = run_dir
            .split(RUN)
            .next()
            .unwrap_or_default()
            .trim_end_matches('/');
        Ok(Some(Self {
            file: file.to_path_buf(),
            name,
            dir: crate::kinds::JobFolder::of(file)
                .path(Path::new(base))
                .join("sweep"),
            runs: loaded,
        }))
    }

    /// Where run `name`'s job spec is written.
    pub fn run_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    /// Writes every run's job spec (paths made absolute) into [`Sweep::dir`].
    pub fn write_runs(&self) -> Result<(), JobError> {
        let io = |path: &Path, e: std::io::Error| JobError::Unreadable {
            file: path.into(),
            reason: format!("cannot write it: {e}"),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        for (run, job) in &self.runs {
            let path = self.run_file(&run.name);
            // The run directory absolute too: the spec is read from the sweep's folder, not the original's.
            let mut spec = job.spec.clone();
            spec.job.run_dir = job.run_dir.clone();
            let text = spec
                .to_toml()
                .map_err(|e| io(&path, std::io::Error::other(e)))?;
            let header = format!(
                "# Run {} of the sweep in {} ({}): written by radit run; edit the sweep, not this file.\n",
                run.name,
                self.file.display(),
                settings_text(run)
            );
            std::fs::write(&path, header + &text).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }

    /// The Slurm array that runs every run (the first run's resources and launcher: every run shares them).
    pub fn slurm_array(&self, radit: &str) -> SlurmJob {
        let mut job = self.runs[0].1.slurm_job(radit);
        job.job_name = format!("{}-sweep", self.name);
        job.run_dir = self.dir.display().to_string();
        job.job_file = self.file.display().to_string();
        job.array = self
            .runs
            .iter()
            .map(|(r, j)| ArrayTask {
                job_file: self.run_file(&r.name).display().to_string(),
                run_dir: j.run_dir.display().to_string(),
            })
            .collect();
        job
    }

    /// The sweep's table, one row per run: its settings, then the last logged step of its `metrics.csv` (loss),
    /// its last validation loss and its last mini-FD (the run's matched in-training FD) with their steps; empty
    /// cells for a run that has not logged them. Written to `<sweep dir>/sweep.csv` and returned.
    pub fn summary(&self) -> Result<String, JobError> {
        let keys: Vec<&str> = self.runs[0]
            .0
            .settings
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        let mut out = format!(
            "run,{},step,loss,val_loss_step,val_loss,fd_step,fd\n",
            keys.join(",")
        );
        for (run, job) in &self.runs {
            let metrics = job.run_dir.join("metrics.csv");
            let text = std::fs::read_to_string(&metrics).unwrap_or_default();
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
            let col = |name: &str| header.iter().position(|h| *h == name);
            let (step, loss, val, fd) = (col("step"), col("loss"), col("val_loss"), col("fd"));
            let (mut last, mut last_val, mut last_fd) = (None, None, None);
            for line in lines {
                let cells: Vec<&str> = line.split(',').collect();
                let get = |c: Option<usize>| c.and_then(|i| cells.get(i)).copied().unwrap_or("");
                let at = get(step).to_string();
                last = Some((at.clone(), get(loss).to_string()));
                if !get(val).is_empty() {
                    last_val = Some((at.clone(), get(val).to_string()));
                }
                if !get(fd).is_empty() {
                    last_fd = Some((at, get(fd).to_string()));
                }
            }
            let pair = |p: Option<(String, String)>| p.unwrap_or_default();
            let (s, l) = pair(last);
            let (vs, v) = pair(last_val);
            let (fs, f) = pair(last_fd);
            let values: Vec<String> = run.settings.iter().map(|(_, v)| v.to_string()).collect();
            out += &format!(
                "{},{},{s},{l},{vs},{v},{fs},{f}\n",
                run.name,
                values.join(",")
            );
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| JobError::Unreadable {
            file: self.dir.clone(),
            reason: format!("cannot write it: {e}"),
        })?;
        let path = self.dir.join("sweep.csv");
        std::fs::write(&path, &out).map_err(|e| JobError::Unreadable {
            file: path.clone(),
            reason: format!("cannot write it: {e}"),
        })?;
        Ok(out)
    }

    /// The dry run's list: every run, its settings and directory.
    pub fn describe(&self) -> String {
        let mut o = format!(
            "sweep of {} runs (from {}; their job specs go to {})\n",
            self.runs.len(),
            self.file.display(),
            self.dir.display()
        );
        for (i, (run, job)) in self.runs.iter().enumerate() {
            o += &format!(
                "  run {i}: {}: {}\n    run directory {}\n",
                run.name,
                settings_text(run),
                job.run_dir.display()
            );
            if let ValidatedWork::Train(t) = &job.work
                && let Some(c) = &t.checkpoint
            {
                o += &format!("    checkpoints {}\n", c.url);
            }
        }
        o
    }
}

fn settings_text(run: &SweepRun) -> String {
    run.settings
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
[job]
name = "b"
run_dir = "runs"
[flow]
shift = 1.0
[checkpoint]
url = "ckpt/{run}"
[sweep.grid]
"flow.shift" = [1.0, 3.0]
"engine.adam.lr" = [1e-4, 2e-4]
"#;

    #[test]
    fn a_grid_crosses_every_value_and_names_each_run_by_its_settings() {
        let runs = expand(SPEC).unwrap().unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "b-lr-0.0001-shift-1.0",
                "b-lr-0.0001-shift-3.0",
                "b-lr-0.0002-shift-1.0",
                "b-lr-0.0002-shift-3.0"
            ]
        );
        let last = &runs[3].spec;
        assert_eq!(last["flow"]["shift"].as_float(), Some(3.0));
        assert_eq!(last["engine"]["adam"]["lr"].as_float(), Some(2e-4));
        assert_eq!(
            last["checkpoint"]["url"].as_str(),
            Some("ckpt/b-lr-0.0002-shift-3.0")
        );
        assert_eq!(
            last["job"]["run_dir"].as_str(),
            Some("runs/b-lr-0.0002-shift-3.0")
        );
        assert!(!last.contains_key("sweep"));
    }

    #[test]
    fn a_list_takes_values_together_and_bad_sweeps_are_named() {
        let list = SPEC.replace(
            "[sweep.grid]",
            "[sweep.list]\n\"model.preset\" = [\"b-pixel\", \"b-latent\"]",
        );
        let runs = expand(&list).unwrap().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].spec["model"]["preset"].as_str(), Some("b-latent"));
        assert_eq!(runs[1].spec["flow"]["shift"].as_float(), Some(3.0));
        for (spec, needle) in [
            (
                "[sweep.grid]\n\"resources.nodes\" = [1, 2]",
                "which every run",
            ),
            ("[sweep.grid]\n\"flow\" = [1, 2]", "is a table"),
            ("[sweep.grid]\n\"flow.shift\" = []", "non-empty list"),
            ("[sweep]\ngird = {}", "'gird' is not grid or list"),
            (
                "[sweep.list]\na = [1]\nb = [1, 2]",
                "take their values together",
            ),
        ] {
            let text = format!("[job]\nname = \"b\"\nrun_dir = \"r\"\n[flow]\nshift = 1.0\n{spec}");
            let err = expand(&text).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        assert!(expand("[job]\nname = \"b\"\n").unwrap().is_none());
    }
}
