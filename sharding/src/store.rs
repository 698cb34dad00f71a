//! Object storage by URL: `file:///abs/dir` (or a plain path), `s3://bucket/prefix` (AWS_* environment variables,
//! including `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` for S3-compatible servers) and `memory://` for tests.
//!
//! [`Storage`] is a blocking facade over `object_store` on one process-wide I/O runtime, so the CPU-bound ingest
//! (rayon) and the loader's threads can call it from anywhere. Retries live here, configured once ([`RetryPolicy`]):
//! every get, put, list and delete of every store (shards, manifests, checkpoints) retries failures worth retrying
//! with exponential backoff; object_store's own S3 retries are off so that a failure is not retried twice over.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// What object storage can go wrong with, by what the caller can do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The location is not a usable URL: fix it.
    #[error("location '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The location exists but cannot be written (permissions, read-only, disk full): fix the location.
    #[error("output '{url}' cannot be written: {reason}")]
    Unwritable { url: String, reason: String },
    #[error("{url} does not exist")]
    NotFound { url: String },
    /// The object store answered that the bucket itself does not exist: create it, or fix the URL.
    #[error(
        "bucket '{bucket}' does not exist at the S3 endpoint (asked for {url}): create it or fix the URL"
    )]
    NoBucket { bucket: String, url: String },
    /// The object store refused the credentials or the permission: fix them (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or the bucket's policy).
    #[error(
        "access to {url} refused ({reason}): check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
         AWS_SESSION_TOKEN) and the bucket's permissions"
    )]
    Refused { url: String, reason: String },
    /// The store failed in a way that may pass on retry (network, server, transient I/O); retried already.
    #[error("storage error at {url}: {source}")]
    Failed {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// The process-wide I/O runtime could not start (out of threads or memory).
    #[error("cannot start the I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl StorageError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Failed { .. })
    }
}

/// How failures worth retrying are retried: `attempts` tries in all, waiting `first_delay`, then twice as long each
/// time, at most `max_delay`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails in a way not worth retrying, or the attempts are spent.
    fn run<T>(
        &self,
        what: &str,
        url: &str,
        mut op: impl FnMut() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match op() {
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    tracing::warn!(url, what, attempt, error = %e, "retrying a storage request");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.max_delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The one I/O runtime of the process, shared by every open store.
fn io_runtime() -> Result<Arc<tokio::runtime::Runtime>, StorageError> {
    static RUNTIME: OnceLock<Arc<tokio::runtime::Runtime>> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("radit-io")
        .enable_all()
        .build()
        .map_err(StorageError::Runtime)?;
    Ok(RUNTIME.get_or_init(|| Arc::new(rt)).clone())
}

/// A store rooted at one URL, with blocking methods.
#[derive(Clone)]
pub struct Storage {
    url: String,
    /// The root directory of a `file://` store (where [`Storage::put_durable`] writes directly).
    local_dir: Option<std::path::PathBuf>,
    inner: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("url", &self.url).finish()
    }
}

/// Turns a plain filesystem path into a `file://` URL; leaves URLs alone.
pub fn normalise_url(location: &str) -> Result<url::Url, StorageError> {
    let bad = |reason: String| StorageError::InvalidUrl {
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

/// The whole chain of an object store error as text (the server's error code is in an inner source).
fn chain_text(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut link: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(l) = link {
        text.push_str(": ");
        text.push_str(&l.to_string());
        link = l.source();
    }
    text
}

/// The server said the bucket, not the key, is missing (S3's `NoSuchBucket`).
fn no_bucket(e: &object_store::Error) -> bool {
    chain_text(e).contains("NoSuchBucket")
}

/// The server refused the request's credentials or signature.
fn refused(e: &object_store::Error) -> bool {
    let text = chain_text(e);
    [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403 Forbidden",
    ]
    .iter()
    .any(|code| text.contains(code))
}

/// The first line of an error, bounded: servers answer with whole XML documents.
fn first_line(e: &object_store::Error) -> String {
    let text = chain_text(e);
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

/// `s3://bucket/prefix` -> `bucket`.
fn bucket_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(url)
        .to_string()
}

/// An `http://` endpoint (MinIO, moto, a site's gateway without TLS) is refused by the S3 client unless
/// `AWS_ALLOW_HTTP` is true, deep in the first request and as "URL scheme is not allowed": said here, at open,
/// with the variable to set. Both values as the environment gave them.
fn plain_http_refused(endpoint: Option<&str>, allow_http: Option<&str>) -> Result<(), String> {
    let plain = endpoint.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("http://"));
    let allowed = allow_http.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on"
        )
    });
    if plain && !allowed {
        return Err(format!(
            "the S3 endpoint {} is plain http, which the client refuses unless AWS_ALLOW_HTTP=true is set \
             (set it for a local MinIO or moto; use an https:// endpoint otherwise)",
            endpoint.unwrap_or_default().trim()
        ));
    }
    Ok(())
}

