//! The object store client: S3 over `aws-sdk-s3`, against AWS or any
//! S3-compatible endpoint (`testnet s3` on loopback).
//!
//! Where: [`StoreConfig`], from `P2PML_S3_ENDPOINT` (unset: AWS S3),
//! `P2PML_S3_BUCKET` (default `p2pml`), `AWS_REGION` (default `us-east-1`) and
//! `P2PML_S3_PATH_STYLE` (`1`/`0`; default `1` when an endpoint is set).
//! Who: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally
//! `AWS_SESSION_TOKEN`, the variables AWS Lambda sets for a function; there is
//! no profile or instance-metadata lookup.
//!
//! Waits are bounded: connecting gives up after [`CONNECT_TIMEOUT`], a stalled
//! response after [`READ_TIMEOUT`], and the SDK retries transient failures
//! (connection refused, 5xx, throttling) [`MAX_ATTEMPTS`] times in all with a
//! short backoff, so an unreachable store is reported within seconds.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::time::Duration;

/// Variable naming the store's endpoint URL; unset means AWS S3.
pub const ENV_ENDPOINT: &str = "P2PML_S3_ENDPOINT";
/// Variable naming the bucket.
pub const ENV_BUCKET: &str = "P2PML_S3_BUCKET";
/// Variable naming the region (the one AWS Lambda sets).
pub const ENV_REGION: &str = "AWS_REGION";
/// Variable choosing path-style addressing (`1`) over virtual-hosted style (`0`).
pub const ENV_PATH_STYLE: &str = "P2PML_S3_PATH_STYLE";
/// The bucket when `P2PML_S3_BUCKET` is unset.
pub const DEFAULT_BUCKET: &str = "p2pml";
/// The region when `AWS_REGION` is unset.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Hidden: `1` restores the data plane before the fast one, to measure against:
/// the SDK's default checksums (a CRC32 trailer in aws-chunked uploads, CRC
/// checks of downloads) and signed payloads. `testnet s3` reads it too (plain
/// s3s-fs). Read when a client is made.
const ENV_LEGACY_DATA_PLANE: &str = "P2PML_S3_LEGACY_DATA_PLANE";

fn legacy_data_plane() -> bool {
    std::env::var(ENV_LEGACY_DATA_PLANE).is_ok_and(|v| v == "1")
}

/// Whether uploads may go with `UNSIGNED-PAYLOAD` rather than a SHA-256 of the
/// body in the signature: where TLS protects the body (https, AWS S3) or it
/// never leaves the machine (a loopback endpoint).
fn payload_signing_optional(endpoint: Option<&str>) -> bool {
    let Some(e) = endpoint else { return true };
    if e.starts_with("https://") {
        return true;
    }
    let host = e.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// How long connecting to the store may take, per attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a response may go without a byte, per attempt.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The cap on one operation, retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);
/// The most a GET reserves up front from the announced Content-Length.
const MAX_PREALLOC: usize = 256 << 20;
/// Attempts per operation, the first included.
pub const MAX_ATTEMPTS: u32 = 3;

/// Where the objects live.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreConfig {
    /// An S3-compatible endpoint URL (`http://127.0.0.1:9000`); `None` is AWS S3.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`) rather than `BUCKET.ENDPOINT/KEY`.
    pub path_style: bool,
}

