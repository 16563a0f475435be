//! The TLS keys: `[server] tls_cert_path / tls_key_path` (serving HTTPS) and the worker side,
//! `[tls]` at the top level, `[tls.prefill]` / `[tls.decode]` for a PD pool and the same keys on
//! a worker's own entry, each level overriding the one above key by key. Every file is read
//! when the configuration is built, so a missing or malformed one is an error that names the
//! file and the key, and never a worker that fails later.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{raw, At, Builder, Flags};
use crate::registry::WorkerRole;
use crate::tls::{ServeSpec, TlsClientSpec};

/// The worker-side TLS settings of the top level and of each PD pool (overrides only).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TlsConfig {
    #[serde(flatten)]
    pub workers: TlsClientSpec,
    pub prefill: TlsClientSpec,
    pub decode: TlsClientSpec,
}

impl TlsConfig {
    /// The settings a worker of `role` with its own `own` settings is reached with.
    pub fn for_worker(&self, role: WorkerRole, own: &TlsClientSpec) -> TlsClientSpec {
        let pool = match role {
            WorkerRole::Prefill => &self.prefill,
            WorkerRole::Decode => &self.decode,
            WorkerRole::Regular => return own.over(&self.workers),
        };
        own.over(&pool.over(&self.workers))
    }
}

impl Builder<'_> {
    /// `--tls-cert-path` / `--tls-key-path` over `[server]`'s keys: both or neither, and a
    /// pair that loads.
    pub(super) fn serve_tls(
        &mut self,
        cert: Option<Spanned<PathBuf>>,
        key: Option<Spanned<PathBuf>>,
        f: &Flags,
    ) -> Option<ServeSpec> {
        let cert = pick(f.tls_cert_path.clone(), "--tls-cert-path", cert.map(|p| self.beside(p)));
        let key = pick(f.tls_key_path.clone(), "--tls-key-path", key.map(|p| self.beside(p)));
        match (cert, key) {
            (None, None) => None,
            (Some((_, at)), None) => {
                self.error("server.tls_key_path", &at, "is needed with tls_cert_path".into());
                None
            }
            (None, Some((_, at))) => {
                self.error("server.tls_cert_path", &at, "is needed with tls_key_path".into());
                None
            }
            (Some((cert_path, at)), Some((key_path, _))) => {
                let spec = ServeSpec { cert_path, key_path };
                match spec.load() {
                    Ok(_) => Some(spec),
                    Err(e) => {
                        self.error("server.tls_cert_path", &at, e);
                        None
                    }
                }
            }
        }
    }

    /// `[tls]` (the flags over its top-level keys) and its pool tables.
    pub(super) fn tls(&mut self, t: raw::RawTls, f: &Flags) -> TlsConfig {
        let top = raw::RawTlsClient {
            ca_cert_paths: t.ca_cert_paths,
            client_cert_path: t.client_cert_path,
            client_key_path: t.client_key_path,
        };
        let mut workers = self.tls_client("tls", top);
        if let Some(paths) = &f.ca_cert_paths {
            workers.ca_cert_paths = paths.clone();
            self.check_cas("tls.ca_cert_paths", paths, &At::flag("--ca-cert-paths"));
        }
        match (&f.client_cert_path, &f.client_key_path) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                workers.client_cert_path = Some(cert.clone());
                workers.client_key_path = Some(key.clone());
                self.check_pair("tls.client_cert_path", cert, key, &At::flag("--client-cert-path"));
            }
            (Some(_), None) => self.error(
                "tls.client_key_path",
                &At::flag("--client-cert-path"),
                "--client-key-path is needed with --client-cert-path".into(),
            ),
            (None, Some(_)) => self.error(
                "tls.client_cert_path",
                &At::flag("--client-key-path"),
                "--client-cert-path is needed with --client-key-path".into(),
            ),
        }
        TlsConfig {
            workers,
            prefill: self.tls_client("tls.prefill", t.prefill.unwrap_or_default()),
            decode: self.tls_client("tls.decode", t.decode.unwrap_or_default()),
        }
    }

    /// One level of worker TLS keys (`prefix` names it in errors), every file checked.
    pub(super) fn tls_client(&mut self, prefix: &str, t: raw::RawTlsClient) -> TlsClientSpec {
        let mut spec = TlsClientSpec::default();
        let (cert, key) =
            (t.client_cert_path.map(|p| self.beside(p)), t.client_key_path.map(|p| self.beside(p)));
        if let Some(paths) = t.ca_cert_paths {
            let full: Vec<PathBuf> = paths.get_ref().iter().map(|p| self.in_file_dir(p)).collect();
            self.check_cas(&format!("{prefix}.ca_cert_paths"), &full, &At::span(&paths));
            spec.ca_cert_paths = full;
        }
        match (cert, key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let key_at = format!("{prefix}.client_cert_path");
                self.check_pair(&key_at, cert.get_ref(), key.get_ref(), &At::span(&cert));
                spec.client_cert_path = Some(cert.into_inner());
                spec.client_key_path = Some(key.into_inner());
            }
            (Some(cert), None) => self.error(
                &format!("{prefix}.client_key_path"),
                &At::span(&cert),
                "is needed with client_cert_path".into(),
            ),
            (None, Some(key)) => self.error(
                &format!("{prefix}.client_cert_path"),
                &At::span(&key),
                "is needed with client_key_path".into(),
            ),
        }
        spec
    }

    /// A path from the configuration file, resolved against the file's directory.
    fn beside(&self, p: Spanned<PathBuf>) -> Spanned<PathBuf> {
        let full = self.in_file_dir(p.get_ref());
        Spanned::new(p.span(), full)
    }

    fn check_cas(&mut self, key: &str, paths: &[PathBuf], at: &At) {
        for path in paths {
            if let Err(e) = crate::tls::load_certs(path) {
                self.error(key, at, e);
            }
        }
    }

    fn check_pair(&mut self, key: &str, cert: &Path, private: &Path, at: &At) {
        let pair = ServeSpec { cert_path: cert.to_owned(), key_path: private.to_owned() };
        if let Err(e) = pair.load() {
            self.error(key, at, e);
        }
    }
}

/// The flag's path if given, else the file's, with where it came from.
fn pick(
    flag: Option<PathBuf>,
    flag_name: &'static str,
    file: Option<Spanned<PathBuf>>,
) -> Option<(PathBuf, At)> {
    match (flag, file) {
        (Some(p), _) => Some((p, At::flag(flag_name))),
        (None, Some(p)) => {
            let at = At::span(&p);
            Some((p.into_inner(), at))
        }
        (None, None) => None,
    }
}
