//! Object storage by URL: `file:///abs/dir` (or a plain path), `s3://bucket/prefix` (AWS_* environment variables,
//! including `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` for S3-compatible servers) and `memory://` for tests.
//!
//! [`Storage`] is a blocking facade over `object_store` with its own small tokio runtime, so the CPU-bound ingest
//! (rayon) can call it from any thread.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::ShardError;

/// A store rooted at one URL, with blocking methods.
#[derive(Clone)]
pub struct Storage {
    url: String,
    inner: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("url", &self.url).finish()
    }
}

/// Turns a plain filesystem path into a `file://` URL; leaves URLs alone.
pub fn normalise_url(location: &str) -> Result<url::Url, ShardError> {
    let bad = |reason: String| ShardError::InvalidUrl {
        url: location.to_string(),
        reason,
    };
    if location.contains("://") {
        return url::Url::parse(location).map_err(|e| bad(e.to_string()));
    }
    let path = std::path::Path::new(location);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| bad(format!("cannot resolve a relative path: {e}")))?
            .join(path)
    };
    url::Url::from_directory_path(&abs).map_err(|()| bad("not a usable directory path".into()))
}

impl Storage {
    /// Opens the store at `location` for reading: a local directory must already exist (no empty directory is
    /// left behind by a mistyped path).
    pub fn open_existing(location: &str) -> Result<Self, ShardError> {
        let url = normalise_url(location)?;
        if url.scheme() == "file" {
            let dir = url.to_file_path().map_err(|()| ShardError::InvalidUrl {
                url: location.into(),
                reason: "not a local path".into(),
            })?;
            if !dir.is_dir() {
                return Err(ShardError::NotFound {
                    url: url.as_str().trim_end_matches('/').to_string(),
                });
            }
        }
        Self::open(location)
    }

    /// Opens (for file URLs: creates) the store at `location`.
    pub fn open(location: &str) -> Result<Self, ShardError> {
        let url = normalise_url(location)?;
        let shown = url.as_str().trim_end_matches('/').to_string();
        let bad = |reason: String| ShardError::InvalidUrl {
            url: shown.clone(),
            reason,
        };
        let inner: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|source| ShardError::Unwritable {
                    url: shown.clone(),
                    reason: format!("cannot create directory {}: {source}", dir.display()),
                })?;
                Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?)
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .ok_or_else(|| bad("s3 URL has no bucket".into()))?;
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| bad(format!("S3 configuration: {e}")))?;
                let prefix =
                    ObjectPath::from_url_path(url.path()).map_err(|e| bad(e.to_string()))?;
                if prefix.as_ref().is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix))
                }
            }
            "memory" => Arc::new(InMemory::new()),
            other => {
                return Err(bad(format!(
                    "unsupported scheme '{other}' (use file://, s3:// or a path)"
                )));
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("radit-io")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Self {
            url: shown,
            inner,
            runtime: Arc::new(runtime),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of `key`, for messages.
    pub fn describe(&self, key: &str) -> String {
        format!("{}/{}", self.url, key)
    }

    /// Classifies a storage failure by what the caller can do: a missing object, a location the user must fix
    /// (permissions, read-only, disk full), or a failure worth retrying.
    fn io_error(&self, key: &str, source: object_store::Error) -> ShardError {
        use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem, StorageFull};
        let io_kind = io_error_kind(&source);
        match source {
            object_store::Error::NotFound { .. } => ShardError::NotFound {
                url: self.describe(key),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => ShardError::Unwritable {
                url: self.describe(key),
                reason: source.to_string(),
            },
            _ if matches!(
                io_kind,
                Some(PermissionDenied | ReadOnlyFilesystem | StorageFull)
            ) =>
            {
                ShardError::Unwritable {
                    url: self.describe(key),
                    reason: source.to_string(),
                }
            }
            source => ShardError::Storage {
                url: self.describe(key),
                source,
            },
        }
    }

    pub fn put(&self, key: &str, data: Bytes) -> Result<(), ShardError> {
        let path = ObjectPath::from(key);
        self.runtime
            .block_on(self.inner.put(&path, PutPayload::from_bytes(data)))
            .map(|_| ())
            .map_err(|e| self.io_error(key, e))
    }

    /// Puts several objects concurrently; fails on the first error.
    pub fn put_many(&self, objects: Vec<(String, Bytes)>) -> Result<(), ShardError> {
        self.runtime.block_on(async {
            futures::stream::iter(objects)
                .map(|(key, data)| {
                    let store = self.inner.clone();
                    async move {
                        store
                            .put(
                                &ObjectPath::from(key.as_str()),
                                PutPayload::from_bytes(data),
                            )
                            .await
                            .map_err(|e| (key, e))
                    }
                })
                .buffer_unordered(8)
                .try_collect::<Vec<_>>()
                .await
                .map(|_| ())
                .map_err(|(key, e)| self.io_error(&key, e))
        })
    }

    pub fn get(&self, key: &str) -> Result<Bytes, ShardError> {
        let path = ObjectPath::from(key);
        self.runtime
            .block_on(async { self.inner.get(&path).await?.bytes().await })
            .map_err(|e| self.io_error(key, e))
    }

    /// Like [`Storage::get`] but `None` when the object does not exist.
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>, ShardError> {
        match self.get(key) {
            Ok(b) => Ok(Some(b)),
            Err(ShardError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gets several objects concurrently, in the order asked; each result separately.
    pub fn get_many(&self, keys: &[String]) -> Vec<Result<Bytes, ShardError>> {
        self.runtime.block_on(async {
            futures::stream::iter(keys.iter().cloned())
                .map(|key| {
                    let store = self.inner.clone();
                    async move {
                        let path = ObjectPath::from(key.as_str());
                        let r = async { store.get(&path).await?.bytes().await }.await;
                        (key, r)
                    }
                })
                .buffered(8)
                .map(|(key, r)| r.map_err(|e| self.io_error(&key, e)))
                .collect()
                .await
        })
    }

    /// Keys under `prefix` (recursive), sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ShardError> {
        let path = ObjectPath::from(prefix);
        let mut keys: Vec<String> = self
            .runtime
            .block_on(
                self.inner
                    .list(Some(&path))
                    .map_ok(|m| m.location.to_string())
                    .try_collect(),
            )
            .map_err(|e| self.io_error(prefix, e))?;
        keys.sort();
        Ok(keys)
    }

    pub fn delete(&self, key: &str) -> Result<(), ShardError> {
        let path = ObjectPath::from(key);
        match self.runtime.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io_error(key, e)),
        }
    }
}

/// The kind of the first `std::io::Error` in an error's source chain.
fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_become_file_urls_and_objects_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let s = Storage::open(root.to_str().unwrap()).unwrap();
        assert!(s.url().starts_with("file:///"));
        s.put("a/b.json", Bytes::from_static(b"{}")).unwrap();
        assert_eq!(s.get("a/b.json").unwrap(), Bytes::from_static(b"{}"));
        assert!(root.join("a/b.json").exists());
        assert_eq!(s.list("a").unwrap(), vec!["a/b.json".to_string()]);
        assert!(s.get_opt("a/missing").unwrap().is_none());
        let e = s.get("a/missing").unwrap_err().to_string();
        assert!(e.contains("a/missing"), "{e}");
    }

    #[test]
    fn unwritable_and_unsupported_urls_are_clear_errors() {
        let e = Storage::open("file:///proc/radit-cannot-write-here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/proc/radit-cannot-write-here"), "{e}");
        let e = Storage::open("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme"), "{e}");
    }
}
