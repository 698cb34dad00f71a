//! Profiles in and out: CSV with one column per variable (the vocabulary's names and `age` in years; class names,
//! empty = missing), JSON rows, and a profile given inline as `name=value,...`. Extra columns (a `radit generate`
//! samples.csv has file, image_id, row and sample) are ignored.

use std::path::Path;

use radit_sharding::schema::Vocabulary;
use tch::{Kind, Tensor};

use super::model::Profiles;
use crate::error::ModelError;

fn bad(what: &str, reason: String) -> ModelError {
    ModelError::BadInput {
        input: "profile",
        reason: format!("{what}: {reason}"),
    }
}

/// A variable a column (or a `name=`) names: case and surrounding spaces ignored.
enum Variable {
    Label(usize),
    Age,
}

fn variable(vocab: &Vocabulary, name: &str) -> Option<Variable> {
    let name = name.trim().to_ascii_lowercase();
    if name == super::graph::AGE {
        return Some(Variable::Age);
    }
    vocab.label_index(&name).map(Variable::Label)
}

/// One profile's values: class ids per label column and age in years/100 (NaN = missing), from `name=value`
/// pairs (unset = missing). `what` names the source in errors.
fn row_from_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
    what: &str,
) -> Result<(Vec<u8>, f32), ModelError> {
    let vocab = Vocabulary::current();
    let mut labels = vec![0u8; vocab.labels.len()];
    let mut age = f32::NAN;
    for (name, value) in pairs {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let i = match variable(&vocab, name) {
            Some(Variable::Label(i)) => i,
            Some(Variable::Age) => {
                let years: f32 = value
                    .parse()
                    .ok()
                    .filter(|y: &f32| y.is_finite() && (0.0..=120.0).contains(y))
                    .ok_or_else(|| {
                        bad(what, format!("age `{value}`: expected years in 0..=120"))
                    })?;
                age = years / 100.0;
                continue;
            }
            None => continue,
        };
        let class = vocab.classes[i]
            .iter()
            .position(|c| c.eq_ignore_ascii_case(value))
            .filter(|&c| c > 0)
            .ok_or_else(|| {
                bad(
                    what,
                    format!(
                        "`{value}` is not a class of {} (classes: {})",
                        vocab.labels[i],
                        vocab.classes[i][1..].join(", ")
                    ),
                )
            })?;
        labels[i] = class as u8;
    }
    Ok((labels, age))
}

/// Profiles from rows of (class ids per label, age in years/100).
pub fn profiles(rows: &[(Vec<u8>, f32)]) -> Profiles {
    let n = rows.len() as i64;
    let columns = Vocabulary::current().labels.len() as i64;
    let labels: Vec<i64> = rows
        .iter()
        .flat_map(|(l, _)| l.iter().map(|&c| i64::from(c)))
        .collect();
    let age: Vec<f32> = rows.iter().map(|(_, a)| *a).collect();
    Profiles {
        labels: Tensor::from_slice(&labels).view([n, columns]),
        age: Tensor::from_slice(&age),
    }
}

/// One profile given inline: `sex=Female,age=63,cardiomegaly=positive` (unset = missing). An unknown variable
/// is an error here (a CSV may have other columns; an inline profile may not).
pub fn parse_inline(text: &str) -> Result<Profiles, ModelError> {
    let vocab = Vocabulary::current();
    let mut pairs = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| bad("--from", format!("`{item}` is not name=value")))?;
        let lower = name.trim().to_ascii_lowercase();
        if lower != super::graph::AGE && vocab.label_index(&lower).is_none() {
            return Err(bad(
                "--from",
                format!(
                    "unknown variable `{}` (known: {}, age)",
                    name.trim(),
                    vocab.labels.join(", ")
                ),
            ));
        }
        pairs.push((name, value));
    }
    Ok(profiles(&[row_from_pairs(pairs.into_iter(), "--from")?]))
}

/// Profiles from a CSV file with a header (see the module docs).
pub fn read_csv(path: &Path) -> Result<Profiles, ModelError> {
    read_csv_prefixed(path, "")
}

/// Profiles from the columns of a CSV file named `prefix` + a variable (`factual_sex`, ... in `edits.csv`); the
/// other columns are ignored.
pub fn read_csv_prefixed(path: &Path, prefix: &str) -> Result<Profiles, ModelError> {
    let what = path.display().to_string();
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(&what, e.to_string()))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(&what, e.to_string()))?
        .iter()
        // A column of another prefix is no variable here.
        .map(|c| {
            c.strip_prefix(prefix)
                .map_or_else(|| format!("-{c}"), str::to_string)
        })
        .collect();
    // Other columns (ids, paths) are allowed beside the variables, but a file with none of them is a wrong file,
    // not a set of all-missing profiles.
    let vocab = Vocabulary::current();
    if !header.iter().any(|c| variable(&vocab, c).is_some()) {
        return Err(bad(
            &what,
            format!(
                "none of its columns ({}) is one of the variables ({}, {})",
                header.join(", "),
                vocab.labels.join(", "),
                super::graph::AGE
            ),
        ));
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(&what, format!("row {}: {e}", i + 2)))?;
        let at = format!("{what}, row {}", i + 2);
        rows.push(row_from_pairs(
            header.iter().map(String::as_str).zip(record.iter()),
            &at,
        )?);
    }
    if rows.is_empty() {
        return Err(bad(&what, "no profiles".into()));
    }
    Ok(profiles(&rows))
}

/// Each profile as (name, value) pairs in the vocabulary's order then age in years; missing values are empty.
pub fn rows(p: &Profiles) -> Vec<Vec<(String, String)>> {
    let vocab = Vocabulary::current();
    let labels =
        Vec::<i64>::try_from(p.labels.to_kind(Kind::Int64).flatten(0, -1)).unwrap_or_default();
    let age = Vec::<f32>::try_from(p.age.to_kind(Kind::Float)).unwrap_or_default();
    let columns = vocab.labels.len();
    age.iter()
        .enumerate()
        .map(|(r, &a)| {
            let mut row: Vec<(String, String)> = vocab
                .labels
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let c = labels[r * columns + i] as usize;
                    let value = if c == 0 {
                        String::new()
                    } else {
                        vocab.classes[i][c].clone()
                    };
                    (name.clone(), value)
                })
                .collect();
            row.push((
                super::graph::AGE.into(),
                if a.is_finite() {
                    format!("{:.2}", a * 100.0)
                } else {
                    String::new()
                },
            ));
            row
        })
        .collect()
}

/// Profiles as CSV text (header, then one line per profile).
pub fn to_csv(p: &Profiles) -> String {
    let rows = rows(p);
    let vocab = Vocabulary::current();
    let mut out = vocab.labels.join(",") + ",age\n";
    for row in rows {
        out += &row
            .iter()
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        out += "\n";
    }
    out
}

/// Profiles as JSON: one object per profile, set variables only.
pub fn to_json(p: &Profiles) -> serde_json::Value {
    serde_json::Value::Array(
        rows(p)
            .into_iter()
            .map(|row| {
                serde_json::Value::Object(
                    row.into_iter()
                        .filter(|(_, v)| !v.is_empty())
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect(),
                )
            })
            .collect(),
    )
}
