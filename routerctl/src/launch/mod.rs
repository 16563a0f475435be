//! `routerctl launch`: start a worker per GPU (or per GPU group), or a PD fleet, wait for each
//! to be healthy, register them with routerd (or start routerd in front of them), keep them
//! running, and stop everything in order on Ctrl-C or SIGTERM: workers deregistered, the
//! router drained, then each worker's process group stopped.

pub mod child;
pub mod plan;
mod register;
mod supervise;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, AdminError, Endpoint};
use child::Child;
use plan::{Engine, Inputs, RouterInputs};
use register::Registrar;
use supervise::{start, supervise, Ctx, Slot, StartError};

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Regular workers to launch: data-parallel replicas, one GPU group each.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
          required_unless_present_any = ["prefill", "decode"],
          conflicts_with_all = ["prefill", "decode"])]
    pub dp_size: Option<u32>,
    /// PD disaggregation: prefill workers to launch (with --decode).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "decode")]
    pub prefill: Option<u32>,
    /// PD disaggregation: decode workers to launch (with --prefill).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "prefill")]
    pub decode: Option<u32>,
    /// The model each worker serves (required by the sglang engine).
    #[arg(long)]
    pub model_path: Option<String>,
    /// `sglang` runs `python -m sglang.launch_server`; `sim` runs simulated workers.
    #[arg(long, value_enum, default_value_t = Engine::Sglang)]
    pub engine: Engine,
    /// First GPU to use; worker k gets the GPUs from base + k * gpus-per-worker on.
    #[arg(long, default_value_t = 0)]
    pub base_gpu_id: u32,
    /// GPUs per worker (its tensor-parallel size; `--tp-size` is passed unless given).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), default_value_t = 1)]
    pub gpus_per_worker: u32,
    /// Address the workers listen on (and are registered by; 0.0.0.0 registers 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the first worker, the next ones count up; 0 lets the system pick free ports.
    #[arg(long, default_value_t = 31000)]
    pub base_port: u16,
    /// Bootstrap port of the first prefill worker, the next ones count up; 0 picks free ones.
    #[arg(long, default_value_t = 8998)]
    pub base_bootstrap_port: u16,
    /// The router to register the workers with (default: --endpoint).
    #[arg(long, conflicts_with = "with_router")]
    pub router: Option<String>,
    /// Start routerd in front of the workers (in PD mode for a PD fleet) and supervise it too.
    #[arg(long)]
    pub with_router: bool,
    /// With --with-router: the router's address.
    #[arg(long, default_value = "127.0.0.1", requires = "with_router")]
    pub router_host: String,
    /// With --with-router: the router's port (0 picks a free one).
    #[arg(long, default_value_t = 30000, requires = "with_router")]
    pub router_port: u16,
    /// With --with-router: one more routerd flag (repeatable), e.g. `--router-arg=--policy
    /// --router-arg=round_robin`.
    #[arg(long = "router-arg", allow_hyphen_values = true, requires = "with_router")]
    pub router_args: Vec<String>,
    /// With --with-router: the routerd binary (default: next to routerctl, else on PATH).
    #[arg(long, requires = "with_router")]
    pub routerd: Option<PathBuf>,
    /// Workers serve HTTPS with this PEM certificate (with --worker-tls-key; the sim engine:
    /// SGLang's own server has no TLS flags) and are registered as https:// workers.
    #[arg(long, value_name = "FILE", requires = "worker_tls_key")]
    pub worker_tls_cert: Option<PathBuf>,
    /// The PEM private key of --worker-tls-cert.
    #[arg(long, value_name = "FILE", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// The CA that signed --worker-tls-cert, when not a system root: trusted by launch's own
    /// health checks and, with --with-router, given to routerd as --ca-cert-paths.
    #[arg(long, value_name = "FILE", requires = "worker_tls_cert")]
    pub worker_tls_ca: Option<PathBuf>,
    /// The Python interpreter of the sglang engine.
    #[arg(long, default_value = "python")]
    pub python: String,
    /// Directory of the per-process log files (`worker-0.log`, `prefill-0.log`, `routerd.log`).
    #[arg(long, default_value = "launch-logs")]
    pub log_dir: PathBuf,
    /// How long a worker may take to answer /health after it starts (model loading included).
    #[arg(long, default_value_t = 600.0)]
    pub startup_timeout_secs: f64,
    /// How long a process may take to exit after SIGTERM before it is killed.
    #[arg(long, default_value_t = 30.0)]
    pub stop_timeout_secs: f64,
    /// Wait before the first restart of a process that exited; it doubles on each failed
    /// restart up to --max-restart-backoff-secs.
    #[arg(long, default_value_t = 1.0)]
    pub restart_backoff_secs: f64,
    #[arg(long, default_value_t = 60.0)]
    pub max_restart_backoff_secs: f64,
    /// The global `--endpoint`/`--admin-key` (set by `cli::run`).
    #[arg(skip)]
    pub endpoint: Endpoint,
    /// Extra arguments for every worker's engine, after `--`.
    #[arg(last = true)]
    pub engine_args: Vec<String>,
}

