//! TLS for the coordinator: a certificate authority made for one job (every `radit run`, like the token) and the
//! coordinator's certificate signed by it for the address it binds. Only the authority's certificate leaves the
//! process (`coordinator-ca.pem` in the run directory, with its SHA-256 handed to the ranks, which pin it); the
//! keys stay in memory. Handshakes run beside each other (a stalled client holds up nobody) and fail after 10 s.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("making the job's TLS certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// One job's certificate authority and the coordinator's certificate.
#[derive(Clone)]
pub struct JobPki {
    /// The authority's certificate, PEM: what ranks (and Prometheus) trust, and nothing else.
    pub ca_pem: String,
    /// SHA-256 of the authority's certificate (DER), hex: ranks refuse an authority file with another digest.
    pub ca_sha256: String,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for JobPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobPki")
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

/// The crypto provider of the coordinator's TLS (named, not taken from a process-wide default; the ranks' client
/// names the same one).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl JobPki {
    /// A fresh authority, and a certificate for `ip` (and `hostname`, when the coordinator binds by name).
    pub fn generate(ip: IpAddr, hostname: Option<&str>) -> Result<Self, TlsError> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "radit job coordinator CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let mut names = vec![ip.to_string()];
        names.extend(hostname.map(str::to_string));
        let leaf_key = rcgen::KeyPair::generate()?;
        let mut leaf_params = rcgen::CertificateParams::new(names)?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "radit job coordinator");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_sha256: hex::encode(Sha256::digest(ca.der())),
            server: Arc::new(server),
        })
    }
}

/// A listener that hands axum finished TLS connections: it accepts TCP connections and runs each handshake in its
/// own task, dropping (and logging) those that fail or stall.
pub struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Starts accepting on `tcp` (inside a tokio runtime).
    pub fn new(tcp: TcpListener, pki: &JobPki) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(pki.server.clone());
        let (tx, ready) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, as axum's own listener does.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
