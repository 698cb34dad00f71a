//! The per-job secret: 32 random bytes, hex. Handed to ranks through the environment or a 0600 file; never logged
//! (its Debug form is redacted).

use std::io::{Read, Write};
use std::path::Path;

/// 32 bytes from the operating system's random source (tokens, handshake nonces).
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A job token.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl JobToken {
    /// 256 bits from the operating system's random source.
    pub fn generate() -> std::io::Result<Self> {
        Ok(Self(hex::encode(random_bytes()?)))
    }

    /// A token from its text (as read from the environment or a file).
    pub fn from_text(text: &str) -> Option<Self> {
        let t = text.trim();
        (t.len() >= 32 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Self(t.to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Writes the token to `path`, readable by its owner only (created 0600, never widened).
    pub fn write_private(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(self.0.as_bytes())
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::from_text(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} holds no job token", path.display()),
            )
        })
    }

    /// Compares in time independent of where the inputs differ.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// Equality in time independent of where the inputs differ (it depends on their lengths only).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_private_and_never_printed() {
        let (a, b) = (JobToken::generate().unwrap(), JobToken::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.secret().len(), 64);
        assert!(!format!("{a:?}").contains(a.secret()));
        assert!(a.matches(a.secret()) && !a.matches(b.secret()) && !a.matches(""));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        a.write_private(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(JobToken::read(&path).unwrap(), a);
        assert!(
            a.write_private(&path).is_err(),
            "an existing file is not overwritten"
        );
        assert!(JobToken::from_text("short").is_none());
    }
}
