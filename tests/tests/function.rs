//! End-to-end: the function tier over real protocols. A real `testnet s3`
//! process (S3), a real `lambda-grad host` process (Lambda's Invoke API) running
//! real `lambda-grad` runtime processes (Lambda's Runtime API), invoked through
//! aws-sdk-lambda.

use aws_sdk_lambda::primitives::Blob;
use aws_smithy_http_client::tls;
use p2pml_lambda_grad::data::{self, Split};
use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig};
use p2pml_lambda_grad::{Model, ModelSpec, TensorData};
use p2pml_proto::task::{
    decode_grad_output, encode_batch, BatchObject, Fault, GradOutput, GradTask, ReduceTask, Task, TaskResult,
};
use p2pml_proto::{encode_f32, DatasetKind, ModelKind, Normalization};
use p2pml_tests::{bin, fashion_mnist, wait_for};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BUCKET: &str = "p2pml-test";
const REGION: &str = "us-east-1";
const FUNCTION: &str = "p2pml-grad";
const ACCESS_KEY: &str = "test";
const SECRET_KEY: &str = "test-secret";
const SEED: u64 = 7;
const BATCH: usize = 16;

/// A child process killed (and reaped) when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    /// SIGTERM (a host stops its environments), then SIGKILL after 5 s.
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).stderr(Stdio::null()).status();
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The URL a server wrote to `file` (waits for it, bounded).
fn read_addr(file: &Path, what: &str, child: &mut Child) -> String {
    wait_for(what, Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        file.exists()
    });
    std::fs::read_to_string(file).unwrap().trim().to_string()
}

/// Object store settings of the test store at `endpoint`, as environment variables.
fn store_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("P2PML_S3_ENDPOINT", endpoint.to_string()),
        ("P2PML_S3_BUCKET", BUCKET.to_string()),
        ("P2PML_S3_PATH_STYLE", "true".to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
    ]
}

/// The S3 server and the function host, both real processes.
struct Tier {
    host: Proc,
    _s3: p2pml_tests::S3Proc,
    _dir: tempfile::TempDir,
    s3_url: String,
    host_url: String,
}

/// A real `testnet s3` serving [`BUCKET`] under `dir`: the process and its URL.
fn start_s3(dir: &Path) -> (p2pml_tests::S3Proc, String) {
    let s3 = p2pml_tests::start_s3(&dir.join("s3"), BUCKET, ACCESS_KEY, SECRET_KEY);
    let url = s3.endpoint.clone();
    (s3, url)
}

/// `lambda-grad host` with the test store's settings (not yet started).
fn host_command(s3_url: &str, host_args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("lambda-grad"));
    cmd.args(["host", "--listen", "127.0.0.1:0", "--function-name", FUNCTION])
        .args(host_args)
        .envs(store_env(s3_url))
        .env("P2PML_TORCH_THREADS", "1")
        .stdout(Stdio::null());
    cmd
}

impl Tier {
    fn start(host_args: &[&str]) -> Tier {
        Self::start_logging(host_args, None)
    }

    /// As [`Tier::start`]; the host's stderr (and so its environments') goes to `stderr` if given.
    fn start_logging(host_args: &[&str], stderr: Option<&Path>) -> Tier {
        let dir = tempfile::tempdir().unwrap();
        let (s3, s3_url) = start_s3(dir.path());
        let host_file = dir.path().join("host.addr");
        let mut cmd = host_command(&s3_url, host_args);
        cmd.arg("--addr-file").arg(&host_file);
        if let Some(f) = stderr {
            cmd.stderr(std::fs::File::create(f).unwrap());
        }
        let mut host = Proc(cmd.spawn().expect("start lambda-grad host"));
        let host_url = read_addr(&host_file, "lambda-grad host", &mut host.0);
        Tier { host, _s3: s3, _dir: dir, s3_url, host_url }
    }

    fn store(&self) -> ObjectStore {
        let cfg = StoreConfig {
            endpoint: Some(self.s3_url.clone()),
            bucket: BUCKET.into(),
            region: REGION.into(),
            path_style: true,
        };
        ObjectStore::with_credentials(&cfg, ACCESS_KEY, SECRET_KEY, None).unwrap()
    }