impl StoreConfig {
    /// From `P2PML_S3_ENDPOINT` (optional), `P2PML_S3_BUCKET` (default "p2pml"),
    /// `AWS_REGION` (default "us-east-1"), `P2PML_S3_PATH_STYLE` ("1"/"0";
    /// default: true when an endpoint is set).
    pub fn from_env() -> Result<Self, StoreError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`StoreConfig::from_env`], with the variables read through `var`
    /// (an empty value counts as unset).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let var = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint = var(ENV_ENDPOINT).map(|e| check_endpoint(&format!("{ENV_ENDPOINT}={e}"), &e)).transpose()?;
        let bucket = var(ENV_BUCKET).unwrap_or_else(|| DEFAULT_BUCKET.to_string());
        check_bucket_name(&bucket)?;
        let region = var(ENV_REGION).unwrap_or_else(|| DEFAULT_REGION.to_string());
        let path_style = match var(ENV_PATH_STYLE).as_deref() {
            None => endpoint.is_some(),
            Some("1") | Some("true") => true,
            Some("0") | Some("false") => false,
            Some(other) => return Err(StoreError::Config(format!("{ENV_PATH_STYLE}={other}: expected 1 or 0"))),
        };
        Ok(Self { endpoint, bucket, region, path_style })
    }

    /// The variables that describe this store; `None`: remove the variable.
    fn env_vars(&self) -> [(&'static str, Option<String>); 4] {
        [
            (ENV_ENDPOINT, self.endpoint.clone()),
            (ENV_BUCKET, Some(self.bucket.clone())),
            (ENV_REGION, Some(self.region.clone())),
            (ENV_PATH_STYLE, Some(if self.path_style { "1" } else { "0" }.to_string())),
        ]
    }

    /// Sets (or removes) those variables on a child process, so that a spawned
    /// function sees the same store. Credentials are inherited as usual.
    pub fn apply_env(&self, cmd: &mut std::process::Command) {
        for (name, value) in self.env_vars() {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
    }

    /// [`StoreConfig::apply_env`] for a tokio command.
    pub fn apply_env_tokio(&self, cmd: &mut tokio::process::Command) {
        self.apply_env(cmd.as_std_mut());
    }

    /// The endpoint as errors name it: the configured URL, or AWS S3's regional one.
    pub fn endpoint_display(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", self.region))
    }
}

/// An endpoint URL as a client needs it (`http://HOST:PORT` or `https://HOST`,
/// no trailing `/`); `setting` names where it came from in the error, e.g.
/// `--s3-endpoint 127.0.0.1:9000` or `P2PML_S3_ENDPOINT=…`.
pub fn check_endpoint(setting: &str, e: &str) -> Result<String, StoreError> {
    let e = e.trim();
    let host = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://")).map(|h| h.trim_end_matches('/'));
    match host {
        Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) => Ok(e.trim_end_matches('/').to_string()),
        _ => Err(StoreError::Config(format!("{setting} is not a URL: expected http://HOST:PORT or https://HOST"))),
    }
}

/// S3's bucket naming rules, so that a typo fails here with one line and not as
/// a signature or endpoint error later.
pub fn check_bucket_name(b: &str) -> Result<(), StoreError> {
    let ok_chars = b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let ok_ends = b.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric()) && b.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if (3..=63).contains(&b.len()) && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "{ENV_BUCKET}={b} is not a valid bucket name: 3-63 characters, lowercase letters, digits, '-' and '.'"
        )))
    }
}

/// S3's limits on a key: 1 to 1024 bytes.
fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(StoreError::Config(format!("object key of {} bytes: S3 keys are 1 to 1024 bytes", key.len())));
    }
    Ok(())
}

/// What went wrong with the store; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object s3://{bucket}/{key} not found")]
    NotFound { bucket: String, key: String },
    /// `setting`: what named the endpoint, and whose it is ("--s3-endpoint /
    /// P2PML_S3_ENDPOINT of this node", "P2PML_S3_ENDPOINT of the function").
    #[error("object store at {endpoint} unreachable: {message} — is the store running, and is {setting} right?")]
    Unreachable { endpoint: String, message: String, setting: String },
    /// `key` is `BUCKET/KEY` (or the bucket, or `BUCKET/PREFIX*`) the operation was about.
    #[error("object store {op} s3://{key} failed: {message}")]
    Service { op: &'static str, key: String, message: String },
    #[error("object store configuration: {0}")]
    Config(String),
}

/// A client of one bucket. Cheap to clone (the SDK client is shared).
#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    region: String,
    endpoint: String,
    /// What named the endpoint and the bucket, for errors (see [`ObjectStore::named_by`]).
    endpoint_setting: String,
    bucket_setting: String,
    /// Uploads without a SHA-256 of the body (see [`payload_signing_optional`]).
    unsigned_payload: bool,
}

