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

enum Input {
    Key(KeyCode),
    Resize,
}

pub async fn run(args: TopArgs) -> anyhow::Result<i32> {
    let admin = Admin::new(&args.endpoint);
    // Raw mode and the alternate screen, with a panic hook that undoes both.
    let mut terminal = ratatui::init();
    let result =
        dashboard(&mut terminal, &admin, Duration::from_millis(args.interval_ms.max(100))).await;
    ratatui::restore();
    result.map(|()| 0)
}

async fn poll(admin: &Admin) -> Result<(Stats, Vec<Decision>), String> {
    let stats: Stats = admin.get("/admin/stats").await.map_err(|e| e.to_string())?;
    let decisions: Value =
        admin.get("/admin/decisions?limit=20").await.map_err(|e| e.to_string())?;
    let decisions = serde_json::from_value(decisions["decisions"].clone()).unwrap_or_default();
    Ok((stats, decisions))
}

async fn dashboard(
    terminal: &mut ratatui::DefaultTerminal,
    admin: &Admin,
    every: Duration,
) -> anyhow::Result<()> {
    let (tx, mut input) = tokio::sync::mpsc::unbounded_channel();
    // Keys are read on their own thread (crossterm's reads block); it ends with the loop.
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
    let mut state = State::new(admin.base());
    let mut tick = tokio::time::interval(every);
    loop {
        terminal.draw(|f| render::render(f, &state))?;
        tokio::select! {
            _ = tick.tick() => match poll(admin).await {
                Ok((stats, decisions)) => state.update(stats, decisions),
                Err(e) => state.disconnected(e),
            },
            got = input.recv() => match got {
                None => return Ok(()),
                Some(Input::Resize) => {}
                Some(Input::Key(KeyCode::Up)) => state.up(),
                Some(Input::Key(KeyCode::Down)) => state.down(),
                Some(Input::Key(KeyCode::Esc)) => { state.key('\u{1b}'); }
                Some(Input::Key(KeyCode::Char(c))) => match state.key(c) {
                    Action::Quit => return Ok(()),
                    Action::Remove(url) => {
                        let path = format!("/workers/{}", encode_segment(&url));
                        state.notice = Some(match admin.delete::<Value>(&path).await {
                            Ok(_) => format!("removed {url}"),
                            Err(e) => format!("could not remove {url}: {e}"),
                        });
                    }
                    Action::None => {}
                },
                Some(Input::Key(_)) => {}
            },
        }
    }
}
