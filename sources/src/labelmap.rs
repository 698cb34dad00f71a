//! Label maps from a source's findings into CheXpert-14, as editable TOML tables (`sources/labelmaps/*.toml` are
//! the built-in defaults), validated when loaded: every finding named is one of the schema's, every label listed is
//! in the source's vocabulary, nothing is listed twice.
//!
//! Convention (shared/design/sources.md A.8): a finding is 1 when any of its labels is present, 0 when the image
//! is labelled and none is (with `absent_is_negative`), and missing when no label maps to it; `no_finding` is 1 with
//! a normal label, else 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use radit_sharding::schema::FINDINGS;
use serde::Deserialize;

use crate::SourceError;
use crate::output::Finding;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelMapFile {
    schema: u32,
    source: String,
    absent_is_negative: bool,
    /// Compare labels ignoring case (PadChest spells `NSG tube` and `nsg tube`).
    #[serde(default)]
    case_insensitive: bool,
    vocabulary: Vec<String>,
    no_finding: Vec<String>,
    findings: BTreeMap<String, Vec<String>>,
}

/// A validated label map.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    /// Where it came from (`(built-in)` for a default), for the report.
    pub origin: String,
    pub source: String,
    pub absent_is_negative: bool,
    case_insensitive: bool,
    /// Labels as compared (lower-cased when the map is case-insensitive).
    vocabulary: BTreeSet<String>,
    no_finding: BTreeSet<String>,
    /// Schema finding index -> the labels that set it.
    findings: BTreeMap<usize, BTreeSet<String>>,
}

/// What [`LabelMap::apply`] made of one image's labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    pub findings: [Finding; 14],
    /// Labels not in the vocabulary.
    pub unknown: Vec<String>,
    /// Labels in the vocabulary that set no finding.
    pub unmapped: Vec<String>,
}

impl LabelMap {
    /// Parses and validates a map; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, SourceError> {
        let bad = |key: &str, reason: String| SourceError::InvalidLabelMap {
            path: origin.to_path_buf(),
            key: key.into(),
            reason,
        };
        let file: LabelMapFile = toml::from_str(text).map_err(|e| bad("(file)", e.to_string()))?;
        if file.schema != 1 {
            return Err(bad(
                "schema",
                format!("{}: this radit reads schema 1", file.schema),
            ));
        }
        let norm = |l: &str| normalise(l, file.case_insensitive);
        let mut vocabulary = BTreeSet::new();
        for label in &file.vocabulary {
            if !vocabulary.insert(norm(label)) {
                return Err(bad("vocabulary", format!("`{label}` is listed twice")));
            }
        }
        let known = |key: &str, label: &String| -> Result<(), SourceError> {
            if vocabulary.contains(&norm(label)) {
                Ok(())
            } else {
                Err(bad(key, format!("`{label}` is not in the vocabulary")))
            }
        };
        for label in &file.no_finding {
            known("no_finding", label)?;
        }
        let mut findings = BTreeMap::new();
        for (name, labels) in &file.findings {
            let key = format!("findings.{name}");
            let Some(index) = FINDINGS.iter().position(|f| f == name) else {
                return Err(bad(
                    &key,
                    format!("not a finding of the schema ({})", FINDINGS.join(", ")),
                ));
            };
            if name == "no_finding" {
                return Err(bad(&key, "set by the top-level `no_finding` list".into()));
            }
            if labels.is_empty() {
                return Err(bad(&key, "empty: leave the finding out instead".into()));
            }
            let mut set = BTreeSet::new();
            for label in labels {
                known(&key, label)?;
                if !set.insert(norm(label)) {
                    return Err(bad(&key, format!("`{label}` is listed twice")));
                }
            }
            findings.insert(index, set);
        }
        Ok(Self {
            origin: origin.display().to_string(),
            source: file.source,
            absent_is_negative: file.absent_is_negative,
            case_insensitive: file.case_insensitive,
            no_finding: file.no_finding.iter().map(|l| norm(l)).collect(),
            vocabulary,
            findings,
        })
    }

    /// How many labels the vocabulary has.
    pub fn vocabulary_len(&self) -> usize {
        self.vocabulary.len()
    }

    fn norm(&self, label: &str) -> String {
        normalise(label, self.case_insensitive)
    }

    /// The map in `file`, or the built-in `default` when none is given.
    pub fn load(file: Option<&Path>, default: &str) -> Result<Self, SourceError> {
        match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| SourceError::ReadInput {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::parse(&text, p)
            }
            None => Self::parse(default, &PathBuf::from("(built-in)")),
        }
    }

    /// Adds `labels` to the finding `name` (a knob such as NIH's `opacity_includes_children`).
    pub fn extend(&mut self, name: &str, labels: &[&str]) {
        let labels: Vec<String> = labels
            .iter()
            .map(|l| self.norm(l))
            .filter(|l| self.vocabulary.contains(l))
            .collect();
        if let Some(index) = FINDINGS.iter().position(|f| *f == name) {
            self.findings.entry(index).or_default().extend(labels);
        }
    }

    /// The findings of an image labelled with `present` (an image with no labels at all has every finding missing).
    pub fn apply(&self, present: &[String]) -> Applied {
        if present.is_empty() {
            return Applied::default();
        }
        self.apply_labelled(present)
    }

    /// The findings of an image known to be labelled, even with no label present (VinDr after a vote none of its
    /// labels won: every mapped finding is negative).
    pub fn apply_labelled(&self, present: &[String]) -> Applied {
        let mut out = Applied::default();
        let mut seen = BTreeSet::new();
        for label in present {
            let key = self.norm(label);
            if !seen.insert(key.clone()) {
                continue;
            }
            if !self.vocabulary.contains(&key) {
                out.unknown.push(label.trim().to_string());
            } else if !self.no_finding.contains(&key)
                && !self.findings.values().any(|s| s.contains(&key))
            {
                out.unmapped.push(label.trim().to_string());
            }
        }
        let present: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
        for (&index, labels) in &self.findings {
            out.findings[index] = if labels.iter().any(|l| present.contains(l.as_str())) {
                Finding::Positive
            } else if self.absent_is_negative {
                Finding::Negative
            } else {
                Finding::Missing
            };
        }
        let no_finding = FINDINGS
            .iter()
            .position(|f| *f == "no_finding")
            .unwrap_or(8);
        out.findings[no_finding] = if self.no_finding.iter().any(|l| present.contains(l.as_str())) {
            Finding::Positive
        } else {
            Finding::Negative
        };
        out
    }

    /// Which finding each label sets, for the report: label -> finding names.
    pub fn targets(&self, label: &str) -> Vec<&'static str> {
        let label = self.norm(label);
        let mut out: Vec<&'static str> = self
            .findings
            .iter()
            .filter(|(_, labels)| labels.contains(&label))
            .map(|(&i, _)| FINDINGS[i])
            .collect();
        if self.no_finding.contains(&label) {
            out.push("no_finding");
        }
        out
    }
}

