//! TLS both ways, with rustls (ring, TLS 1.2 and 1.3, ALPN `http/1.1`).
//!
//! - **Serving.** `ServerTls` holds the certificate chain and key the listener presents behind a
//!   resolver, so a new pair (file change, SIGHUP, `POST /admin/reload`) applies to new
//!   handshakes while open connections keep theirs; a pair that does not load leaves the old
//!   one in place and is reported.
//! - **Workers.** `https://` workers are reached with a `ClientTls` built from `TlsClientSpec`
//!   (system roots plus `ca_cert_paths`, an optional client certificate for mTLS), shared by
//!   every worker with the same settings. A handshake that fails is reported by cause (unknown
//!   CA, expired, name mismatch, client certificate refused); nothing falls back to plaintext.
//! - `Conn` is a connection either way (plain or TLS), so the HTTP/1 wire is written once.
//!
//! Private keys are read from their files into rustls and nowhere else: no error, log line or
//! configuration view carries their content (paths only).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PEM certificates from `path` (a chain, or a bundle of CAs).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", path.display()));
    }
    Ok(certs)
}

/// A PEM private key from `path`: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {}", path.display(), pem_error(e)))
}

/// What went wrong reading a PEM file, without any of its content.
fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind in the file".to_owned(),
        Error::MissingSectionEnd { .. } | Error::IllegalSectionStart { .. } => {
            "a PEM section is not closed".to_owned()
        }
        Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        _ => "not a valid PEM file".to_owned(),
    }
}

/// The certificate and key routerd serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServeSpec {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl ServeSpec {
    /// Reads and checks the pair (the key must match the certificate).
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        let (chain, key) = self.read()?;
        self.certify(chain, key)
    }

    /// The certificate chain and the key, as their files hold them.
    fn read(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        Ok((load_certs(&self.cert_path)?, load_key(&self.key_path)?))
    }

    /// `chain` and `key` as one certified key, if the key belongs to the certificate.
    fn certify(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<CertifiedKey>, String> {
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: unusable private key: {e}", self.key_path.display()))?;
        let ck = CertifiedKey::new(chain, signer);
        ck.keys_match().map_err(|e| {
            format!(
                "{} and {} do not belong together: {e}",
                self.cert_path.display(),
                self.key_path.display()
            )
        })?;
        Ok(Arc::new(ck))
    }
}

/// The serving side: a TLS acceptor whose certificate can be replaced while it runs.
pub struct ServerTls {
    spec: Mutex<ServeSpec>,
    current: Arc<CurrentCert>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("spec", &self.spec()).finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn new(spec: &ServeSpec) -> Result<Self, String> {
        Self::build(spec, None)
    }

    /// Serving that requires a client certificate signed by one of the CAs in `client_cas`
    /// (mTLS; the simulated worker's `--tls-client-ca`).
    pub fn requiring_client_certs(
        spec: &ServeSpec,
        client_cas: &[PathBuf],
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for path in client_cas {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            }
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| format!("client CAs: {e}"))?;
        Self::build(spec, Some(verifier))
    }

    fn build(
        spec: &ServeSpec,
        clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<Self, String> {
        let current = Arc::new(CurrentCert(ArcSwap::new(spec.load()?)));
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match clients {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Self {
            spec: Mutex::new(spec.clone()),
            current,
            acceptor,
            handshakes: Default::default(),
        })
    }

    /// The server side of a handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Conn> {
        let s = self.acceptor.accept(tcp).await?;
        self.handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
    }

    /// Handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads `spec` again (the same files, or new paths from a reloaded configuration):
    /// `Ok(true)` when the certificate changed, `Ok(false)` when it is the same, an error (and
    /// the old certificate kept) when the new pair does not load.
    pub fn reload(&self, spec: &ServeSpec) -> Result<bool, String> {
        let new = spec.load()?;
        *self.spec.lock().unwrap_or_else(|p| p.into_inner()) = spec.clone();
        let old = self.current.0.load();
        if old.cert == new.cert {
            return Ok(false);
        }
        self.current.0.store(new);
        Ok(true)
    }

    pub fn spec(&self) -> ServeSpec {
        self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How routerd verifies `https://` workers and which certificate it presents to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct TlsClientSpec {
    /// PEM files (certificates or bundles) trusted besides the system roots.
    pub ca_cert_paths: Vec<PathBuf>,
    /// A client certificate chain and its key, for workers that require mTLS.
    pub client_cert_path: Option<PathBuf>,
    pub client_key_path: Option<PathBuf>,
}

impl TlsClientSpec {
    /// Field by field, `self`'s settings where it has them, else `base`'s.
    pub fn over(&self, base: &TlsClientSpec) -> TlsClientSpec {
        TlsClientSpec {
            ca_cert_paths: if self.ca_cert_paths.is_empty() {
                base.ca_cert_paths.clone()
            } else {
                self.ca_cert_paths.clone()
            },
            client_cert_path: self
                .client_cert_path
                .clone()
                .or_else(|| base.client_cert_path.clone()),
            client_key_path: self.client_key_path.clone().or_else(|| base.client_key_path.clone()),
        }
    }

    /// Builds the client configuration (reading every file now).
    pub fn build(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        // The system's roots (unreadable ones are skipped: a fleet on a private CA has none).
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        for path in &self.ca_cert_paths {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match (&self.client_cert_path, &self.client_key_path) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                // Each file read once: checked as a pair, then handed to rustls.
                let pair = ServeSpec { cert_path: cert.clone(), key_path: key.clone() };
                let (chain, private) = pair.read()?;
                pair.certify(chain.clone(), private.clone_key())?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| format!("{}: {e}", key.display()))?
            }
            (Some(_), None) => return Err("client_cert_path is set without client_key_path".into()),
            (None, Some(_)) => return Err("client_key_path is set without client_cert_path".into()),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A worker-facing TLS client: the configuration for the inference wire and a pooled hyper
/// client for the router's other calls (health checks, load polls, info), sharing it.
pub struct ClientTls {
    pub spec: TlsClientSpec,
    pub connector: tokio_rustls::TlsConnector,
    pub hyper: hyper_util::client::legacy::Client<Described, http_body_util::Full<bytes::Bytes>>,
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-rustls's connector with its TLS failures said by cause (hyper's client boxes them
/// twice, past where `describe` can see the rustls error).
#[derive(Clone)]
pub struct Described(Https);

impl tower_service::Service<http::Uri> for Described {
    type Response = <Https as tower_service::Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            connecting.await.map_err(|e| match describe(&*e) {
                Some(cause) => cause.into(),
                None => e,
            })
        })
    }
}

