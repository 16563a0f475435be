use super::*;

fn build(text: &str, flags: &Flags) -> Result<Config, ConfigErrors> {
    Config::build(Some(Source { name: "r.toml", text }), flags)
}

fn errors(text: &str) -> Vec<String> {
    build(text, &Flags::default()).unwrap_err().0.iter().map(ToString::to_string).collect()
}

#[test]
fn defaults_apply() {
    let c = build("", &Flags::default()).unwrap();
    assert_eq!(c.server.host, "127.0.0.1");
    assert_eq!(c.server.port, 30000);
    assert_eq!(c.server.max_payload_size, 256 << 20);
    assert_eq!(c.server.request_timeout, Duration::from_secs(600));
    assert_eq!(c.server.max_concurrent_requests, None);
    assert_eq!(c.server.request_id_headers.len(), 4);
    assert!(c.workers.is_empty());
}

#[test]
fn full_file() {
    let c = build(
        r#"
[server]
host = "0.0.0.0"
port = 8080
max_payload_size = 1024
request_timeout = "30s"
max_concurrent_requests = 8
queue_size = 4
queue_timeout = "500ms"
request_id_headers = ["X-Req"]

[policy]
name = "power_of_two"
load_poll_interval = "2s"

[[workers]]
url = "http://127.0.0.1:31001/"

[[workers]]
url = "http://gpu-2:8000"
api_key = "k"
"#,
        &Flags::default(),
    )
    .unwrap();
    assert_eq!(c.server.port, 8080);
    assert_eq!(c.server.queue_timeout, Duration::from_millis(500));
    assert_eq!(c.server.max_concurrent_requests, NonZeroUsize::new(8));
    assert_eq!(c.server.request_id_headers, vec![HeaderName::from_static("x-req")]);
    assert_eq!(c.policy.name, PolicyName::PowerOfTwo);
    assert_eq!(c.policy.load_poll_interval, Some(Duration::from_secs(2)));
    assert_eq!(c.workers[0].url, "http://127.0.0.1:31001");
    assert_eq!(c.workers[1].api_key.as_ref().map(|k| k.expose()), Some("k"));
}

#[test]
fn syntax_and_unknown_keys_point_at_the_file() {
    let e = errors("[server]\nport = 1\nbogus = 2\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("r.toml:3:1: server.bogus: unknown field `bogus`"), "{e:?}");
    let e = errors("[server]\nport = \"x\"\n");
    assert!(e[0].starts_with("r.toml:2:8: server.port:"), "{e:?}");
    let e = errors("[server\n");
    assert!(e[0].starts_with("r.toml:1:"), "{e:?}");
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let e = errors(
        r#"[server]
request_timeout = "soon"
[policy]
name = "fastest"
[[workers]]
url = "ftp://a"
[[workers]]
url = "http://b:1"
[[workers]]
url = "http://b:1/"
"#,
    );
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(
        e[0].starts_with("r.toml:2:19: server.request_timeout: \"soon\" is not a duration"),
        "{e:?}"
    );
    assert!(e[1].starts_with("r.toml:4:8: policy.name: unknown policy \"fastest\""), "{e:?}");
    assert!(
        e[2].starts_with("r.toml:6:7: workers[0].url: \"ftp://a\" must start with http://"),
        "{e:?}"
    );
    assert_eq!(e[3], "r.toml:10:7: workers[2].url: duplicate worker http://b:1");
}

#[test]
fn metrics_logging_and_cors_settings() {
    let c = build(
        "[metrics]\nport = 9100\n[server]\ncors_allowed_origins = [\"https://ui\"]\n",
        &Flags::default(),
    )
    .unwrap();
    assert_eq!(c.metrics, Some(MetricsConfig { host: "127.0.0.1".into(), port: 9100 }));
    assert_eq!(c.server.cors_allowed_origins, vec!["https://ui"]);
    assert_eq!(c.log_format, LogFormat::Text);
    let off = build("[metrics]\nenabled = false\n", &Flags::default()).unwrap();
    assert_eq!(off.metrics, None);
    let f =
        Flags { prometheus_port: Some(1), log_format: Some("JSON".into()), ..Default::default() };
    let c = build("[metrics]\nport = 9100\n", &f).unwrap();
    assert_eq!((c.metrics.unwrap().port, c.log_format), (1, LogFormat::Json));
    let bad = Flags { log_format: Some("xml".into()), ..Default::default() };
    let e: Vec<String> = build("", &bad).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        e,
        vec!["flag --log-format: log_format: unknown log format \"xml\"; expected text or json"]
    );
}

fn cli(args: &[&str]) -> Flags {
    use clap::Parser;
    let mut all = vec!["routerd"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).expect("flags parse").flags
}