    fn lambda(&self) -> aws_sdk_lambda::Client {
        let creds = aws_sdk_lambda::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let cfg = aws_sdk_lambda::Config::builder()
            .behavior_version(aws_sdk_lambda::config::BehaviorVersion::latest())
            .endpoint_url(&self.host_url)
            .region(aws_sdk_lambda::config::Region::new(REGION))
            .credentials_provider(creds)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
                    .build_https(),
            )
            .build();
        aws_sdk_lambda::Client::from_conf(cfg)
    }

    /// `GET /p2pml/stats` over a plain socket.
    fn stats(&self) -> Value {
        let addr = self.host_url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /p2pml/stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").map(|p| p.1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("stats {text:?}: {e}"))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What an invocation returned: the result, or the function error's payload.
#[derive(Debug)]
enum Invoked {
    Ok(TaskResult),
    FunctionError(Value),
}

impl Invoked {
    fn ok(self) -> TaskResult {
        match self {
            Invoked::Ok(r) => r,
            Invoked::FunctionError(e) => panic!("function error: {e}"),
        }
    }
    fn error(self) -> Value {
        match self {
            Invoked::Ok(r) => panic!("expected a function error, got {r:?}"),
            Invoked::FunctionError(e) => e,
        }
    }
}

async fn invoke_json(client: &aws_sdk_lambda::Client, event: &Value) -> Invoked {
    let out = client
        .invoke()
        .function_name(FUNCTION)
        .payload(Blob::new(serde_json::to_vec(event).unwrap()))
        .send()
        .await
        .expect("invoke");
    assert_eq!(out.status_code(), 200);
    assert_eq!(out.executed_version(), Some("$LATEST"));
    let payload: Value = serde_json::from_slice(out.payload().expect("payload").as_ref()).unwrap();
    match out.function_error() {
        None => Invoked::Ok(serde_json::from_value(payload).unwrap()),
        Some(kind) => {
            assert_eq!(kind, "Unhandled");
            assert!(payload["errorType"].is_string(), "{payload}");
            Invoked::FunctionError(payload)
        }
    }
}

async fn invoke(client: &aws_sdk_lambda::Client, task: &Task) -> Invoked {
    invoke_json(client, &serde_json::to_value(task).unwrap()).await
}

/// Fashion-MNIST test samples as `n` batches of [`BATCH`].
fn batches(n: usize) -> Vec<BatchObject> {
    let ds = data::load(DatasetKind::FashionMnist, Some(&fashion_mnist())).unwrap();
    let sample = 28 * 28;
    (0..n)
        .map(|i| {
            let r = i * BATCH..(i + 1) * BATCH;
            BatchObject {
                shape: [1, 28, 28],
                images: ds.test.images[r.start * sample..r.end * sample].to_vec(),
                labels: ds.test.labels[r].to_vec(),
            }
        })
        .collect()
}

/// The parameters the tests use, and their digest.
fn model() -> Model {
    let spec = ModelSpec::for_dataset(ModelKind::Cnn, DatasetKind::FashionMnist);
    Model::new(spec, tch::Device::Cpu, SEED).unwrap()
}

/// The gradient the function must compute, computed here.
fn reference(batches: &[BatchObject], dropout_seed: u64) -> GradOutput {
    p2pml_lambda_grad::set_torch_threads(1);
    let mut m = model();
    tch::manual_seed(dropout_seed as i64);
    let mut out = GradOutput { samples: 0, loss_sum: 0.0, grad: vec![0.0; m.numel()] };
    for b in batches {
        let split = Split { images: b.images.clone(), labels: b.labels.clone(), shape: [1, 28, 28] };
        let d = TensorData::new(&split, DatasetKind::FashionMnist, Normalization::MeanStd, tch::Device::Cpu);
        let g = m.batch_gradient(&d.x, &d.y);
        out.samples += g.samples as u64;
        out.loss_sum += g.loss_sum;
        let g: Vec<f32> = Vec::try_from(&g.grad).unwrap();
        out.grad.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    }
    out
}

/// A run's objects in the store: parameters and batches. Returns a task template.
async fn upload(store: &ObjectStore, run: &str, batches: &[BatchObject]) -> GradTask {
    store.ensure_bucket().await.unwrap();
    let m = model();
    let digest = format!("d{SEED}");
    let params_key = p2pml_proto::task::params_key(run, &digest);
    store.put(&params_key, encode_f32(&m.params_vec()).unwrap()).await.unwrap();
    let mut batch_keys = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let key = p2pml_proto::task::batch_key(run, "peer0", 0, i);
        store.put(&key, encode_batch(b)).await.unwrap();
        batch_keys.push(key);
    }
    GradTask {
        run: run.into(),
        peer: "peer0".into(),
        round: 0,
        model: ModelKind::Cnn,
        dataset: DatasetKind::FashionMnist,
        normalization: Normalization::MeanStd,
        seed: SEED,
        dropout_seed: 11,
        numel: m.numel(),
        params_key,
        params_digest: digest,
        batch_keys,
        output_key: p2pml_proto::task::output_key(run, "peer0", 0, "t0"),
        bucket: Some(store.bucket().to_string()),
        fault: None,
    }
}

