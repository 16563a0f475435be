//! Building `[discovery]` and sgl-router's `--service-discovery` flags: which pods are workers
//! (label selectors per mode), on which port, and where the Kubernetes API is.

use std::collections::BTreeMap;

use toml::Spanned;

use super::{layered, raw, At, Builder, DiscoveryConfig, Flags};

type Labels = BTreeMap<String, String>;

impl Builder<'_> {
    pub(super) fn discovery(
        &mut self,
        raw: Option<raw::RawDiscovery>,
        pd: bool,
        f: &Flags,
    ) -> Option<DiscoveryConfig> {
        let given = raw.as_ref().is_some_and(|d| d.enabled.unwrap_or(true));
        let on = f.service_discovery || given;
        let mut d = raw.unwrap_or_default();
        let fields = super::security::SecretFields {
            inline: d.api_key.take(),
            file: d.api_key_file.take(),
            env: d.api_key_env.take(),
        };
        let api_key = if on { self.secret("discovery.api_key", fields) } else { None };
        let selector = self.selector("discovery.selector", &f.selector, "--selector", d.selector);
        let prefill = self.selector(
            "discovery.prefill_selector",
            &f.prefill_selector,
            "--prefill-selector",
            d.prefill_selector,
        );
        let decode = self.selector(
            "discovery.decode_selector",
            &f.decode_selector,
            "--decode-selector",
            d.decode_selector,
        );
        if !on {
            return None;
        }
        if !cfg!(feature = "k8s") {
            let msg = "this routerd was built without Kubernetes support (cargo feature k8s)";
            self.error("discovery", &At::flag("--service-discovery"), msg.into());
        }
        if pd {
            if !selector.0.is_empty() {
                let msg = "PD mode discovers pods by discovery.prefill_selector and \
                           discovery.decode_selector; selector is for regular mode";
                self.error("discovery.selector", &selector.1, msg.into());
            }
            if prefill.0.is_empty() && decode.0.is_empty() {
                let msg = "PD mode needs prefill_selector or decode_selector (--prefill-selector, \
                           --decode-selector): without one every pod would be a worker";
                self.error("discovery.prefill_selector", &At::default(), msg.into());
            }
        } else {
            for (key, (labels, at)) in
                [("discovery.prefill_selector", &prefill), ("discovery.decode_selector", &decode)]
            {
                if !labels.is_empty() {
                    let msg = "only applies in PD mode (--pd-disaggregation)".into();
                    self.error(key, at, msg);
                }
            }
            if selector.0.is_empty() {
                let msg = "service discovery needs a selector (--selector app=sglang): \
                           without one every pod would be a worker";
                self.error("discovery.selector", &selector.1, msg.into());
            }
        }
        let namespace = layered(
            f.service_discovery_namespace.clone().map(Some),
            "--service-discovery-namespace",
            None,
            d.namespace.as_ref().map(|n| n.get_ref().clone()),
        );
        if namespace.0.as_deref().is_some_and(|n| n.trim().is_empty()) {
            self.error("discovery.namespace", &namespace.1, "must not be empty".into());
        }
        let annotation = layered(
            f.bootstrap_port_annotation.clone(),
            "--bootstrap-port-annotation",
            d.bootstrap_port_annotation.as_ref(),
            "sglang.ai/bootstrap-port".into(),
        );
        if annotation.0.trim().is_empty() {
            let key = "discovery.bootstrap_port_annotation";
            self.error(key, &annotation.1, "must not be empty".into());
        }
        let https = match d.scheme.as_ref().map(|s| (s.get_ref().as_str(), At::span(s))) {
            None | Some(("http", _)) => false,
            Some(("https", _)) => true,
            Some((other, at)) => {
                let msg = format!("{other:?} is not a scheme; expected \"http\" or \"https\"");
                self.error("discovery.scheme", &at, msg);
                false
            }
        };
        let default_port = if https { 443 } else { 80 };
        let port = f.service_discovery_port.or(d.port).unwrap_or(default_port);
        if port == 0 {
            let at = At::flag("--service-discovery-port");
            self.error("discovery.port", &at, "must be a port number (1-65535)".into());
        }
        Some(DiscoveryConfig {
            namespace: namespace.0,
            port,
            selector: selector.0,
            prefill_selector: prefill.0,
            decode_selector: decode.0,
            bootstrap_port_annotation: annotation.0,
            kubeconfig: d.kubeconfig.map(Spanned::into_inner),
            https,
            api_key,
        })
    }

    /// A label selector from `key=value` flags or a TOML table; keys and values checked as
    /// Kubernetes checks them, roughly (no empty key, no `,` `=` or space).
    fn selector(
        &mut self,
        key: &str,
        flag: &Option<Vec<String>>,
        flag_name: &'static str,
        file: Option<Spanned<Labels>>,
    ) -> (Labels, At) {
        let (pairs, at): (Vec<(String, String)>, At) = match (flag, file) {
            (Some(given), _) => {
                let at = At::flag(flag_name);
                let mut pairs = Vec::new();
                for kv in given {
                    match kv.split_once('=') {
                        Some((k, v)) => pairs.push((k.to_owned(), v.to_owned())),
                        None => self.error(key, &at, format!("{kv:?} is not key=value")),
                    }
                }
                (pairs, at)
            }
            (None, Some(t)) => {
                let at = At::span(&t);
                (t.into_inner().into_iter().collect(), at)
            }
            (None, None) => return (Labels::new(), At::default()),
        };
        let bad = |s: &str| s.contains([',', '=', ' ', '!', '(', ')']);
        let mut labels = Labels::new();
        for (k, v) in pairs {
            if k.is_empty() || bad(&k) || bad(&v) {
                self.error(key, &at, format!("{k:?}={v:?} is not a valid label"));
            } else {
                labels.insert(k, v);
            }
        }
        (labels, at)
    }
}

/// The Kubernetes label selector for `labels`: `k1=v1,k2=v2`.
pub fn label_selector(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