/// (access key id, secret, session token) from `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` read through `var` (empty
/// values count as unset); None without a key id and secret.
pub fn credentials_from(var: impl Fn(&str) -> Option<String>) -> Option<(String, String, Option<String>)> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    Some((var("AWS_ACCESS_KEY_ID")?, var("AWS_SECRET_ACCESS_KEY")?, var("AWS_SESSION_TOKEN")))
}

/// The HTTP client of every AWS SDK client here: one client for http:// and
/// https:// endpoints; rustls on ring, web PKI roots from the system's store.
pub fn sdk_http_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https()
}

impl ObjectStore {
    /// A client with the credentials of `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and (optionally) `AWS_SESSION_TOKEN`.
    pub fn new(cfg: &StoreConfig) -> Result<Self, StoreError> {
        Self::from_lookup(cfg, |name| std::env::var(name).ok())
    }

    /// [`ObjectStore::new`] with the variables read through `var`.
    fn from_lookup(cfg: &StoreConfig, var: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let Some((id, secret, token)) = credentials_from(var) else {
            return Err(StoreError::Config(format!(
                "no credentials for the object store at {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)",
                cfg.endpoint_display()
            )));
        };
        Self::with_credentials(cfg, &id, &secret, token.as_deref())
    }

    /// A client with the given credentials.
    pub fn with_credentials(cfg: &StoreConfig, access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Result<Self, StoreError> {
        check_bucket_name(&cfg.bucket)?;
        let creds = Credentials::new(access_key_id, secret_access_key, session_token.map(String::from), None, "p2pml-env");
        let http = sdk_http_client();
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .credentials_provider(creds)
            .http_client(http)
            .force_path_style(cfg.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(2)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(e) = &cfg.endpoint {
            b = b.endpoint_url(e);
        }
        let legacy = legacy_data_plane();
        if !legacy {
            // No CRC32 of every upload (sent as an aws-chunked trailer) and of
            // every download: TCP and TLS already guard the bytes, and the CRCs
            // cost as much as moving them on loopback.
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            region: cfg.region.clone(),
            endpoint: cfg.endpoint_display(),
            endpoint_setting: ENV_ENDPOINT.to_string(),
            bucket_setting: ENV_BUCKET.to_string(),
            unsigned_payload: !legacy && payload_signing_optional(cfg.endpoint.as_deref()),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Names the settings behind the endpoint and the bucket in this client's
    /// errors, with whose they are: the node's flags, or the function's variables.
    pub fn named_by(mut self, endpoint_setting: &str, bucket_setting: &str) -> Self {
        self.endpoint_setting = endpoint_setting.to_string();
        self.bucket_setting = bucket_setting.to_string();
        self
    }

    /// The endpoint as errors name it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Fails unless the bucket exists and these credentials may use it; one
    /// line naming the bucket's setting and how to create it.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Err(StoreError::Service {
                op: "head-bucket",
                key: self.bucket.clone(),
                message: format!("NoSuchBucket: bucket {} does not exist ({}){}", self.bucket, self.bucket_setting, self.no_bucket_hint()),
            }),
            Err(e) => Err(self.error("head-bucket", String::new(), e)),
        }
    }