/// An error in words: a TLS failure by cause, else the innermost cause's own words.
pub fn detail(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(d) = describe(e) {
        return d;
    }
    let mut innermost = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    innermost.to_string()
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl ClientTls {
    fn new(spec: &TlsClientSpec) -> Result<Self, String> {
        let config = Arc::new(spec.build()?);
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        // hyper-rustls sets the ALPN list itself from the protocols enabled.
        let mut for_hyper = (*config).clone();
        for_hyper.alpn_protocols.clear();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(for_hyper)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let https = Described(https);
        let hyper =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .build(https);
        Ok(Self { spec: spec.clone(), connector: tokio_rustls::TlsConnector::from(config), hyper })
    }

    /// The client for `spec`, built once per distinct settings and shared.
    pub fn for_spec(spec: &TlsClientSpec) -> Result<Arc<ClientTls>, String> {
        static CLIENTS: OnceLock<Mutex<HashMap<TlsClientSpec, Arc<ClientTls>>>> = OnceLock::new();
        let mut clients =
            CLIENTS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(spec) {
            return Ok(c.clone());
        }
        let c = Arc::new(ClientTls::new(spec)?);
        clients.insert(spec.clone(), c.clone());
        Ok(c)
    }
}

/// What an `https://` worker is reached with: the shared client and the name its
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    pub client: Arc<ClientTls>,
    pub name: ServerName<'static>,
}

impl WorkerTls {
    pub fn new(spec: &TlsClientSpec, host: &str) -> Result<Self, String> {
        Ok(Self { client: ClientTls::for_spec(spec)?, name: server_name(host)? })
    }

    /// A TLS session on `tcp`, or why the handshake failed.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Conn, String> {
        match self.client.connector.connect(self.name.clone(), tcp).await {
            Ok(s) => Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(s)))),
            Err(e) => Err(describe(&e).unwrap_or_else(|| format!("TLS handshake: {e}"))),
        }
    }
}

/// The server name a worker's certificate must carry: its host (a DNS name or an IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a valid TLS server name"))
}

/// Says which TLS failure an error is, in an operator's words, when it is one.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(t));
        }
        // An io::Error's own `source` skips the error it wraps (and hyper-rustls wraps
        // tokio-rustls's io::Error in another): look inside.
        cur = match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

pub fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "TLS: the worker's certificate is signed by an unknown CA (not in the system \
                 roots or ca_cert_paths)"
                    .to_owned()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "TLS: the worker's certificate has expired".to_owned()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "TLS: the worker's certificate is not valid yet".to_owned()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "TLS: the worker's certificate does not name this host (no matching DNS or IP \
                 subject alternative name)"
                    .to_owned()
            }
            C::Revoked => "TLS: the worker's certificate is revoked".to_owned(),
            C::BadSignature => "TLS: the worker's certificate has a bad signature".to_owned(),
            other => format!("TLS: the worker's certificate was refused: {other:?}"),
        },
        E::AlertReceived(A::CertificateRequired) => {
            "TLS: the worker requires a client certificate (set client_cert_path and \
             client_key_path)"
                .to_owned()
        }
        E::AlertReceived(
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError,
        ) => "TLS: the worker refused routerd's client certificate".to_owned(),
        E::AlertReceived(A::HandshakeFailure) => {
            "TLS: the worker ended the handshake (handshake_failure; a client certificate it \
             requires, or no common cipher)"
                .to_owned()
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "TLS: the worker did not answer with TLS (is it serving plain HTTP?)".to_owned()
        }
        other => format!("TLS: {other}"),
    }
}

/// One connection, plain or TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }

    /// An idle connection is still usable: nothing arrived on it and it is not closed. (On a
    /// TLS connection any bytes are a close_notify or worse.) Never blocks.
    pub fn idle_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.tcp().poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}
