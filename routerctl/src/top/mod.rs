//! `routerctl top`: a live dashboard of the router, refreshed from `GET /admin/stats` and
//! `GET /admin/decisions` about once a second. The state and the drawing are pure (`state`,
//! `render`); this loop only polls, reads keys and draws. It keeps running while the router is
//! away and picks up again when it returns; the terminal is restored on any exit, panics
//! included.

pub mod render;
pub mod state;
#[cfg(test)]
mod tests;

use std::time::Duration;

use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use routerd::decisions::View as Decision;
use routerd::stats::Stats;
use serde_json::Value;

use crate::admin::{encode_segment, Admin, Endpoint};
use state::{Action, State};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The global `--endpoint`/`--admin-key` (set by `cli::run`).
    #[arg(skip)]
    pub endpoint: Endpoint,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

/// What the dashboard loop reacts to: keys and resizes (from the terminal's reader thread),
/// poll results and removal outcomes (from their own tasks). Nothing in the loop waits on the
/// network, so keys are answered at once even while the router hangs.
pub enum Input {
    Key(KeyCode),
    Resize,
    /// A poll of replica `.0` (0 with one router); boxed, as it is much larger than the rest.
    Polled(usize, Result<Box<(Stats, Vec<Decision>)>, String>),
    Notice(String),
}

pub async fn run(args: TopArgs) -> anyhow::Result<i32> {
    let admins: Vec<Admin> = args.endpoint.each().iter().map(Admin::new).collect();
    // Raw mode and the alternate screen, with a panic hook that undoes both.
    let mut terminal = ratatui::init();
    let (tx, input) = tokio::sync::mpsc::unbounded_channel();
    read_keys(tx.clone());
    let every = Duration::from_millis(args.interval_ms.max(100));
    let result = dashboard(&mut terminal, admins, every, tx, input).await;
    ratatui::restore();
    result.map(|()| 0)
}

/// Keys are read on their own thread (crossterm's reads block); it ends with the loop.
fn read_keys(tx: tokio::sync::mpsc::UnboundedSender<Input>) {
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {
                let sent = match event::read() {
                    Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                        tx.send(Input::Key(k.code))
                    }
                    Ok(Event::Resize(..)) => tx.send(Input::Resize),
                    Ok(_) => Ok(()),
                    Err(_) => return,
                };
                if sent.is_err() {
                    return;
                }
            }
            Ok(false) if tx.is_closed() => return,
            Ok(false) => {}
            Err(_) => return,
        }
    });
}

async fn poll(admin: &Admin) -> Result<Box<(Stats, Vec<Decision>)>, String> {
    let stats: Stats = admin.get("/admin/stats").await.map_err(|e| e.to_string())?;
    let decisions: Value =
        admin.get("/admin/decisions?limit=20").await.map_err(|e| e.to_string())?;
    let decisions = serde_json::from_value(decisions["decisions"].clone()).unwrap_or_default();
    Ok(Box::new((stats, decisions)))
}

/// Polls replica `k` every `every` on its own, one poll at a time, sending each result to the
/// loop.
async fn poller(
    k: usize,
    admin: Admin,
    every: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<Input>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.send(Input::Polled(k, poll(&admin).await)).is_err() {
            return;
        }
    }
}

/// The dashboard until `q`: draws the state of the replica shown, reacts to `input`. Each
/// replica is polled in its own task, and removals run in theirs (all ended with the loop); the
/// screen is redrawn at least every 250 ms, so the age of the figures shown keeps counting while
/// a poll hangs.
pub async fn dashboard<B: ratatui::backend::Backend>(
    terminal: &mut ratatui::Terminal<B>,
    admins: Vec<Admin>,
    every: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<Input>,
    mut input: tokio::sync::mpsc::UnboundedReceiver<Input>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (k, admin) in admins.iter().enumerate() {
        tasks.spawn(poller(k, admin.clone(), every, tx.clone()));
    }
    let result = dashboard_loop(terminal, &admins, every, &tx, &mut input, &mut tasks).await;
    tasks.abort_all();
    result
}

async fn dashboard_loop<B: ratatui::backend::Backend>(
    terminal: &mut ratatui::Terminal<B>,
    admins: &[Admin],
    every: Duration,
    tx: &tokio::sync::mpsc::UnboundedSender<Input>,
    input: &mut tokio::sync::mpsc::UnboundedReceiver<Input>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let mut states: Vec<State> = admins.iter().map(|a| State::new(a.base())).collect();
    let mut fresh = vec![std::time::Instant::now(); admins.len()];
    let mut shown = 0usize;
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    loop {
        for (k, s) in states.iter_mut().enumerate() {
            let age = fresh[k].elapsed();
            s.stale = (age > 2 * every).then_some(age);
        }
        if states.len() > 1 {
            let line: Vec<state::Replica> =
                states.iter().enumerate().map(|(k, s)| state::Replica::of(s, k == shown)).collect();
            states[shown].replicas = line;
        }
        terminal.draw(|f| render::render(f, &states[shown]))?;
        let n = states.len();
        tokio::select! {
            _ = redraw.tick() => {}
            got = input.recv() => match got {
                None => return Ok(()),
                Some(Input::Resize) => {}
                Some(Input::Polled(k, Ok(polled))) => {
                    let (stats, decisions) = *polled;
                    if let Some(s) = states.get_mut(k) {
                        s.update(stats, decisions);
                        fresh[k] = std::time::Instant::now();
                    }
                }
                Some(Input::Polled(k, Err(e))) => {
                    if let Some(s) = states.get_mut(k) {
                        s.disconnected(e);
                    }
                }
                Some(Input::Notice(text)) => states[shown].notice = Some(text),
                Some(Input::Key(KeyCode::Tab)) => shown = (shown + 1) % n,
                Some(Input::Key(KeyCode::BackTab)) => shown = (shown + n - 1) % n,
                Some(Input::Key(KeyCode::Up)) => states[shown].up(),
                Some(Input::Key(KeyCode::Down)) => states[shown].down(),
                Some(Input::Key(KeyCode::Esc)) => { states[shown].key('\u{1b}'); }
                Some(Input::Key(KeyCode::Char(c))) => match states[shown].key(c) {
                    Action::Quit => return Ok(()),
                    Action::Remove(url) => {
                        states[shown].notice = Some(format!("removing {url}..."));
                        let (admins, tx) = (admins.to_vec(), tx.clone());
                        tasks.spawn(async move {
                            let notice = remove_everywhere(&admins, &url).await;
                            let _ = tx.send(Input::Notice(notice));
                        });
                    }
                    Action::None => {}
                },
                Some(Input::Key(_)) => {}
            },
        }
    }
}

/// Removes `url` from every replica (a worker one replica still routes to is not removed);
/// the notice says what happened where.
async fn remove_everywhere(admins: &[Admin], url: &str) -> String {
    let path = format!("/workers/{}", encode_segment(url));
    let mut failed = Vec::new();
    for a in admins {
        if let Err(e) = a.delete::<Value>(&path).await {
            failed.push(if admins.len() > 1 {
                format!("{}: {e}", a.base())
            } else {
                e.to_string()
            });
        }
    }
    match (failed.is_empty(), admins.len()) {
        (true, 1) => format!("removed {url}"),
        (true, n) => format!("removed {url} from {n} replicas"),
        (false, _) => format!("could not remove {url}: {}", failed.join("; ")),
    }
}
