//! The dashboard's state: what the last polls said, turned into rates, percentiles and
//! history; the selection, sort order and dialogs; what each key does. No I/O here, so every
//! screen can be rebuilt from fixture data in tests.

use std::collections::VecDeque;

use routerd::admin::WorkerView;
use routerd::decisions::View as Decision;
use routerd::stats::{CacheAccounting, Event, Stats};

/// Points kept in each sparkline.
pub const HISTORY: usize = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Url,
    InFlight,
    Rate,
    Errors,
    Hit,
}

impl Sort {
    fn next(self) -> Self {
        match self {
            Sort::Url => Sort::InFlight,
            Sort::InFlight => Sort::Rate,
            Sort::Rate => Sort::Errors,
            Sort::Errors => Sort::Hit,
            Sort::Hit => Sort::Url,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Sort::Url => "url",
            Sort::InFlight => "in-flight",
            Sort::Rate => "req/s",
            Sort::Errors => "errors",
            Sort::Hit => "hit ratio",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    Help,
    /// Waiting for `y` to remove this worker.
    Confirm(String),
}

/// One worker's line in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub view: WorkerView,
    pub rate: f64,
    /// Errors per request over the last interval.
    pub error_rate: Option<f64>,
    /// The worker's own cached/prompt tokens over the last interval (else since start).
    pub hit: Option<f64>,
    /// Event routing: the share of prompt tokens routerd predicted cached there, over the
    /// same interval (`None` where it predicted nothing: no events).
    pub predicted: Option<f64>,
}

/// What a key asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Remove(String),
}

#[derive(Debug, Clone)]
pub struct State {
    pub endpoint: String,
    /// `Err` while the router cannot be reached (the last figures stay on screen).
    pub link: Result<(), String>,
    pub stats: Option<Stats>,
    pub rows: Vec<Row>,
    pub rate: f64,
    pub p99_ms: Option<f64>,
    pub hit: Option<f64>,
    pub rate_history: VecDeque<u64>,
    pub p99_history: VecDeque<u64>,
    pub hit_history: VecDeque<u64>,
    pub events: VecDeque<String>,
    last_event: u64,
    pub decisions: Vec<Decision>,
    pub selected: usize,
    pub sort: Sort,
    pub mode: Mode,
    /// A one-line notice (the outcome of a removal).
    pub notice: Option<String>,
    /// How old the figures on screen are, when older than two refreshes (the poll is slow or
    /// the router does not answer); `None` while they are fresh.
    pub stale: Option<std::time::Duration>,
    /// With several replicas (`--endpoint A,B,...`): one line each, and which one this is.
    pub replicas: Vec<Replica>,
    /// The cache accounting's totals at each poll of the last minute.
    accounting_history: VecDeque<(f64, CacheAccounting)>,
    /// How the prompts routed over the last minute split (None before any was accounted).
    pub accounting: Option<CacheSplit>,
}

/// The prompts routed over the last minute, split as docs/metrics.md says, in the unit most of
/// them were accounted in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSplit {
    pub unit: &'static str,
    /// workload, policy, stale, underpredicted, hit.
    pub parts: [u64; 5],
    /// Seconds the figures span.
    pub over_secs: f64,
}

impl CacheSplit {
    /// The prompts' total length.
    pub fn prompt(&self) -> u64 {
        let [workload, policy, stale, under, hit] = self.parts;
        (workload + policy + stale + hit).saturating_sub(under)
    }
}

/// One replica's summary, for the line that lists them all.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub endpoint: String,
    pub reachable: bool,
    pub ready: bool,
    pub rate: f64,
    pub in_flight: u64,
    pub current: bool,
}

impl Replica {
    pub fn of(s: &State, current: bool) -> Self {
        Self {
            endpoint: s.endpoint.clone(),
            reachable: s.link.is_ok(),
            ready: s.stats.as_ref().is_some_and(|st| st.ready),
            rate: s.rate,
            in_flight: s.stats.as_ref().map_or(0, |st| st.in_flight),
            current,
        }
    }
}