#[test]
fn pd_pools_from_sgl_router_flags_with_policy_inheritance() {
    let f = cli(&[
        "--pd-disaggregation",
        "--policy",
        "power_of_two",
        "--prefill",
        "http://p1:30000",
        "8998",
        "--prefill",
        "http://p2:30000",
        "none",
        "--prefill",
        "http://p3:30000",
        "--decode",
        "http://d1:30001",
        "--decode",
        "http://d2:30001",
        "--decode-policy",
        "round_robin",
    ]);
    let c = Config::build(None, &f).unwrap();
    let pd = c.pd.unwrap();
    let prefill: Vec<_> = pd.prefill.iter().map(|p| (p.url.as_str(), p.bootstrap_port)).collect();
    assert_eq!(
        prefill,
        vec![("http://p1:30000", Some(8998)), ("http://p2:30000", None), ("http://p3:30000", None)]
    );
    let decode: Vec<_> = pd.decode.iter().map(|d| d.url.as_str()).collect();
    assert_eq!(decode, vec!["http://d1:30001", "http://d2:30001"]);
    assert_eq!(pd.prefill_policy, PolicyName::PowerOfTwo, "inherits --policy");
    assert_eq!(pd.decode_policy, PolicyName::RoundRobin);

    let only_pd = Config::build(None, &cli(&["--pd-disaggregation"])).unwrap();
    assert_eq!(
        only_pd.pd.map(|p| (p.prefill.len(), p.prefill_policy)),
        Some((0, PolicyName::CacheAware))
    );
}

#[test]
fn pd_pools_from_the_file_and_their_errors() {
    let c = build(
        "[policy]\nprefill_policy = \"cache_aware\"\ndecode_policy = \"random\"\n[[prefill]]\nurl = \"http://p:1\"\nbootstrap_port = 8998\n[[decode]]\nurl = \"http://d:1\"\n",
        &Flags::default(),
    )
    .unwrap();
    let pd = c.pd.unwrap();
    assert_eq!((pd.prefill[0].bootstrap_port, pd.decode_policy), (Some(8998), PolicyName::Random));
    let e = errors("[[workers]]\nurl = \"http://w:1\"\n[[prefill]]\nurl = \"http://p:1\"\n[[decode]]\nurl = \"http://p:1\"\n");
    assert_eq!(
        e,
        vec![
            "r.toml:6:7: decode[0].url: duplicate worker http://p:1",
            "r.toml:2:7: workers: PD mode routes to prefill and decode pools; regular workers are not allowed with them",
        ]
    );
    let f = cli(&["--prefill", "http://p:1", "99999", "--decode-policy", "fastest"]);
    let e: Vec<String> =
        Config::build(None, &f).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        e,
        vec![
            "flag --decode-policy: policy.decode_policy: unknown policy \"fastest\"; expected one of cache_aware, cost_aware, round_robin, random, power_of_two, manual, bucket",
            "flag --prefill: prefill[0].bootstrap_port: bootstrap port \"99999\" must be a port number or `none`",
        ]
    );
    let e: Vec<String> = Config::build(None, &cli(&["--prefill-policy", "random"]))
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        e,
        vec!["flag --prefill-policy: policy: only applies in PD mode (--pd-disaggregation)"]
    );
}

#[test]
fn flags_override_the_file() {
    let flags = Flags {
        port: Some(9),
        policy: Some("random".into()),
        worker_urls: Some(vec!["http://x:1".into()]),
        request_timeout_secs: Some(5),
        ..Flags::default()
    };
    let c = build(
        "[server]\nport = 1\n[policy]\nname = \"round_robin\"\n[[workers]]\nurl = \"http://y:1\"\n",
        &flags,
    )
    .unwrap();
    assert_eq!(c.server.port, 9);
    assert_eq!(c.policy.name, PolicyName::Random);
    assert_eq!(c.workers.len(), 1);
    assert_eq!(c.workers[0].url, "http://x:1");
    assert_eq!(c.server.request_timeout, Duration::from_secs(5));
    let bad = Flags {
        worker_urls: Some(vec!["nope".into()]),
        policy: Some("random".into()),
        ..Flags::default()
    };
    let e = Config::build(None, &bad).unwrap_err();
    assert_eq!(
        e.0[0].to_string(),
        "flag --worker-urls: workers[0].url: \"nope\" must start with http:// or https://"
    );
}

