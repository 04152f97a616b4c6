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

use fast::{legacy_data_plane, FastFs};
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
    let legacy = legacy_data_plane();
    let mut b = if legacy { S3ServiceBuilder::new(fs) } else { S3ServiceBuilder::new(FastFs::new(fs, root.clone())) };
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
            // Responses go out as written: a body written after its headers
            // must not wait for the client's delayed ACK (Nagle).
            if !legacy {
                let _ = socket.set_nodelay(true);
            }
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

/// A faster data plane over s3s-fs: GetObject and PutObject of whole objects
/// with one blocking file read or write (s3s-fs streams files in 4 KiB tokio
/// reads and 8 KiB buffered writes, each a hop to the blocking pool, and hashes
/// every put with MD5); everything else, and any request that uses what this
/// path does not (ranges, conditions, checksums, metadata, Content-MD5), goes to
/// s3s-fs itself. The files are s3s-fs's: the object, its
/// `.bucket-B.object-K.metadata.json` and `.internal.json` (the ETag).
mod fast {
    use bytes::Bytes;
    use futures::StreamExt;
    use s3s::dto::*;
    use s3s::crypto::{Checksum as _, Crc64Nvme};
    use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
    use std::future::Future;
    use std::path::{Path, PathBuf};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Hidden: `1` serves plain s3s-fs (and makes the client compute and check
    /// checksums and sign payloads), the data plane before this one, to measure
    /// against. Read when a server or client is made.
    pub(crate) const ENV_LEGACY: &str = "P2PML_S3_LEGACY_DATA_PLANE";

    pub(crate) fn legacy_data_plane() -> bool {
        std::env::var(ENV_LEGACY).is_ok_and(|v| v == "1")
    }

    /// Objects larger than this stream through s3s-fs instead of being held in memory.
    const MAX_WHOLE: u64 = 256 << 20;

    pub(crate) struct FastFs {
        fs: s3s_fs::FileSystem,
        root: PathBuf,
        tmp: AtomicU64,
    }

    impl std::fmt::Debug for FastFs {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FastFs").field("root", &self.root).finish_non_exhaustive()
        }
    }

    /// A key that maps to `ROOT/BUCKET/KEY` as it is, with nothing to resolve
    /// (s3s-fs resolves `.`, `..` and `//`; those go to it).
    fn plain(bucket: &str, key: &str) -> bool {
        let ok = |c: &str| !c.is_empty() && c != "." && c != ".." && !c.contains('\0');
        ok(bucket) && !bucket.contains('/') && key.split('/').all(ok)
    }

    /// s3s-fs's name for a file about `bucket`/`key`: base64url (no padding) of each.
    fn sidecar(root: &Path, bucket: &str, key: &str, suffix: &str) -> PathBuf {
        root.join(format!(".bucket-{}.object-{}.{suffix}", b64url(bucket.as_bytes()), b64url(key.as_bytes())))
    }

    fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..=c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn hex(data: &[u8]) -> String {
        data.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What a whole-object read found.
    struct Found {
        body: Vec<u8>,
        modified: std::time::SystemTime,
        e_tag: String,
        content_type: Option<String>,
        checksum: Checksum,
    }

    /// The object and its sidecars, when they are of the kinds this path serves;
    /// None: let s3s-fs answer (missing object, no stored ETag, metadata, ...).
    fn read_whole(root: &Path, bucket: &str, key: &str) -> Option<Found> {
        let info: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&std::fs::read(sidecar(root, bucket, key, "internal.json")).ok()?).ok()?;
        let mut checksum = Checksum::default();
        let mut e_tag = None;
        for (k, v) in &info {
            let v = Some(v.as_str()?.to_string());
            match k.as_str() {
                "e_tag" => e_tag = v,
                "checksum_crc32" => checksum.checksum_crc32 = v,
                "checksum_crc32c" => checksum.checksum_crc32c = v,
                "checksum_sha1" => checksum.checksum_sha1 = v,
                "checksum_sha256" => checksum.checksum_sha256 = v,
                "checksum_crc64nvme" => checksum.checksum_crc64nvme = v,
                _ => return None,
            }
        }
        let mut content_type = None;
        match std::fs::read(sidecar(root, bucket, key, "metadata.json")) {
            Ok(attrs) => {
                let attrs: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&attrs).ok()?;
                for (k, v) in attrs {
                    match (k.as_str(), v) {
                        ("content_type", serde_json::Value::String(t)) => content_type = Some(t),
                        _ => return None,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
        let file = std::fs::File::open(root.join(bucket).join(key)).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() > MAX_WHOLE {
            return None;
        }
        let mut body = Vec::with_capacity(meta.len() as usize);
        std::io::Read::read_to_end(&mut (&file), &mut body).ok()?;
        Some(Found { body, modified: meta.modified().ok()?, e_tag: e_tag?, content_type, checksum })
    }

    impl FastFs {
        pub(crate) fn new(fs: s3s_fs::FileSystem, root: PathBuf) -> Self {
            Self { fs, root, tmp: AtomicU64::new(0) }
        }

        /// A temporary file name that s3s-fs's start-up clean-up also removes.
        fn tmp_path(&self) -> PathBuf {
            let n = self.tmp.fetch_add(1, Ordering::Relaxed);
            self.root.join(format!(".tmp.fast-{}-{n}.internal.part", std::process::id()))
        }
    }

    /// Writes `data` to `tmp`, then renames it to `dest` (creating its directory).
    fn write_renamed(tmp: &Path, dest: &Path, data: &[u8]) -> std::io::Result<()> {
        let r = std::fs::write(tmp, data).and_then(|()| {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(tmp, dest)
        });
        if r.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        r
    }

    /// The methods as `#[async_trait]` writes them (it does not see into macros).
    macro_rules! delegate {
        ($($op:ident($input:ty) -> $output:ty;)*) => {$(
            fn $op<'life0, 'async_trait>(
                &'life0 self,
                req: S3Request<$input>,
            ) -> Pin<Box<dyn Future<Output = S3Result<S3Response<$output>>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                self.fs.$op(req)
            }
        )*};
    }

    #[async_trait::async_trait]
    impl S3 for FastFs {
        delegate! {
            create_bucket(CreateBucketInput) -> CreateBucketOutput;
            copy_object(CopyObjectInput) -> CopyObjectOutput;
            delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
            delete_object(DeleteObjectInput) -> DeleteObjectOutput;
            delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
            get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
            head_bucket(HeadBucketInput) -> HeadBucketOutput;
            head_object(HeadObjectInput) -> HeadObjectOutput;
            list_buckets(ListBucketsInput) -> ListBucketsOutput;
            list_objects(ListObjectsInput) -> ListObjectsOutput;
            list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
            create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
            upload_part(UploadPartInput) -> UploadPartOutput;
            upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
            list_parts(ListPartsInput) -> ListPartsOutput;
            complete_multipart_upload(CompleteMultipartUploadInput) -> CompleteMultipartUploadOutput;
            abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
        }

        async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
            let i = &req.input;
            // Conditions, response overrides and checksum mode are s3s-fs's to answer.
            let special = i.range.is_some()
                || i.part_number.is_some()
                || i.version_id.is_some()
                || i.checksum_mode.is_some()
                || i.if_match.is_some()
                || i.if_none_match.is_some()
                || i.if_modified_since.is_some()
                || i.if_unmodified_since.is_some()
                || i.response_cache_control.is_some()
                || i.response_content_disposition.is_some()
                || i.response_content_encoding.is_some()
                || i.response_content_language.is_some()
                || i.response_content_type.is_some()
                || i.response_expires.is_some();
            if special || !plain(&i.bucket, &i.key) {
                return self.fs.get_object(req).await;
            }
            let (root, bucket, key) = (self.root.clone(), i.bucket.clone(), i.key.clone());
            let found = tokio::task::spawn_blocking(move || read_whole(&root, &bucket, &key)).await.map_err(|e| s3_error!(e, InternalError))?;
            let Some(f) = found else { return self.fs.get_object(req).await };
            let len = f.body.len();
            let output = GetObjectOutput {
                body: Some(StreamingBlob::from(s3s::Body::from(Bytes::from(f.body)))),
                content_length: Some(len as i64),
                last_modified: Some(Timestamp::from(f.modified)),
                content_type: f.content_type,
                e_tag: Some(ETag::Strong(f.e_tag)),
                checksum_crc32: f.checksum.checksum_crc32,
                checksum_crc32c: f.checksum.checksum_crc32c,
                checksum_sha1: f.checksum.checksum_sha1,
                checksum_sha256: f.checksum.checksum_sha256,
                checksum_crc64nvme: f.checksum.checksum_crc64nvme,
                ..Default::default()
            };
            Ok(S3Response::new(output))
        }

        async fn put_object(&self, mut req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
            let i = &req.input;
            let whole = i.body.is_some()
                && i.content_length.is_some_and(|n| (0..=MAX_WHOLE as i64).contains(&n))
                && plain(&i.bucket, &i.key)
                && req.trailing_headers.is_none()
                && i.content_md5.is_none()
                && i.checksum_algorithm.is_none()
                && i.checksum_crc32.is_none()
                && i.checksum_crc32c.is_none()
                && i.checksum_crc64nvme.is_none()
                && i.checksum_sha1.is_none()
                && i.checksum_sha256.is_none()
                && i.if_match.is_none()
                && i.if_none_match.is_none()
                && i.metadata.is_none()
                && i.cache_control.is_none()
                && i.content_disposition.is_none()
                && i.content_encoding.is_none()
                && i.content_language.is_none()
                && i.expires.is_none()
                && i.website_redirect_location.is_none()
                && i.storage_class.is_none()
                && self.root.join(&i.bucket).is_dir();
            if !whole {
                return self.fs.put_object(req).await;
            }
            let len = req.input.content_length.unwrap_or_default() as usize;
            let Some(mut body) = req.input.body.take() else { return Err(s3_error!(IncompleteBody)) };
            // The body goes to the file as it arrives (a blocking thread writes
            // what the connection reads), so the copy into the page cache
            // overlaps the transfer instead of following it.
            let tmp = self.tmp_path();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            let file = tmp.clone();
            let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&file)?;
                while let Some(chunk) = rx.blocking_recv() {
                    std::io::Write::write_all(&mut f, &chunk)?;
                }
                Ok(())
            });
            let mut crc = <Crc64Nvme as s3s::crypto::Checksum>::new();
            let (mut n, mut broke) = (0, None);
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        crc.update(&c);
                        n += c.len();
                        if tx.send(c).await.is_err() {
                            break; // The writer failed; its error says why.
                        }
                    }
                    Err(e) => {
                        broke = Some(e.to_string());
                        break;
                    }
                }
            }
            drop(tx);
            let written = writer.await;
            let fail = |e: s3s::S3Error| {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            };
            match written {
                Err(e) => return fail(s3_error!(e, InternalError)),
                Ok(Err(e)) => return fail(s3_error!(e, InternalError)),
                Ok(Ok(())) => {}
            }
            if let Some(e) = broke {
                return fail(s3_error!(IncompleteBody, "the request body broke off: {e}"));
            }
            if n != len {
                return fail(s3_error!(IncompleteBody, "{n} bytes of a body of {len}"));
            }
            // An ETag from a fast hash, not MD5; the "-1" suffix (as of a one-part
            // multipart upload) tells clients not to compare it with an MD5.
            let e_tag = format!("{}-1", hex(&crc.finalize()));
            let (b, k) = (&req.input.bucket, &req.input.key);
            let dest = self.root.join(b).join(k);
            let meta = sidecar(&self.root, b, k, "metadata.json");
            // s3s-fs writes `{}` when there is nothing to say; no file means the same.
            let attrs = req.input.content_type.as_ref().map(|t| serde_json::json!({ "content_type": t }).to_string());
            let attrs = (self.tmp_path(), meta, attrs);
            let info = (self.tmp_path(), sidecar(&self.root, b, k, "internal.json"), serde_json::json!({ "e_tag": e_tag }).to_string());
            let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let placed = match dest.parent() {
                    Some(dir) => std::fs::create_dir_all(dir),
                    None => Ok(()),
                }
                .and_then(|()| std::fs::rename(&tmp, &dest));
                if placed.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                placed?;
                let (attrs_tmp, meta, attrs) = attrs;
                match attrs {
                    Some(a) => write_renamed(&attrs_tmp, &meta, a.as_bytes())?,
                    None => match std::fs::remove_file(&meta) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    },
                }
                write_renamed(&info.0, &info.1, info.2.as_bytes())
            });
            done.await.map_err(|e| s3_error!(e, InternalError))?.map_err(|e| s3_error!(e, InternalError))?;
            Ok(S3Response::new(PutObjectOutput { e_tag: Some(ETag::Strong(e_tag)), ..Default::default() }))
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn base64url_matches_s3s_fs() {
            assert_eq!(super::b64url(b""), "");
            assert_eq!(super::b64url(b"f"), "Zg");
            assert_eq!(super::b64url(b"fo"), "Zm8");
            assert_eq!(super::b64url(b"foo"), "Zm9v");
            assert_eq!(super::b64url(b"run/r1/params?>"), "cnVuL3IxL3BhcmFtcz8-");
        }

        #[test]
        fn only_plain_keys_take_the_fast_path() {
            assert!(super::plain("p2pml", "run/r1/params"));
            for k in ["", "/a", "a/", "a//b", "a/../b", "./a", ".."] {
                assert!(!super::plain("p2pml", k), "{k}");
            }
        }
    }
}
