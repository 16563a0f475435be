//! The scripted subcommands: `workers list|add|remove`, `status`, `config check`,
//! `completions`. Each prints a table or JSON (`-o`) and returns the exit code.

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};
use routerd::admin::WorkerView;
use serde_json::{json, Value};

use crate::admin::{encode_segment, Admin, AdminError, Endpoint};
use crate::bench::Output;

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// List the router's workers.
    List,
    /// Register a worker (it takes requests from the next one on).
    Add {
        url: String,
        /// PD mode: `prefill` or `decode`.
        #[arg(long, value_enum)]
        role: Option<Role>,
        /// PD prefill workers: the port decode workers fetch the KV cache from.
        #[arg(long)]
        bootstrap_port: Option<u16>,
        /// Sent to this worker as `Authorization: Bearer KEY`.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// Remove a worker (requests already on it finish).
    Remove { url: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    Regular,
    Prefill,
    Decode,
}

#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// The global `--endpoint`/`--admin-key` (set by `cli::run`).
    #[arg(skip)]
    pub endpoint: Endpoint,
    #[command(subcommand)]
    pub command: WorkersCommand,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The global options (set by `cli::run`).
    #[arg(skip)]
    pub endpoint: Endpoint,
    #[arg(skip = Output::Table)]
    pub output: Output,
}

fn fail(e: AdminError) -> i32 {
    eprintln!("routerctl: {e}");
    e.exit_code()
}

/// The workers as an aligned table.
pub fn workers_table(workers: &[WorkerView]) -> String {
    let header = [
        "URL",
        "ROLE",
        "HEALTH",
        "CIRCUIT",
        "IN-FLIGHT",
        "REQUESTS",
        "ERRORS",
        "HIT",
        "TREE",
        "SOURCE",
    ];
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.url.clone(),
                w.role.as_str().to_owned(),
                if w.healthy { "up" } else { "down" }.to_owned(),
                w.circuit.clone(),
                w.in_flight.to_string(),
                w.requests_total.to_string(),
                w.errors_total.to_string(),
                w.hit_ratio.map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
                w.tree_chars.to_string(),
                json!(w.source).as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    // Why each worker that is down is down (a failed health check, a TLS handshake...).
    let why: Vec<String> = workers
        .iter()
        .filter(|w| !w.healthy)
        .filter_map(|w| w.last_error.as_ref().map(|e| format!("  {}: {e}\n", w.url)))
        .collect();
    if !why.is_empty() {
        out.push_str("\nlast errors of the workers that are down:\n");
        out.extend(why);
    }
    out
}

pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

pub async fn workers(args: WorkersArgs, output: Output) -> i32 {
    let replicas = args.endpoint.each();
    if replicas.len() == 1 {
        return match workers_on(&Admin::new(&replicas[0]), &args.command).await {
            Ok((v, _)) if output == Output::Json => {
                print_json(&v);
                0
            }
            Ok((_, text)) => {
                print!("{text}");
                0
            }
            Err(e) => fail(e),
        };
    }
    // Replicas: the same command on each, in turn; one that fails does not stop the others.
    // JSON: one array of `{endpoint, result}` (or `{endpoint, error}`); the exit code is the
    // worst.
    let (mut code, mut all) = (0, Vec::new());
    let list = matches!(args.command, WorkersCommand::List);
    for (k, e) in replicas.iter().enumerate() {
        let admin = Admin::new(e);
        let r = admin.base();
        if output == Output::Table && list {
            println!("{}replica {r}", if k > 0 { "\n" } else { "" });
        }
        match workers_on(&admin, &args.command).await {
            Ok((v, text)) => {
                if output == Output::Table {
                    // "added URL" / "removed URL" say where; a list is under its heading.
                    match text.strip_suffix('\n').filter(|_| !list) {
                        Some(line) => println!("{line} on {r}"),
                        None => print!("{text}"),
                    }
                }
                all.push(json!({"endpoint": r, "result": v}));
            }
            Err(e) => {
                eprintln!("routerctl: replica {r}: {e}");
                code = code.max(e.exit_code());
                all.push(json!({"endpoint": r, "error": e.to_string()}));
            }
        }
    }
    if output == Output::Json {
        print_json(&all);
    }
    code
}

/// One router's `workers` command: its JSON answer and its text (the table, or one line).
async fn workers_on(
    admin: &Admin,
    command: &WorkersCommand,
) -> Result<(Value, String), AdminError> {
    match command {
        WorkersCommand::List => {
            let v = admin.get::<Value>("/workers").await?;
            let ws = serde_json::from_value::<Vec<WorkerView>>(v["workers"].clone())
                .map_err(|e| AdminError::Malformed(e.to_string()))?;
            Ok((json!(ws), workers_table(&ws)))
        }
        WorkersCommand::Add { url, role, bootstrap_port, api_key } => {
            let role = role.map(|r| format!("{r:?}").to_ascii_lowercase());
            let body = json!({"url": url, "role": role, "bootstrap_port": bootstrap_port, "api_key": api_key});
            let w = admin.post_json::<Value>("/workers", &body).await.and_then(worker_of)?;
            let text = format!("added {}\n", w.url);
            Ok((json!(w), text))
        }
        WorkersCommand::Remove { url } => {
            let path = format!("/workers/{}", encode_segment(url));
            let w = admin.delete::<Value>(&path).await.and_then(worker_of)?;
            let text = format!("removed {}\n", w.url);
            Ok((json!(w), text))
        }
    }
}

