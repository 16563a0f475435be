//! Draws the dashboard from its state, and nothing else: header, three sparklines (requests/s,
//! p99 latency, real cache hit ratio), the workers table, the event pane, and the help and
//! confirmation dialogs on top.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState};
use ratatui::Frame;

use super::state::{Mode, State};

pub fn render(f: &mut Frame, s: &State) {
    let lines = 1 + usize::from(s.replicas.len() > 1) + usize::from(s.accounting.is_some());
    let lines = lines as u16;
    let [header, sparks, table, events] = Layout::vertical([
        Constraint::Length(lines),
        Constraint::Length(5),
        Constraint::Min(5),
        Constraint::Length(9),
    ])
    .areas(f.area());
    let mut head = vec![header_line(s)];
    if s.replicas.len() > 1 {
        head.push(replicas_line(s));
    }
    if let Some(split) = &s.accounting {
        head.push(accounting_line(split));
    }
    f.render_widget(Paragraph::new(head), header);
    render_sparklines(f, s, sparks);
    render_table(f, s, table);
    render_events(f, s, events);
    match &s.mode {
        Mode::Help => dialog(f, "help", &HELP.join("\n")),
        Mode::Confirm(url) => dialog(
            f,
            "remove worker",
            &format!("Remove {url} from the router?\nRequests already on it finish.\n\ny: remove    any other key: cancel"),
        ),
        Mode::Normal => {}
    }
}

const HELP: [&str; 8] = [
    "q        quit",
    "up/down  select a worker",
    "s        sort by the next column",
    "d        remove the selected worker (asks first; from every replica)",
    "tab      the next replica (several --endpoint URLs), shift-tab the previous",
    "?        this help",
    "",
    "Figures are per second over the last refresh; hit is the workers' own cache hit ratio.",
];

fn header_line(s: &State) -> Line<'static> {
    let link = match &s.link {
        Ok(()) => Span::styled("connected", Style::default().fg(Color::Green)),
        Err(e) => Span::styled(format!("unreachable: {e}"), Style::default().fg(Color::Red)),
    };
    let mut spans = vec![
        Span::styled("routerd top ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!("{}  ", s.endpoint)),
        link,
    ];
    if let Some(age) = s.stale {
        // No answer for two refreshes: the poll hangs, or the router is away.
        spans.push(Span::styled(
            format!("  figures {:.1}s old", age.as_secs_f64()),
            Style::default().fg(Color::Yellow),
        ));
    }
    if let Some(st) = &s.stats {
        let mode = if st.pd { "PD" } else { "regular" };
        spans.push(Span::raw(format!(
            "  {mode}, policy {}  config gen {}  up {}  {}",
            st.policy,
            st.generation,
            uptime(st.uptime_secs),
            if st.ready { "ready" } else { "NOT READY" }
        )));
    }
    Line::from(spans)
}

/// Every replica in one line, the one shown in reverse video (tab: the next one).
fn replicas_line(s: &State) -> Line<'static> {
    let mut spans = vec![Span::raw("replicas ")];
    for (k, r) in s.replicas.iter().enumerate() {
        let state = match (r.reachable, r.ready) {
            (false, _) => "unreachable".to_owned(),
            (true, false) => "NOT READY".to_owned(),
            (true, true) => format!("{:.0} req/s {} in flight", r.rate, r.in_flight),
        };
        let style = match (r.current, r.reachable && r.ready) {
            (true, _) => Style::default().add_modifier(Modifier::REVERSED),
            (false, true) => Style::default(),
            (false, false) => Style::default().fg(Color::Red),
        };
        spans.push(Span::styled(format!(" {} {} {state} ", k + 1, r.endpoint), style));
    }
    spans.push(Span::styled("  tab: next", Style::default().fg(Color::DarkGray)));
    Line::from(spans)
}

/// Why the hit rate is what it is, over the last minute (docs/metrics.md).
fn accounting_line(a: &super::state::CacheSplit) -> Line<'static> {
    let prompt = a.prompt().max(1) as f64;
    let pct = |n: u64| format!("{:.0}%", n as f64 * 100.0 / prompt);
    let [workload, policy, stale, under, hit] = a.parts;
    let mut spans = vec![
        Span::raw(format!("cache, last {:.0}s of {} prompt {}: ", a.over_secs, a.prompt(), a.unit)),
        Span::styled(format!("hit {}", pct(hit)), Style::default().fg(Color::Green)),
        Span::raw(format!("  not in the fleet {}", pct(workload))),
        Span::raw(format!("  given up for balance {}", pct(policy))),
    ];
    let stale_style = if stale > 0 { Style::default().fg(Color::Yellow) } else { Style::default() };
    spans.push(Span::styled(format!("  stale {}", pct(stale)), stale_style));
    if under > 0 {
        spans.push(Span::raw(format!("  underpredicted {}", pct(under))));
    }
    Line::from(spans)
}