fn with(t: &GradTask, f: impl FnOnce(&mut GradTask)) -> Task {
    let mut t = t.clone();
    f(&mut t);
    Task::Grad(t)
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

#[test]
fn gradients_match_in_process_stay_warm_and_reduce() {
    let tier = Tier::start(&["--concurrency", "1", "--timeout-s", "60"]);
    let data = batches(2);
    rt().block_on(async {
        let store = tier.store();
        let lambda = tier.lambda();
        let task = upload(&store, "run-a", &data).await;
        let numel = task.numel;

        // Cold: the function computes what this process computes.
        let r = invoke(&lambda, &Task::Grad(task.clone())).await.ok();
        assert!(!r.params_cached);
        assert_eq!(r.output_key, task.output_key);
        let out = decode_grad_output(&store.get(&task.output_key).await.unwrap(), numel).unwrap();
        let want = reference(&data, task.dropout_seed);
        assert_eq!(out.samples, 2 * BATCH as u64);
        assert_eq!(r.samples, out.samples);
        assert!((out.loss_sum - want.loss_sum).abs() <= 1e-5 * want.loss_sum.abs(), "{} vs {}", out.loss_sum, want.loss_sum);
        assert_eq!(r.loss_sum, out.loss_sum);
        let err = relative_error(&out.grad, &want.grad);
        assert!(err < 1e-5, "gradient differs from the in-process one: relative error {err}");
        assert!(r.bytes_in as usize > numel * 4 && r.bytes_out as usize >= numel * 4, "{r:?}");
        let s = tier.stats();
        assert_eq!((s["invocations"].as_u64(), s["cold_starts"].as_u64(), s["environments"].as_u64()), (Some(1), Some(1), Some(1)));

        // Warm: same environment, parameters from its cache, same gradient (same dropout seed).
        let r2 = invoke(&lambda, &Task::Grad(task.clone())).await.ok();
        assert!(r2.params_cached, "{r2:?}");
        assert!(r2.bytes_in < r.bytes_in);
        let again = decode_grad_output(&store.get(&task.output_key).await.unwrap(), numel).unwrap();
        assert_eq!(again, out);
        let s = tier.stats();
        assert_eq!((s["invocations"].as_u64(), s["cold_starts"].as_u64()), (Some(2), Some(1)));
        assert_eq!(s["errors"].as_u64(), Some(0));
        assert!(s["billed_ms"].as_u64().unwrap() > 0 && s["gb_seconds"].as_f64().unwrap() > 0.0, "{s}");
        assert_eq!(s["memory_mb"].as_u64(), Some(1769));

        // Reduce: one task per batch, then their sum in one object.
        let mut parts = Vec::new();
        for (i, key) in task.batch_keys.iter().enumerate() {
            let output_key = p2pml_proto::task::output_key("run-a", "peer0", 1, &format!("t{i}"));
            let t = with(&task, |t| {
                t.batch_keys = vec![key.clone()];
                t.output_key = output_key.clone();
            });
            invoke(&lambda, &t).await.ok();
            let part = decode_grad_output(&store.get(&output_key).await.unwrap(), numel).unwrap();
            assert_eq!(part.samples, BATCH as u64);
            parts.push(part);
        }
        let reduce = Task::Reduce(ReduceTask {
            run: "run-a".into(),
            peer: "peer0".into(),
            round: 1,
            numel,
            input_keys: (0..2).map(|i| p2pml_proto::task::output_key("run-a", "peer0", 1, &format!("t{i}"))).collect(),
            output_key: p2pml_proto::task::output_key("run-a", "peer0", 1, "sum"),
            bucket: None,
        });
        let r = invoke(&lambda, &reduce).await.ok();
        let sum = decode_grad_output(&store.get(&r.output_key).await.unwrap(), numel).unwrap();
        assert_eq!(sum.samples, parts[0].samples + parts[1].samples);
        assert_eq!(sum.loss_sum, parts[0].loss_sum + parts[1].loss_sum);
        let expected: Vec<f32> = parts[0].grad.iter().zip(&parts[1].grad).map(|(a, b)| a + b).collect();
        assert_eq!(sum.grad, expected);
        assert_eq!(tier.stats()["cold_starts"].as_u64(), Some(1));
    });
}

#[test]
fn faults_become_function_errors_and_the_host_recovers() {
    let tier = Tier::start(&["--concurrency", "1", "--timeout-s", "4"]);
    let data = batches(1);
    rt().block_on(async {
        let store = tier.store();
        let lambda = tier.lambda();
        let task = upload(&store, "run-b", &data).await;
        invoke(&lambda, &Task::Grad(task.clone())).await.ok();

        // A panic is a function error; the environment survives it, warm.
        let e = invoke(&lambda, &with(&task, |t| t.fault = Some(Fault::Panic))).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains("injected fault: panic"), "{e}");
        let r = invoke(&lambda, &Task::Grad(task.clone())).await.ok();
        assert!(r.params_cached);
        let e = invoke(&lambda, &with(&task, |t| t.fault = Some(Fault::Error))).await.error();
        assert_eq!(e["errorType"], "p2pml.InjectedFault");
        let s = tier.stats();
        assert_eq!((s["cold_starts"].as_u64(), s["errors"].as_u64(), s["invocations"].as_u64()), (Some(1), Some(2), Some(4)));

        // Bad events and bad inputs are function errors naming what is wrong.
        let mut ev = serde_json::to_value(Task::Grad(task.clone())).unwrap();
        ev.as_object_mut().unwrap().remove("output_key");
        let e = invoke_json(&lambda, &ev).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains("output_key"), "{e}");
        assert_eq!(e["errorType"], "p2pml.BadEvent");
        let mut ev = serde_json::to_value(Task::Grad(task.clone())).unwrap();
        ev["model"] = "lenet".into();
        let e = invoke_json(&lambda, &ev).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains("lenet"), "{e}");
        let missing = "run-b/data/peer0/e0/b99";
        let e = invoke(&lambda, &with(&task, |t| t.batch_keys.push(missing.into()))).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains(missing), "{e}");
        assert_eq!(e["errorType"], "p2pml.NotFound");
        let e = invoke(&lambda, &with(&task, |t| t.numel += 1)).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains("numel"), "{e}");
        assert_eq!(tier.stats()["cold_starts"].as_u64(), Some(1));

        // Past the timeout: Lambda's timeout error, the environment is replaced.
        let e = invoke(&lambda, &with(&task, |t| t.fault = Some(Fault::SleepMs(6000)))).await.error();
        assert!(e["errorMessage"].as_str().unwrap().contains("Task timed out after 4.00 seconds"), "{e}");
        let r = invoke(&lambda, &Task::Grad(task.clone())).await.ok();
        assert!(!r.params_cached, "a new environment has no cache");
        let s = tier.stats();
        assert_eq!((s["timeouts"].as_u64(), s["cold_starts"].as_u64(), s["environments"].as_u64()), (Some(1), Some(2), Some(1)));

        // An unknown function is Lambda's ResourceNotFoundException.
        let err = lambda.invoke().function_name("nope").send().await.unwrap_err();
        let service = err.into_service_error();
        assert!(service.is_resource_not_found_exception(), "{service:?}");
    });
}

