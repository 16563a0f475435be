//! The `routerd` binary. The request path is not built yet: rather than pretend, the binary says
//! so and exits with the usage-error code.

use std::process::ExitCode;

fn main() -> ExitCode {
    let version = env!("CARGO_PKG_VERSION");
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("routerd {version}");
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "routerd {version}: the router's request path is not implemented yet.\n\
         Today this workspace ships the simulated SGLang worker: `routerctl sim-worker --port 31001`."
    );
    ExitCode::from(2)
}
