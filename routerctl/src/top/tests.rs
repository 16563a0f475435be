//! Dashboard screens rendered from fixture data on ratatui's `TestBackend`, compared with the
//! snapshots next to this file (insta).

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use routerd::admin::WorkerView;
use routerd::registry::{WorkerRole, WorkerSource};
use routerd::stats::{Event, Stats};

use super::render::render;
use super::state::{Action, Mode, State};

fn worker(
    url: &str,
    requests: u64,
    prompt: u64,
    cached: u64,
    healthy: bool,
    circuit: &str,
) -> WorkerView {
    WorkerView {
        id: format!("id-{url}"),
        url: url.into(),
        role: WorkerRole::Regular,
        worker_type: WorkerRole::Regular,
        is_healthy: healthy,
        health_state: if healthy { "healthy" } else { "unhealthy" }.into(),
        bootstrap_port: None,
        healthy,
        circuit: circuit.into(),
        routable: healthy && circuit != "open",
        health_checks_total: 10,
        circuit_opened_total: u64::from(circuit == "open"),
        retries_total: 0,
        last_error: None,
        in_flight: requests % 7,
        load: requests % 7,
        load_report: None,
        requests_total: requests,
        errors_total: if healthy { 0 } else { requests / 10 },
        prompt_tokens: prompt,
        cached_tokens: cached,
        hit_ratio: (prompt > 0).then(|| cached as f64 / prompt as f64),
        // Event routing predicted a little more than the workers then reported.
        predicted_tokens: cached + cached / 20,
        tree_chars: prompt * 4,
        tree_nodes: 3,
        tree_bytes: 1000,
        source: WorkerSource::Config,
    }
}

fn stats(uptime: f64, scale: u64) -> Stats {
    Stats {
        generation: 3,
        uptime_secs: uptime,
        policy: "cache_aware".into(),
        pd: false,
        ready: true,
        requests_total: 300 * scale,
        errors_total: 3 * scale,
        retries_total: scale,
        in_flight: 9,
        latency_bounds_ms: routerd::stats::LATENCY_BOUNDS_MS[..15].to_vec(),
        latency_counts: vec![
            0,
            0,
            0,
            10 * scale,
            200 * scale,
            80 * scale,
            7 * scale,
            3 * scale,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ],
        workers: vec![
            worker("http://10.0.0.1:8000", 120 * scale, 9000 * scale, 8100 * scale, true, "closed"),
            worker("http://10.0.0.2:8000", 150 * scale, 9000 * scale, 7200 * scale, true, "closed"),
            worker("http://10.0.0.3:8000", 30 * scale, 3000 * scale, 300 * scale, false, "open"),
        ],
        events: vec![
            Event {
                seq: 1,
                at_unix_ms: 0,
                kind: "worker_added".into(),
                message: "http://10.0.0.3:8000 (regular, via the API)".into(),
            },
            Event {
                seq: 2,
                at_unix_ms: 0,
                kind: "circuit_opened".into(),
                message: "http://10.0.0.3:8000".into(),
            },
        ],
        cache_accounting: Default::default(),
    }
}

fn screen(s: &State) -> String {
    let mut t = Terminal::new(TestBackend::new(110, 28)).unwrap();
    t.draw(|f| render(f, s)).unwrap();
    t.backend().to_string()
}

fn running() -> State {
    let mut s = State::new("http://127.0.0.1:30000");
    s.update(stats(10.0, 1), vec![]);
    s.update(stats(11.0, 2), vec![]);
    s
}

#[test]
fn live_screen() {
    let s = running();
    assert_eq!(s.rate, 300.0, "requests between two polls a second apart");
    assert_eq!(s.p99_ms, Some(100.0));
    insta::assert_snapshot!("live", screen(&s));
}

#[test]
fn unreachable_keeps_the_last_figures() {
    let mut s = running();
    s.disconnected("connection refused".into());
    insta::assert_snapshot!("unreachable", screen(&s));
}

#[test]
fn help_sort_and_confirmed_removal() {
    let mut s = running();
    assert_eq!(s.key('?'), Action::None);
    insta::assert_snapshot!("help", screen(&s));
    s.key('x');
    assert_eq!(s.mode, Mode::Normal);
    s.key('s');
    s.key('s');
    assert_eq!(s.rows[0].view.url, "http://10.0.0.2:8000", "sorted by req/s");
    s.down();
    assert_eq!(s.key('d'), Action::None);
    insta::assert_snapshot!("confirm", screen(&s));
    assert_eq!(s.key('y'), Action::Remove("http://10.0.0.1:8000".into()));
    s.key('d');
    assert_eq!(s.key('n'), Action::None, "anything but y cancels");
    assert_eq!(s.key('q'), Action::Quit);
}

#[test]
fn several_replicas_in_one_line() {
    let mut s = running();
    let mut other = State::new("http://127.0.0.1:30001");
    other.disconnected("connection refused".into());
    s.replicas = vec![
        crate::top::state::Replica::of(&s, true),
        crate::top::state::Replica::of(&other, false),
    ];
    insta::assert_snapshot!("replicas", screen(&s));
}

#[test]
fn the_cache_accounting_over_the_last_minute() {
    let mut s = State::new("http://127.0.0.1:30000");
    let at = |uptime: f64, scale: u64| {
        let mut st = stats(uptime, scale);
        // workload, policy, stale, underpredicted, hit (characters).
        st.cache_accounting.chars = [300 * scale, 50 * scale, 100 * scale, 0, 550 * scale];
        st
    };
    s.update(at(10.0, 1), vec![]);
    s.update(at(40.0, 2), vec![]);
    s.update(at(80.0, 4), vec![]);
    let a = s.accounting.expect("an accounting line");
    // Against the poll of 40 s (within the minute), not the one of 10 s.
    assert_eq!((a.unit, a.parts, a.over_secs), ("chars", [600, 100, 200, 0, 1100], 40.0));
    assert_eq!(a.prompt(), 2000);
    insta::assert_snapshot!("accounting", screen(&s));
}

/// A router that takes connections and never answers: `q` still quits at once, and the screen
/// says the figures are stale while the poll waits (the admin client's timeout is 10 s).
#[tokio::test]
async fn keys_are_answered_while_the_router_never_answers() {
    use std::time::{Duration, Instant};

    use ratatui::crossterm::event::KeyCode;

    use super::{dashboard, Input};
    use crate::admin::{Admin, Endpoint};

    // Bound and listening, never accepting: connections complete, requests get no answer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let admin = Admin::new(&Endpoint { endpoint, admin_key: None });
    let mut terminal = Terminal::new(TestBackend::new(120, 30)).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let keys = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        keys.send(Input::Key(KeyCode::Char('q'))).unwrap();
    });
    let started = Instant::now();
    dashboard(&mut terminal, vec![admin], Duration::from_millis(100), tx, rx).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "q was answered after {took:?}: the loop waited on the poll"
    );
    let screen: String = terminal.backend().buffer().content().iter().map(|c| c.symbol()).collect();
    assert!(screen.contains("figures 0.") && screen.contains("s old"), "{screen}");
    drop(silent);
}
