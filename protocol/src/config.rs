//! The one error of the config tree (the job spec and the train config the supervisor writes for its ranks): the
//! field, as its dotted path in the file (`engine.adam.lr`), and why it cannot work.

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The known name closest to `word`, when one is close enough to be what was meant (a typo, a missing or extra
/// letter, a singular for a plural).
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(word, k), *k))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Checks a config file's top-level sections: every section found must be known (an unknown one is named, with
/// the known one it is closest to, and the list of known ones), and every required one present.
pub fn check_sections<'a>(
    found: impl IntoIterator<Item = &'a str>,
    known: &[&str],
    required: &[&str],
) -> Result<(), ConfigError> {
    let found: Vec<&str> = found.into_iter().collect();
    let list = known
        .iter()
        .map(|k| format!("[{k}]"))
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(unknown) = found.iter().find(|f| !known.contains(f)) {
        let hint = did_you_mean(unknown, known)
            .map(|k| format!("did you mean [{k}]? "))
            .unwrap_or_default();
        return Err(ConfigError::new(
            *unknown,
            format!("unknown section: {hint}(this file's sections are {list})"),
        ));
    }
    if let Some(missing) = required.iter().find(|r| !found.contains(r)) {
        let hint = found
            .iter()
            .find(|f| did_you_mean(f, &[missing]).is_some())
            .map(|f| format!(" (is [{f}] meant to be it?)"))
            .unwrap_or_default();
        return Err(ConfigError::new(
            *missing,
            format!("missing section [{missing}]{hint}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 4] = ["job", "resources", "launcher", "samples"];

    #[test]
    fn typos_get_the_section_that_was_meant() {
        assert_eq!(did_you_mean("resorces", &KNOWN), Some("resources"));
        assert_eq!(did_you_mean("sample", &KNOWN), Some("samples"));
        assert_eq!(did_you_mean("zzz", &KNOWN), None);
        let e = check_sections(["job", "resorces", "launcher"], &KNOWN, &KNOWN[..3]).unwrap_err();
        assert_eq!(e.field, "resorces");
        assert!(e.reason.contains("did you mean [resources]?"), "{e}");
        assert!(e.reason.contains("[samples]"), "the known list: {e}");
        let e = check_sections(["job", "launcher"], &KNOWN, &KNOWN[..3]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid config: resources: missing section [resources]"
        );
        assert!(check_sections(["job", "resources", "launcher"], &KNOWN, &KNOWN[..3]).is_ok());
    }
}
