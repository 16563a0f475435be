//! `routerctl workers|status|config|completions` as scripts run them: a real routerd (in this
//! process) with simulated workers, the routerctl binary, its output and exit codes.

use std::process::Command;

use routerctl::sim::{SimArgs, SimWorker};
use serde_json::Value;

struct Run {
    code: i32,
    out: String,
    err: String,
}

async fn ctl(args: &[&str], endpoint: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_routerctl"));
    cmd.args(args).env_remove("ROUTERCTL_ENDPOINT");
    if let Some(e) = endpoint {
        cmd.env("ROUTERCTL_ENDPOINT", e);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn fleet() -> (routerd::run::Running, Vec<SimWorker>) {
    let mut ws = Vec::new();
    for _ in 0..2 {
        ws.push(SimWorker::start(SimArgs::ephemeral()).await.unwrap());
    }
    (router_over(&ws[0]).await, ws)
}

/// A round_robin router over `w` alone.
async fn router_over(w: &SimWorker) -> routerd::run::Running {
    let flags = routerd::config::Flags {
        policy: Some("round_robin".into()),
        worker_urls: Some(vec![w.url()]),
        ..Default::default()
    };
    let config = routerd::config::Config::build(None, &flags).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    routerd::run::start(listener, config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_list_add_remove_with_exit_codes() {
    let (r, ws) = fleet().await;
    let ep = r.url();
    let list = ctl(&["workers", "list"], Some(&ep)).await;
    assert_eq!(list.code, 0, "{}", list.err);
    assert!(list.out.starts_with("URL"), "{}", list.out);
    assert!(list.out.contains(&ws[0].url()) && list.out.contains("up"), "{}", list.out);

    let added = ctl(&["workers", "add", &ws[1].url(), "--endpoint", &ep], None).await;
    assert_eq!((added.code, added.out.trim()), (0, format!("added {}", ws[1].url()).as_str()));
    let json = ctl(&["workers", "list", "-o", "json"], Some(&ep)).await;
    let listed: Vec<Value> = serde_json::from_str(&json.out).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["source"], "api");

    let dup = ctl(&["workers", "add", &ws[1].url()], Some(&ep)).await;
    assert_eq!(dup.code, 1, "the router refused it");
    assert!(dup.err.contains("409") && dup.err.contains("already registered"), "{}", dup.err);
    let pd = ctl(&["workers", "add", "http://127.0.0.1:1", "--role", "prefill"], Some(&ep)).await;
    assert_eq!(pd.code, 1);
    assert!(pd.err.contains("PD mode"), "{}", pd.err);

    let removed = ctl(&["workers", "remove", &ws[1].url(), "-o", "json"], Some(&ep)).await;
    assert_eq!(removed.code, 0, "{}", removed.err);
    let view: Value = serde_json::from_str(&removed.out).unwrap();
    assert_eq!(view["url"], ws[1].url());
    let unknown = ctl(&["workers", "remove", &ws[1].url()], Some(&ep)).await;
    assert_eq!(unknown.code, 1);

    let away = ctl(&["workers", "list"], Some("http://127.0.0.1:9")).await;
    assert_eq!(away.code, 3, "unreachable");
    assert!(away.err.contains("cannot reach the router at http://127.0.0.1:9"), "{}", away.err);
    let usage = ctl(&["workers", "frobnicate"], None).await;
    assert_eq!(usage.code, 2);
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_health_readiness_and_generation() {
    let (r, ws) = fleet().await;
    let st = ctl(&["status"], Some(&r.url())).await;
    assert_eq!(st.code, 0, "{}", st.err);
    for want in [
        "health      ok",
        "readiness   ready",
        "workers     1",
        "policy      round_robin",
        "generation 1",
        "last reload none yet",
    ] {
        assert!(st.out.contains(want), "{want:?} in\n{}", st.out);
    }
    let js = ctl(&["status", "-o", "json"], Some(&r.url())).await;
    let v: Value = serde_json::from_str(&js.out).unwrap();
    assert_eq!(
        (v["healthy"].as_bool(), v["ready"].as_bool(), v["workers"].as_u64()),
        (Some(true), Some(true), Some(1))
    );
    let away = ctl(&["status"], Some("http://127.0.0.1:9")).await;
    assert_eq!(away.code, 3);
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_and_completions() {
    let dir = std::env::temp_dir().join(format!("routerctl-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[workers]]\nurl = \"http://127.0.0.1:31001\"\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[policy]\nname = \"fastest\"\n").unwrap();
    let ok = ctl(&["config", "check", good.to_str().unwrap()], None).await;
    assert_eq!(ok.code, 0, "{}", ok.err);
    assert!(ok.out.contains("configuration is valid (1 workers)"), "{}", ok.out);
    let no = ctl(&["config", "check", bad.to_str().unwrap()], None).await;
    assert_eq!(no.code, 1);
    assert!(no.err.contains("bad.toml:2:8: policy.name: unknown policy \"fastest\""), "{}", no.err);
    let _ = std::fs::remove_dir_all(&dir);
    for shell in ["bash", "zsh", "fish"] {
        let c = ctl(&["completions", shell], None).await;
        assert_eq!(c.code, 0);
        assert!(c.out.contains("routerctl") && c.out.contains("workers"), "{shell}");
    }
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// (ca, cert, key).
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_list_over_https_says_why_a_worker_is_down() {
    let dir = std::env::temp_dir().join(format!("routerctl-tls-{}", std::process::id()));
    let (ca, cert, key) = pki(&dir);
    let w = SimWorker::start(SimArgs::ephemeral()).await.unwrap();
    // A plain worker registered as https://: its handshake fails.
    let flags = routerd::config::Flags {
        worker_urls: Some(vec![w.url().replacen("http://", "https://", 1)]),
        tls_cert_path: Some(cert),
        tls_key_path: Some(key),
        ..Default::default()
    };
    let mut config = routerd::config::Config::build(None, &flags).unwrap();
    config.health.interval = std::time::Duration::from_millis(100);
    config.health.failure_threshold = 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = routerd::run::start(listener, config).unwrap();
    assert!(r.url().starts_with("https://"));
    let mut list = None;
    for _ in 0..50 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routerctl"));
        cmd.args(["workers", "list", "--endpoint", &r.url()]).env("SSL_CERT_FILE", &ca);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if text.contains("down") {
            list = Some(text);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let list = list.expect("the worker goes down");
    assert!(list.contains("did not answer with TLS"), "{list}");
    // Without the CA, routerctl says why it cannot reach the router.
    let untrusting = ctl(&["workers", "list", "--endpoint", &r.url()], None).await;
    assert_eq!(untrusting.code, 3);
    assert!(untrusting.err.contains("UnknownIssuer"), "{}", untrusting.err);
    r.shutdown().await;
    w.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_options_go_before_or_after_the_subcommand() {
    let (r, ws) = fleet().await;
    let ep = r.url();
    let listed = |out: &str| -> Vec<Value> { serde_json::from_str(out).expect("JSON output") };
    for args in [
        vec!["--endpoint", &ep, "workers", "list", "-o", "json"],
        vec!["workers", "list", "--endpoint", &ep, "-o", "json"],
        vec!["-o", "json", "--endpoint", &ep, "workers", "list"],
        vec!["workers", "--endpoint", &ep, "list", "--output", "json"],
    ] {
        let run = ctl(&args, None).await;
        assert_eq!(run.code, 0, "{args:?}: {}", run.err);
        assert_eq!(listed(&run.out).len(), 1, "{args:?}: {}", run.out);
    }
    let by_env = ctl(&["workers", "list"], Some(&ep)).await;
    assert_eq!(by_env.code, 0, "{}", by_env.err);
    assert!(by_env.out.starts_with("URL"), "{}", by_env.out);
    let status = ctl(&["--output", "json", "--endpoint", &ep, "status"], None).await;
    assert_eq!(status.code, 0, "{}", status.err);
    let v: Value = serde_json::from_str(&status.out).unwrap();
    assert_eq!(v["workers"], 1);
    // Listed once in the top-level help.
    let help = ctl(&["--help"], None).await;
    assert_eq!(help.out.matches("--endpoint").count(), 1, "{}", help.out);
    assert_eq!(help.out.matches("--output").count(), 1, "{}", help.out);
    assert_eq!(help.out.matches("--admin-key").count(), 1, "{}", help.out);
    r.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_act_on_each_replica() {
    let (a, ws) = fleet().await;
    let b = router_over(&ws[0]).await;
    let both = format!("{},{}", a.url(), b.url());

    // A worker added through the API goes to every replica listed.
    let added = ctl(&["--endpoint", &both, "workers", "add", &ws[1].url()], None).await;
    assert_eq!(added.code, 0, "{}", added.err);
    assert_eq!(
        added.out,
        format!("added {w} on {}\nadded {w} on {}\n", a.url(), b.url(), w = ws[1].url())
    );
    let list = ctl(&["workers", "list", "-o", "json"], Some(&both)).await;
    let each: Vec<Value> = serde_json::from_str(&list.out).unwrap();
    assert_eq!(each.len(), 2, "{}", list.out);
    assert_eq!(each[1]["endpoint"].as_str(), Some(&*b.url()));
    assert_eq!(each[1]["result"].as_array().map(Vec::len), Some(2));
    for r in [&a, &b] {
        let one = ctl(&["workers", "list", "-o", "json"], Some(&r.url())).await;
        let listed: Vec<Value> = serde_json::from_str(&one.out).unwrap();
        assert_eq!(listed.len(), 2, "replica {}: {}", r.url(), one.out);
    }
    let table = ctl(&["workers", "list"], Some(&both)).await;
    assert!(
        table.out.starts_with(&format!("replica {}\nURL", a.url()))
            && table.out.contains(&format!("\n\nreplica {}\nURL", b.url())),
        "{}",
        table.out
    );

    // Status of each; one replica gone makes the exit code 3 and is named.
    let status = ctl(&["status", "-o", "json"], Some(&both)).await;
    assert_eq!(status.code, 0, "{}", status.err);
    let each: Vec<Value> = serde_json::from_str(&status.out).unwrap();
    assert_eq!(each.len(), 2);
    assert_eq!(
        (each[0]["endpoint"].as_str(), each[0]["ready"].as_bool()),
        (Some(&*a.url()), Some(true))
    );
    assert_eq!(each[1]["endpoint"].as_str(), Some(&*b.url()));
    let with_gone = format!("{both},http://127.0.0.1:9");
    let status = ctl(&["status"], Some(&with_gone)).await;
    assert_eq!(status.code, 3);
    assert!(
        status.out.contains(&format!("router      {}\nhealth      ok", b.url())),
        "{}",
        status.out
    );
    assert!(
        status.out.contains("router      http://127.0.0.1:9\nunreachable cannot reach"),
        "{}",
        status.out
    );

    let removed = ctl(&["workers", "remove", &ws[1].url()], Some(&both)).await;
    assert_eq!(removed.code, 0, "{}", removed.err);
    assert_eq!(removed.out.lines().count(), 2);
    a.shutdown().await;
    b.shutdown().await;
    for w in ws {
        w.shutdown().await;
    }
}
