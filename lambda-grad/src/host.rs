//! A local function host: Lambda's Invoke API for clients (aws-sdk-lambda),
//! Lambda's Runtime API for a pool of real `lambda-grad` processes.
//!
//! Each execution environment is one child process with its own Runtime API
//! listener (`AWS_LAMBDA_RUNTIME_API` is only `host:port`, so the port is how the
//! host knows which environment asks). Environments start on demand up to the
//! concurrency limit, stay warm between invocations, and are killed on timeout,
//! when idle too long, and when the host stops. An invocation that finds every
//! environment busy waits for one, at most the function's timeout, and is then
//! throttled (429) as Lambda would.
//!
//! What clients see follows Lambda: a function error is HTTP 200 with
//! `X-Amz-Function-Error: Unhandled` and an `{"errorMessage","errorType"}`
//! payload; an unknown function is 404 `ResourceNotFoundException`.
//! `GetFunction` and `GetFunctionConfiguration` describe the function (its
//! timeout, memory and the object store variables its environments get), so a
//! client can check the endpoint, the function and its bucket before invoking.
//! A non-AWS endpoint, `GET /p2pml/stats`, reports counts and billed GB-seconds.

use crate::objstore::{StoreConfig, ENV_BUCKET, ENV_ENDPOINT, ENV_PATH_STYLE, ENV_REGION};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// Largest synchronous invocation payload, request or response (Lambda's 6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// What a host runs and how.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub listen: SocketAddr,
    pub function_name: String,
    /// Most environments alive (and invocations running) at once.
    pub concurrency: usize,
    /// Invocation timeout (and the bound on a runtime's start).
    pub timeout: Duration,
    /// Memory size, for `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` and billing.
    pub memory_mb: u32,
    /// Idle environments are stopped after this long (never when None).
    pub idle: Option<Duration>,
    /// The runtime executable and its arguments (an environment runs `program args...`).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment variables of every environment (on top of the host's own).
    pub env: Vec<(String, String)>,
    /// The object store the environments use (its variables are set on each).
    pub store: Option<StoreConfig>,
    /// AWS region in the function's ARN.
    pub region: String,
}

/// `GET /p2pml/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStats {
    /// Invocations that reached an environment.
    pub invocations: u64,
    /// Function errors (handler errors, timeouts, runtime exits).
    pub errors: u64,
    pub timeouts: u64,
    pub cold_starts: u64,
    /// Environments alive now.
    pub environments: u64,
    /// Invocations refused after waiting a whole timeout for a free environment.
    pub throttles: u64,
    /// Sum of billed durations (each rounded up to the millisecond).
    pub billed_ms: u64,
    /// billed seconds × memory in GB, Lambda's compute charge unit.
    pub gb_seconds: f64,
    pub memory_mb: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start environment {program}: {source}")]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("bad host configuration: {0}")]
    Config(String),
}

/// A response body.
type Body = Full<Bytes>;

