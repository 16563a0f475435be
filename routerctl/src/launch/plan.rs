//! What `routerctl launch` starts, decided before anything runs: each worker's name, role, port,
//! bootstrap port, GPUs and exact command line, and the router's. Pure, so the command lines
//! and GPU assignment are unit-tested; choosing free ports is the one impure step, kept apart
//! in `ports`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use routerd::registry::WorkerRole;

/// The engine a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// `python -m sglang.launch_server`, one GPU group each (CUDA_VISIBLE_DEVICES).
    Sglang,
    /// `routerctl sim-worker`: a simulated SGLang worker, no GPU needed.
    Sim,
}

/// A program, its arguments and the environment it gets on top of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl CommandLine {
    /// The command as a shell would show it, for logs and error messages.
    pub fn display(&self) -> String {
        let mut out: Vec<String> =
            self.env
                .iter()
                .map(|(k, v)| {
                    if k.ends_with("_KEY") {
                        format!("{k}=<redacted>")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
        out.push(self.program.display().to_string());
        out.extend(self.args.iter().map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("{a:?}")
            } else {
                a.clone()
            }
        }));
        out.join(" ")
    }
}

/// One process launch supervises: a worker, or the router in front of them.
#[derive(Debug, Clone)]
pub struct ProcPlan {
    /// `worker-0`, `prefill-1`, `decode-0`, `routerd`: names its log file and its lines.
    pub name: String,
    /// The address it serves on.
    pub url: String,
    /// `None` for the router.
    pub role: Option<WorkerRole>,
    pub bootstrap_port: Option<u16>,
    pub gpus: Vec<u32>,
    pub command: CommandLine,
    pub log: PathBuf,
    /// The path polled until it answers 200: `/health` for workers, `/liveness` for routerd.
    pub health_path: &'static str,
}

/// Everything `plan` needs, gathered from the flags and the machine.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub engine: Engine,
    /// Regular workers, or (prefill, decode) workers.
    pub fleet: Fleet,
    pub model_path: Option<String>,
    pub host: String,
    pub worker_ports: Vec<u16>,
    /// One per prefill worker.
    pub bootstrap_ports: Vec<u16>,
    pub base_gpu_id: u32,
    pub gpus_per_worker: u32,
    pub python: String,
    /// This executable: sim workers run `<self> sim-worker`.
    pub self_exe: PathBuf,
    pub engine_args: Vec<String>,
    pub log_dir: PathBuf,
    /// `(routerd binary, host, port, extra flags)` with `--with-router`.
    pub router: Option<RouterInputs>,
    /// Workers serve HTTPS (the sim engine).
    pub worker_tls: Option<WorkerTlsInputs>,
}

#[derive(Debug, Clone)]
pub struct WorkerTlsInputs {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed `cert`, when it is not a system root.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RouterInputs {
    pub program: PathBuf,
    pub host: String,
    pub port: u16,
    pub args: Vec<String>,
    /// routerctl's `--admin-key`: the router started gets it as its admin key, through the
    /// environment (`ROUTERD_ADMIN_API_KEY`) so that it never shows in a process list.
    pub admin_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    Regular(u32),
    Pd { prefill: u32, decode: u32 },
}

impl Fleet {
    pub fn workers(self) -> usize {
        match self {
            Fleet::Regular(n) => n as usize,
            Fleet::Pd { prefill, decode } => (prefill + decode) as usize,
        }
    }

    pub fn prefill(self) -> usize {
        match self {
            Fleet::Regular(_) => 0,
            Fleet::Pd { prefill, .. } => prefill as usize,
        }
    }

