//! Building the PD pools: `--pd-disaggregation`, `--prefill URL [PORT|none]`, `--decode URL`,
//! `[[prefill]]`, `[[decode]]` and the pool policies, which inherit `--policy`.

use toml::Spanned;

use super::{
    layered, normalize_worker_url, raw, At, Builder, Flags, PdConfig, PolicyConfig, PolicyName,
    PrefillConfig, Secret, SecurityConfig, WorkerConfig,
};

impl Builder<'_> {
    pub(super) fn pd(
        &mut self,
        prefill: Vec<raw::RawPrefill>,
        decode: Vec<raw::RawWorker>,
        (p_policy, d_policy): (Option<Spanned<String>>, Option<Spanned<String>>),
        policy: &PolicyConfig,
        f: &Flags,
        sec: &SecurityConfig,
    ) -> Option<PdConfig> {
        let on = f.pd_disaggregation
            || !prefill.is_empty()
            || !decode.is_empty()
            || !f.prefill.is_empty()
            || !f.decode.is_empty();
        if !on {
            for (flag, given) in
                [("--prefill-policy", &f.prefill_policy), ("--decode-policy", &f.decode_policy)]
            {
                if given.is_some() {
                    self.error(
                        "policy",
                        &At::flag(flag),
                        "only applies in PD mode (--pd-disaggregation)".into(),
                    );
                }
            }
            return None;
        }
        let inherit = policy.name.as_str().to_owned();
        let p = layered(
            f.prefill_policy.clone(),
            "--prefill-policy",
            p_policy.as_ref(),
            inherit.clone(),
        );
        let prefill_policy = self.policy_name("policy.prefill_policy", p);
        let d = layered(f.decode_policy.clone(), "--decode-policy", d_policy.as_ref(), inherit);
        let d_at = d.1.clone();
        let decode_policy = self.policy_name("policy.decode_policy", d);
        if decode_policy == PolicyName::Bucket {
            let msg = "bucket routes prefill pools only; choose another decode policy";
            self.error("policy.decode_policy", &d_at, msg.into());
        }
        // Workers given by flags get --api-key, as in sgl-router.
        let mut tls = Vec::new();
        let given: Vec<(String, Option<String>, Option<Secret>, At)> = if !f.prefill.is_empty() {
            let mut given = self.prefill_flags(&f.prefill);
            for g in &mut given {
                g.2 = sec.api_key.clone();
            }
            given
        } else {
            prefill
                .into_iter()
                .enumerate()
                .map(|(i, mut p)| {
                    let port = p.bootstrap_port.as_ref().map(|v| v.get_ref().to_string());
                    let key = self.secret(&format!("prefill[{i}].api_key"), p.secret_fields());
                    tls.push(self.tls_client(&format!("prefill[{i}]"), p.tls_fields()));
                    (p.url.get_ref().clone(), port, key, At::span(&p.url))
                })
                .collect()
        };
        let mut seen: Vec<String> = Vec::new();
        let mut pools =
            PdConfig { prefill: Vec::new(), decode: Vec::new(), prefill_policy, decode_policy };
        for (i, (url, port, api_key, at)) in given.into_iter().enumerate() {
            let bootstrap_port = match port.as_deref() {
                None => None,
                Some(p) if p.eq_ignore_ascii_case("none") => None,
                Some(p) => match p.parse::<u16>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        let msg = format!("bootstrap port {p:?} must be a port number or `none`");
                        self.error(&format!("prefill[{i}].bootstrap_port"), &at, msg);
                        None
                    }
                },
            };
            if let Some(url) = self.pool_url(&format!("prefill[{i}].url"), &url, &at, &mut seen) {
                let tls = tls.get(i).cloned().unwrap_or_default();
                pools.prefill.push(PrefillConfig { url, bootstrap_port, api_key, tls });
            }
        }
        let mut tls = Vec::new();
        let given: Vec<(String, Option<Secret>, At)> = if !f.decode.is_empty() {
            let key = &sec.api_key;
            f.decode.iter().map(|u| (u.clone(), key.clone(), At::flag("--decode"))).collect()
        } else {
            decode
                .into_iter()
                .enumerate()
                .map(|(i, mut w)| {
                    let key = self.secret(&format!("decode[{i}].api_key"), w.secret_fields());
                    tls.push(self.tls_client(&format!("decode[{i}]"), w.tls_fields()));
                    (w.url.get_ref().clone(), key, At::span(&w.url))
                })
                .collect()
        };
        for (i, (url, api_key, at)) in given.into_iter().enumerate() {
            if let Some(url) = self.pool_url(&format!("decode[{i}].url"), &url, &at, &mut seen) {
                let tls = tls.get(i).cloned().unwrap_or_default();
                pools.decode.push(WorkerConfig { url, api_key, tls });
            }
        }
        Some(pools)
    }

    /// `--prefill URL [PORT|none]`, repeated: clap hands the values over flat; a port (digits
    /// or `none`) belongs to the URL before it.
    fn prefill_flags(
        &mut self,
        values: &[String],
    ) -> Vec<(String, Option<String>, Option<Secret>, At)> {
        let mut out: Vec<(String, Option<String>, Option<Secret>, At)> = Vec::new();
        for v in values {
            let is_port = v.eq_ignore_ascii_case("none") || v.bytes().all(|b| b.is_ascii_digit());
            match out.last_mut() {
                Some(last) if is_port && last.1.is_none() => last.1 = Some(v.clone()),
                _ if is_port => {
                    let msg = format!("bootstrap port {v:?} must follow a prefill URL");
                    self.error("prefill", &At::flag("--prefill"), msg);
                }
                _ => out.push((v.clone(), None, None, At::flag("--prefill"))),
            }
        }
        out
    }

    /// A normalised worker URL not seen before in either pool.
    fn pool_url(
        &mut self,
        key: &str,
        url: &str,
        at: &At,
        seen: &mut Vec<String>,
    ) -> Option<String> {
        match normalize_worker_url(url) {
            Ok(u) if seen.contains(&u) => {
                self.error(key, at, format!("duplicate worker {u}"));
                None
            }
            Ok(u) => {
                seen.push(u.clone());
                Some(u)
            }
            Err(e) => {
                self.error(key, at, e);
                None
            }
        }
    }
}
