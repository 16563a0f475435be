//! `[kv_events]` (where workers publish their KV events), the tokenizer routerd hashes
//! prompts with (`--tokenizer-path`, `--model-path`, `[tokenizer] path`, a PD pool's own in
//! `[tokenizer.prefill]` / `[tokenizer.decode]`), and `[peers]` (the
//! replicas told what this one routes where there are no events).

use std::path::PathBuf;

use toml::Spanned;

use super::raw::{RawKvEndpoint, RawKvEvents, RawPoolTokenizer, RawTokenizer};
use super::{At, Builder, Flags, PoolTokenizers};
use crate::kv::tokenize::TokenizerFiles;
use crate::kv::{KvEndpoint, KvEventsConfig, KvWorkerEndpoint};

impl Builder<'_> {
    pub(super) fn kv_events(&mut self, raw: RawKvEvents) -> KvEventsConfig {
        let d = KvEventsConfig::default();
        let endpoint = |b: &mut Self, key: &str, v: Option<Spanned<String>>| {
            let v = v?;
            let ok = v.get_ref().starts_with("tcp://")
                && v.get_ref().rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok());
            if !ok {
                b.error(
                    key,
                    &At::span(&v),
                    format!(
                        "{:?} is not tcp://HOST:PORT ({{host}} stands for the worker's host)",
                        v.get_ref()
                    ),
                );
                return None;
            }
            Some(v.into_inner())
        };
        let ep = endpoint(self, "kv_events.endpoint", raw.endpoint);
        let replay = endpoint(self, "kv_events.replay_endpoint", raw.replay_endpoint);
        let load_span = raw.load_endpoint.as_ref().map(At::span);
        let load = endpoint(self, "kv_events.load_endpoint", raw.load_endpoint);
        if let (Some(at), None, true) = (load_span, &ep, load.is_some()) {
            self.error(
                "kv_events.load_endpoint",
                &at,
                "needs kv_events.endpoint: the load socket is read beside the events \
                 (SGLang publishes load only with --kv-events-config)"
                    .into(),
            );
        }
        let dp = |b: &mut Self, key: &str, v: Option<Spanned<u32>>| match v {
            Some(v) if !(1..=1024).contains(v.get_ref()) => {
                b.error(
                    key,
                    &At::span(&v),
                    format!("{} is not a size from 1 to 1024", v.get_ref()),
                );
                None
            }
            v => v.map(Spanned::into_inner),
        };
        // A pool's or a worker's endpoints: `None` (with the errors recorded) when invalid.
        let at = |b: &mut Self, key: &str, r: RawKvEndpoint| -> Option<KvEndpoint> {
            let ep = endpoint(b, &format!("{key}.endpoint"), Some(r.endpoint));
            let replay = endpoint(b, &format!("{key}.replay_endpoint"), r.replay_endpoint);
            let load_endpoint = endpoint(b, &format!("{key}.load_endpoint"), r.load_endpoint);
            let dp_size = dp(b, &format!("{key}.dp_size"), r.dp_size);
            Some(KvEndpoint { endpoint: ep?, replay_endpoint: replay, load_endpoint, dp_size })
        };
        let pool = |b: &mut Self, name: &str, r: Option<RawKvEndpoint>| {
            let r = r?;
            let key = format!("kv_events.{name}");
            if let Some(u) = &r.url {
                b.error(
                    &format!("{key}.url"),
                    &At::span(u),
                    "a pool's endpoints take no url (one worker's go in [[kv_events.workers]])"
                        .into(),
                );
            }
            at(b, &key, r)
        };
        let prefill = pool(self, "prefill", raw.prefill);
        let decode = pool(self, "decode", raw.decode);
        let mut workers: Vec<KvWorkerEndpoint> = Vec::new();
        for (i, mut r) in raw.workers.into_iter().enumerate() {
            let key = format!("kv_events.workers[{i}]");
            let Some(u) = r.url.take() else {
                self.error(
                    &format!("{key}.url"),
                    &At::span(&r.endpoint),
                    "missing: the worker's URL".into(),
                );
                continue;
            };
            let url = match crate::config::normalize_worker_url(u.get_ref()) {
                Ok(url) if workers.iter().any(|w| w.url == url) => {
                    self.error(
                        &format!("{key}.url"),
                        &At::span(&u),
                        format!("{url} is listed twice"),
                    );
                    continue;
                }
                Ok(url) => url,
                Err(e) => {
                    self.error(&format!("{key}.url"), &At::span(&u), e);
                    continue;
                }
            };
            if let Some(at) = at(self, &key, r) {
                workers.push(KvWorkerEndpoint { url, at });
            }
        }
        let block_size = raw.block_size.and_then(|b| match *b.get_ref() {
            1..=65_536 => Some(*b.get_ref() as usize),
            n => {
                self.error(
                    "kv_events.block_size",
                    &At::span(&b),
                    format!("{n} is not a page size from 1 to 65536"),
                );
                None
            }
        });
        let dp_size = dp(self, "kv_events.dp_size", raw.dp_size).unwrap_or(1);
        let max_blocks = raw.max_blocks.map_or(d.max_blocks, |v| {
            let at = (*v.get_ref() as usize, At::span(&v));
            self.count("kv_events.max_blocks", at, d.max_blocks)
        });
        KvEventsConfig {
            enabled: raw.enabled.unwrap_or(d.enabled),
            endpoint: ep,
            replay_endpoint: replay,
            load_endpoint: load,
            topic: raw.topic.unwrap_or_default(),
            block_size,
            dp_size,
            pending_ttl: self.duration(
                "kv_events.pending_ttl",
                None,
                raw.pending_ttl,
                d.pending_ttl,
            ),
            max_blocks,
            prefill,
            decode,
            workers,
        }
    }

    /// The tokenizer file: a flag's path as given, the file's relative to the file; a
    /// directory means its `tokenizer.json`. The chat template likewise (`--chat-template`,
    /// `[tokenizer] chat_template`). Checked to exist here; loaded by `tokenize`.
    pub(super) fn tokenizer(&mut self, raw: RawTokenizer, f: &Flags) -> Option<TokenizerFiles> {
        let chat_template = match (&f.chat_template, raw.chat_template) {
            (Some(p), _) => Some((p.clone(), At::flag("--chat-template"))),
            (None, Some(p)) => Some((self.in_file_dir(p.get_ref()), At::span(&p))),
            (None, None) => None,
        };
        let path = match (&f.tokenizer_path, &f.model_path, raw.path) {
            (Some(p), _, _) => (p.clone(), At::flag("--tokenizer-path")),
            (None, Some(p), _) => (p.clone(), At::flag("--model-path")),
            (None, None, Some(p)) => (self.in_file_dir(p.get_ref()), At::span(&p)),
            (None, None, None) => {
                if let Some((_, at)) = chat_template {
                    self.error(
                        "tokenizer.chat_template",
                        &at,
                        "a chat template needs the model's tokenizer (--tokenizer-path, \
                         --model-path or [tokenizer] path)"
                            .into(),
                    );
                }
                return None;
            }
        };
        self.tokenizer_files("tokenizer", path, chat_template)
    }

    /// `[tokenizer.prefill]` and `[tokenizer.decode]`, PD mode only.
    pub(super) fn pool_tokenizers(&mut self, raw: &RawTokenizer, pd: bool) -> PoolTokenizers {
        let mut pool = |name: &str, t: &Option<Spanned<RawPoolTokenizer>>| {
            let t = t.as_ref()?;
            let key = format!("tokenizer.{name}");
            if !pd {
                let msg = format!("[{key}] is a PD pool's tokenizer; no PD pools are configured");
                self.error(&key, &At::span(t), msg);
                return None;
            }
            let t = t.get_ref();
            let path = (self.in_file_dir(t.path.get_ref()), At::span(&t.path));
            let chat =
                t.chat_template.as_ref().map(|c| (self.in_file_dir(c.get_ref()), At::span(c)));
            self.tokenizer_files(&key, path, chat)
        };
        PoolTokenizers {
            prefill: pool("prefill", &raw.prefill),
            decode: pool("decode", &raw.decode),
        }
    }

    /// The files of one tokenizer, checked to exist (errors under `key`).
    fn tokenizer_files(
        &mut self,
        key: &str,
        (path, at): (PathBuf, At),
        chat_template: Option<(PathBuf, At)>,
    ) -> Option<TokenizerFiles> {
        let file = crate::kv::tokenize::tokenizer_file(&path);
        if !file.is_file() {
            self.error(
                &format!("{key}.path"),
                &at,
                format!(
                    "{} is not a tokenizer.json file (or a directory that has one)",
                    file.display()
                ),
            );
            return None;
        }
        let chat_template = match chat_template {
            Some((p, at)) if !p.is_file() => {
                self.error(
                    &format!("{key}.chat_template"),
                    &at,
                    format!("{} is not a chat template file", p.display()),
                );
                None
            }
            other => other.map(|(p, _)| p),
        };
        Some(TokenizerFiles { path: file, chat_template })
    }
}

impl Builder<'_> {
    pub(super) fn peers(&mut self, raw: super::raw::RawPeers, f: &Flags) -> super::PeersConfig {
        let d = super::PeersConfig::default();
        let urls: Vec<(String, At)> = match &f.peer_urls {
            Some(u) => u.iter().map(|u| (u.clone(), At::flag("--peer-urls"))).collect(),
            None => raw.urls.iter().map(|u| (u.get_ref().clone(), At::span(u))).collect(),
        };
        let mut out = Vec::new();
        for (i, (u, at)) in urls.into_iter().enumerate() {
            let ok = u
                .parse::<http::Uri>()
                .ok()
                .filter(|x| x.scheme_str() == Some("http") && x.host().is_some());
            match ok {
                Some(_) => out.push(u.trim_end_matches('/').to_owned()),
                None => self.error(
                    &format!("peers.urls[{i}]"),
                    &at,
                    format!("{u:?} is not http://HOST:PORT (peers are told over plain HTTP)"),
                ),
            }
        }
        let max_pages = raw.max_pages.map_or(d.max_pages, |v| {
            self.count("peers.max_pages", (*v.get_ref() as usize, At::span(&v)), d.max_pages)
        });
        super::PeersConfig { urls: out, max_pages }
    }
}