fn respond(status: StatusCode, headers: &[(&'static str, String)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An AWS service error as restJson1 clients parse it (`x-amzn-ErrorType` and a JSON body).
fn aws_error(status: StatusCode, error_type: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "Type": "User", "Message": message });
    respond(status, &[("x-amzn-ErrorType", error_type.to_string())], body.to_string())
}

/// A function error payload, as the runtime or Lambda itself writes it.
fn function_error_body(error_type: &str, message: &str) -> Bytes {
    serde_json::json!({ "errorType": error_type, "errorMessage": message }).to_string().into()
}

/// Reads a request body of at most `limit` bytes (None when larger or broken).
async fn read_body(body: Incoming, limit: usize) -> Option<Bytes> {
    Limited::new(body, limit).collect().await.ok().map(|c| c.to_bytes())
}

/// Serves HTTP/1 on `listener` with `handler` until `stop` turns true.
fn serve<F, Fut>(listener: TcpListener, handler: F, mut stop: watch::Receiver<bool>) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let stream = match accepted {
                // Small answers (a Runtime API event, an invocation's result) must
                // not wait for the peer's delayed ACK.
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

/// A random request id shaped like Lambda's (a UUID).
fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// What the runtime answered for one invocation.
#[derive(Debug)]
enum Reply {
    Response(Bytes),
    Error(Bytes),
}

/// One invocation handed to an environment.
struct Invocation {
    id: String,
    payload: Bytes,
    /// Fired when the runtime has taken the event (its timeout starts then).
    started: oneshot::Sender<()>,
    reply: oneshot::Sender<Reply>,
}

/// The Runtime API side of one environment.
struct RuntimeApi {
    inbox: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    init_error: Mutex<Option<Bytes>>,
    arn: String,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RuntimeApi {
    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let accepted = || respond(StatusCode::ACCEPTED, &[], r#"{"status":"OK"}"#);
        match (req.method(), parts.as_slice()) {
            (&Method::GET, ["2018-06-01", "runtime", "invocation", "next"]) => self.next().await,
            (&Method::POST, ["2018-06-01", "runtime", "invocation", id, kind @ ("response" | "error")]) => {
                let Some(sender) = lock(&self.pending).remove(*id) else {
                    return aws_error(StatusCode::BAD_REQUEST, "InvalidRequestID", &format!("unknown request id {id}"));
                };
                let error = *kind == "error";
                let Some(body) = read_body(req.into_body(), MAX_PAYLOAD_BYTES).await else {
                    let msg = format!("response is larger than {MAX_PAYLOAD_BYTES} bytes");
                    let _ = sender.send(Reply::Error(function_error_body("Function.ResponseSizeTooLarge", &msg)));
                    return aws_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", &msg);
                };
                let _ = sender.send(if error { Reply::Error(body) } else { Reply::Response(body) });
                accepted()
            }
            (&Method::POST, ["2018-06-01", "runtime", "init", "error"]) => {
                let body = read_body(req.into_body(), 64 << 10).await.unwrap_or_default();
                *lock(&self.init_error) = Some(body);
                accepted()
            }
            _ => aws_error(StatusCode::NOT_FOUND, "UnknownOperation", &format!("no route for {path}")),
        }
    }

    /// `GET /runtime/invocation/next`: blocks until the host hands this environment an event.
    async fn next(&self) -> Response<Body> {
        let inv = self.inbox.lock().await.recv().await;
        let Some(inv) = inv else {
            return aws_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", "environment is shutting down");
        };
        lock(&self.pending).insert(inv.id.clone(), inv.reply);
        let _ = inv.started.send(());
        let deadline = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + self.timeout;
        respond(
            StatusCode::OK,
            &[
                ("Lambda-Runtime-Aws-Request-Id", inv.id),
                ("Lambda-Runtime-Deadline-Ms", deadline.as_millis().to_string()),
                ("Lambda-Runtime-Invoked-Function-Arn", self.arn.clone()),
            ],
            inv.payload,
        )
    }
}

/// One execution environment: a runtime process and its Runtime API listener.
struct Env {
    id: u64,
    inbox: mpsc::Sender<Invocation>,
    api: Arc<RuntimeApi>,
    /// Some(how it ended) once the process has exited.
    exit: watch::Receiver<Option<String>>,
    /// Dropping or firing it kills the process.
    kill: Mutex<Option<oneshot::Sender<()>>>,
    server: JoinHandle<()>,
    last_used: Mutex<Instant>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Env {
    fn alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    fn kill(&self) {
        if let Some(k) = lock(&self.kill).take() {
            let _ = k.send(());
        }
    }

    /// Waits until the process has exited; says how.
    async fn exited(&self) -> String {
        let mut rx = self.exit.clone();
        let how = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().unwrap_or_default(),
            Err(_) => "environment stopped".to_string(),
        };
        how
    }

    /// The error payload the runtime posted to `/runtime/init/error`, if it did.
    fn init_error(&self) -> Option<Bytes> {
        lock(&self.api.init_error).clone()
    }
}

/// Counters behind [`HostStats`].
#[derive(Default)]
struct Counters {
    invocations: u64,
    errors: u64,
    timeouts: u64,
    cold_starts: u64,
    throttles: u64,
    billed_ms: u64,
}

struct Shared {
    cfg: HostConfig,
    arn: String,
    slots: Semaphore,
    idle: Mutex<Vec<Arc<Env>>>,
    all: Mutex<HashMap<u64, Arc<Env>>>,
    counters: Mutex<Counters>,
    next_env: AtomicU64,
    stop: watch::Sender<bool>,
}

/// How one invocation ended.
enum Outcome {
    Reply(Reply),
    Timeout,
    Exit(String),
}

impl Shared {
    fn stats(&self) -> HostStats {
        let c = lock(&self.counters);
        HostStats {
            invocations: c.invocations,
            errors: c.errors,
            timeouts: c.timeouts,
            cold_starts: c.cold_starts,
            environments: lock(&self.all).len() as u64,
            throttles: c.throttles,
            billed_ms: c.billed_ms,
            gb_seconds: c.billed_ms as f64 / 1000.0 * self.cfg.memory_mb as f64 / 1024.0,
            memory_mb: self.cfg.memory_mb,
        }
    }

    /// Whether `name` (a name, ARN or partial ARN, maybe with a qualifier) is this function.
    fn is_function(&self, name: &str) -> bool {
        let name = name.strip_suffix(":$LATEST").unwrap_or(name);
        name == self.cfg.function_name || name == self.arn || name.ends_with(&format!(":function:{}", self.cfg.function_name))
    }

    /// Lambda's 404 for a function this host does not serve.
    fn not_found(&self, name: &str) -> Response<Body> {
        let arn = if name.contains(":function:") {
            name.to_string()
        } else {
            format!("{}:function:{name}", self.arn.rsplit_once(":function:").map_or("", |p| p.0))
        };
        aws_error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &format!("Function not found: {arn}"))
    }

    /// The variables every environment gets from the host's configuration
    /// (not the ones it inherits): the extra ones, then the object store's.
    fn environment(&self) -> serde_json::Map<String, serde_json::Value> {
        let cfg = &self.cfg;
        let mut vars: serde_json::Map<String, serde_json::Value> =
            cfg.env.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        vars.insert("AWS_REGION".into(), cfg.region.clone().into());
        if let Some(store) = &cfg.store {
            match &store.endpoint {
                Some(e) => vars.insert(ENV_ENDPOINT.into(), e.clone().into()),
                None => vars.remove(ENV_ENDPOINT),
            };
            vars.insert(ENV_BUCKET.into(), store.bucket.clone().into());
            vars.insert(ENV_REGION.into(), store.region.clone().into());
            vars.insert(ENV_PATH_STYLE.into(), if store.path_style { "1" } else { "0" }.into());
        }
        vars
    }

    /// The function's configuration, as Lambda's `GetFunctionConfiguration`
    /// returns it (and `GetFunction` under `Configuration`). `Timeout` is whole
    /// seconds, as Lambda's: the host's timeout rounded up.
    fn configuration(&self) -> serde_json::Value {
        let cfg = &self.cfg;
        serde_json::json!({
            "FunctionName": cfg.function_name,
            "FunctionArn": self.arn,
            "Runtime": "provided.al2023",
            "Handler": "bootstrap",
            "Timeout": (cfg.timeout.as_secs_f64().ceil() as u64).max(1),
            "MemorySize": cfg.memory_mb,
            "Version": "$LATEST",
            "PackageType": "Zip",
            "Architectures": [std::env::consts::ARCH.replace("aarch64", "arm64")],
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "Environment": { "Variables": self.environment() },
        })
    }

    /// Kills `env` and takes it out of the pool.
    fn remove(&self, env: &Env) {
        env.kill();
        self.forget(env.id);
    }

    fn forget(&self, id: u64) {
        lock(&self.all).remove(&id);
        lock(&self.idle).retain(|e| e.id != id);
    }

    /// A warm environment, or a new one (cold start).
    async fn checkout(self: &Arc<Self>) -> Result<Arc<Env>, HostError> {
        loop {
            let Some(env) = lock(&self.idle).pop() else { break };
            if env.alive() {
                return Ok(env);
            }
            self.remove(&env);
        }
        let env = self.spawn_env().await?;
        lock(&self.counters).cold_starts += 1;
        Ok(env)
    }

    fn checkin(&self, env: Arc<Env>) {
        *lock(&env.last_used) = Instant::now();
        if env.alive() && !*self.stop.borrow() {
            lock(&self.idle).push(env);
        } else {
            self.remove(&env);
        }
    }

    async fn spawn_env(self: &Arc<Self>) -> Result<Arc<Env>, HostError> {
        let id = self.next_env.fetch_add(1, Ordering::Relaxed);
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener =
            TcpListener::bind(loopback).await.map_err(|source| HostError::Bind { addr: loopback, source })?;
        let addr = listener.local_addr().map_err(|source| HostError::Bind { addr: loopback, source })?;
        let (inbox_tx, inbox_rx) = mpsc::channel(1);
        let api = Arc::new(RuntimeApi {
            inbox: tokio::sync::Mutex::new(inbox_rx),
            pending: Mutex::new(HashMap::new()),
            init_error: Mutex::new(None),
            arn: self.arn.clone(),
            timeout: self.cfg.timeout,
        });
        let routed = api.clone();
        let server = serve(listener, move |req| routed.clone().route(req), self.stop.subscribe());

        let cfg = &self.cfg;
        let mut cmd = tokio::process::Command::new(&cfg.program);
        cmd.args(&cfg.args)
            .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &cfg.function_name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", cfg.memory_mb.to_string())
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{}", cfg.function_name))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("local/env-{id}"))
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
            .env("AWS_REGION", &cfg.region)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(store) = &cfg.store {
            store.apply_env_tokio(&mut cmd);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                server.abort();
                return Err(HostError::Spawn { program: cfg.program.clone(), source });
            }
        };
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let how = match status {
                Ok(s) => format!("Runtime exited with error: {s}"),
                Err(e) => format!("Runtime exited: {e}"),
            };
            tracing::info!("environment {id}: {how}");
            let _ = exit_tx.send(Some(how));
            // Whatever ended it, it is no longer part of the pool.
            if let Some(host) = host.upgrade() {
                host.forget(id);
            }
        });
        let env = Arc::new(Env {
            id,
            inbox: inbox_tx,
            api,
            exit: exit_rx,
            kill: Mutex::new(Some(kill_tx)),
            server,
            last_used: Mutex::new(Instant::now()),
        });
        lock(&self.all).insert(id, env.clone());
        tracing::info!("environment {id}: started, runtime API on {addr}");
        Ok(env)
    }

    /// Runs one invocation on `env`.
    async fn run_on(&self, env: &Env, id: &str, payload: Bytes) -> Outcome {
        let (started_tx, started_rx) = oneshot::channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let inv = Invocation { id: id.to_string(), payload, started: started_tx, reply: reply_tx };
        let timeout = self.cfg.timeout;
        if env.inbox.send(inv).await.is_err() {
            return Outcome::Exit(env.exited().await);
        }
        // The runtime takes the event (bounded, for a runtime stuck starting) ...
        tokio::select! {
            r = started_rx => if r.is_err() { return Outcome::Exit(env.exited().await) },
            _ = tokio::time::sleep(timeout) => return Outcome::Timeout,
            how = env.exited() => return Outcome::Exit(how),
        }
        // ... then has `timeout` to answer.
        tokio::select! {
            r = reply_rx => match r {
                Ok(reply) => Outcome::Reply(reply),
                Err(_) => Outcome::Exit(env.exited().await),
            },
            _ = tokio::time::sleep(timeout) => Outcome::Timeout,
            how = env.exited() => Outcome::Exit(how),
        }
    }

    /// An invocation, end to end: a free environment, the run, the bill.
    async fn invoke(self: Arc<Self>, payload: Bytes) -> Response<Body> {
        let timeout = self.cfg.timeout;
        let Ok(Ok(permit)) = tokio::time::timeout(timeout, self.slots.acquire()).await else {
            lock(&self.counters).throttles += 1;
            return respond(
                StatusCode::TOO_MANY_REQUESTS,
                &[("x-amzn-ErrorType", "TooManyRequestsException".into())],
                r#"{"Reason":"ConcurrentInvocationLimitExceeded","Type":"User","message":"Rate Exceeded."}"#,
            );
        };
        let env = match self.checkout().await {
            Ok(env) => env,
            Err(e) => return aws_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string()),
        };
        let id = request_id();
        let start = Instant::now();
        let outcome = self.run_on(&env, &id, payload).await;
        let billed_ms = start.elapsed().as_micros().div_ceil(1000) as u64;
        // A runtime that answered stays warm; one that timed out or died goes.
        let keep = matches!(outcome, Outcome::Reply(_));
        let body = {
            let mut c = lock(&self.counters);
            c.invocations += 1;
            c.billed_ms += billed_ms;
            match &outcome {
                Outcome::Reply(Reply::Response(_)) => {}
                Outcome::Timeout => {
                    c.errors += 1;
                    c.timeouts += 1;
                }
                _ => c.errors += 1,
            }
            match outcome {
                Outcome::Reply(Reply::Response(b)) => Ok(b),
                Outcome::Reply(Reply::Error(b)) => Err(b),
                Outcome::Timeout => {
                    let msg = format!("RequestId: {id} Error: Task timed out after {:.2} seconds", timeout.as_secs_f64());
                    Err(function_error_body("Sandbox.Timedout", &msg))
                }
                // A runtime that failed to start and said why: its words, as Lambda does.
                Outcome::Exit(how) => Err(env.init_error().unwrap_or_else(|| {
                    function_error_body("Runtime.ExitError", &format!("RequestId: {id} Error: {how}"))
                })),
            }
        };
        if keep {
            self.checkin(env);
        } else {
            self.remove(&env);
        }
        drop(permit);
        let mut headers = vec![("X-Amz-Executed-Version", "$LATEST".to_string()), ("x-amzn-RequestId", id)];
        let payload = match body {
            Ok(b) => b,
            Err(b) => {
                headers.push(("X-Amz-Function-Error", "Unhandled".into()));
                b
            }
        };
        respond(StatusCode::OK, &headers, payload)
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method(), parts.as_slice()) {
            (&Method::GET, ["p2pml", "stats"]) => {
                respond(StatusCode::OK, &[], serde_json::to_vec(&self.stats()).unwrap_or_default())
            }
            (&Method::GET, ["2015-03-31", "functions", name, rest @ ..]) if rest.is_empty() || rest == ["configuration"] => {
                let name = percent_decode(name);
                let qualifier = query_param(req.uri().query(), "Qualifier");
                if !self.is_function(&name) || qualifier.is_some_and(|q| q != "$LATEST") {
                    return self.not_found(&name);
                }
                let config = self.configuration();
                let body = if rest.is_empty() { serde_json::json!({ "Configuration": config }) } else { config };
                respond(StatusCode::OK, &[("x-amzn-RequestId", request_id())], body.to_string())
            }
            (&Method::POST, ["2015-03-31", "functions", name, "invocations"]) => {
                let name = percent_decode(name);
                if !self.is_function(&name) {
                    return self.not_found(&name);
                }
                let kind = req.headers().get("X-Amz-Invocation-Type").and_then(|v| v.to_str().ok()).unwrap_or("RequestResponse");
                let kind = kind.to_string();
                let Some(payload) = read_body(req.into_body(), MAX_PAYLOAD_BYTES).await else {
                    let msg = format!("Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation");
                    return aws_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException", &msg);
                };
                let payload = if payload.is_empty() { Bytes::from_static(b"{}") } else { payload };
                if serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_err() {
                    let msg = "Could not parse request body into json";
                    return aws_error(StatusCode::BAD_REQUEST, "InvalidRequestContentException", msg);
                }
                match kind.as_str() {
                    // Its own task: a client that goes away does not strand the environment.
                    "RequestResponse" => match tokio::spawn(self.invoke(payload)).await {
                        Ok(r) => r,
                        Err(e) => aws_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string()),
                    },
                    "Event" => {
                        tokio::spawn(self.invoke(payload));
                        respond(StatusCode::ACCEPTED, &[("x-amzn-RequestId", request_id())], "")
                    }
                    "DryRun" => respond(StatusCode::NO_CONTENT, &[], ""),
                    other => aws_error(
                        StatusCode::BAD_REQUEST,
                        "InvalidParameterValueException",
                        &format!("unknown invocation type {other}"),
                    ),
                }
            }
            _ => aws_error(StatusCode::NOT_FOUND, "UnknownOperationException", &format!("Unknown operation {path}")),
        }
    }

    /// Stops idle environments unused for longer than the idle limit.
    fn reap(&self, idle: Duration) {
        let old: Vec<Arc<Env>> = {
            let mut pool = lock(&self.idle);
            let (old, keep) = pool.drain(..).partition(|e| lock(&e.last_used).elapsed() >= idle);
            *pool = keep;
            old
        };
        for env in old {
            tracing::info!("environment {}: idle, stopped", env.id);
            self.remove(&env);
        }
    }
}

