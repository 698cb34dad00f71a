//! The harmonised CXR7-1M metadata schema and its 19-variable encoding.
//!
//! Class 0 always means "missing". The vocabulary (names, order, class ids) is written into every store so a
//! reader never has to guess it; [`Vocabulary::current`] is what this version writes.

use serde::{Deserialize, Serialize};

/// Version of the store layout and encoding; bump when either changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// Number of categorical variables stored in `labels` (14 findings + race + sex + view + dataset).
pub const NUM_LABELS: usize = 18;

/// The 14 finding columns, in schema order (the order is part of the schema).
pub const FINDINGS: [&str; 14] = [
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "enlarged_cardiomediastinum",
    "fracture",
    "lung_lesion",
    "lung_opacity",
    "no_finding",
    "pleural_effusion",
    "pleural_other",
    "pneumonia",
    "pneumothorax",
    "support_devices",
];

/// Finding classes: 0 missing, 1 negative, 2 positive.
pub const FINDING_CLASSES: [&str; 3] = ["missing", "negative", "positive"];
pub const RACE_CLASSES: [&str; 4] = ["missing", "Asian", "Black", "White"];
pub const SEX_CLASSES: [&str; 3] = ["missing", "Male", "Female"];
pub const VIEW_CLASSES: [&str; 4] = ["missing", "AP", "PA", "Lateral"];
/// Class 0 is reserved (unknown source); then the seven sources in the order of dataset.md.
pub const DATASET_CLASSES: [&str; 8] = [
    "missing",
    "MIMIC-CXR",
    "CheXpert-Plus",
    "ReXGradient-160K",
    "PadChest",
    "VinDr-CXR",
    "NIH-CXR14",
    "BRAX",
];

/// Index of each non-finding variable inside `labels`.
pub const RACE_INDEX: usize = 14;
pub const SEX_INDEX: usize = 15;
pub const VIEW_INDEX: usize = 16;
pub const DATASET_INDEX: usize = 17;

/// How CheXpert's "uncertain" (-1) finding label is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UncertainPolicy {
    /// Uncertain becomes missing (class 0). The paper's choice and the default.
    #[default]
    UIgnore,
    /// Uncertain becomes positive.
    UOnes,
    /// Uncertain becomes negative.
    UZeros,
}

impl std::str::FromStr for UncertainPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "u-ignore" | "ignore" => Ok(Self::UIgnore),
            "u-ones" | "ones" => Ok(Self::UOnes),
            "u-zeros" | "zeros" => Ok(Self::UZeros),
            other => Err(format!(
                "unknown uncertain-label policy '{other}' (expected u-ignore, u-ones or u-zeros)"
            )),
        }
    }
}

/// Settings that decide how table values become class ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodingConfig {
    pub uncertain: UncertainPolicy,
    /// Ages outside this inclusive range (years) are implausible and become missing.
    pub age_min: f32,
    pub age_max: f32,
    /// Map common view spellings (`LL`, `LATERAL`, `postero-anterior`...) onto AP/PA/Lateral.
    pub view_aliases: bool,
}

impl Default for EncodingConfig {
    fn default() -> Self {
        Self {
            uncertain: UncertainPolicy::UIgnore,
            age_min: 0.0,
            age_max: 100.0,
            view_aliases: true,
        }
    }
}

impl EncodingConfig {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.age_min.is_finite() && self.age_max.is_finite() && self.age_min <= self.age_max) {
            return Err(format!(
                "encoding.age_min/age_max must be finite with age_min <= age_max (got {}..={})",
                self.age_min, self.age_max
            ));
        }
        Ok(())
    }
}

/// Outcome of decoding one cell: a class id, or "missing" because the value was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Class(u8),
    /// The cell had a value outside the vocabulary; it is stored as missing and counted.
    Unknown,
}

pub fn encode_finding(raw: &str, policy: UncertainPolicy) -> Cell {
    match raw.trim() {
        "" => Cell::Class(0),
        "1" | "1.0" => Cell::Class(2),
        "0" | "0.0" => Cell::Class(1),
        "-1" | "-1.0" => Cell::Class(match policy {
            UncertainPolicy::UIgnore => 0,
            UncertainPolicy::UOnes => 2,
            UncertainPolicy::UZeros => 1,
        }),
        _ => Cell::Unknown,
    }
}

fn class_of(raw: &str, classes: &[&str]) -> Cell {
    let raw = raw.trim();
    if raw.is_empty() {
        return Cell::Class(0);
    }
    classes
        .iter()
        .skip(1)
        .position(|c| c.eq_ignore_ascii_case(raw))
        .map_or(Cell::Unknown, |i| Cell::Class(i as u8 + 1))
}

pub fn encode_race(raw: &str) -> Cell {
    class_of(raw, &RACE_CLASSES)
}

pub fn encode_sex(raw: &str) -> Cell {
    class_of(raw, &SEX_CLASSES)
}

pub fn encode_dataset(raw: &str) -> Cell {
    class_of(raw, &DATASET_CLASSES)
}

pub fn encode_view(raw: &str, aliases: bool) -> Cell {
    let direct = class_of(raw, &VIEW_CLASSES);
    if direct != Cell::Unknown || !aliases {
        return direct;
    }
    let key: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match key.as_str() {
        "ap" | "anteroposterior" | "apsupine" | "aperect" | "apportable" => Cell::Class(1),
        "pa" | "posteroanterior" => Cell::Class(2),
        "lateral" | "lat" | "ll" | "rl" | "leftlateral" | "rightlateral" => Cell::Class(3),
        _ => Cell::Unknown,
    }
}