    /// Roles in launch order: prefill workers first, then decode.
    fn roles(self) -> Vec<WorkerRole> {
        match self {
            Fleet::Regular(n) => vec![WorkerRole::Regular; n as usize],
            Fleet::Pd { prefill, decode } => {
                let mut r = vec![WorkerRole::Prefill; prefill as usize];
                r.extend(vec![WorkerRole::Decode; decode as usize]);
                r
            }
        }
    }
}

/// The address clients use for a process listening on `host`: a wildcard bind is reached
/// on loopback.
pub fn reachable_host(host: &str) -> &str {
    match host {
        "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
        h => h,
    }
}

/// The workers (and router) to start, in launch order.
pub fn plan(i: &Inputs) -> (Vec<ProcPlan>, Option<ProcPlan>) {
    let mut counts = [0usize; 3];
    let mut gpu = i.base_gpu_id;
    let mut workers = Vec::new();
    let scheme = if i.worker_tls.is_some() { "https" } else { "http" };
    for (n, role) in i.fleet.roles().into_iter().enumerate() {
        let k = match role {
            WorkerRole::Regular => 0,
            WorkerRole::Prefill => 1,
            WorkerRole::Decode => 2,
        };
        let name = match role {
            WorkerRole::Regular => format!("worker-{}", counts[k]),
            r => format!("{}-{}", r.as_str(), counts[k]),
        };
        let bootstrap_port = (role == WorkerRole::Prefill).then(|| i.bootstrap_ports[counts[k]]);
        counts[k] += 1;
        let port = i.worker_ports[n];
        let gpus: Vec<u32> = match i.engine {
            Engine::Sglang => (gpu..gpu + i.gpus_per_worker).collect(),
            Engine::Sim => Vec::new(),
        };
        gpu += i.gpus_per_worker;
        let command = match i.engine {
            Engine::Sglang => sglang_command(i, port, role, bootstrap_port, &gpus),
            Engine::Sim => sim_command(i, port, role, bootstrap_port),
        };
        workers.push(ProcPlan {
            log: i.log_dir.join(format!("{name}.log")),
            name,
            url: format!("{scheme}://{}:{port}", reachable_host(&i.host)),
            role: Some(role),
            bootstrap_port,
            gpus,
            command,
            health_path: "/health",
        });
    }
    let router = i.router.as_ref().map(|r| router_plan(r, i, &i.log_dir));
    (workers, router)
}

fn sglang_command(
    i: &Inputs,
    port: u16,
    role: WorkerRole,
    bootstrap_port: Option<u16>,
    gpus: &[u32],
) -> CommandLine {
    let mut args: Vec<String> = vec!["-m".into(), "sglang.launch_server".into()];
    if let Some(m) = &i.model_path {
        args.extend(["--model-path".into(), m.clone()]);
    }
    args.extend(["--host".into(), i.host.clone(), "--port".into(), port.to_string()]);
    // The GPUs a worker sees are its tensor-parallel group, unless the extra args say otherwise.
    let tp_given = i.engine_args.iter().any(|a| {
        ["--tp-size", "--tp", "--tensor-parallel-size"]
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
    });
    if i.gpus_per_worker > 1 && !tp_given {
        args.extend(["--tp-size".into(), i.gpus_per_worker.to_string()]);
    }
    args.extend(pd_args(
        role,
        bootstrap_port,
        "--disaggregation-mode",
        "--disaggregation-bootstrap-port",
    ));
    args.extend(i.engine_args.iter().cloned());
    let devices = gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    CommandLine {
        program: PathBuf::from(&i.python),
        args,
        env: vec![("CUDA_VISIBLE_DEVICES".into(), devices)],
    }
}

fn sim_command(
    i: &Inputs,
    port: u16,
    role: WorkerRole,
    bootstrap_port: Option<u16>,
) -> CommandLine {
    let mut args: Vec<String> = vec!["sim-worker".into()];
    args.extend(["--host".into(), i.host.clone(), "--port".into(), port.to_string()]);
    if let Some(m) = &i.model_path {
        args.extend(["--model-path".into(), m.clone()]);
    }
    args.extend(pd_args(role, bootstrap_port, "--role", "--bootstrap-port"));
    if let Some(t) = &i.worker_tls {
        args.extend(["--tls-cert".into(), t.cert.display().to_string()]);
        args.extend(["--tls-key".into(), t.key.display().to_string()]);
    }
    args.extend(i.engine_args.iter().cloned());
    CommandLine { program: i.self_exe.clone(), args, env: Vec::new() }
}

/// The PD flags, spelled as the engine spells them.
fn pd_args(role: WorkerRole, bootstrap_port: Option<u16>, mode: &str, port: &str) -> Vec<String> {
    let mut out = Vec::new();
    if role != WorkerRole::Regular {
        out.extend([mode.to_owned(), role.as_str().to_owned()]);
    }
    if let Some(p) = bootstrap_port {
        out.extend([port.to_owned(), p.to_string()]);
    }
    out
}

fn router_plan(r: &RouterInputs, i: &Inputs, log_dir: &Path) -> ProcPlan {
    let mut args = vec!["--host".into(), r.host.clone(), "--port".into(), r.port.to_string()];
    if matches!(i.fleet, Fleet::Pd { .. }) {
        args.push("--pd-disaggregation".into());
    }
    if let Some(ca) = i.worker_tls.as_ref().and_then(|t| t.ca.as_ref()) {
        args.extend(["--ca-cert-paths".into(), ca.display().to_string()]);
    }
    args.extend(r.args.iter().cloned());
    ProcPlan {
        name: "routerd".into(),
        url: format!("http://{}:{}", reachable_host(&r.host), r.port),
        role: None,
        bootstrap_port: None,
        gpus: Vec::new(),
        command: CommandLine {
            program: r.program.clone(),
            args,
            env: r
                .admin_key
                .iter()
                .map(|k| ("ROUTERD_ADMIN_API_KEY".to_owned(), k.clone()))
                .collect(),
        },
        log: log_dir.join("routerd.log"),
        health_path: "/liveness",
    }
}

/// `n` ports on `host` from `base` up, each checked free; `base` 0 lets the system choose
/// each one. The check is a bind that is released at once, so another program can still take
/// the port before the worker binds it: the worker then fails its start with a clear log.
pub fn ports(host: &str, base: u16, n: usize, what: &str) -> Result<Vec<u16>, String> {
    let mut held = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let port = if base == 0 {
            0
        } else {
            u16::try_from(base as usize + k)
                .map_err(|_| format!("{what}: {base} + {k} is past the last port (65535)"))?
        };
        let l = TcpListener::bind((host, port)).map_err(|e| match port {
            0 => format!("{what}: cannot find a free port on {host}: {e}"),
            p => format!("{what}: port {p} on {host} is not free: {e}"),
        })?;
        out.push(l.local_addr().map_err(|e| e.to_string())?.port());
        held.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(engine: Engine, fleet: Fleet) -> Inputs {
        Inputs {
            engine,
            fleet,
            model_path: Some("meta-llama/Llama-3.1-8B-Instruct".into()),
            host: "127.0.0.1".into(),
            worker_ports: (0..fleet.workers() as u16).map(|k| 31000 + k).collect(),
            bootstrap_ports: (0..fleet.prefill() as u16).map(|k| 8998 + k).collect(),
            base_gpu_id: 2,
            gpus_per_worker: 1,
            python: "python".into(),
            self_exe: "/bin/routerctl".into(),
            engine_args: vec!["--mem-fraction-static".into(), "0.8".into()],
            log_dir: "logs".into(),
            router: None,
            worker_tls: None,
        }
    }

    #[test]
    fn sglang_workers_get_one_gpu_each_and_sglang_flags() {
        let (w, router) = plan(&inputs(Engine::Sglang, Fleet::Regular(2)));
        assert!(router.is_none());
        assert_eq!(
            w[1].command.display(),
            "CUDA_VISIBLE_DEVICES=3 python -m sglang.launch_server --model-path \
             meta-llama/Llama-3.1-8B-Instruct --host 127.0.0.1 --port 31001 \
             --mem-fraction-static 0.8"
        );
        assert_eq!((w[0].name.as_str(), w[0].gpus.as_slice()), ("worker-0", &[2][..]));
        assert_eq!(w[1].url, "http://127.0.0.1:31001");
        assert_eq!(w[1].log, Path::new("logs/worker-1.log"));
    }

    #[test]
    fn tensor_parallel_groups_are_consecutive_and_set_tp_size_unless_given() {
        let mut i = inputs(Engine::Sglang, Fleet::Regular(2));
        i.gpus_per_worker = 2;
        let (w, _) = plan(&i);
        assert_eq!(w[0].command.env, vec![("CUDA_VISIBLE_DEVICES".into(), "2,3".into())]);
        assert_eq!(w[1].command.env, vec![("CUDA_VISIBLE_DEVICES".into(), "4,5".into())]);
        assert!(w[1].command.display().contains("--port 31001 --tp-size 2 --mem"));
        i.engine_args = vec!["--tp-size=2".into()];
        let (w, _) = plan(&i);
        assert_eq!(w[0].command.args.iter().filter(|a| a.starts_with("--tp")).count(), 1);
    }

    #[test]
    fn pd_fleets_launch_prefill_first_with_distinct_bootstrap_ports() {
        let (w, _) = plan(&inputs(Engine::Sglang, Fleet::Pd { prefill: 2, decode: 1 }));
        let names: Vec<&str> = w.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["prefill-0", "prefill-1", "decode-0"]);
        assert_eq!(w[1].bootstrap_port, Some(8999));
        assert!(w[1].command.display().ends_with(
            "--port 31001 --disaggregation-mode prefill --disaggregation-bootstrap-port 8999 \
             --mem-fraction-static 0.8"
        ));
        assert!(w[2]
            .command
            .display()
            .ends_with("--port 31002 --disaggregation-mode decode --mem-fraction-static 0.8"));
        assert_eq!(w[2].bootstrap_port, None);
        assert_eq!(w[2].gpus, [4]);
    }