/// PIDs of the processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|r| r.1.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn sigterm_stops_the_host_and_its_environments() {
    let mut tier = Tier::start(&["--concurrency", "2", "--timeout-s", "60"]);
    let data = batches(1);
    rt().block_on(async {
        let store = tier.store();
        let lambda = tier.lambda();
        let task = upload(&store, "run-c", &data).await;
        // Two at once: two environments.
        let slow = with(&task, |t| t.fault = Some(Fault::SleepMs(500)));
        let (a, b) = tokio::join!(invoke(&lambda, &slow), invoke(&lambda, &slow));
        a.ok();
        b.ok();
    });
    assert_eq!(tier.stats()["environments"].as_u64(), Some(2));
    let pid = tier.host.0.id();
    let envs = children(pid);
    assert_eq!(envs.len(), 2, "{envs:?}");
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    wait_for("the host to exit", Duration::from_secs(10), || tier.host.0.try_wait().unwrap().is_some());
    assert!(tier.host.0.try_wait().unwrap().unwrap().success());
    for p in envs {
        assert!(!Path::new(&format!("/proc/{p}")).exists(), "environment {p} outlived its host");
    }
}

#[test]
fn busy_environments_make_invocations_wait_and_idle_ones_stop() {
    let tier = Tier::start(&["--concurrency", "1", "--timeout-s", "30", "--idle-s", "1"]);
    let data = batches(1);
    let rt = rt();
    let lambda = tier.lambda();
    let task = rt.block_on(upload(&tier.store(), "run-d", &data));
    // One environment, two invocations at once: the second waits for the first.
    let slow = with(&task, |t| t.fault = Some(Fault::SleepMs(300)));
    let (a, b) = rt.block_on(async { tokio::join!(invoke(&lambda, &slow), invoke(&lambda, &slow)) });
    let (a, b) = (a.ok(), b.ok());
    assert_ne!(a.params_cached, b.params_cached, "one cold, one warm: {a:?} {b:?}");
    let s = tier.stats();
    assert_eq!((s["cold_starts"].as_u64(), s["environments"].as_u64(), s["throttles"].as_u64()), (Some(1), Some(1), Some(0)));
    // Idle past --idle-s: stopped; the next invocation starts a new one.
    wait_for("the idle environment to stop", Duration::from_secs(10), || tier.stats()["environments"] == 0);
    let r = rt.block_on(invoke(&lambda, &Task::Grad(task))).ok();
    assert!(!r.params_cached);
    assert_eq!(tier.stats()["cold_starts"].as_u64(), Some(2));
}