/// The worker's state in a `POST /workers` or `DELETE /workers/{id}` answer (`worker`, next to
/// sgl-router 0.3's `status` and `worker_id`).
fn worker_of(answer: Value) -> Result<WorkerView, AdminError> {
    serde_json::from_value(answer["worker"].clone())
        .map_err(|e| AdminError::Malformed(e.to_string()))
}

/// Router health, readiness, configuration generation and the last reload's outcome.
pub async fn status(args: StatusArgs) -> i32 {
    let replicas = args.endpoint.each();
    if replicas.len() == 1 {
        return match status_of(&Admin::new(&replicas[0])).await {
            Ok((summary, _)) if args.output == Output::Json => {
                print_json(&summary);
                0
            }
            Ok((_, text)) => {
                print!("{text}");
                0
            }
            Err(e) => fail(e),
        };
    }
    // Replicas: each one's status; the exit code is the worst.
    let (mut code, mut all) = (0, Vec::new());
    for (k, e) in replicas.iter().enumerate() {
        let admin = Admin::new(e);
        match status_of(&admin).await {
            Ok((summary, text)) => {
                if args.output == Output::Table {
                    print!("{}{text}", if k > 0 { "\n" } else { "" });
                }
                all.push(summary);
            }
            Err(e) => {
                code = code.max(e.exit_code());
                if args.output == Output::Table {
                    print!(
                        "{}router      {}\nunreachable {e}\n",
                        if k > 0 { "\n" } else { "" },
                        admin.base()
                    );
                }
                all.push(json!({"endpoint": admin.base(), "error": e.to_string()}));
            }
        }
    }
    if args.output == Output::Json {
        print_json(&all);
    }
    code
}

/// One router's status: the JSON summary and the text block.
async fn status_of(admin: &Admin) -> Result<(Value, String), AdminError> {
    let (health, _) = admin.status_of("/health").await?;
    let (ready_status, ready_body) = admin.status_of("/readiness").await?;
    let config: Value = admin.get("/admin/config").await?;
    let workers: Value = admin.get("/workers").await.unwrap_or(Value::Null);
    let ready: Value = serde_json::from_str(&ready_body).unwrap_or(Value::Null);
    let last = &config["last_reload"];
    let summary = json!({
        "endpoint": admin.base(),
        "healthy": health == 200,
        "ready": ready_status == 200,
        "readiness": ready,
        "generation": config["generation"],
        "config_source": config["source"],
        "policy": config["config"]["policy"]["name"],
        "workers": workers["workers"].as_array().map(Vec::len),
        "last_reload": last,
    });
    let mut out = Vec::new();
    let _ = writeln!(out, "router      {}", admin.base());
    let _ = writeln!(out, "health      {}", if health == 200 { "ok" } else { "failing" });
    let reason = ready["reason"].as_str().or(ready["status"].as_str()).unwrap_or("");
    let _ = writeln!(
        out,
        "readiness   {} ({reason})",
        if ready_status == 200 { "ready" } else { "not ready" }
    );
    let _ = writeln!(out, "workers     {}", summary["workers"]);
    let _ = writeln!(out, "policy      {}", summary["policy"].as_str().unwrap_or("-"));
    let source = config["source"].as_str().unwrap_or("flags only");
    let _ = writeln!(out, "config      generation {} from {source}", config["generation"]);
    let reload = match last["outcome"]["result"].as_str() {
        None => "none yet".to_owned(),
        Some(r) => {
            let errors = last["outcome"]["errors"].as_array().map(|e| e.len()).unwrap_or(0);
            if errors > 0 {
                format!("{r} ({errors} errors)")
            } else {
                r.to_owned()
            }
        }
    };
    let _ = writeln!(out, "last reload {reload}");
    Ok((summary, String::from_utf8_lossy(&out).into_owned()))
}

/// `routerctl config check FILE`: the file as routerd would load it.
pub fn config_check(file: &std::path::Path) -> i32 {
    let flags = routerd::config::Flags { config: Some(file.to_owned()), ..Default::default() };
    match routerd::config::Config::load(&flags) {
        Ok(c) => {
            let workers =
                c.workers.len() + c.pd.as_ref().map_or(0, |p| p.prefill.len() + p.decode.len());
            println!("{}: configuration is valid ({workers} workers)", file.display());
            0
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("routerctl: invalid configuration ({} errors)", errors.0.len());
            1
        }
    }
}