#[test]
fn cache_aware_is_the_default_with_sgl_router_parameters() {
    let c = Config::build(None, &Flags::default()).unwrap();
    assert_eq!(c.policy.name, PolicyName::CacheAware);
    assert_eq!(c.policy.cache_threshold, 0.5);
    assert_eq!(c.policy.balance_abs_threshold, 32);
    assert_eq!(c.policy.balance_rel_threshold, 1.0001);
    assert_eq!(c.policy.eviction_interval, Duration::from_secs(60));
    assert_eq!(c.policy.max_tree_size, 16_777_216);
    let flags = Flags {
        cache_threshold: Some(0.3),
        max_tree_size: Some(1000),
        eviction_interval_secs: Some(5),
        ..Flags::default()
    };
    let c = build("[policy]\ncache_threshold = 0.9\nbalance_abs_threshold = 8\n", &flags).unwrap();
    assert_eq!(c.policy.cache_threshold, 0.3, "flag wins");
    assert_eq!(c.policy.balance_abs_threshold, 8);
    assert_eq!(c.policy.max_tree_size, 1000);
    assert_eq!(c.policy.eviction_interval, Duration::from_secs(5));
    let e =
        errors("[policy]\ncache_threshold = 1.5\nbalance_rel_threshold = 0.5\nmax_tree_size = 0\n");
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].starts_with("r.toml:2:19: policy.cache_threshold: must be between 0 and 1"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("r.toml:3:25: policy.balance_rel_threshold: must be a number >= 1.0"),
        "{e:?}"
    );
    assert!(e[2].starts_with("r.toml:4:17: policy.max_tree_size: must be at least 1"), "{e:?}");
}

