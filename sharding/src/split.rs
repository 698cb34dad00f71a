//! Patient-level splits: given by the table, or a seeded hash of `patient_id` with the paper's proportions.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(format!("split '{other}' is not one of train, val, test")),
        }
    }
}

/// Which splits a command reads: one, or (`any`, for a list of ids) all three in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SplitScope {
    One(Split),
    Any,
}

impl SplitScope {
    pub fn splits(self) -> Vec<Split> {
        match self {
            SplitScope::One(s) => vec![s],
            SplitScope::Any => Split::ALL.to_vec(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SplitScope::One(s) => s.name(),
            SplitScope::Any => "any",
        }
    }
}

impl std::fmt::Display for SplitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SplitScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("any") {
            return Ok(SplitScope::Any);
        }
        s.parse()
            .map(SplitScope::One)
            .map_err(|e: String| format!("{e} (or any)"))
    }
}

impl TryFrom<String> for SplitScope {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SplitScope> for String {
    fn from(s: SplitScope) -> String {
        s.name().to_string()
    }
}

impl From<Split> for SplitScope {
    fn from(s: Split) -> Self {
        SplitScope::One(s)
    }
}

/// How patients without an explicit split are assigned one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub seed: u64,
    /// Relative weights of train / val / test (the paper's patient counts by default).
    pub weights: [f64; 3],
    /// Exact patient counts of validation and test instead of the weights: the patients without an explicit
    /// split in a seeded order (the same hash), the first `val` to validation, the next `test` to test, the rest
    /// to train. Absent from the manifest when unset, so older stores keep their fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<ExactSplit>,
}

/// `--split-patients VAL,TEST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactSplit {
    pub val: u64,
    pub test: u64,
}

impl std::str::FromStr for ExactSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not VAL,TEST patient counts (for example 10000,30790)");
        let (val, test) = s.split_once(',').ok_or_else(bad)?;
        Ok(Self {
            val: val.trim().parse().map_err(|_| bad())?,
            test: test.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl Default for SplitConfig {
    fn default() -> Self {
        // CXR7-1M: 302,871 / 10,000 / 30,790 patients.
        Self {
            seed: 0,
            weights: [302_871.0, 10_000.0, 30_790.0],
            patients: None,
        }
    }
}

impl SplitConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.weights.iter().any(|w| !w.is_finite() || *w < 0.0)
            || self.weights.iter().sum::<f64>() <= 0.0
        {
            return Err(format!(
                "split.weights must be non-negative with a positive sum (got {:?})",
                self.weights
            ));
        }
        Ok(())
    }

    /// The splits of the patients `assign` would hash: by exact counts when `patients` is set (an error when the
    /// patients are too few), else by `assign` each.
    pub fn assign_all<'a>(
        &self,
        patients: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::HashMap<&'a str, Split>, String> {
        let mut unique: Vec<&'a str> = patients.into_iter().collect();
        unique.sort_unstable();
        unique.dedup();
        let Some(exact) = self.patients else {
            return Ok(unique.into_iter().map(|p| (p, self.assign(p))).collect());
        };
        let wanted = exact.val.saturating_add(exact.test);
        if (unique.len() as u64) < wanted {
            return Err(format!(
                "--split-patients asks for {} validation and {} test patients but the table has only {} patients \
                 without an explicit split",
                exact.val,
                exact.test,
                unique.len()
            ));
        }
        // A seeded permutation: the order of the same hash `assign` uses, ties broken by the id.
        let mut keyed: Vec<(u64, &'a str)> = unique
            .into_iter()
            .map(|p| (id_key(self.seed, p) >> 11, p))
            .collect();
        keyed.sort_unstable();
        Ok(keyed
            .into_iter()
            .enumerate()
            .map(|(i, (_, p))| {
                let i = i as u64;
                let split = if i < exact.val {
                    Split::Val
                } else if i < wanted {
                    Split::Test
                } else {
                    Split::Train
                };
                (p, split)
            })
            .collect())
    }

    /// The split of a patient: a pure function of (seed, patient_id), identical on every platform.
    pub fn assign(&self, patient_id: &str) -> Split {
        let u = unit_hash(self.seed, patient_id);
        let total: f64 = self.weights.iter().sum();
        let train = self.weights[0] / total;
        let val = self.weights[1] / total;
        if u < train {
            Split::Train
        } else if u < train + val {
            Split::Val
        } else {
            Split::Test
        }
    }
}

/// [`id_key`] mapped to [0, 1) from the top 53 bits.
fn unit_hash(seed: u64, id: &str) -> f64 {
    (id_key(seed, id) >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a over the seed and the id, finished with splitmix64: a seeded order of ids (splits, reference sets)
/// that is the same on every platform and in every version.
pub fn id_key(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_split_is_stable_and_close_to_the_paper_proportions() {
        let cfg = SplitConfig::default();
        let mut counts = [0usize; 3];
        for i in 0..100_000 {
            let s = cfg.assign(&format!("patient-{i}"));
            assert_eq!(s, cfg.assign(&format!("patient-{i}")));
            counts[s as usize] += 1;
        }
        let frac = |c: usize| c as f64 / 100_000.0;
        assert!((frac(counts[0]) - 0.8813).abs() < 0.01, "{counts:?}");
        assert!((frac(counts[1]) - 0.0291).abs() < 0.005, "{counts:?}");
        assert!((frac(counts[2]) - 0.0896).abs() < 0.01, "{counts:?}");
        // Pinned: a change here would silently move patients between the splits of existing stores.
        let pinned: String = (0..40)
            .map(|i| cfg.assign(&format!("P{i:06}")).name().as_bytes()[0] as char)
            .collect();
        assert_eq!(pinned, "tttttttttttvtttttttttttttttttttttttttttt");
        let other_seed = SplitConfig {
            seed: 7,
            ..SplitConfig::default()
        };
        let moved = (0..1000)
            .filter(|i| cfg.assign(&i.to_string()) != other_seed.assign(&i.to_string()))
            .count();
        assert!(
            moved > 50,
            "the seed must change the assignment ({moved} moved)"
        );
    }

    #[test]
    fn exact_counts_place_exactly_that_many_patients() {
        let cfg = SplitConfig {
            patients: Some("10,30".parse().unwrap()),
            ..SplitConfig::default()
        };
        let ids: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
        // Each patient twice: counts are of patients, not rows.
        let all = cfg
            .assign_all(ids.iter().chain(&ids).map(String::as_str))
            .unwrap();
        let count = |s: Split| all.values().filter(|v| **v == s).count();
        assert_eq!(
            (count(Split::Val), count(Split::Test), count(Split::Train)),
            (10, 30, 160)
        );
        // The order is the seeded hash's: another seed picks other patients, the same seed the same ones.
        assert_eq!(
            all,
            cfg.assign_all(ids.iter().rev().map(String::as_str))
                .unwrap()
        );
        let reseeded = SplitConfig {
            seed: 3,
            ..cfg.clone()
        };
        assert_ne!(
            all,
            reseeded.assign_all(ids.iter().map(String::as_str)).unwrap()
        );
        let err = cfg
            .assign_all(ids[..39].iter().map(String::as_str))
            .unwrap_err();
        assert!(err.contains("only 39 patients"), "{err}");
        assert!("10".parse::<ExactSplit>().unwrap_err().contains("VAL,TEST"));
    }
}