/// Runs a fleet until Ctrl-C / SIGTERM; returns the exit code (0 stopped cleanly, 1 a process
/// failed to start or the router refused a worker, 2 usage error).
pub async fn run(args: LaunchArgs) -> anyhow::Result<i32> {
    let inputs = match inputs(&args) {
        Ok(i) => i,
        Err(msg) => {
            eprintln!("routerctl launch: {msg}");
            return Ok(2);
        }
    };
    let (workers, router) = plan::plan(&inputs);
    let endpoint = match (&router, &args.router) {
        (Some(r), _) => r.url.clone(),
        (None, Some(url)) => url.trim_end_matches('/').to_owned(),
        (None, None) if args.endpoint.each().len() > 1 => {
            eprintln!(
                "routerctl launch: --endpoint lists several routers; launch registers its workers \
                 with one (replicas share workers through discovery or one configuration file: \
                 docs/replicas.md)"
            );
            return Ok(2);
        }
        (None, None) => args.endpoint.endpoint.clone(),
    };
    let admin = Admin::new(&Endpoint { endpoint, admin_key: args.endpoint.admin_key.clone() });
    let signals = Signals::install()?;
    // Launch's own health checks trust the workers' CA when one is given.
    let mut http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2));
    if let Some(ca) = inputs.worker_tls.as_ref().and_then(|t| t.ca.as_ref()) {
        let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", ca.display()))?;
        http = http.add_root_certificate(cert);
    }
    let http = http.build()?;
    let ctx = |registrar: Option<Arc<Registrar>>| Ctx {
        http: http.clone(),
        startup_timeout: secs(args.startup_timeout_secs),
        grace: secs(args.stop_timeout_secs),
        backoff: (secs(args.restart_backoff_secs), secs(args.max_restart_backoff_secs)),
        force: signals.force.clone(),
        registrar,
    };
    let registrar = Arc::new(Registrar::new(admin));
    let fleet = Launched::new(
        workers.into_iter().map(|p| Arc::new(Slot::new(p))).collect(),
        router.map(|p| Arc::new(Slot::new(p))),
        Arc::new(ctx(Some(registrar.clone()))),
        Arc::new(ctx(None)),
        registrar,
    );
    println!(
        "launching {} {} worker{} (logs in {})",
        fleet.workers.len(),
        match args.engine {
            Engine::Sglang => "sglang",
            Engine::Sim => "simulated",
        },
        if fleet.workers.len() == 1 { "" } else { "s" },
        args.log_dir.display()
    );
    fleet.run(&signals).await
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// `path` from the working directory, so children started elsewhere find it.
fn absolute(path: &std::path::Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The flags checked and turned into planning inputs (free ports chosen, binaries found).
fn inputs(args: &LaunchArgs) -> Result<Inputs, String> {
    for (flag, v) in [
        ("--startup-timeout-secs", args.startup_timeout_secs),
        ("--stop-timeout-secs", args.stop_timeout_secs),
        ("--restart-backoff-secs", args.restart_backoff_secs),
        ("--max-restart-backoff-secs", args.max_restart_backoff_secs),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{flag} must be a number of seconds >= 0, not {v}"));
        }
    }
    if args.engine == Engine::Sglang && args.model_path.is_none() {
        return Err("--model-path is required with --engine sglang".into());
    }
    if args.engine == Engine::Sglang && args.worker_tls_cert.is_some() {
        return Err("--worker-tls-cert needs --engine sim: SGLang's server has no TLS flags \
                    (put a TLS-terminating sidecar in front of it and add it as https://)"
            .into());
    }
    let worker_tls = match (&args.worker_tls_cert, &args.worker_tls_key) {
        (Some(cert), Some(key)) => Some(plan::WorkerTlsInputs {
            cert: absolute(cert)?,
            key: absolute(key)?,
            ca: args.worker_tls_ca.as_deref().map(absolute).transpose()?,
        }),
        _ => None,
    };
    let fleet = match (args.dp_size, args.prefill, args.decode) {
        (Some(n), _, _) => plan::Fleet::Regular(n),
        (None, Some(prefill), Some(decode)) => plan::Fleet::Pd { prefill, decode },
        _ => return Err("give --dp-size N, or --prefill N --decode M".into()),
    };
    let self_exe = std::env::current_exe()
        .map_err(|e| format!("cannot find routerctl's own executable: {e}"))?;
    let router = if args.with_router {
        let program = match &args.routerd {
            Some(p) => p.clone(),
            None => self_exe
                .parent()
                .map(|d| d.join("routerd"))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("routerd")),
        };
        let port = plan::ports(&args.router_host, args.router_port, 1, "--router-port")?[0];
        Some(RouterInputs {
            program,
            host: args.router_host.clone(),
            port,
            args: args.router_args.clone(),
            admin_key: args.endpoint.admin_key.clone(),
        })
    } else {
        None
    };
    Ok(Inputs {
        engine: args.engine,
        fleet,
        model_path: args.model_path.clone(),
        host: args.host.clone(),
        worker_ports: plan::ports(&args.host, args.base_port, fleet.workers(), "--base-port")?,
        bootstrap_ports: plan::ports(
            &args.host,
            args.base_bootstrap_port,
            fleet.prefill(),
            "--base-bootstrap-port",
        )?,
        base_gpu_id: args.base_gpu_id,
        gpus_per_worker: args.gpus_per_worker,
        python: args.python.clone(),
        self_exe,
        engine_args: args.engine_args.clone(),
        log_dir: args.log_dir.clone(),
        router,
        worker_tls,
    })
}