    /// Creates the bucket unless it exists.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(self.error("head-bucket", String::new(), e)),
        }
        let mut req = self.client.create_bucket().bucket(&self.bucket);
        // us-east-1 is S3's default location and must not be named.
        if self.region != DEFAULT_REGION {
            let loc = BucketLocationConstraint::from(self.region.as_str());
            req = req.create_bucket_configuration(CreateBucketConfiguration::builder().location_constraint(loc).build());
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you()) => Ok(()),
            // Another process created it between our two requests, or (on AWS)
            // another account owns the name: only the first is fine.
            Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_exists()) => {
                match self.client.head_bucket().bucket(&self.bucket).send().await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(StoreError::Service {
                        op: "create-bucket",
                        key: self.bucket.clone(),
                        message: format!("the name is taken by another account: choose another {ENV_BUCKET}"),
                    }),
                }
            }
            Err(e) => Err(self.error("create-bucket", String::new(), e)),
        }
    }

    /// Writes `bytes` to `key`, replacing what was there.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        check_key(key)?;
        let req = self.client.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(bytes));
        let sent = if self.unsigned_payload { req.customize().disable_payload_signing().send().await } else { req.send().await };
        sent.map(drop).map_err(|e| self.error("put", key.to_string(), e))
    }

    /// The bytes of `key`; [`StoreError::NotFound`] when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if status(&e) == Some(404) && !is_no_such_bucket(&e) => {
                self.require_bucket("get", key).await?;
                return Err(StoreError::NotFound { bucket: self.bucket.clone(), key: key.to_string() });
            }
            Err(e) => return Err(self.error("get", key.to_string(), e)),
        };
        // Into one buffer of the announced size as the chunks come: no doubling,
        // no second copy.
        // (The announced size is the server's word: capped, the buffer grows past it.)
        let cap = out.content_length().and_then(|n| usize::try_from(n).ok()).unwrap_or_default().min(MAX_PREALLOC);
        let mut bytes = Vec::with_capacity(cap);
        let mut body = out.body;
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) => return Ok(bytes),
                Err(e) => {
                    return Err(StoreError::Service {
                        op: "get",
                        key: format!("{}/{key}", self.bucket),
                        message: format!("the response broke off: {}", root_cause(&e)),
                    })
                }
            }
        }
    }

    /// Whether `key` exists, in one HEAD request (a missing bucket reads as a
    /// missing key: for polling, after the bucket was checked).
    pub async fn head(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(self.error("exists", key.to_string(), e)),
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => self.require_bucket("exists", key).await.map(|()| false),
            Err(e) => Err(self.error("exists", key.to_string(), e)),
        }
    }

    /// Deletes every object whose key starts with `prefix`; returns how many.
    /// An empty prefix is refused (it would empty the bucket).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StoreError> {
        if prefix.is_empty() {
            return Err(StoreError::Config(format!("delete_prefix needs a prefix: \"\" would empty bucket {}", self.bucket)));
        }
        let keys = self.list_keys(prefix).await?;
        self.delete_keys(&keys).await
    }

    /// The keys that start with `prefix`, in the store's order (all pages).
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("list", format!("{prefix}*"), e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_string));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes `keys` (a missing key is no error); returns how many were asked.
    pub async fn delete_keys(&self, keys: &[String]) -> Result<usize, StoreError> {
        for chunk in keys.chunks(1000) {
            let ids = chunk.iter().filter_map(|k| ObjectIdentifier::builder().key(k).build().ok()).collect();
            match self.delete_batch(ids, &chunk[0]).await {
                Ok(()) => {}
                // A store that refuses DeleteObjects (some want Content-MD5 rather
                // than the SDK's CRC32, some lack it): one DeleteObject per key.
                Err(StoreError::Service { op: "delete", .. }) => {
                    for k in chunk {
                        self.client.delete_object().bucket(&self.bucket).key(k).send().await.map_err(|e| self.error("delete", k.clone(), e))?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(keys.len())
    }

    /// One DeleteObjects request (at most 1000 keys); `what` names them in errors.
    async fn delete_batch(&self, ids: Vec<ObjectIdentifier>, what: &str) -> Result<(), StoreError> {
        let delete = Delete::builder().set_objects(Some(ids)).quiet(true).build().map_err(|e| StoreError::Service {
            op: "delete",
            key: format!("{}/{what}", self.bucket),
            message: e.to_string(),
        })?;
        let out = self.client.delete_objects().bucket(&self.bucket).delete(delete).send().await.map_err(|e| self.error("delete", what.to_string(), e))?;
        match out.errors().first() {
            Some(err) => Err(StoreError::Service {
                op: "delete",
                key: format!("{}/{}", self.bucket, err.key().unwrap_or_default()),
                message: format!("{}: {} ({} of this batch failed)", err.code().unwrap_or("error"), err.message().unwrap_or(""), out.errors().len()),
            }),
            None => Ok(()),
        }
    }

    /// After a 404 about `key`: whether the bucket is there (HEAD responses have
    /// no body, and some stores answer NoSuchKey for a missing bucket too). A
    /// refused HEAD (a role without s3:ListBucket) leaves the object's 404 standing.
    async fn require_bucket(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Err(e) if status(&e) == Some(404) => Err(StoreError::Service {
                op,
                key: format!("{}/{key}", self.bucket),
                message: format!("NoSuchBucket: bucket {} does not exist{}", self.bucket, self.no_bucket_hint()),
            }),
            Err(e) if status(&e).is_none() => Err(self.error(op, key.to_string(), e)),
            _ => Ok(()),
        }
    }

    /// How a user of each kind of store creates the bucket.
    fn no_bucket_hint(&self) -> String {
        let b = &self.bucket;
        format!(
            ": create it (AWS: `aws s3 mb s3://{b}`; MinIO: `mc mb ALIAS/{b}`; Garage: `garage bucket create {b}`; \
             `testnet s3 --bucket {b}`), or correct {}",
            self.bucket_setting
        )
    }

    /// One line for a failed request about `key` (empty: the bucket itself).
    fn error<E: ProvideErrorMetadata + std::error::Error + 'static>(&self, op: &'static str, key: String, e: SdkError<E, HttpResponse>) -> StoreError {
        let key = if key.is_empty() { self.bucket.clone() } else { format!("{}/{key}", self.bucket) };
        let message = match &e {
            SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
                return StoreError::Unreachable { endpoint: self.endpoint.clone(), message: root_cause(&e), setting: self.endpoint_setting.clone() };
            }
            SdkError::TimeoutError(_) => {
                return StoreError::Unreachable { endpoint: self.endpoint.clone(), message: "timed out".into(), setting: self.endpoint_setting.clone() };
            }
            SdkError::ServiceError(s) => {
                let err = s.err();
                let code = err.code().map(str::to_string).unwrap_or_else(|| format!("HTTP {}", s.raw().status().as_u16()));
                let hint = match code.as_str() {
                    "NoSuchBucket" => self.no_bucket_hint(),
                    "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "NotSignedUp" => " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)".to_string(),
                    "AccessDenied" | "HTTP 403" => " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their S3 permissions)".to_string(),
                    _ => String::new(),
                };
                match err.message() {
                    Some(m) if !m.is_empty() => format!("{code}: {m}{hint}"),
                    _ => format!("{code}{hint}"),
                }
            }
            _ => root_cause(&e),
        };
        StoreError::Service { op, key, message }
    }
}

