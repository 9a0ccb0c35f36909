//! The `wsengine` command: runs the engine as a standalone server.
//!
//! ```text
//! wsengine serve [--listen ADDR] [--config FILE] [--print-config]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use wsengine::{Config, Engine};

const USAGE: &str = "\
wsengine - a real-time WebSocket engine (WSE protocol v1)

USAGE:
    wsengine serve [--listen ADDR] [--config FILE] [--print-config]
    wsengine --version

OPTIONS:
    --listen ADDR     address to listen on (default 127.0.0.1:5006; overrides the config)
    --config FILE     TOML configuration file; every key can also be set with WSENGINE_<KEY>
    --print-config    print the effective configuration and exit

SIGTERM or Ctrl-C drains: connections are closed with drain_close_code (4300) so that
clients reconnect; the server exits when they are gone or after drain_timeout. A second
signal exits at once.
";

struct Args {
    listen: Option<String>,
    config: Option<PathBuf>,
    print_config: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    match args.next().as_deref() {
        Some("serve") => {}
        Some("--version" | "-V") => {
            println!("wsengine {}", env!("CARGO_PKG_VERSION"));
            return Ok(None);
        }
        Some("--help" | "-h" | "help") | None => {
            print!("{USAGE}");
            return Ok(None);
        }
        Some(other) => return Err(format!("unknown command {other:?}")),
    }
    let mut parsed = Args { listen: None, config: None, print_config: false };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--listen" => parsed.listen = Some(value("--listen")?),
            "--config" => parsed.config = Some(PathBuf::from(value("--config")?)),
            "--print-config" => parsed.print_config = true,
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wsengine: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("wsengine: configuration: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = args.listen {
        match listen.parse() {
            Ok(addr) => config.listen = addr,
            Err(_) => {
                eprintln!("wsengine: --listen: {listen:?} is not an address like 127.0.0.1:5006");
                return ExitCode::from(2);
            }
        }
    }
    if args.print_config {
        print!("{}", config.to_toml_string());
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsengine: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wsengine: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::builder(config).build()?;
    let listen = engine.config().listen;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr()?;
    tracing::info!("wsengine {} listening on {address}", env!("CARGO_PKG_VERSION"));
    let secure = if engine.config().tls_cert.is_some() { "s" } else { "" };
    println!(
        "wsengine listening on ws{secure}://{address}{} (HTTP API on http{secure}://{address})",
        engine.config().path
    );
    let server = tokio::spawn(engine.clone().serve(listener));
    // SIGTERM or Ctrl-C drains: every client is closed with the drain code (4300 by default)
    // and reconnects, to this server's successor or another node. A shutdown's 1001 would be
    // final for the TypeScript client (PROTOCOL.md §12.1). A second signal stops at once.
    shutdown_signal().await;
    let drain_timeout = engine.config().drain_timeout;
    tracing::info!(
        connections = engine.connection_count(),
        "draining (up to {drain_timeout:?}); signal again to stop now"
    );
    engine.drain();
    tokio::select! {
        () = engine.wait_for_connections(drain_timeout) => {}
        () = shutdown_signal() => tracing::info!("second signal: stopping now"),
    }
    tracing::info!("shutting down");
    engine.shutdown();
    server.await??;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok();
    }
}