#[test]
fn worker_urls_are_normalised_and_checked() {
    assert_eq!(normalize_worker_url("http://h:1/").unwrap(), "http://h:1");
    assert_eq!(normalize_worker_url(" http://h ").unwrap(), "http://h");
    assert_eq!(normalize_worker_url("https://h:8443/").unwrap(), "https://h:8443");
    assert!(normalize_worker_url("ftp://h").unwrap_err().contains("http:// or https://"));
    for bad in ["h:1", "http://", "http://u:p@h:1", "http://h:1/v1", "http://h:1?x=1", "mailto:x"] {
        assert!(normalize_worker_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn fault_tolerance_sections_and_their_errors() {
    let c = build(
        r#"
[server]
stream_idle_timeout = "2s"
header_timeout = "1h"

[health]
endpoint = "/health_generate"
interval = "3s"
failure_threshold = 4

[circuit_breaker]
enabled = false

[retry]
max_retries = 5
initial_backoff = "50ms"
"#,
        &Flags::default(),
    )
    .unwrap();
    assert_eq!(c.server.stream_idle_timeout, Duration::from_secs(2));
    assert_eq!(c.server.header_timeout, c.server.request_timeout, "capped by request_timeout");
    assert_eq!((c.health.endpoint.as_str(), c.health.failure_threshold), ("/health_generate", 4));
    assert_eq!(c.health.interval, Duration::from_secs(3));
    assert!(!c.circuit_breaker.enabled);
    assert_eq!((c.retry.max_retries, c.retry.initial_backoff), (5, Duration::from_millis(50)));

    let errs = errors(
        "[health]\nendpoint = \"health\"\nsuccess_threshold = 0\n[circuit_breaker]\nfailure_threshold = 0\n[retry]\njitter_factor = 2.0\nbackoff_multiplier = 0.5\n",
    );
    assert_eq!(
        errs,
        vec![
            "r.toml:2:12: health.endpoint: \"health\" must be a path starting with /",
            "r.toml:3:21: health.success_threshold: must be at least 1",
            "r.toml:5:21: circuit_breaker.failure_threshold: must be at least 1",
            "r.toml:8:22: retry.backoff_multiplier: must be a number >= 1.0, got 0.5",
            "r.toml:7:17: retry.jitter_factor: must be between 0 and 1, got 2",
        ]
    );
}

#[test]
fn sgl_router_fault_flags_override_the_file() {
    let flags = Flags {
        retry_max_retries: Some(1),
        retry_initial_backoff_ms: Some(20),
        disable_circuit_breaker: true,
        cb_failure_threshold: Some(9),
        health_check_interval_secs: Some(7),
        health_check_endpoint: Some("/ping".into()),
        worker_startup_check_interval: Some(1),
        stream_idle_timeout_secs: Some(9),
        ..Default::default()
    };
    let c = build("[retry]\nmax_retries = 4\n[circuit_breaker]\nenabled = true\n", &flags).unwrap();
    assert_eq!((c.retry.max_retries, c.retry.initial_backoff), (1, Duration::from_millis(20)));
    assert!(!c.circuit_breaker.enabled);
    assert_eq!(c.circuit_breaker.failure_threshold, 9);
    assert_eq!((c.health.interval, c.health.endpoint.as_str()), (Duration::from_secs(7), "/ping"));
    assert_eq!(c.health.startup_check_interval, Duration::from_secs(1));
    assert_eq!(c.server.stream_idle_timeout, Duration::from_secs(9));
    let zero = Flags { retry_max_backoff_ms: Some(0), ..Default::default() };
    let errs: Vec<String> =
        build("", &zero).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        vec!["flag --retry-max-backoff-ms: retry.max_backoff: must be longer than zero"]
    );
}

#[test]
fn credentials_in_worker_urls_are_masked_in_errors() {
    let e = normalize_worker_url("http://user:pw@10.0.0.1:8000/x").unwrap_err();
    assert!(e.contains("http://***@10.0.0.1:8000/x") && !e.contains("pw"), "{e}");
    assert_eq!(super::redact_userinfo("http://a:b@h:1"), "http://***@h:1");
    assert_eq!(super::redact_userinfo("http://h:1/p@q"), "http://h:1/p@q");
    assert_eq!(super::redact_userinfo("no scheme@x"), "no scheme@x");
}

/// sgl-router's documented command lines, with `routerd` in place of
/// `python -m sglang_router.launch_router`: each becomes the configuration it describes.
fn from_command_line(line: &str) -> Config {
    use clap::Parser;
    let args: Vec<&str> = std::iter::once("routerd").chain(line.split_whitespace()).collect();
    assert_eq!(unsupported_flag(&args[1..]), None);
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
    Config::build(None, &cli.flags).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn the_sgl_router_documentation_command_lines() {
    let c = from_command_line(
        "--worker-urls http://worker1:8000 http://worker2:8000 --policy cache_aware",
    );
    let urls: Vec<&str> = c.workers.iter().map(|w| w.url.as_str()).collect();
    assert_eq!(urls, ["http://worker1:8000", "http://worker2:8000"]);
    assert_eq!(c.policy.name, PolicyName::CacheAware);
    assert!(c.pd.is_none());

    // PD with bootstrap ports (one given, one not) and explicit pool policies.
    let c = from_command_line(
        "--pd-disaggregation --prefill http://prefill1:30001 9001 --prefill http://prefill2:30002 \
         --decode http://decode1:30011 --decode http://decode2:30012 --policy cache_aware \
         --prefill-policy cache_aware --decode-policy power_of_two",
    );
    let pd = c.pd.unwrap();
    let prefill: Vec<(&str, Option<u16>)> =
        pd.prefill.iter().map(|p| (p.url.as_str(), p.bootstrap_port)).collect();
    assert_eq!(prefill, [("http://prefill1:30001", Some(9001)), ("http://prefill2:30002", None)]);
    let decode: Vec<&str> = pd.decode.iter().map(|d| d.url.as_str()).collect();
    assert_eq!(decode, ["http://decode1:30011", "http://decode2:30012"]);
    assert_eq!(
        (pd.prefill_policy, pd.decode_policy),
        (PolicyName::CacheAware, PolicyName::PowerOfTwo)
    );

    // `none` as the bootstrap port, and pools inheriting --policy.
    let c = from_command_line(
        "--pd-disaggregation --prefill http://127.0.0.1:30001 none --prefill http://127.0.0.1:30002 8999 \
         --decode http://127.0.0.1:30011 --policy power_of_two --host 0.0.0.0 --port 8000",
    );
    let pd = c.pd.unwrap();
    assert_eq!(pd.prefill[0].bootstrap_port, None);
    assert_eq!(pd.prefill[1].bootstrap_port, Some(8999));
    assert_eq!(
        (pd.prefill_policy, pd.decode_policy),
        (PolicyName::PowerOfTwo, PolicyName::PowerOfTwo)
    );
    assert_eq!((c.server.host.as_str(), c.server.port), ("0.0.0.0", 8000));
    let c = from_command_line(
        "--pd-disaggregation --prefill http://p:1 --decode http://d:2 --policy round_robin \
         --decode-policy random",
    );
    let pd = c.pd.unwrap();
    assert_eq!((pd.prefill_policy, pd.decode_policy), (PolicyName::RoundRobin, PolicyName::Random));
    let c = from_command_line("--pd-disaggregation --prefill http://p:1 --decode http://d:2");
    let pd = c.pd.unwrap();
    assert_eq!(
        (pd.prefill_policy, pd.decode_policy),
        (PolicyName::CacheAware, PolicyName::CacheAware)
    );

    // Service discovery, regular and PD.
    let c = from_command_line(
        "--service-discovery --selector app=sglang-worker role=inference \
         --service-discovery-namespace sglang-system --service-discovery-port 8000",
    );
    let d = c.discovery.unwrap();
    assert_eq!(d.selector.get("role").map(String::as_str), Some("inference"));
    assert_eq!((d.namespace.as_deref(), d.port), (Some("sglang-system"), 8000));
    let c = from_command_line(
        "--pd-disaggregation --prefill-selector app=sglang component=prefill \
         --decode-selector app=sglang component=decode --service-discovery",
    );
    let d = c.discovery.unwrap();
    assert_eq!(d.prefill_selector.get("component").map(String::as_str), Some("prefill"));
    assert_eq!(d.bootstrap_port_annotation, "sglang.ai/bootstrap-port");

    // The tuning flags, the key and DP-aware routing.
    let c = from_command_line(
        "--worker-urls http://w:1 --cache-threshold 0.3 --balance-abs-threshold 64 \
         --balance-rel-threshold 1.5 --eviction-interval 30 --max-tree-size 67108864 \
         --max-payload-size 536870912 --request-timeout-secs 1800 --max-concurrent-requests 512 \
         --queue-size 200 --queue-timeout-secs 30 --retry-max-retries 5 --retry-initial-backoff-ms 50 \
         --retry-max-backoff-ms 30000 --retry-backoff-multiplier 1.5 --retry-jitter-factor 0.2 \
         --cb-failure-threshold 10 --cb-success-threshold 3 --cb-timeout-duration-secs 60 \
         --cb-window-duration-secs 120 --health-check-interval-secs 30 --health-check-timeout-secs 10 \
         --health-failure-threshold 5 --health-success-threshold 1 --health-check-endpoint /health \
         --worker-startup-timeout-secs 300 --worker-startup-check-interval 5 --prometheus-host 0.0.0.0 \
         --prometheus-port 29001 --log-level debug --request-id-headers x-trace-id \
         --cors-allowed-origins https://a.example --api-key sk-fleet --dp-aware",
    );
    assert_eq!((c.policy.cache_threshold, c.policy.balance_abs_threshold), (0.3, 64));
    assert_eq!(c.policy.eviction_interval, Duration::from_secs(30));
    assert_eq!(c.server.max_concurrent_requests.map(|n| n.get()), Some(512));
    assert_eq!((c.retry.max_retries, c.circuit_breaker.failure_threshold), (5, 10));
    assert_eq!(c.health.startup_check_interval, Duration::from_secs(5));
    assert_eq!(c.metrics.as_ref().map(|m| m.port), Some(29001));
    assert!(c.policy.dp_aware);
    assert_eq!(c.security.api_key.as_ref().map(|k| k.expose()), Some("sk-fleet"));
    assert_eq!(c.workers[0].api_key.as_ref().map(|k| k.expose()), Some("sk-fleet"));
    let c =
        from_command_line("--worker-urls http://w:1 --disable-retries --disable-circuit-breaker");
    assert!(!c.retry.enabled && !c.circuit_breaker.enabled);
}

#[test]
fn unimplemented_sgl_router_flags_are_named() {
    let e =
        unsupported_flag(&["--worker-urls", "http://w:1", "--mcp-config-path", "m.yaml"]).unwrap();
    assert!(e.contains("--mcp-config-path") && e.contains("MCP"), "{e}");
    let e = unsupported_flag(&["--history-backend=oracle"]).unwrap();
    assert!(e.contains("history"), "{e}");
    assert!(unsupported_flag(&["--tokenizer-cache-enable-l0"]).unwrap().contains("gRPC"));
    // The tokenizer routes text prompts on the workers' KV events (docs/kv-events.md).
    assert_eq!(unsupported_flag(&["--tokenizer-path", "x"]), None);
    assert_eq!(unsupported_flag(&["--model-path", "x"]), None);
    assert_eq!(unsupported_flag(&["--policy", "cache_aware", "--", "--backend"]), None);
}

/// Every `[default: X]` that `routerd --help` promises is what the built configuration really
/// uses: setting the flag to X explicitly changes nothing. Defaults that are not a value (they
/// describe a behaviour) are listed here, each once.
#[test]
fn help_defaults_are_the_real_defaults() {
    use clap::{CommandFactory, Parser};
    const DESCRIPTIVE: [&str; 6] = [
        "--policy",
        "unlimited",
        "one per CPU",
        "all namespaces",
        "any but link-local and metadata addresses",
        "$OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else grpc",
    ];
    let base = Config::build(None, &Flags::default()).unwrap();
    let (mut checked, mut described) = (0, Vec::new());
    for arg in Cli::command().get_arguments() {
        let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else { continue };
        let help = help.to_string();
        let Some(default) = help.split("[default: ").nth(1).and_then(|d| d.split(']').next())
        else {
            continue;
        };
        if DESCRIPTIVE.contains(&default) {
            described.push(default.to_owned());
            continue;
        }
        let flag = format!("--{long}");
        let values: Vec<&str> =
            if default == "none" { vec![] } else { default.split(' ').collect() };
        if values.is_empty() {
            // `none`: the flag takes a list and the default is an empty one; nothing to set.
            assert!(arg.get_num_args().is_some_and(|n| n.min_values() <= 1), "{flag}");
            continue;
        }
        let args = std::iter::once("routerd").chain(std::iter::once(flag.as_str())).chain(values);
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{flag} {default}: {e}"));
        let built = Config::build(None, &cli.flags)
            .unwrap_or_else(|e| panic!("{flag} {default} is not a valid value: {}", e.0[0]));
        assert!(built == base, "{flag}: the help says [default: {default}], the config differs");
        checked += 1;
    }
    assert!(checked >= 35, "only {checked} defaults found in --help");
    described.sort();
    described.dedup();
    assert_eq!(described.len(), DESCRIPTIVE.len(), "every descriptive default is still in --help");
}

/// PEM files for the TLS keys' tests: a CA, and two certificate/key pairs it signed.
struct Pems {
    dir: std::path::PathBuf,
}

impl Pems {
    fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("routerd-cfg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for stem in ["a", "b"] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        }
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        Self { dir }
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.join(file)
    }

    fn p(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for Pems {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tls_keys_resolve_worker_over_pool_over_top_level() {
    let f = Pems::new("resolve");
    let text = format!(
        r#"
[server]
tls_cert_path = "{a}"
tls_key_path = "{ak}"

[tls]
ca_cert_paths = ["{ca}"]
client_cert_path = "{a}"
client_key_path = "{ak}"

[tls.decode]
client_cert_path = "{b}"
client_key_path = "{bk}"

[[prefill]]
url = "https://p1:8443"
bootstrap_port = 9000

[[prefill]]
url = "https://p2:8443"
ca_cert_paths = ["{a}"]

[[decode]]
url = "https://d1:8443"
"#,
        a = f.p("a.pem"),
        ak = f.p("a.key"),
        b = f.p("b.pem"),
        bk = f.p("b.key"),
        ca = f.p("ca.pem"),
    );
    let c = build(&text, &Flags::default()).unwrap();
    let serve = c.server.tls.clone().unwrap();
    assert_eq!((serve.cert_path, serve.key_path), (f.path("a.pem"), f.path("a.key")));
    let specs = crate::app::config_workers(&c);
    let by_url = |u: &str| specs.iter().find(|s| s.url == u).unwrap().tls.clone();
    let p1 = by_url("https://p1:8443");
    assert_eq!(p1.ca_cert_paths, vec![f.path("ca.pem")]);
    assert_eq!(p1.client_cert_path, Some(f.path("a.pem")));
    // A worker's own key replaces the one above it; the others are inherited.
    let p2 = by_url("https://p2:8443");
    assert_eq!(p2.ca_cert_paths, vec![f.path("a.pem")]);
    assert_eq!(p2.client_key_path, Some(f.path("a.key")));
    // The decode pool's client certificate.
    let d1 = by_url("https://d1:8443");
    assert_eq!(
        (d1.client_cert_path, d1.ca_cert_paths),
        (Some(f.path("b.pem")), vec![f.path("ca.pem")])
    );
    // Flags override the top level, as sgl-router's --ca-cert-paths etc.
    let flags =
        Flags { ca_cert_paths: Some(vec![f.path("a.pem"), f.path("b.pem")]), ..Default::default() };
    let c = build(&text, &flags).unwrap();
    assert_eq!(c.tls.workers.ca_cert_paths.len(), 2);
    // The configuration shown never holds a key's content.
    let shown = serde_json::to_string(&c).unwrap();
    assert!(shown.contains("a.key") && !shown.contains("PRIVATE KEY"), "{shown}");
}

#[test]
fn tls_errors_name_the_file_the_key_and_the_problem() {
    let f = Pems::new("errors");
    let text = format!(
        r#"
[server]
tls_cert_path = "{a}"
tls_key_path = "{bk}"

[tls]
ca_cert_paths = ["{missing}", "{junk}"]
client_cert_path = "{a}"

[[workers]]
url = "https://w:1"
client_key_path = "{ak}"
"#,
        a = f.p("a.pem"),
        ak = f.p("a.key"),
        bk = f.p("b.key"),
        missing = f.p("missing.pem"),
        junk = f.p("junk.pem"),
    );
    let errs = errors(&text);
    let find = |what: &str| {
        errs.iter()
            .find(|e| e.contains(what))
            .unwrap_or_else(|| panic!("{what} in {errs:#?}"))
            .clone()
    };
    let e = find("server.tls_cert_path");
    assert!(e.starts_with("r.toml:3:") && e.contains("do not belong together"), "{e}");
    let e = find("missing.pem");
    assert!(e.starts_with("r.toml:7:") && e.contains("tls.ca_cert_paths"), "{e}");
    assert!(find("junk.pem").contains("no PEM"), "{errs:#?}");
    let e = find("tls.client_key_path");
    assert!(e.starts_with("r.toml:8:") && e.contains("is needed with client_cert_path"), "{e}");
    assert!(find("workers[0].client_cert_path").contains("is needed with client_key_path"));
    // Flags: a certificate without its key, and serving needs both.
    let flags = Flags {
        client_cert_path: Some(f.path("a.pem")),
        tls_key_path: Some(f.path("a.key")),
        ..Default::default()
    };
    let errs: Vec<String> =
        build("", &flags).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert!(
        errs.iter()
            .any(|e| e.contains("flag --client-cert-path")
                && e.contains("--client-key-path is needed")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("flag --tls-key-path") && e.contains("server.tls_cert_path")),
        "{errs:#?}"
    );
    // Nothing in any error is a key's content.
    assert!(errs.iter().all(|e| !e.contains("PRIVATE")), "{errs:#?}");
}

#[test]
fn tls_paths_in_the_file_are_relative_to_the_file() {
    let f = Pems::new("relative");
    let name = f.path("routerd.toml").display().to_string();
    let text = "[server]\ntls_cert_path = \"a.pem\"\ntls_key_path = \"a.key\"\n\
                [tls]\nca_cert_paths = [\"ca.pem\"]\n";
    let c = Config::build(Some(Source { name: &name, text }), &Flags::default()).unwrap();
    assert_eq!(c.server.tls.unwrap().cert_path, f.path("a.pem"));
    assert_eq!(c.tls.workers.ca_cert_paths, vec![f.path("ca.pem")]);
    // From the working directory the same names do not exist: the file's directory is used.
    assert!(!std::path::Path::new("a.pem").exists());
}

#[test]
fn tokenizer_and_chat_template_files_are_checked() {
    let dir = std::env::temp_dir().join(format!("routerd-cfg-tok-{}", std::process::id()));
    crate::kv::tokenize::write_byte_level(&dir).unwrap();
    std::fs::write(dir.join("chat.jinja"), "{{ messages[0].content }}").unwrap();
    let d = dir.display();
    let c = build(
        &format!("[tokenizer]\npath = \"{d}\"\nchat_template = \"{d}/chat.jinja\"\n"),
        &Flags::default(),
    )
    .unwrap();
    let files = c.tokenizer.unwrap();
    assert_eq!(files.path, dir.join("tokenizer.json"));
    assert_eq!(files.chat_template, Some(dir.join("chat.jinja")));
    // sgl-router's flags: --model-path DIR, --chat-template FILE.
    let c = build(
        "",
        &cli(&["--model-path", &d.to_string(), "--chat-template", &format!("{d}/chat.jinja")]),
    )
    .unwrap();
    assert_eq!(c.tokenizer.unwrap().chat_template, Some(dir.join("chat.jinja")));
    let e =
        errors(&format!("[tokenizer]\npath = \"{d}\"\nchat_template = \"{d}/missing.jinja\"\n"));
    assert!(
        e.iter().any(|e| e.contains("tokenizer.chat_template") && e.contains("missing.jinja")),
        "{e:?}"
    );
    let e = errors(&format!("[tokenizer]\nchat_template = \"{d}/chat.jinja\"\n"));
    assert!(e.iter().any(|e| e.contains("needs the model's tokenizer")), "{e:?}");
    let e = errors("[kv_events]\nendpoint = \"udp://h:1\"\nblock_size = 0\n");
    assert!(e.iter().any(|e| e.contains("kv_events.endpoint") && e.contains("tcp://")), "{e:?}");
    assert!(e.iter().any(|e| e.contains("kv_events.block_size")), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kv_event_endpoints_per_pool_and_worker() {
    let c = build(
        r#"
[kv_events]
endpoint = "tcp://{host}:5557"
[kv_events.prefill]
endpoint = "tcp://{host}:6557"
dp_size = 2
[[kv_events.workers]]
url = "http://10.0.0.5:30000/"
endpoint = "tcp://10.0.0.5:7000"
replay_endpoint = "tcp://10.0.0.5:7001"
"#,
        &Flags::default(),
    )
    .unwrap();
    let k = &c.kv_events;
    assert_eq!(k.prefill.as_ref().unwrap().endpoint, "tcp://{host}:6557");
    assert_eq!(k.prefill.as_ref().unwrap().dp_size, Some(2));
    assert_eq!(k.decode, None);
    assert_eq!(k.workers[0].url, "http://10.0.0.5:30000");
    assert_eq!(k.workers[0].at.replay_endpoint.as_deref(), Some("tcp://10.0.0.5:7001"));
    let e = errors(
        r#"
[kv_events.decode]
url = "http://d:1"
endpoint = "tcp://{host}:x"
dp_size = 0
[[kv_events.workers]]
endpoint = "tcp://h:1"
[[kv_events.workers]]
url = "http://w:1"
endpoint = "tcp://h:1"
[[kv_events.workers]]
url = "http://w:1"
endpoint = "tcp://h:2"
"#,
    );
    for want in [
        "kv_events.decode.url",
        "kv_events.decode.endpoint",
        "kv_events.decode.dp_size",
        "kv_events.workers[0].url",
        "kv_events.workers[2].url",
    ] {
        assert!(e.iter().any(|e| e.contains(want)), "{want}: {e:?}");
    }
}

#[test]
fn trace_section_and_its_errors() {
    let c = build(
        r#"
[trace]
enabled = true
endpoint = "collector:4318"
protocol = "http/protobuf"
service_name = "router-eu"
sample_ratio = 0.25
max_queue_size = 100
schedule_delay = "1s"
"#,
        &Flags::default(),
    )
    .unwrap();
    let t = c.trace.unwrap();
    assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
    assert_eq!((t.protocol, t.service_name.as_str()), (TraceProtocol::HttpProtobuf, "router-eu"));
    assert_eq!((t.sample_ratio, t.max_queue_size), (0.25, 100));
    assert_eq!(t.max_export_batch_size, 512);
    assert_eq!(t.schedule_delay, Duration::from_secs(1));
    assert!(build("[trace]\nendpoint = \"c:4317\"\n", &Flags::default()).unwrap().trace.is_none());
    let e = errors("[trace]\nenabled = true\nprotocol = \"udp\"\nsample_ratio = 2.0\n");
    assert!(e.iter().any(|e| e.contains("trace.protocol") && e.contains("r.toml:3")), "{e:?}");
    assert!(e.iter().any(|e| e.contains("trace.sample_ratio") && e.contains("r.toml:4")), "{e:?}");
    let e = errors("[trace]\nenabled = true\nendpoint = \"nohost\"\n");
    assert!(e.iter().any(|e| e.contains("trace.endpoint") && e.contains("no port")), "{e:?}");
    let flags = Flags { enable_trace: true, ..Flags::default() };
    let t = build("", &flags).unwrap().trace.unwrap();
    assert_eq!((t.endpoint.as_str(), t.protocol), ("http://localhost:4317", TraceProtocol::Grpc));
}

#[test]
fn a_pd_pool_can_have_its_own_tokenizer() {
    use crate::registry::WorkerRole::*;
    let dir = std::env::temp_dir().join(format!("routerd-cfg-pooltok-{}", std::process::id()));
    let (a, b) = (dir.join("a"), dir.join("b"));
    crate::kv::tokenize::write_byte_level(&a).unwrap();
    crate::kv::tokenize::write_byte_level(&b).unwrap();
    let pd = "[[prefill]]\nurl = \"http://p:1\"\n[[decode]]\nurl = \"http://d:1\"\n";
    let text = format!(
        "{pd}[tokenizer]\npath = \"{}\"\n[tokenizer.decode]\npath = \"{}\"\n",
        a.display(),
        b.display()
    );
    let c = build(&text, &Flags::default()).unwrap();
    let path = |role| c.tokenizer_for(role).map(|t| t.path.clone());
    assert_eq!(path(Prefill), Some(a.join("tokenizer.json")), "[tokenizer]'s");
    assert_eq!(path(Decode), Some(b.join("tokenizer.json")), "its own");
    // A pool's own alone: the other pool has none.
    let only = format!("{pd}[tokenizer.prefill]\npath = \"{}\"\n", a.display());
    let c = build(&only, &Flags::default()).unwrap();
    assert!(c.tokenizer_for(Prefill).is_some() && c.tokenizer_for(Decode).is_none());
    // Outside PD mode, and a missing file, are errors naming the key and the line.
    let e = errors(&format!("[tokenizer.decode]\npath = \"{}\"\n", b.display()));
    assert!(e.iter().any(|e| e.contains("tokenizer.decode") && e.contains("no PD pools")), "{e:?}");
    let e = errors(&format!("{pd}[tokenizer.prefill]\npath = \"{}/nope\"\n", dir.display()));
    assert!(
        e.iter().any(|e| e.contains("tokenizer.prefill.path") && e.contains("r.toml:6")),
        "{e:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