/// The HTTP status of a failed request, when a response came back.
fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn is_no_such_bucket<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    e.code() == Some("NoSuchBucket")
}

/// The innermost cause of an error, on one line ("connection refused").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let text = cur.to_string();
    let line = text.lines().next().unwrap_or_default();
    // "Connection refused (os error 111)" -> "connection refused"
    let line = line.split(" (os error").next().unwrap_or(line);
    let mut chars = line.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<StoreConfig, StoreError> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        StoreConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_are_aws_s3_in_us_east_1() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c, StoreConfig { endpoint: None, bucket: "p2pml".into(), region: "us-east-1".into(), path_style: false });
        assert_eq!(c.endpoint_display(), "https://s3.us-east-1.amazonaws.com");
    }

    #[test]
    fn an_endpoint_means_path_style_unless_told_otherwise() {
        let c = cfg(&[("P2PML_S3_ENDPOINT", "http://127.0.0.1:9000/"), ("P2PML_S3_BUCKET", "runs"), ("AWS_REGION", "eu-west-1")]).unwrap();
        assert_eq!(c, StoreConfig { endpoint: Some("http://127.0.0.1:9000".into()), bucket: "runs".into(), region: "eu-west-1".into(), path_style: true });
        let c = cfg(&[("P2PML_S3_ENDPOINT", "https://minio.example"), ("P2PML_S3_PATH_STYLE", "0")]).unwrap();
        assert!(!c.path_style);
        assert!(cfg(&[("P2PML_S3_PATH_STYLE", "1")]).unwrap().path_style);
        // Empty values count as unset.
        assert_eq!(cfg(&[("P2PML_S3_ENDPOINT", ""), ("P2PML_S3_BUCKET", " ")]).unwrap(), cfg(&[]).unwrap());
    }

    #[test]
    fn bad_values_are_one_line_naming_the_variable() {
        for (vars, needle) in [
            (vec![("P2PML_S3_PATH_STYLE", "yes")], "P2PML_S3_PATH_STYLE=yes"),
            (vec![("P2PML_S3_ENDPOINT", "127.0.0.1:9000")], "P2PML_S3_ENDPOINT=127.0.0.1:9000"),
            (vec![("P2PML_S3_ENDPOINT", "http://")], "P2PML_S3_ENDPOINT=http://"),
            (vec![("P2PML_S3_BUCKET", "My_Bucket")], "P2PML_S3_BUCKET=My_Bucket"),
            (vec![("P2PML_S3_BUCKET", "ab")], "P2PML_S3_BUCKET=ab"),
        ] {
            let e = cfg(&vars).unwrap_err();
            assert!(matches!(e, StoreError::Config(_)), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(needle) && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn apply_env_sets_and_removes_the_variables() {
        let c = StoreConfig { endpoint: None, bucket: "b-1".into(), region: "us-west-2".into(), path_style: false };
        let mut cmd = std::process::Command::new("true");
        cmd.env(ENV_ENDPOINT, "http://stale:1");
        c.apply_env(&mut cmd);
        let envs: HashMap<String, Option<String>> =
            cmd.get_envs().map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned()))).collect();
        assert_eq!(envs[ENV_ENDPOINT], None);
        assert_eq!(envs[ENV_BUCKET].as_deref(), Some("b-1"));
        assert_eq!(envs[ENV_REGION].as_deref(), Some("us-west-2"));
        assert_eq!(envs[ENV_PATH_STYLE].as_deref(), Some("0"));
        // What the child reads back is the same store.
        let back = StoreConfig::from_lookup(|k| envs.get(k).cloned().flatten()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn missing_credentials_name_the_variables() {
        let c = cfg(&[("P2PML_S3_ENDPOINT", "http://127.0.0.1:9000")]).unwrap();
        let only_id = |k: &str| (k == "AWS_ACCESS_KEY_ID").then(|| "id".to_string());
        let e = ObjectStore::from_lookup(&c, only_id).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Config(_)), "{e:?}");
        assert!(msg.contains("AWS_ACCESS_KEY_ID") && msg.contains("AWS_SECRET_ACCESS_KEY") && msg.contains("http://127.0.0.1:9000"), "{msg}");
        let both = |k: &str| matches!(k, "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY").then(|| "x".to_string());
        assert_eq!(ObjectStore::from_lookup(&c, both).unwrap().bucket(), "p2pml");
    }

    #[test]
    fn payloads_go_unsigned_only_over_tls_or_loopback() {
        for e in [None, Some("https://minio.example"), Some("http://127.0.0.1:9000"), Some("http://localhost:9000/"), Some("http://[::1]:9000")] {
            assert!(payload_signing_optional(e), "{e:?}");
        }
        for e in ["http://10.0.0.5:9000", "http://minio.example", "http://127.0.0.1.example:80"] {
            assert!(!payload_signing_optional(Some(e)), "{e}");
        }
    }

    #[test]
    fn errors_display_as_one_line() {
        let e = StoreError::NotFound { bucket: "p2pml".into(), key: "run/x".into() };
        assert_eq!(e.to_string(), "object s3://p2pml/run/x not found");
        let e = StoreError::Unreachable { endpoint: "http://127.0.0.1:9".into(), message: "connection refused".into(), setting: ENV_ENDPOINT.into() };
        assert_eq!(e.to_string(), "object store at http://127.0.0.1:9 unreachable: connection refused — is the store running, and is P2PML_S3_ENDPOINT right?");
        let io = std::io::Error::other("Connection refused (os error 111)");
        assert_eq!(root_cause(&io), "connection refused");
    }
}