/// Age outcome: years/100 (NaN when missing) and why it is missing, if it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Age {
    Present(f32),
    Missing,
    NotANumber,
    Implausible(f32),
}

impl Age {
    /// The stored value: years/100, NaN when missing.
    pub fn stored(self) -> f32 {
        match self {
            Age::Present(years) => years / 100.0,
            _ => f32::NAN,
        }
    }
}

pub fn encode_age(raw: &str, cfg: &EncodingConfig) -> Age {
    let raw = raw.trim();
    if raw.is_empty() {
        return Age::Missing;
    }
    match raw.parse::<f32>() {
        Ok(years) if !years.is_finite() => Age::NotANumber,
        Ok(years) if years < cfg.age_min || years > cfg.age_max => Age::Implausible(years),
        Ok(years) => Age::Present(years),
        Err(_) => Age::NotANumber,
    }
}

/// The vocabulary as written into a store's root attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    pub schema_version: u32,
    /// Name of each `labels` column, in order.
    pub labels: Vec<String>,
    /// Class names of each `labels` column (index = class id; 0 = missing).
    pub classes: Vec<Vec<String>>,
    /// How age is stored.
    pub age: String,
}

impl Vocabulary {
    pub fn current() -> Self {
        let strings = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut labels: Vec<String> = FINDINGS.iter().map(|s| s.to_string()).collect();
        let mut classes: Vec<Vec<String>> =
            FINDINGS.iter().map(|_| strings(&FINDING_CLASSES)).collect();
        for (name, c) in [
            ("race", &RACE_CLASSES[..]),
            ("sex", &SEX_CLASSES[..]),
            ("view", &VIEW_CLASSES[..]),
            ("dataset", &DATASET_CLASSES[..]),
        ] {
            labels.push(name.to_string());
            classes.push(strings(c));
        }
        Self {
            schema_version: SCHEMA_VERSION,
            labels,
            classes,
            age: "float32 years/100, NaN = missing".to_string(),
        }
    }

    /// Index of a `labels` column by name (finding, race, sex, view or dataset).
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }

    /// Class id of `value` in column `index`; accepts the class names and, for findings, `positive`/`negative`.
    pub fn class_id(&self, index: usize, value: &str) -> Option<u8> {
        self.classes
            .get(index)?
            .iter()
            .position(|c| c.eq_ignore_ascii_case(value))
            .map(|i| i as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_follow_chexpert_convention_under_each_policy() {
        use UncertainPolicy::*;
        assert_eq!(encode_finding("1", UIgnore), Cell::Class(2));
        assert_eq!(encode_finding("0.0", UIgnore), Cell::Class(1));
        assert_eq!(encode_finding("", UIgnore), Cell::Class(0));
        assert_eq!(encode_finding("-1", UIgnore), Cell::Class(0));
        assert_eq!(encode_finding("-1.0", UOnes), Cell::Class(2));
        assert_eq!(encode_finding("-1", UZeros), Cell::Class(1));
        assert_eq!(encode_finding("2", UIgnore), Cell::Unknown);
        assert_eq!(encode_finding("yes", UIgnore), Cell::Unknown);
    }

    #[test]
    fn enums_map_to_class_ids_and_unknowns_are_flagged() {
        assert_eq!(encode_sex("Female"), Cell::Class(2));
        assert_eq!(encode_sex("male"), Cell::Class(1));
        assert_eq!(encode_sex("X"), Cell::Unknown);
        assert_eq!(encode_race("White"), Cell::Class(3));
        assert_eq!(encode_race("Martian"), Cell::Unknown);
        assert_eq!(encode_dataset("BRAX"), Cell::Class(7));
        assert_eq!(encode_dataset("MIMIC-CXR"), Cell::Class(1));
        assert_eq!(encode_view("postero-anterior", true), Cell::Class(2));
        assert_eq!(encode_view("LL", true), Cell::Class(3));
        assert_eq!(encode_view("LL", false), Cell::Unknown);
        assert_eq!(encode_view("oblique", true), Cell::Unknown);
    }

    #[test]
    fn ages_outside_range_or_not_numbers_are_missing() {
        let cfg = EncodingConfig::default();
        assert_eq!(encode_age("63", &cfg), Age::Present(63.0));
        assert!((encode_age("63", &cfg).stored() - 0.63).abs() < 1e-6);
        assert_eq!(encode_age("150", &cfg), Age::Implausible(150.0));
        assert_eq!(encode_age("sixty", &cfg), Age::NotANumber);
        assert_eq!(encode_age("nan", &cfg), Age::NotANumber);
        assert!(encode_age("", &cfg).stored().is_nan());
    }

    #[test]
    fn vocabulary_has_18_label_columns_in_schema_order() {
        let v = Vocabulary::current();
        assert_eq!(v.labels.len(), NUM_LABELS);
        assert_eq!(v.label_index("cardiomegaly"), Some(1));
        assert_eq!(v.label_index("dataset"), Some(DATASET_INDEX));
        assert_eq!(v.class_id(1, "positive"), Some(2));
        assert_eq!(v.class_id(SEX_INDEX, "Female"), Some(2));
    }
}