/// A label as compared: trimmed, and lower-cased for a case-insensitive map.
fn normalise(label: &str, case_insensitive: bool) -> String {
    let t = label.trim();
    if case_insensitive {
        t.to_lowercase()
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIH: &str = include_str!("../labelmaps/nih.toml");

    fn finding(a: &Applied, name: &str) -> Finding {
        a.findings[FINDINGS.iter().position(|f| *f == name).unwrap()]
    }

    #[test]
    fn the_built_in_nih_map_validates_and_follows_the_convention() {
        let m = LabelMap::load(None, NIH).unwrap();
        let a = m.apply(&[
            "Effusion".into(),
            "Mass".into(),
            "Hernia".into(),
            "Pneumonitis".into(),
        ]);
        assert_eq!(finding(&a, "pleural_effusion"), Finding::Positive);
        assert_eq!(finding(&a, "lung_lesion"), Finding::Positive);
        assert_eq!(finding(&a, "atelectasis"), Finding::Negative);
        assert_eq!(finding(&a, "no_finding"), Finding::Negative);
        assert_eq!(
            finding(&a, "fracture"),
            Finding::Missing,
            "no NIH label maps to it"
        );
        assert_eq!(a.unknown, vec!["Pneumonitis"]);
        assert_eq!(a.unmapped, vec!["Hernia"]);
        let normal = m.apply(&["No Finding".into()]);
        assert_eq!(finding(&normal, "no_finding"), Finding::Positive);
        assert_eq!(finding(&normal, "cardiomegaly"), Finding::Negative);
        assert_eq!(m.apply(&[]).findings, [Finding::Missing; 14]);
        assert_eq!(m.targets("Nodule"), vec!["lung_lesion"]);
    }

    #[test]
    fn the_built_in_padchest_map_has_the_193_labels_and_ignores_case() {
        let m = LabelMap::load(None, include_str!("../labelmaps/padchest.toml")).unwrap();
        assert_eq!(m.vocabulary_len(), 193);
        let a = m.apply(&[
            " pneumonia".into(),
            "nsg tube".into(),
            "hydropneumothorax".into(),
            "scoliosis".into(),
        ]);
        for f in [
            "pneumonia",
            "support_devices",
            "pleural_effusion",
            "pneumothorax",
        ] {
            assert_eq!(finding(&a, f), Finding::Positive, "{f}");
        }
        assert_eq!(finding(&a, "cardiomegaly"), Finding::Negative);
        assert_eq!(a.unmapped, vec!["scoliosis"]);
        assert!(a.unknown.is_empty());
    }

    #[test]
    fn mistakes_in_a_map_name_the_key() {
        let cases = [
            (
                NIH.replace("lung_lesion = [", "lung_lesions = ["),
                "findings.lung_lesions",
            ),
            (
                NIH.replace("[\"Nodule\", \"Mass\"]", "[\"Nodule\", \"Masss\"]"),
                "findings.lung_lesion",
            ),
            (
                NIH.replace("\"Hernia\",", "\"Hernia\", \"Hernia\","),
                "vocabulary",
            ),
            (
                NIH.replace("cardiomegaly = [\"Cardiomegaly\"]", "cardiomegaly = []"),
                "findings.cardiomegaly",
            ),
            (
                NIH.replace("schema = 1", "schema = 1\nextra = true"),
                "(file)",
            ),
            (
                format!("{NIH}\nno_finding = [\"No Finding\"]\n"),
                "findings.no_finding",
            ),
        ];
        for (text, key) in cases {
            let e = LabelMap::parse(&text, Path::new("my.toml")).unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.contains("my.toml") && shown.contains(key),
                "{key}: {shown}"
            );
        }
    }
}