#[test]
fn get_function_describes_the_function_and_tasks_of_another_bucket_are_refused() {
    let logs = tempfile::tempdir().unwrap();
    let stderr = logs.path().join("host.stderr");
    let tier = Tier::start_logging(&["--concurrency", "1", "--timeout-s", "7", "--memory-mb", "1024"], Some(&stderr));
    let data = batches(1);
    rt().block_on(async {
        let lambda = tier.lambda();

        // GetFunction: what a node checks before it invokes anything.
        let out = lambda.get_function().function_name(FUNCTION).send().await.expect("get_function");
        let c = out.configuration().expect("configuration");
        assert_eq!(c.function_name(), Some(FUNCTION));
        assert_eq!(c.function_arn(), Some(format!("arn:aws:lambda:{REGION}:000000000000:function:{FUNCTION}").as_str()));
        assert_eq!(c.timeout(), Some(7));
        assert_eq!(c.memory_size(), Some(1024));
        assert_eq!(c.runtime().map(|r| r.as_str()), Some("provided.al2023"));
        assert_eq!(c.state().map(|s| s.as_str()), Some("Active"));
        assert_eq!(c.last_update_status().map(|s| s.as_str()), Some("Successful"));
        let vars = c.environment().and_then(|e| e.variables()).expect("environment variables");
        assert_eq!(vars.get("P2PML_S3_BUCKET").map(String::as_str), Some(BUCKET), "{vars:?}");
        assert_eq!(vars.get("P2PML_S3_ENDPOINT"), Some(&tier.s3_url), "{vars:?}");
        assert_eq!(vars.get("AWS_REGION").map(String::as_str), Some(REGION), "{vars:?}");
        assert_eq!(vars.get("P2PML_S3_PATH_STYLE").map(String::as_str), Some("1"), "{vars:?}");
        assert!(!vars.contains_key("AWS_SECRET_ACCESS_KEY"), "{vars:?}");
        // By ARN and with $LATEST too; GetFunctionConfiguration is the same object.
        let arn = c.function_arn().unwrap().to_string();
        let by_arn = lambda.get_function().function_name(&arn).qualifier("$LATEST").send().await.expect("by ARN");
        assert_eq!(by_arn.configuration().and_then(|c| c.timeout()), Some(7));
        let conf = lambda.get_function_configuration().function_name(FUNCTION).send().await.expect("configuration");
        assert_eq!(conf.timeout(), Some(7));
        assert_eq!(conf.environment().and_then(|e| e.variables()).and_then(|v| v.get("P2PML_S3_BUCKET")).map(String::as_str), Some(BUCKET));

        // An unknown function is ResourceNotFoundException, as for Invoke.
        let err = lambda.get_function().function_name("nope").send().await.unwrap_err();
        let service = err.into_service_error();
        assert!(service.is_resource_not_found_exception(), "{service:?}");
        let err = lambda.get_function_configuration().function_name("nope").send().await.unwrap_err();
        assert!(err.into_service_error().is_resource_not_found_exception());

        // A task whose objects are in another bucket is refused, naming both buckets.
        let store = tier.store();
        let task = upload(&store, "run-e", &data).await;
        let e = invoke(&lambda, &with(&task, |t| t.bucket = Some("p2pml-elsewhere".into()))).await.error();
        assert_eq!(e["errorType"], "p2pml.WrongBucket", "{e}");
        let msg = e["errorMessage"].as_str().unwrap();
        assert!(msg.contains("bucket p2pml-elsewhere (the node's --s3-bucket)"), "{msg}");
        assert!(msg.contains(&format!("bucket {BUCKET} (P2PML_S3_BUCKET of the function)")), "{msg}");
        let reduce = Task::Reduce(ReduceTask {
            run: "run-e".into(),
            peer: "peer0".into(),
            round: 0,
            numel: task.numel,
            input_keys: vec![task.output_key.clone()],
            output_key: p2pml_proto::task::output_key("run-e", "peer0", 0, "sum"),
            bucket: Some("p2pml-elsewhere".into()),
        });
        assert_eq!(invoke(&lambda, &reduce).await.error()["errorType"], "p2pml.WrongBucket");
        // Its own bucket named: runs.
        invoke(&lambda, &Task::Grad(task.clone())).await.ok();
        let e = invoke(&lambda, &with(&task, |t| t.batch_keys.push("run-e/data/peer0/e0/b99".into()))).await.error();
        assert_eq!(e["errorType"], "p2pml.NotFound");
    });

    // Function errors are logged as function errors, once, not as panics.
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("function error p2pml.WrongBucket: task's objects are in bucket p2pml-elsewhere"), "{log}");
    assert!(log.contains("function error p2pml.NotFound: cannot read batch"), "{log}");
    assert!(!log.to_lowercase().contains("panic"), "{log}");
    assert!(!log.contains("Diagnostic"), "{log}");
}

#[test]
fn a_host_whose_bucket_is_missing_fails_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (_s3, s3_url) = start_s3(dir.path());
    let start = std::time::Instant::now();
    let out = host_command(&s3_url, &[])
        .env("P2PML_S3_BUCKET", "p2pml-missing")
        .stderr(Stdio::piped())
        .output()
        .expect("run lambda-grad host");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(line.starts_with("lambda-grad: "), "{line}");
    assert!(line.contains("p2pml-missing") && line.contains("P2PML_S3_BUCKET of the function host"), "{line}");
    assert!(line.contains("testnet s3 --bucket p2pml-missing"), "{line}");
}