    #[test]
    fn sim_workers_run_this_binary_and_the_router_gets_pd_mode() {
        let mut i = inputs(Engine::Sim, Fleet::Pd { prefill: 1, decode: 1 });
        i.model_path = None;
        i.host = "0.0.0.0".into();
        i.router = Some(RouterInputs {
            program: "/bin/routerd".into(),
            host: "127.0.0.1".into(),
            port: 30000,
            args: vec!["--policy".into(), "round_robin".into()],
            admin_key: Some("adm-secret".into()),
        });
        let (w, router) = plan(&i);
        assert_eq!(
            w[0].command.display(),
            "/bin/routerctl sim-worker --host 0.0.0.0 --port 31000 --role prefill \
             --bootstrap-port 8998 --mem-fraction-static 0.8"
        );
        assert_eq!(w[0].url, "http://127.0.0.1:31000");
        assert!(w[0].gpus.is_empty() && w[0].command.env.is_empty());
        let r = router.unwrap();
        assert_eq!(
            r.command.display(),
            "ROUTERD_ADMIN_API_KEY=<redacted> /bin/routerd --host 127.0.0.1 --port 30000 \
             --pd-disaggregation --policy round_robin"
        );
        assert_eq!(r.command.env, [("ROUTERD_ADMIN_API_KEY".into(), "adm-secret".into())]);
        assert_eq!((r.url.as_str(), r.health_path), ("http://127.0.0.1:30000", "/liveness"));
    }

