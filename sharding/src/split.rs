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

/// How patients without an explicit split are assigned one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub seed: u64,
    /// Relative weights of train / val / test (the paper's patient counts by default).
    pub weights: [f64; 3],
}

impl Default for SplitConfig {
    fn default() -> Self {
        // CXR7-1M: 302,871 / 10,000 / 30,790 patients.
        Self {
            seed: 0,
            weights: [302_871.0, 10_000.0, 30_790.0],
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

/// FNV-1a over the seed and the id, finished with splitmix64; mapped to [0, 1) from the top 53 bits.
fn unit_hash(seed: u64, id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
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
}