/// SIGINT and SIGTERM: the first stops the fleet in order, the second stops it now.
struct Signals {
    stop: CancellationToken,
    force: CancellationToken,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let (stop, force) = (CancellationToken::new(), CancellationToken::new());
        let (s, f) = (stop.clone(), force.clone());
        tokio::spawn(async move {
            for token in [s, f] {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                token.cancel();
            }
        });
        Ok(Self { stop, force })
    }
}

/// The launched processes and the order they start and stop in.
struct Launched {
    workers: Vec<Arc<Slot>>,
    router: Option<Arc<Slot>>,
    worker_ctx: Arc<Ctx>,
    router_ctx: Arc<Ctx>,
    registrar: Arc<Registrar>,
}

impl Launched {
    fn new(
        workers: Vec<Arc<Slot>>,
        router: Option<Arc<Slot>>,
        worker_ctx: Arc<Ctx>,
        router_ctx: Arc<Ctx>,
        registrar: Arc<Registrar>,
    ) -> Self {
        Self { workers, router, worker_ctx, router_ctx, registrar }
    }

    /// Starts everything, supervises until a signal, stops everything. A process that fails
    /// to start stops the launch (exit 1): at startup a failure is a mistake to fix (a wrong
    /// model path, a GPU in use), not something a restart mends.
    async fn run(self, signals: &Signals) -> anyhow::Result<i32> {
        let abort = signals.stop.child_token();
        // The router first, so workers are registered the moment they are healthy.
        let router_child = match &self.router {
            None => None,
            Some(r) => match start(r, &self.router_ctx, "starting", &abort).await {
                Ok(c) => Some(c),
                Err(StartError::Cancelled) => return Ok(0),
                Err(e) => {
                    eprintln!("routerctl launch: {}", e.report(&r.plan));
                    return Ok(1);
                }
            },
        };
        let started = join_all(self.workers.iter().map(|w| self.start_worker(w, &abort))).await;
        let failed = abort.is_cancelled() && !signals.stop.is_cancelled();

        let no_restart = signals.stop.clone();
        let (stop_router, stop_workers) = (CancellationToken::new(), CancellationToken::new());
        let workers = TaskTracker::new();
        for (w, c) in self.workers.iter().zip(started) {
            if let Some(c) = c {
                let (ctx, stop, no_restart) =
                    (self.worker_ctx.clone(), stop_workers.clone(), no_restart.clone());
                workers.spawn(supervise(w.clone(), c, ctx, stop, no_restart));
            }
        }
        let router = self.router.clone().zip(router_child).map(|(slot, c)| {
            tokio::spawn(supervise(
                slot,
                c,
                self.router_ctx.clone(),
                stop_router.clone(),
                no_restart.clone(),
            ))
        });
        let reconcile = CancellationToken::new();
        if !failed && !signals.stop.is_cancelled() {
            println!("{}", self.table());
            println!(
                "ready: {} workers registered with {}; Ctrl-C stops them all",
                self.workers.len(),
                self.registrar.endpoint()
            );
            let slots = self.workers.clone();
            let task = register::reconcile_loop(self.registrar.clone(), slots, reconcile.clone());
            workers.spawn(task);
            signals.stop.cancelled().await;
            println!("stopping: deregistering the workers, then stopping every process");
        }
        // In order: no new request reaches a worker, the router drains what it has in flight,
        // then the workers stop.
        workers.close();
        reconcile.cancel();
        join_all(self.workers.iter().map(|w| self.registrar.deregister(w))).await;
        stop_router.cancel();
        if let Some(r) = router {
            let _ = r.await;
        }
        stop_workers.cancel();
        workers.wait().await;
        Ok(if failed { 1 } else { 0 })
    }