impl State {
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            link: Err("connecting".into()),
            stats: None,
            rows: Vec::new(),
            rate: 0.0,
            p99_ms: None,
            hit: None,
            rate_history: VecDeque::new(),
            p99_history: VecDeque::new(),
            hit_history: VecDeque::new(),
            events: VecDeque::new(),
            last_event: 0,
            decisions: Vec::new(),
            selected: 0,
            sort: Sort::Url,
            mode: Mode::Normal,
            notice: None,
            stale: None,
            replicas: Vec::new(),
            accounting_history: VecDeque::new(),
            accounting: None,
        }
    }

    /// The accounting over the last minute of polls.
    fn account(&mut self, uptime: f64, totals: CacheAccounting, restarted: bool) {
        if restarted {
            self.accounting_history.clear();
        }
        self.accounting_history.push_back((uptime, totals));
        while self.accounting_history.len() > 2
            && self.accounting_history.front().is_some_and(|(t, _)| uptime - t > 60.0)
        {
            self.accounting_history.pop_front();
        }
        let (from, before) = match self.accounting_history.front() {
            Some(&(t, b)) if self.accounting_history.len() > 1 => (t, b),
            _ => (0.0, CacheAccounting::default()),
        };
        let delta = |now: [u64; 5], then: [u64; 5]| -> [u64; 5] {
            std::array::from_fn(|i| now[i].saturating_sub(then[i]))
        };
        let tokens = delta(totals.tokens, before.tokens);
        let chars = delta(totals.chars, before.chars);
        let sum = |p: &[u64; 5]| p.iter().sum::<u64>();
        let (unit, parts) =
            if sum(&tokens) >= sum(&chars) { ("tokens", tokens) } else { ("chars", chars) };
        self.accounting =
            (sum(&parts) > 0).then_some(CacheSplit { unit, parts, over_secs: uptime - from });
    }

    /// A new poll's figures; rates come from the difference with the previous poll.
    pub fn update(&mut self, stats: Stats, decisions: Vec<Decision>) {
        let prev = self.stats.take();
        let dt = prev.as_ref().map_or(0.0, |p| stats.uptime_secs - p.uptime_secs);
        let restarted = prev.as_ref().is_some_and(|p| stats.uptime_secs < p.uptime_secs);
        self.account(stats.uptime_secs, stats.cache_accounting, restarted);
        let prev = if restarted { None } else { prev };
        let per_sec = |now: u64, before: u64| {
            if dt > 0.0 {
                now.saturating_sub(before) as f64 / dt
            } else {
                0.0
            }
        };
        self.rate = prev.as_ref().map_or(0.0, |p| per_sec(stats.requests_total, p.requests_total));
        self.p99_ms = prev.as_ref().and_then(|p| p99(&stats, p));
        let (mut prompt, mut cached) = (0u64, 0u64);
        self.rows = stats
            .workers
            .iter()
            .map(|w| {
                let before = prev.as_ref().and_then(|p| p.workers.iter().find(|o| o.url == w.url));
                let (dp, dc, dr, de, dpred) = match before {
                    Some(b) => (
                        w.prompt_tokens.saturating_sub(b.prompt_tokens),
                        w.cached_tokens.saturating_sub(b.cached_tokens),
                        w.requests_total.saturating_sub(b.requests_total),
                        w.errors_total.saturating_sub(b.errors_total),
                        w.predicted_tokens.saturating_sub(b.predicted_tokens),
                    ),
                    None => (0, 0, 0, 0, 0),
                };
                let predicted = if dp > 0 && dpred > 0 {
                    Some(dpred as f64 / dp as f64)
                } else if w.prompt_tokens > 0 && w.predicted_tokens > 0 {
                    Some(w.predicted_tokens as f64 / w.prompt_tokens as f64)
                } else {
                    None
                };
                prompt += dp;
                cached += dc;
                Row {
                    view: w.clone(),
                    rate: if dt > 0.0 { dr as f64 / dt } else { 0.0 },
                    error_rate: (dr > 0).then(|| de as f64 / dr as f64),
                    hit: if dp > 0 { Some(dc as f64 / dp as f64) } else { w.hit_ratio },
                    predicted,
                }
            })
            .collect();
        self.hit = (prompt > 0).then(|| cached as f64 / prompt as f64).or(self.hit);
        self.sort_rows();
        push(&mut self.rate_history, self.rate.round() as u64);
        push(&mut self.p99_history, self.p99_ms.unwrap_or(0.0).round() as u64);
        push(&mut self.hit_history, (self.hit.unwrap_or(0.0) * 100.0).round() as u64);
        self.add_events(&stats.events);
        self.decisions = decisions;
        self.selected = self.selected.min(self.rows.len().saturating_sub(1));
        self.stats = Some(stats);
        self.link = Ok(());
    }

    pub fn disconnected(&mut self, reason: String) {
        if self.link.is_ok() {
            self.events.push_back(format!("router unreachable: {reason}"));
        }
        self.link = Err(reason);
    }

    fn add_events(&mut self, events: &[Event]) {
        let since = self.last_event;
        for e in events.iter().filter(|e| e.seq > since) {
            self.events.push_back(format!("{} {}", e.kind.replace('_', " "), e.message));
            self.last_event = e.seq;
        }
        while self.events.len() > 200 {
            self.events.pop_front();
        }
    }

    fn sort_rows(&mut self) {
        let key = self.sort;
        self.rows.sort_by(|a, b| {
            let f = |r: &Row| match key {
                Sort::Url => 0.0,
                Sort::InFlight => r.view.in_flight as f64,
                Sort::Rate => r.rate,
                Sort::Errors => r.error_rate.unwrap_or(0.0),
                Sort::Hit => r.hit.unwrap_or(-1.0),
            };
            f(b).total_cmp(&f(a)).then_with(|| a.view.url.cmp(&b.view.url))
        });
    }

    pub fn key(&mut self, c: char) -> Action {
        match (&self.mode, c) {
            (Mode::Confirm(url), 'y') => {
                let url = url.clone();
                self.mode = Mode::Normal;
                return Action::Remove(url);
            }
            (Mode::Confirm(_), _) | (Mode::Help, _) => self.mode = Mode::Normal,
            (Mode::Normal, 'q') => return Action::Quit,
            (Mode::Normal, '?') => self.mode = Mode::Help,
            (Mode::Normal, 's') => {
                self.sort = self.sort.next();
                self.sort_rows();
            }
            (Mode::Normal, 'd') => {
                if let Some(r) = self.rows.get(self.selected) {
                    self.mode = Mode::Confirm(r.view.url.clone());
                }
            }
            _ => {}
        }
        Action::None
    }

    pub fn up(&mut self) {
        self.selected = self.selected.saturating_sub(1);
    }

    pub fn down(&mut self) {
        if self.selected + 1 < self.rows.len() {
            self.selected += 1;
        }
    }
}

fn push(h: &mut VecDeque<u64>, v: u64) {
    h.push_back(v);
    while h.len() > HISTORY {
        h.pop_front();
    }
}

/// The 99th percentile of the requests finished between two polls, as the upper bound of its
/// bucket (an overflow is shown as the last bound).
fn p99(now: &Stats, before: &Stats) -> Option<f64> {
    let delta: Vec<u64> = now
        .latency_counts
        .iter()
        .zip(before.latency_counts.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * 0.99).ceil() as u64;
    let mut seen = 0;
    for (i, n) in delta.iter().enumerate() {
        seen += n;
        if seen >= want {
            let bounds = &now.latency_bounds_ms;
            return Some(*bounds.get(i).or(bounds.last()).unwrap_or(&0.0));
        }
    }
    None
}