impl Storage {
    /// Opens the store at `location` for reading: a local directory must already exist (no empty directory is
    /// left behind by a mistyped path).
    pub fn open_existing(location: &str) -> Result<Self, StorageError> {
        Self::open_existing_with(location, None)
    }

    /// [`Storage::open_existing`] with a limit on each request to an object store (a stalled server fails the
    /// request after it, and the request is retried like any failure); `None`: object_store's 30 s.
    pub fn open_existing_with(
        location: &str,
        request_timeout: Option<Duration>,
    ) -> Result<Self, StorageError> {
        let url = normalise_url(location)?;
        if url.scheme() == "file" {
            let dir = url.to_file_path().map_err(|()| StorageError::InvalidUrl {
                url: location.into(),
                reason: "not a local path".into(),
            })?;
            if !dir.is_dir() {
                return Err(StorageError::NotFound {
                    url: url.as_str().trim_end_matches('/').to_string(),
                });
            }
        }
        Self::open_with(location, request_timeout)
    }

    /// Opens (for file URLs: creates) the store at `location`.
    pub fn open(location: &str) -> Result<Self, StorageError> {
        Self::open_with(location, None)
    }

    fn open_with(location: &str, request_timeout: Option<Duration>) -> Result<Self, StorageError> {
        let url = normalise_url(location)?;
        let shown = url.as_str().trim_end_matches('/').to_string();
        let bad = |reason: String| StorageError::InvalidUrl {
            url: shown.clone(),
            reason,
        };
        let mut local_dir = None;
        let inner: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad("not a local path".into()))?;
                local_dir = Some(dir.clone());
                std::fs::create_dir_all(&dir).map_err(|source| StorageError::Unwritable {
                    url: shown.clone(),
                    reason: format!("cannot create directory {}: {source}", dir.display()),
                })?;
                // Deleting an object removes the directories it leaves empty (a pruned checkpoint's step
                // directory), up to the store's root.
                Arc::new(
                    LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| bad(e.to_string()))?
                        .with_automatic_cleanup(true),
                )
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .ok_or_else(|| bad("s3 URL has no bucket".into()))?;
                // Retries are this module's (RetryPolicy), for every backend alike.
                let no_retries = object_store::RetryConfig {
                    max_retries: 0,
                    ..object_store::RetryConfig::default()
                };
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(no_retries);
                // Set key by key: replacing the client options would drop what the environment set
                // (AWS_ALLOW_HTTP and the like).
                if let Some(t) = request_timeout {
                    use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
                    use object_store::aws::AmazonS3ConfigKey::Client;
                    let connect = t.min(Duration::from_secs(5));
                    builder = builder
                        .with_config(Client(Timeout), format!("{}ms", t.as_millis().max(1)))
                        .with_config(
                            Client(ConnectTimeout),
                            format!("{}ms", connect.as_millis().max(1)),
                        );
                }
                {
                    use object_store::ClientConfigKey::AllowHttp;
                    use object_store::aws::AmazonS3ConfigKey::{Client, Endpoint};
                    plain_http_refused(
                        builder.get_config_value(&Endpoint).as_deref(),
                        builder.get_config_value(&Client(AllowHttp)).as_deref(),
                    )
                    .map_err(bad)?;
                }
                let s3 = builder
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
        Ok(Self {
            url: shown,
            local_dir,
            inner,
            runtime: io_runtime()?,
            retry: RetryPolicy::default(),
        })
    }

    /// The same store with another retry policy (tests; a site whose storage needs longer patience).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
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
    fn io_error(&self, key: &str, source: object_store::Error) -> StorageError {
        use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem, StorageFull};
        let io_kind = io_error_kind(&source);
        match source {
            object_store::Error::NotFound { .. }
                if self.local_dir.is_none() && no_bucket(&source) =>
            {
                StorageError::NoBucket {
                    bucket: bucket_of(&self.url),
                    url: self.describe(key),
                }
            }
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                url: self.describe(key),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
                if self.local_dir.is_none() =>
            {
                StorageError::Refused {
                    url: self.describe(key),
                    reason: first_line(&source),
                }
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StorageError::Unwritable {
                url: self.describe(key),
                reason: source.to_string(),
            },
            // S3 answers 403 to a key it does not know; object_store passes some of those on as generic errors.
            _ if self.local_dir.is_none() && refused(&source) => StorageError::Refused {
                url: self.describe(key),
                reason: first_line(&source),
            },
            _ if matches!(
                io_kind,
                Some(PermissionDenied | ReadOnlyFilesystem | StorageFull)
            ) =>
            {
                StorageError::Unwritable {
                    url: self.describe(key),
                    reason: source.to_string(),
                }
            }
            source => StorageError::Failed {
                url: self.describe(key),
                source,
            },
        }
    }

    pub fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let path = ObjectPath::from(key);
        self.retry.run("put", &self.describe(key), || {
            self.runtime
                .block_on(self.inner.put(&path, PutPayload::from_bytes(data.clone())))
                .map(|_| ())
                .map_err(|e| self.io_error(key, e))
        })
    }

    /// Puts `data` at `key` and returns once it is durable. A local object is written straight from `data` into a
    /// temporary file that is fsynced, renamed into place, and its directory fsynced: a crash or power loss leaves
    /// no object or the whole one, as with an object store, which is durable when it acknowledges a put.
    pub fn put_durable(&self, key: &str, data: &Bytes) -> Result<(), StorageError> {
        let Some(path) = self.local_file(key) else {
            return self.put(key, data.clone());
        };
        self.retry.run("put", &self.describe(key), || {
            write_durably(&path, data).map_err(|e| self.local_error(key, e))
        })
    }

    /// The file of `key` in a `file://` store, for plain keys (segments that are not empty, `.` or `..`); other
    /// keys, and other stores, go through object_store, which refuses or encodes them.
    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        let root = self.local_dir.as_ref()?;
        let plain = key
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
        plain.then(|| root.join(key))
    }

    /// A failure of this module's own local file I/O, classified as object_store's are.
    fn local_error(&self, key: &str, e: std::io::Error) -> StorageError {
        if e.kind() == std::io::ErrorKind::NotFound {
            return StorageError::NotFound {
                url: self.describe(key),
            };
        }
        self.io_error(
            key,
            object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            },
        )
    }

    /// Puts several objects concurrently; fails on the first error (puts are idempotent: a retry puts them all).
    pub fn put_many(&self, objects: Vec<(String, Bytes)>) -> Result<(), StorageError> {
        self.retry
            .run("put", &self.url, || self.put_many_once(objects.clone()))
    }

    fn put_many_once(&self, objects: Vec<(String, Bytes)>) -> Result<(), StorageError> {
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

    pub fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        if let Some(file) = self.local_file(key) {
            // One read into a buffer of the file's size: object_store's local get reads in pieces on a blocking
            // task and measured half the bandwidth on a 4.9 GB checkpoint object.
            return self.retry.run("get", &self.describe(key), || {
                std::fs::read(&file)
                    .map(Bytes::from)
                    .map_err(|e| self.local_error(key, e))
            });
        }
        let path = ObjectPath::from(key);
        self.retry.run("get", &self.describe(key), || {
            self.runtime
                .block_on(async { self.inner.get(&path).await?.bytes().await })
                .map_err(|e| self.io_error(key, e))
        })
    }

    /// An object and its SHA-256. A local file is hashed as it is read: each 64 MiB piece is hashed on a second
    /// thread while the next one is read, so a large object (a checkpoint) costs about its read, not its read plus
    /// its hash; other stores read, then hash.
    pub fn get_sha256(&self, key: &str) -> Result<(Bytes, [u8; 32]), StorageError> {
        if let Some(file) = self.local_file(key) {
            return self.retry.run("get", &self.describe(key), || {
                read_hashing(&file).map_err(|e| self.local_error(key, e))
            });
        }
        use sha2::Digest;
        let data = self.get(key)?;
        let digest = sha2::Sha256::digest(&data).into();
        Ok((data, digest))
    }

    /// The first `len` bytes of an object (all of it when it is shorter): a file's header without its body.
    pub fn get_prefix(&self, key: &str, len: u64) -> Result<Bytes, StorageError> {
        let path = ObjectPath::from(key);
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(0..len)),
            ..Default::default()
        };
        self.retry.run("get", &self.describe(key), || {
            self.runtime
                .block_on(async {
                    self.inner
                        .get_opts(&path, options.clone())
                        .await?
                        .bytes()
                        .await
                })
                .map_err(|e| self.io_error(key, e))
        })
    }

    /// Like [`Storage::get`] but `None` when the object does not exist.
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        match self.get(key) {
            Ok(b) => Ok(Some(b)),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gets several objects concurrently, in the order asked; each result separately (a failure worth retrying is
    /// retried on its own).
    pub fn get_many(&self, keys: &[String]) -> Vec<Result<Bytes, StorageError>> {
        let first: Vec<_> = self.runtime.block_on(async {
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
        });
        first
            .into_iter()
            .zip(keys)
            .map(|(r, key)| match r {
                Err(e) if e.is_retryable() => self.get(key),
                other => other,
            })
            .collect()
    }

    /// Keys under `prefix` (recursive), sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let path = ObjectPath::from(prefix);
        let mut keys: Vec<String> = self.retry.run("list", &self.describe(prefix), || {
            self.runtime
                .block_on(
                    self.inner
                        .list(Some(&path))
                        .map_ok(|m| m.location.to_string())
                        .try_collect(),
                )
                .map_err(|e| self.io_error(prefix, e))
        })?;
        keys.sort();
        Ok(keys)
    }

    /// Deletes every object under `prefix` (a "directory"), and on a local store the directory itself, which a
    /// write that failed before its first byte (a full disk) leaves empty.
    pub fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        for key in self.list(prefix)? {
            self.delete(&key)?;
        }
        if let Ok(url) = url::Url::parse(&self.url)
            && url.scheme() == "file"
            && let Ok(root) = url.to_file_path()
        {
            // Only an empty directory goes; anything else (another writer's new object) stays.
            let _ = std::fs::remove_dir(root.join(prefix));
        }
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = ObjectPath::from(key);
        self.retry.run("delete", &self.describe(key), || {
            match self.runtime.block_on(self.inner.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.io_error(key, e)),
            }
        })
    }
}

