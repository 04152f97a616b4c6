//! The local object store: an S3-compatible server (s3s over a directory, with
//! SigV4 authentication) on loopback, so that nodes and functions talk the real
//! S3 protocol through aws-sdk-s3 without AWS.
//!
//! Buckets are the directories under the root; objects are files (a key's `/`
//! makes subdirectories). Requests are path-style: `http://ADDR/BUCKET/KEY`.

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s::validation::{AwsNameValidation, NameValidation};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The access key when neither `--access-key` nor `AWS_ACCESS_KEY_ID` is given.
pub(crate) const LOCAL_ACCESS_KEY: &str = "p2pml-local";
/// The secret key when neither `--secret-key` nor `AWS_SECRET_ACCESS_KEY` is given.
pub(crate) const LOCAL_SECRET_KEY: &str = "p2pml-local-secret";

/// How long a shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// A running server; dropping it stops accepting connections.
pub(crate) struct S3Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl S3Server {
    /// The bound address (the real port when asked for port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the value for `P2PML_S3_ENDPOINT`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Stops accepting, lets requests in flight finish (at most a few seconds),
    /// and returns when the server is gone.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the buckets under `root` (which must exist) on `listen`, accepting
/// requests signed with `access_key`/`secret_key`.
pub(crate) async fn start(root: &Path, listen: SocketAddr, access_key: &str, secret_key: &str) -> anyhow::Result<S3Server> {
    // s3s_fs's error has no Display: check the usual mistake first.
    let root = std::fs::canonicalize(root).with_context(|| format!("cannot serve {}", root.display()))?;
    let fs = s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("cannot serve {}: {e:?}", root.display()))?;
    let mut b = S3ServiceBuilder::new(fs);
    b.set_auth(SimpleAuth::from_single(access_key, secret_key));
    let service = b.build();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        loop {
            let socket = tokio::select! {
                r = listener.accept() => match r {
                    Ok((socket, _)) => socket,
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep serving.
                        eprintln!("s3: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // A stop signal, or the handle dropped.
                _ = &mut stopped => break,
            };
            let conn = graceful.watch(http.serve_connection(TokioIo::new(socket), service.clone()).into_owned());
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    });
    Ok(S3Server { addr, stop: Some(stop), task })
}

/// `testnet s3`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct S3Args {
    /// The directory that holds the buckets (created if missing).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Bucket to create (a directory under --root) if missing.
    #[arg(long, default_value = "p2pml")]
    bucket: String,
    /// Write the endpoint URL (http://ADDR) to this file once listening (atomically).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Access key that requests must be signed with [default: p2pml-local].
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    access_key: Option<String>,
    /// Secret key that requests must be signed with [default: p2pml-local-secret].
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: Option<String>,
}

/// `testnet s3`: serve until SIGTERM or SIGINT.
pub(crate) async fn run(a: S3Args) -> anyhow::Result<()> {
    let (access_key, secret_key, source) = match (a.access_key, a.secret_key) {
        (Some(k), Some(s)) => (k, s, "from --access-key/--secret-key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        (None, None) => (LOCAL_ACCESS_KEY.to_string(), LOCAL_SECRET_KEY.to_string(), "the local defaults"),
        _ => anyhow::bail!("give both an access key and a secret key (--access-key/--secret-key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or neither for the local defaults"),
    };
    if !AwsNameValidation::new().validate_bucket_name(&a.bucket) {
        anyhow::bail!("--bucket {}: not a valid bucket name (3-63 characters: lowercase letters, digits, '-' and '.')", a.bucket);
    }
    let bucket_dir = a.root.join(&a.bucket);
    std::fs::create_dir_all(&bucket_dir).with_context(|| format!("cannot create {}", bucket_dir.display()))?;
    let server = start(&a.root, a.listen, &access_key, &secret_key).await?;
    eprintln!("s3: serving {} (bucket {}), credentials {source}: AWS_ACCESS_KEY_ID={access_key}", a.root.display(), a.bucket);
    if let Some(f) = &a.addr_file {
        write_atomically(f, &server.endpoint()).with_context(|| format!("cannot write {}", f.display()))?;
    }
    println!("s3 listening on {}", server.endpoint());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
    }
    server.shutdown().await;
    if let Some(f) = &a.addr_file {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}

/// Writes `text` to a temporary file beside `path`, then renames it into place,
/// so that a reader sees no file or the whole file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