    #[test]
    fn tls_sim_workers_serve_https_and_the_router_trusts_their_ca() {
        let mut i = inputs(Engine::Sim, Fleet::Regular(2));
        i.model_path = None;
        i.engine_args.clear();
        i.worker_tls = Some(WorkerTlsInputs {
            cert: "/pki/w.pem".into(),
            key: "/pki/w.key".into(),
            ca: Some("/pki/ca.pem".into()),
        });
        i.router = Some(RouterInputs {
            program: "/bin/routerd".into(),
            host: "127.0.0.1".into(),
            port: 30000,
            args: Vec::new(),
            admin_key: None,
        });
        let (w, router) = plan(&i);
        assert_eq!(w[1].url, "https://127.0.0.1:31001");
        assert_eq!(
            w[1].command.display(),
            "/bin/routerctl sim-worker --host 127.0.0.1 --port 31001 --tls-cert /pki/w.pem \
             --tls-key /pki/w.key"
        );
        assert_eq!(
            router.unwrap().command.display(),
            "/bin/routerd --host 127.0.0.1 --port 30000 --ca-cert-paths /pki/ca.pem"
        );
    }

    #[test]
    fn ports_are_checked_free_and_zero_picks_distinct_ones() {
        let picked = ports("127.0.0.1", 0, 3, "workers").unwrap();
        assert_eq!(picked.len(), 3);
        assert!(picked[0] != picked[1] && picked[1] != picked[2] && picked[0] != picked[2]);
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = busy.local_addr().unwrap().port();
        let err = ports("127.0.0.1", p, 1, "--base-port").unwrap_err();
        assert!(
            err.starts_with(&format!("--base-port: port {p} on 127.0.0.1 is not free")),
            "{err}"
        );
        assert!(ports("127.0.0.1", 65535, 2, "--base-port").unwrap_err().contains("past the last"));
    }
}