/// Reads `path` whole and hashes it as it arrives (see [`Storage::get_sha256`]).
fn read_hashing(path: &std::path::Path) -> std::io::Result<(Bytes, [u8; 32])> {
    use sha2::Digest;
    use std::io::Read;
    const PIECE: usize = 64 << 20;
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(|_| {
        std::io::Error::other("the file is larger than this machine's address space")
    })?;
    let mut buf = vec![0u8; len];
    let digest = std::thread::scope(|scope| -> std::io::Result<[u8; 32]> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(2);
        let hasher = scope.spawn(move || {
            let mut h = sha2::Sha256::new();
            rx.iter().for_each(|piece| h.update(piece));
            <[u8; 32]>::from(h.finalize())
        });
        for piece in buf.chunks_mut(PIECE) {
            file.read_exact(piece)?;
            let read: &[u8] = piece;
            if tx.send(read).is_err() {
                break;
            }
        }
        drop(tx);
        hasher
            .join()
            .map_err(|_| std::io::Error::other("the hashing thread panicked"))
    })?;
    Ok((Bytes::from(buf), digest))
}

/// Writes `data` to `path` durably (see [`Storage::put_durable`]); on failure nothing is left behind.
fn write_durably(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!("{name}.{}.partial", std::process::id()));
    // One sequential writer: ext4 serialises buffered writes to one file on its inode lock, and two writers
    // measured no faster (the second spun on the lock).
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
    fn a_plain_http_endpoint_needs_allow_http() {
        let e = plain_http_refused(Some("http://127.0.0.1:9000"), None).unwrap_err();
        assert!(e.contains("AWS_ALLOW_HTTP=true"), "{e}");
        assert!(plain_http_refused(Some("http://127.0.0.1:9000"), Some("false")).is_err());
        assert!(plain_http_refused(Some("HTTP://minio:9000"), Some("TRUE")).is_ok());
        assert!(plain_http_refused(Some("https://s3.example"), None).is_ok());
        assert!(plain_http_refused(None, None).is_ok());
    }

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

    /// A large object with a ragged tail reads back whole, through the store, with no temporary left; a put that
    /// cannot land leaves nothing and says where.
    #[test]
    fn durable_puts_land_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let data: Vec<u8> = (0..(20 << 20) + 3).map(|i| (i * 31 % 251) as u8).collect();
        s.put_durable("step-1/rank-0.bin", &Bytes::from(data.clone()))
            .unwrap();
        assert!(s.get("step-1/rank-0.bin").unwrap() == data);
        assert_eq!(
            s.list("step-1").unwrap(),
            vec!["step-1/rank-0.bin".to_string()]
        );
        s.put_durable("step-1/rank-0.bin", &Bytes::from_static(b"again"))
            .unwrap();
        assert_eq!(
            s.get("step-1/rank-0.bin").unwrap(),
            Bytes::from_static(b"again")
        );
        // A file where the step directory should be: the put fails, names the key, and leaves nothing.
        std::fs::write(dir.path().join("step-2"), b"not a directory").unwrap();
        let e = s
            .put_durable("step-2/rank-0.bin", &Bytes::from_static(b"x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step-2/rank-0.bin"), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Object stores take the same call.
        let m = Storage::open("memory://").unwrap();
        m.put_durable("k", &Bytes::from_static(b"v")).unwrap();
        assert_eq!(m.get("k").unwrap(), Bytes::from_static(b"v"));
    }

    /// Hashing while reading gives the object and the digest of a read-then-hash, across the 64 MiB pieces and a
    /// ragged tail, locally and from an object store; a missing object is named.
    #[test]
    fn an_object_read_with_its_sha256_matches_a_read_then_a_hash() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(130usize << 20) + 5)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let want: [u8; 32] = sha2::Sha256::digest(&data).into();
        for url in [dir.path().to_str().unwrap(), "memory://"] {
            let s = Storage::open(url).unwrap();
            s.put("ckpt/rank-0.bin", Bytes::from(data.clone())).unwrap();
            let (got, digest) = s.get_sha256("ckpt/rank-0.bin").unwrap();
            assert!(got == data, "{url}");
            assert_eq!(digest, want, "{url}");
            let (empty, digest) = {
                s.put("ckpt/empty", Bytes::new()).unwrap();
                s.get_sha256("ckpt/empty").unwrap()
            };
            assert!(empty.is_empty());
            assert_eq!(digest, <[u8; 32]>::from(sha2::Sha256::digest(b"")));
            let e = s.get_sha256("ckpt/missing").unwrap_err();
            assert!(matches!(e, StorageError::NotFound { .. }), "{e}");
            assert!(e.to_string().contains("ckpt/missing"), "{e}");
        }
    }

    #[test]
    fn failures_worth_retrying_are_retried_with_backoff_and_others_are_not() {
        let policy = RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let transient = || StorageError::Failed {
            url: "s3://b/k".into(),
            source: object_store::Error::Generic {
                store: "test",
                source: "connection reset".into(),
            },
        };
        let mut calls = 0;
        let got = policy.run("get", "s3://b/k", || {
            calls += 1;
            if calls < 3 {
                Err(transient())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(got.unwrap(), 3);
        let mut calls = 0;
        let spent = policy.run("get", "s3://b/k", || -> Result<(), _> {
            calls += 1;
            Err(transient())
        });
        assert!(spent.unwrap_err().is_retryable());
        assert_eq!(calls, 4, "every attempt is used");
        let mut calls = 0;
        let missing = policy.run("get", "s3://b/k", || -> Result<(), _> {
            calls += 1;
            Err(StorageError::NotFound {
                url: "s3://b/k".into(),
            })
        });
        assert!(matches!(missing, Err(StorageError::NotFound { .. })));
        assert_eq!(calls, 1, "a missing object is not retried");
    }

    #[test]
    fn every_store_shares_one_io_runtime() {
        let a = Storage::open("memory://").unwrap();
        let b = Storage::open("memory://").unwrap();
        assert!(Arc::ptr_eq(&a.runtime, &b.runtime));
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