fn uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn render_sparklines(f: &mut Frame, s: &State, area: Rect) {
    let [a, b, c] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(area);
    let in_flight = s.stats.as_ref().map_or(0, |st| st.in_flight);
    let spark = |title: String, data: &std::collections::VecDeque<u64>, color: Color| {
        let data: Vec<u64> = data.iter().copied().collect();
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .data(data)
            .style(Style::default().fg(color))
    };
    let rate = format!(" req/s {:.1}  in flight {in_flight} ", s.rate);
    f.render_widget(spark(rate, &s.rate_history, Color::Cyan), a);
    let p99 = s.p99_ms.map_or("-".into(), |v| format!("{v:.0} ms"));
    f.render_widget(spark(format!(" p99 {p99} "), &s.p99_history, Color::Yellow), b);
    let hit = s.hit.map_or("-".into(), |h| format!("{:.1}%", h * 100.0));
    f.render_widget(spark(format!(" cache hit {hit} "), &s.hit_history, Color::Green), c);
}

fn render_table(f: &mut Frame, s: &State, area: Rect) {
    let header = [
        "worker",
        "role",
        "health",
        "circuit",
        "in-flight",
        "req/s",
        "errors",
        "tree",
        "hit",
        "predicted",
    ];
    let rows = s.rows.iter().map(|r| {
        let w = &r.view;
        let health = if w.healthy {
            Cell::from("up").style(Style::default().fg(Color::Green))
        } else {
            Cell::from("down").style(Style::default().fg(Color::Red))
        };
        let circuit_color = if w.circuit == "closed" { Color::Reset } else { Color::Red };
        Row::new(vec![
            Cell::from(w.url.clone()),
            Cell::from(w.role.as_str().to_owned()),
            health,
            Cell::from(w.circuit.clone()).style(Style::default().fg(circuit_color)),
            Cell::from(w.in_flight.to_string()),
            Cell::from(format!("{:.1}", r.rate)),
            Cell::from(r.error_rate.map_or("-".into(), |e| format!("{:.1}%", e * 100.0))),
            Cell::from(w.tree_chars.to_string()),
            Cell::from(r.hit.map_or("-".into(), |h| format!("{:.1}%", h * 100.0))),
            Cell::from(r.predicted.map_or("-".into(), |h| format!("{:.1}%", h * 100.0))),
        ])
    });
    let widths = [
        Constraint::Min(24),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(9),
    ];
    let title = format!(
        " workers ({}) sorted by {}   s sort  d remove  ? help  q quit ",
        s.rows.len(),
        s.sort.label()
    );
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(title))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::default().with_selected((!s.rows.is_empty()).then_some(s.selected));
    f.render_stateful_widget(table, area, &mut state);
}

fn render_events(f: &mut Frame, s: &State, area: Rect) {
    let [ev, dec] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
    let height = ev.height.saturating_sub(2) as usize;
    let mut lines: Vec<Line> =
        s.events.iter().rev().take(height).rev().map(|e| Line::from(e.clone())).collect();
    if let Some(n) = &s.notice {
        lines.push(Line::styled(n.clone(), Style::default().fg(Color::Yellow)));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" events ")),
        ev,
    );
    let decisions: Vec<Line> = s
        .decisions
        .iter()
        .take(dec.height.saturating_sub(2) as usize)
        .map(|d| {
            let ratio = d.match_ratio.map_or(String::new(), |r| format!(" {:.0}%", r * 100.0));
            let eta = d.estimate_ms.map_or(String::new(), |e| format!(" ~{e:.0}ms"));
            let worker = d.worker.rsplit('/').next().unwrap_or(&d.worker);
            Line::from(format!("{} {}{ratio}{eta} -> {worker}", d.route, d.branch))
        })
        .collect();
    f.render_widget(
        Paragraph::new(decisions)
            .block(Block::default().borders(Borders::ALL).title(" recent routing decisions ")),
        dec,
    );
}

fn dialog(f: &mut Frame, title: &str, text: &str) {
    let area = f.area();
    let w = (text.lines().map(str::len).max().unwrap_or(10) as u16 + 4).min(area.width);
    let h = (text.lines().count() as u16 + 2).min(area.height);
    let r = Rect {
        x: area.width.saturating_sub(w) / 2,
        y: area.height.saturating_sub(h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(text.to_owned())
            .block(Block::default().borders(Borders::ALL).title(format!(" {title} "))),
        r,
    );
}