/// The (decoded) value of `name` in a query string.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes (function names and ARNs arrive percent-encoded).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running function host.
pub struct FunctionHost {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    reaper: Option<JoinHandle<()>>,
}

impl FunctionHost {
    /// Binds the Invoke API and starts serving. No environment starts until the first invocation.
    pub async fn start(cfg: HostConfig) -> Result<Self, HostError> {
        if cfg.concurrency == 0 {
            return Err(HostError::Config("concurrency must be at least 1".into()));
        }
        if cfg.timeout.is_zero() {
            return Err(HostError::Config("timeout must be positive".into()));
        }
        if cfg.function_name.is_empty() || cfg.function_name.contains(['/', ':']) {
            return Err(HostError::Config(format!("function name {:?} must be non-empty without '/' or ':'", cfg.function_name)));
        }
        let listener = TcpListener::bind(cfg.listen).await.map_err(|source| HostError::Bind { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| HostError::Bind { addr: cfg.listen, source })?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            arn: format!("arn:aws:lambda:{}:000000000000:function:{}", cfg.region, cfg.function_name),
            slots: Semaphore::new(cfg.concurrency),
            idle: Mutex::new(Vec::new()),
            all: Mutex::new(HashMap::new()),
            counters: Mutex::new(Counters::default()),
            next_env: AtomicU64::new(0),
            stop,
            cfg,
        });
        let routed = shared.clone();
        let server = serve(listener, move |req| routed.clone().route(req), shared.stop.subscribe());
        let reaper = shared.cfg.idle.map(|idle| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)));
                loop {
                    tick.tick().await;
                    shared.reap(idle);
                }
            })
        });
        Ok(FunctionHost { addr, shared, server, reaper })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL clients use (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> HostStats {
        self.shared.stats()
    }

    /// Stops serving and kills every environment, waiting (a few seconds at most) for them to exit.
    pub async fn shutdown(self) {
        let _ = self.shared.stop.send(true);
        self.server.abort();
        if let Some(r) = &self.reaper {
            r.abort();
        }
        let envs: Vec<Arc<Env>> = lock(&self.shared.all).drain().map(|(_, e)| e).collect();
        lock(&self.shared.idle).clear();
        for e in &envs {
            e.kill();
        }
        let all_exited = futures::future::join_all(envs.iter().map(|e| e.exited()));
        let _ = tokio::time::timeout(Duration::from_secs(5), all_exited).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
    }

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(query_param(Some("Qualifier=%24LATEST"), "Qualifier").as_deref(), Some("$LATEST"));
        assert_eq!(query_param(Some("a=1&Qualifier=v2"), "Qualifier").as_deref(), Some("v2"));
        assert_eq!(query_param(Some("a=1"), "Qualifier"), None);
        assert_eq!(query_param(None, "Qualifier"), None);
    }

    #[test]
    fn percent_decoding_of_names() {
        assert_eq!(percent_decode("f%3A%24LATEST"), "f:$LATEST");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%2"), "bad%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
