//! `lambda-grad`: the gradient function.
//!
//! - No subcommand: an AWS Lambda custom runtime (the `lambda_runtime` crate),
//!   talking to the Runtime API at `AWS_LAMBDA_RUNTIME_API`. Each event is a
//!   task (JSON, see `p2pml_proto::task`); the result is a `TaskResult`.
//! - `lambda-grad host`: the local function host, Lambda's Invoke API on a
//!   loopback port, running this same binary as its execution environments.

// The runtime's service future nests the handler's deeply (rustc's default
// layout query depth is not enough on a fresh, non-incremental build).
#![recursion_limit = "256"]

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use futures::FutureExt;
use p2pml_lambda_grad::handler::{
    panic_message, parse_task, torch_threads_from_env, Handler, FUNCTION_BUCKET_SETTING, FUNCTION_ENDPOINT_SETTING,
};
use p2pml_lambda_grad::host::{FunctionHost, HostConfig};
use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig};
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "lambda-grad", version, about = "p2pml gradient function: a Lambda runtime, or (`host`) a local function host")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve Lambda's Invoke API locally, running lambda-grad processes as the function's environments.
    Host(HostArgs),
}

#[derive(clap::Args)]
struct HostArgs {
    /// Address of the Invoke API (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The function's name (clients invoke /2015-03-31/functions/NAME/invocations).
    #[arg(long, default_value = "p2pml-grad")]
    function_name: String,
    /// Most execution environments (concurrent invocations) at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Invocation timeout in seconds: a slower invocation is killed with its environment.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Memory size in MB (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, and GB-seconds billing).
    #[arg(long, default_value_t = 1769)]
    memory_mb: u32,
    /// Stop an environment idle for this many seconds (default: keep it).
    #[arg(long)]
    idle_s: Option<f64>,
    /// Write the endpoint URL (http://ADDR) to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// How the host's errors name its object store settings.
const HOST_ENDPOINT_SETTING: &str = "P2PML_S3_ENDPOINT of the function host";
const HOST_BUCKET_SETTING: &str = "P2PML_S3_BUCKET of the function host";

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("{flag} {s} must be a positive number of seconds"))
}

/// Writes `text` to `path` through a temporary file and a rename, so readers never see half of it.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).with_context(|| format!("cannot write {}", path.display()))
}

fn tokio_runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().context("cannot start the async runtime")
}

fn host(a: HostArgs) -> anyhow::Result<()> {
    let timeout = seconds("--timeout-s", a.timeout_s)?;
    let idle = a.idle_s.map(|s| seconds("--idle-s", s)).transpose()?;
    // Environments get the object store's settings as this process resolved them
    // (and inherit the credentials' variables).
    let store = StoreConfig::from_env()?;
    // Missing credentials and a missing bucket fail here, once, rather than in
    // every environment's start or every invocation.
    let client = ObjectStore::new(&store)
        .context("the function's environments need the object store")?
        .named_by(HOST_ENDPOINT_SETTING, HOST_BUCKET_SETTING);
    let cfg = HostConfig {
        listen: a.listen,
        function_name: a.function_name,
        concurrency: a.concurrency,
        timeout,
        memory_mb: a.memory_mb,
        idle,
        program: std::env::current_exe().context("cannot find the lambda-grad executable")?,
        args: Vec::new(),
        env: Vec::new(),
        region: store.region.clone(),
        store: Some(store),
    };
    tokio_runtime(true)?.block_on(async {
        client.check_bucket().await?;
        let host = FunctionHost::start(cfg).await?;
        if let Some(f) = &a.addr_file {
            write_atomically(f, &host.url())?;
        }
        println!("function host listening on {}", host.url());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let stats = host.stats();
        host.shutdown().await;
        eprintln!("function host stopped: {}", serde_json::to_string(&stats).unwrap_or_default());
        Ok(())
    })
}

