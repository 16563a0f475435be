//! `[security]` and every secret of the configuration: API keys given inline, in a file
//! (`*_file`, read at each load so a rotated key is picked up by a reload) or in an environment
//! variable (`*_env`); `--api-key`/`--admin-api-key` (env `ROUTERD_API_KEY`,
//! `ROUTERD_ADMIN_API_KEY`) and their `*-file` flags on top. Errors name the key, never the
//! value.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::{raw, At, Builder, Flags, SecurityConfig};
use crate::secret::Secret;

/// One secret as the file may give it: inline, from a file, from an environment variable.
pub(super) struct SecretFields {
    pub inline: Option<Spanned<String>>,
    pub file: Option<Spanned<PathBuf>>,
    pub env: Option<Spanned<String>>,
}

impl Builder<'_> {
    pub(super) fn security(&mut self, s: raw::RawSecurity, f: &Flags) -> SecurityConfig {
        let api_key = self.flag_secret(
            "security.api_key",
            (&f.api_key, "--api-key"),
            (&f.api_key_file, "--api-key-file"),
            SecretFields { inline: s.api_key, file: s.api_key_file, env: s.api_key_env },
        );
        let admin_api_key = self.flag_secret(
            "security.admin_api_key",
            (&f.admin_api_key, "--admin-api-key"),
            (&f.admin_api_key_file, "--admin-api-key-file"),
            SecretFields {
                inline: s.admin_api_key,
                file: s.admin_api_key_file,
                env: s.admin_api_key_env,
            },
        );
        let given: Vec<(String, At)> = match (&f.allowed_worker_networks, s.allowed_worker_networks)
        {
            (Some(v), _) => {
                v.iter().map(|n| (n.clone(), At::flag("--allowed-worker-networks"))).collect()
            }
            (None, Some(v)) => v.iter().map(|n| (n.get_ref().clone(), At::span(n))).collect(),
            (None, None) => Vec::new(),
        };
        let mut allowed_worker_networks = Vec::new();
        for (i, (net, at)) in given.into_iter().enumerate() {
            match parse_network(&net) {
                Some(n) => allowed_worker_networks.push(n),
                None => self.error(
                    &format!("security.allowed_worker_networks[{i}]"),
                    &at,
                    format!("{net:?} is not a network like \"10.0.0.0/8\" or an address"),
                ),
            }
        }
        SecurityConfig { api_key, admin_api_key, allowed_worker_networks }
    }

    /// A secret from its flags (value or file) or else from the configuration file.
    fn flag_secret(
        &mut self,
        key: &str,
        (value, value_flag): (&Option<Secret>, &'static str),
        (file, file_flag): (&Option<PathBuf>, &'static str),
        fields: SecretFields,
    ) -> Option<Secret> {
        match (value, file) {
            (Some(_), Some(_)) => {
                let msg = format!("give {value_flag} or {file_flag}, not both");
                self.error(key, &At::flag(file_flag), msg);
                None
            }
            (Some(v), None) => self.nonempty(key, &At::flag(value_flag), v.expose()),
            (None, Some(path)) => self.secret_file(key, &At::flag(file_flag), path),
            (None, None) => self.secret(key, fields),
        }
    }

    /// A secret from the file's `KEY`, `KEY_file` or `KEY_env` (at most one of them).
    pub(super) fn secret(&mut self, key: &str, s: SecretFields) -> Option<Secret> {
        let given = [s.inline.is_some(), s.file.is_some(), s.env.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            let at = s.env.as_ref().map(At::span).or(s.file.as_ref().map(At::span));
            let msg = format!("give only one of {key}, {key}_file and {key}_env");
            self.error(key, &at.unwrap_or_default(), msg);
            return None;
        }
        if let Some(v) = &s.inline {
            return self.nonempty(key, &At::span(v), v.get_ref());
        }
        if let Some(path) = &s.file {
            let full = self.in_file_dir(path.get_ref());
            return self.secret_file(&format!("{key}_file"), &At::span(path), &full);
        }
        let var = s.env?;
        let key = format!("{key}_env");
        match std::env::var(var.get_ref()) {
            Ok(v) => self.nonempty(&key, &At::span(&var), v.trim()),
            Err(_) => {
                let msg = format!("the environment variable {} is not set", var.get_ref());
                self.error(&key, &At::span(&var), msg);
                None
            }
        }
    }

    /// The secret in the file at `full` (already resolved against the configuration file).
    fn secret_file(&mut self, key: &str, at: &At, full: &Path) -> Option<Secret> {
        match std::fs::read_to_string(full) {
            Ok(text) => {
                let v = text.trim();
                if v.is_empty() {
                    self.error(key, at, format!("{} is empty", full.display()));
                    return None;
                }
                self.nonempty(key, at, v)
            }
            Err(e) => {
                self.error(key, at, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    fn nonempty(&mut self, key: &str, at: &At, v: &str) -> Option<Secret> {
        if v.trim().is_empty() {
            self.error(key, at, "must not be empty".into());
            return None;
        }
        if v.chars().any(|c| c.is_control()) {
            self.error(key, at, "must not contain control characters".into());
            return None;
        }
        Some(Secret::new(v))
    }
}

/// `10.0.0.0/8`, `fd00::/8`, or a single address.
fn parse_network(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}