    /// Starts one worker and registers it once healthy. On a failure, reports it and aborts
    /// the other starts; returns the running worker, if any.
    async fn start_worker(&self, w: &Arc<Slot>, abort: &CancellationToken) -> Option<Child> {
        let child = match start(w, &self.worker_ctx, "starting", abort).await {
            Ok(c) => c,
            Err(StartError::Cancelled) => return None,
            Err(e) => {
                eprintln!("routerctl launch: {}", e.report(&w.plan));
                abort.cancel();
                return None;
            }
        };
        // An unreachable router is reported by the registrar and retried by reconciling; a
        // router that refuses the worker (not in PD mode, say) is a mistake to fix.
        if let Err(e @ AdminError::Refused { .. }) = self.registrar.register(w).await {
            eprintln!("routerctl launch: cannot register {} ({}): {e}", w.plan.name, w.plan.url);
            abort.cancel();
        }
        Some(child)
    }

    /// The launched processes, as a table.
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .workers
            .iter()
            .chain(&self.router)
            .map(|s| {
                let p = &s.plan;
                let gpus = p.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                vec![
                    p.name.clone(),
                    p.role.map_or("router", |r| r.as_str()).to_owned(),
                    p.url.clone(),
                    p.bootstrap_port.map_or("-".into(), |b| b.to_string()),
                    if gpus.is_empty() { "-".into() } else { gpus },
                    s.pid().to_string(),
                    p.log.display().to_string(),
                ]
            })
            .collect();
        crate::ops::table(&["NAME", "ROLE", "URL", "BOOTSTRAP", "GPUS", "PID", "LOG"], &rows)
            .trim_end()
            .to_owned()
    }
}