/// Tells the Runtime API why this runtime cannot start (`POST /runtime/init/error`),
/// so that the invocation that started it fails with the reason. Best effort.
fn report_init_error(message: &str) {
    use std::io::{Read, Write};
    let Some(api) = std::env::var("AWS_LAMBDA_RUNTIME_API").ok().and_then(|a| a.to_socket_addrs().ok()?.next()) else {
        return;
    };
    let body = serde_json::json!({ "errorType": "p2pml.InitError", "errorMessage": message }).to_string();
    let limit = Duration::from_secs(2);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&api, limit) else { return };
    let _ = s.set_write_timeout(Some(limit)).and_then(|_| s.set_read_timeout(Some(limit)));
    let request = format!(
        "POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Lambda-Runtime-Function-Error-Type: Runtime.InitError\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(request.as_bytes()).is_ok() {
        let _ = s.read(&mut [0u8; 256]);
    }
}

fn runtime() -> anyhow::Result<()> {
    for var in ["AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION"] {
        if std::env::var_os(var).is_none() {
            bail!(
                "{var} is not set: without a subcommand lambda-grad is a Lambda function runtime; \
                 run it in AWS Lambda or under `lambda-grad host` (see --help)"
            );
        }
    }
    let memory = std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").unwrap_or_default();
    if memory.parse::<i32>().is_err() {
        bail!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE={memory:?} is not a number of MB");
    }
    let init = || -> anyhow::Result<ObjectStore> {
        p2pml_lambda_grad::set_torch_threads(torch_threads_from_env()?);
        Ok(ObjectStore::new(&StoreConfig::from_env()?)?.named_by(FUNCTION_ENDPOINT_SETTING, FUNCTION_BUCKET_SETTING))
    };
    let store = init().inspect_err(|e| report_init_error(&format!("{e:#}")))?;
    let handler = Arc::new(tokio::sync::Mutex::new(Handler::new(store)));
    tokio_runtime(false)?.block_on(async {
        lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
            let handler = handler.clone();
            let work = async move {
                let task = parse_task(event.payload)?;
                handler.lock().await.handle(task).await
            };
            // A panic (the handler's lock is released as it unwinds) is this
            // invocation's error; the environment stays up for the next one.
            async move {
                // This runtime logs each failure once, as what it is (lambda_runtime's
                // own log of a returned error is filtered out, see `log_filter`).
                let (error_type, error_message) = match AssertUnwindSafe(work).catch_unwind().await {
                    Ok(Ok(result)) => return Ok(result),
                    Ok(Err(e)) => {
                        tracing::warn!("function error {}: {e}", e.error_type());
                        (e.error_type().to_string(), e.to_string())
                    }
                    Err(p) => {
                        let message = panic_message(p.as_ref());
                        tracing::error!("function panicked (p2pml.Panic): {message}");
                        ("p2pml.Panic".to_string(), message)
                    }
                };
                Err(Diagnostic { error_type, error_message })
            }
        }))
        .await
        .map_err(|e| anyhow!("Lambda runtime stopped: {e}"))
    })
}

/// Where lambda_runtime (1.x) logs every error a handler returns, at ERROR, as
/// `Diagnostic { … }` (the target of its panic-catching layer, so that it reads
/// like a panic). The runtime here logs its own line for each function error.
const RUNTIME_ERROR_LOG_TARGET: &str = "lambda_runtime::layers::panic";

/// `RUST_LOG` (default `warn`), without lambda_runtime's log of returned errors
/// unless `RUST_LOG` names that target itself.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty());
    let names_target = spec.as_deref().is_some_and(|s| s.contains(RUNTIME_ERROR_LOG_TARGET));
    let filter = spec
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    match format!("{RUNTIME_ERROR_LOG_TARGET}=off").parse() {
        Ok(d) if !names_target => filter.add_directive(d),
        _ => filter,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(log_filter())
        .init();
    let result = match cli.cmd {
        None => runtime(),
        Some(Cmd::Host(a)) => host(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lambda-grad: {e:#}");
            ExitCode::FAILURE
        }
    }
}
