//! Prometheus metrics: one registry per process (one node per process), served
//! as text at `http://--metrics-addr/metrics`.
//!
//! Names follow Prometheus's conventions: a `p2pml_` prefix, base units in the
//! name (`_seconds`, `_bytes`, `_ratio`, `_usd`), `_total` for counters. Every
//! series carries the node's `role` (p2p, ps or worker) and `peer` (its id).
//! The list is in the README; the dashboards in dashboards/ use them.

use crate::config::P2pConfig;
use crate::exec::{self, ExecConfig, LambdaExecutor};
use crate::net::{Client, Traffic};
use crate::report::StageTimes;
use libp2p::PeerId;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

/// The stages of a round whose durations are observed (`stage` label).
pub const STAGES: &[&str] = &[
    "compute",
    "encode",
    "send",
    "barrier_wait",
    "receive",
    "decode",
    "aggregate",
    "update",
    "checkpoint",
    "convergence_check",
    "evaluate",
];

pub struct Metrics {
    pub registry: Registry,
    pub round: IntGauge,
    pub epoch: IntGauge,
    pub rounds: IntCounter,
    pub train_loss: Gauge,
    pub validation_loss: Gauge,
    pub test_accuracy: Gauge,
    pub test_loss: Gauge,
    pub learning_rate: Gauge,
    pub stage_seconds: HistogramVec,
    pub connected_peers: IntGauge,
    pub live_members: IntGauge,
    pub failures_detected: IntCounter,
    pub rejoins: IntCounter,
    /// Rounds closed on the straggler deadline.
    pub deadline_rounds: IntCounter,
    /// Members demoted for missing rounds while alive.
    pub withholding_demotions: IntCounter,
    pub state_syncs: IntCounter,
    pub function_invocations: IntCounter,
    pub function_errors: IntCounter,
    pub function_timeouts: IntCounter,
    pub function_retries: IntCounter,
    pub function_cold_starts: IntCounter,
    pub function_duration: Histogram,
    pub function_gb_seconds: prometheus::Counter,
    /// Planned function tasks by how they ended: outcome tier|tier_after_retry|local, and the local cause.
    pub function_tasks: IntCounterVec,
    /// 1 while the circuit breaker keeps tasks off the function tier.
    pub function_breaker_open: IntGauge,
    pub function_reuploads: IntCounter,
    pub function_objects_deleted: IntCounter,
    pub cost_usd: prometheus::Counter,
    /// Pushes refused and gradients dropped as invalid (added to the invalid-message count).
    pub invalid_pushes: IntCounter,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, once [`init`] has run.
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// Observes `secs` for `stage` if metrics are on.
pub fn stage(stage: &str, secs: f64) {
    if let Some(m) = get() {
        m.stage_seconds.with_label_values(&[stage]).observe(secs);
    }
}

/// A membership change (joined, rejoined, died, refuted) as the node printed it.
pub fn membership_event(event: &str) {
    if let Some(m) = get() {
        match event {
            "died" => m.failures_detected.inc(),
            "rejoined" => m.rejoins.inc(),
            "withholding" => m.withholding_demotions.inc(),
            _ => {}
        }
    }
}

/// A parameter server refused a push as invalid.
pub fn invalid_push() {
    if let Some(m) = get() {
        m.invalid_pushes.inc();
    }
}

/// Connected peers and live members, sampled every heartbeat.
pub fn membership(connected: usize, live: usize) {
    if let Some(m) = get() {
        m.connected_peers.set(connected as i64);
        m.live_members.set(live as i64);
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    let g = Gauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    fn new(role: &str, peer: &str, traffic: Arc<Traffic>) -> prometheus::Result<Metrics> {
        let labels = HashMap::from([("role".to_string(), role.to_string()), ("peer".to_string(), peer.to_string())]);
        let r = Registry::new_custom(None, Some(labels))?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new("p2pml_stage_duration_seconds", "Duration of one stage of a round, by stage")
                .buckets(prometheus::exponential_buckets(0.0005, 2.5, 14)?),
            &["stage"],
        )?;
        r.register(Box::new(stage_seconds.clone()))?;
        for s in STAGES {
            // Every stage's series exists from the start (zero observations).
            stage_seconds.with_label_values(&[s]);
        }
        let function_duration = Histogram::with_opts(
            HistogramOpts::new("p2pml_function_duration_seconds", "Round trip of one function invocation, as the node saw it")
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 12)?),
        )?;
        r.register(Box::new(function_duration.clone()))?;
        let function_gb_seconds = prometheus::Counter::new(
            "p2pml_function_billed_gigabyte_seconds_total",
            "Billed function time times memory (GB-seconds)",
        )?;
        r.register(Box::new(function_gb_seconds.clone()))?;
        let function_tasks = IntCounterVec::new(
            prometheus::Opts::new("p2pml_function_tasks_total", "Planned function tasks by how they ended (outcome: tier, tier_after_retry, local; cause of a local one)"),
            &["outcome", "cause"],
        )?;
        r.register(Box::new(function_tasks.clone()))?;
        for outcome in ["tier", "tier_after_retry"] {
            // The series exist from the start (zero), as a dashboard expects.
            function_tasks.with_label_values(&[outcome, ""]);
        }
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        r.register(Box::new(TrafficCollector::new(traffic)?))?;
        Ok(Metrics {
            round: int_gauge(&r, "p2pml_round", "The round this node is on")?,
            epoch: int_gauge(&r, "p2pml_epoch", "The epoch this node is in (1-based)")?,
            rounds: counter(&r, "p2pml_rounds_total", "Rounds this node completed (aggregated and applied)")?,
            train_loss: gauge(&r, "p2pml_train_loss", "Mean training loss of the last round")?,
            validation_loss: gauge(&r, "p2pml_validation_loss", "Validation loss after the last epoch")?,
            test_accuracy: gauge(&r, "p2pml_test_accuracy_ratio", "Test accuracy after the last epoch (0 to 1)")?,
            test_loss: gauge(&r, "p2pml_test_loss", "Test loss after the last epoch")?,
            learning_rate: gauge(&r, "p2pml_learning_rate", "The optimizer's current learning rate")?,
            stage_seconds,
            connected_peers: int_gauge(&r, "p2pml_connected_peers", "Peers with an open connection")?,
            live_members: int_gauge(&r, "p2pml_live_members", "Members the failure detector holds alive (this node included)")?,
            failures_detected: counter(&r, "p2pml_failures_detected_total", "Members declared dead by this node")?,
            rejoins: counter(&r, "p2pml_rejoins_total", "Members seen coming back with a higher incarnation")?,
            deadline_rounds: counter(&r, "p2pml_deadline_rounds_total", "Rounds closed on the straggler deadline without every expected member")?,
            withholding_demotions: counter(&r, "p2pml_withholding_demotions_total", "Members demoted for missing rounds in a row while alive")?,
            state_syncs: counter(&r, "p2pml_state_syncs_total", "Full states fetched from another node (join, catch-up, repair)")?,
            function_invocations: counter(&r, "p2pml_function_invocations_total", "Function invocations (retries and backups included)")?,
            function_errors: counter(&r, "p2pml_function_errors_total", "Function invocations that failed")?,
            function_timeouts: counter(&r, "p2pml_function_timeouts_total", "Function invocations that timed out")?,
            function_retries: counter(&r, "p2pml_function_retries_total", "Function invocations retried")?,
            function_cold_starts: counter(&r, "p2pml_function_cold_starts_total", "Invocations that started a new function environment")?,
            function_duration,
            function_gb_seconds,
            function_tasks,
            function_breaker_open: int_gauge(&r, "p2pml_function_breaker_open", "1 while the circuit breaker computes the function tasks locally")?,
            function_reuploads: counter(&r, "p2pml_function_reuploads_total", "Objects put back after a function found them missing")?,
            function_objects_deleted: counter(&r, "p2pml_function_objects_deleted_total", "Objects deleted from the store once no task needed them")?,
            cost_usd: {
                let c = prometheus::Counter::new("p2pml_estimated_cost_usd_total", "This node's estimated cost so far: function billing plus instance time")?;
                r.register(Box::new(c.clone()))?;
                c
            },
            invalid_pushes: counter(&r, "p2pml_invalid_pushes_total", "Gradients a parameter server refused as invalid")?,
            registry: r,
        })
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }

    /// Brings the function-tier counters up to `now` (cumulative stats).
    pub fn function_stats(&self, before: &crate::exec::ExecStats, now: &crate::exec::ExecStats, memory_mb: u64, durations_ms: &[f64]) {
        let up = |c: &IntCounter, a: u64, b: u64| c.inc_by(b.saturating_sub(a));
        up(&self.function_invocations, before.invocations, now.invocations);
        up(&self.function_errors, before.errors, now.errors);
        up(&self.function_timeouts, before.timeouts, now.timeouts);
        up(&self.function_retries, before.retries, now.retries);
        up(&self.function_cold_starts, before.cold_starts, now.cold_starts);
        up(&self.function_reuploads, before.reuploads, now.reuploads);
        up(&self.function_objects_deleted, before.objects_deleted, now.objects_deleted);
        up(&self.function_tasks.with_label_values(&["tier", ""]), before.tasks_ok, now.tasks_ok);
        up(&self.function_tasks.with_label_values(&["tier_after_retry", ""]), before.tasks_ok_after_retry, now.tasks_ok_after_retry);
        for (cause, n) in &now.tasks_local {
            up(&self.function_tasks.with_label_values(&["local", cause]), before.tasks_local.get(cause).copied().unwrap_or(0), *n);
        }
        self.function_breaker_open.set(i64::from(now.breaker_open));
        let billed = now.billed_ms.saturating_sub(before.billed_ms) as f64 / 1000.0;
        self.function_gb_seconds.inc_by(billed * memory_mb as f64 / 1024.0);
        for d in durations_ms {
            self.function_duration.observe(d / 1000.0);
        }
    }
}

/// The network counters of [`Traffic`], read at scrape time.
struct TrafficCollector {
    traffic: Arc<Traffic>,
    descs: Vec<Desc>,
}

const TRAFFIC: &[(&str, &str)] = &[
    ("p2pml_sent_bytes_total", "Bytes sent, by kind (gossip, request_response)"),
    ("p2pml_received_bytes_total", "Bytes received, by kind (gossip, request_response)"),
    ("p2pml_sent_messages_total", "Messages sent, by kind (gossip, request_response)"),
    ("p2pml_received_messages_total", "Messages received, by kind (gossip, request_response)"),
    ("p2pml_invalid_messages_total", "Messages rejected as invalid (gossip validation, refused pushes)"),
    ("p2pml_events_dropped_total", "Gossip messages and requests dropped because the node's event queue was full"),
];

impl TrafficCollector {
    fn new(traffic: Arc<Traffic>) -> prometheus::Result<Self> {
        let descs = TRAFFIC
            .iter()
            .map(|(n, h)| {
                let labels = if n.contains("invalid") || n.contains("dropped") { vec![] } else { vec!["kind".to_string()] };
                Desc::new(n.to_string(), h.to_string(), labels, HashMap::new())
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(TrafficCollector { traffic, descs })
    }
}

impl Collector for TrafficCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let t = &self.traffic;
        let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let by_kind = |name: &str, help: &str, gossip: u64, rr: u64| -> Option<MetricFamily> {
            let c = prometheus::IntCounterVec::new(Opts::new(name, help), &["kind"]).ok()?;
            c.with_label_values(&["gossip"]).inc_by(gossip);
            c.with_label_values(&["request_response"]).inc_by(rr);
            c.collect().into_iter().next()
        };
        let invalid = get().map_or(0, |m| m.invalid_pushes.get());
        let mut out = Vec::new();
        out.extend(by_kind(TRAFFIC[0].0, TRAFFIC[0].1, v(&t.gossip_bytes_sent), v(&t.rr_bytes_sent)));
        out.extend(by_kind(TRAFFIC[1].0, TRAFFIC[1].1, v(&t.gossip_bytes_received), v(&t.rr_bytes_received)));
        out.extend(by_kind(TRAFFIC[2].0, TRAFFIC[2].1, v(&t.gossip_messages_sent), v(&t.rr_messages_sent)));
        out.extend(by_kind(TRAFFIC[3].0, TRAFFIC[3].1, v(&t.gossip_messages_received), v(&t.rr_messages_received)));
        if let Ok(c) = IntCounter::new(TRAFFIC[4].0, TRAFFIC[4].1) {
            c.inc_by(v(&t.invalid_messages) + invalid);
            out.extend(c.collect());
        }
        if let Ok(c) = IntCounter::new(TRAFFIC[5].0, TRAFFIC[5].1) {
            c.inc_by(v(&t.events_dropped));
            out.extend(c.collect());
        }
        out
    }
}

/// Sets up the metrics of this process and serves them on `addr` (port 0: any
/// free port). Returns the address it listens on.
pub async fn serve(addr: &str, role: &str, peer: &str, traffic: Arc<Traffic>) -> anyhow::Result<SocketAddr> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr} is not an address ({e}); for example 127.0.0.1:9464, or none"))?;
    let m = Metrics::new(role, peer, traffic).map_err(|e| anyhow::anyhow!("cannot set up the metrics: {e}"))?;
    if METRICS.set(m).is_err() {
        anyhow::bail!("metrics are already set up in this process");
    }
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let resp = match (req.method(), req.uri().path()) {
                        (&hyper::Method::GET, "/metrics") => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(get().map(Metrics::encode).unwrap_or_default()))),
                        _ => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"see /metrics\n"))),
                    };
                    resp
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(local)
}

// Recording a node's figures: shared by every role.

/// Serves this node's metrics (unless `--metrics-addr none`) and prints where:
/// testnet reads the line.
pub(crate) async fn start_metrics(p2p: &P2pConfig, role: &str, me: &PeerId, client: &Client) -> anyhow::Result<()> {
    if let Some(addr) = &p2p.metrics_addr {
        let a = crate::metrics::serve(addr, role, &me.to_string(), client.traffic.clone()).await?;
        println!("{}", p2pml_proto::line::Line::Metrics { url: format!("http://{a}/metrics") });
    }
    Ok(())
}

/// A round's figures into the log (one info line) and the metrics (if they are on).
pub(crate) fn record_round(round: u64, epoch: u64, contributors: usize, samples: u64, st: &StageTimes, train_loss: f64, lr: f64) {
    tracing::info!(
        round,
        epoch = epoch + 1,
        contributors,
        samples,
        loss = format!("{train_loss:.4}"),
        lr,
        compute_s = format!("{:.3}", st.compute),
        barrier_s = format!("{:.3}", st.barrier_wait),
        update_s = format!("{:.3}", st.update),
        "round done"
    );
    let Some(m) = get() else { return };
    for (name, secs) in [
        ("compute", st.compute),
        ("encode", st.encode),
        ("send", st.send),
        ("barrier_wait", st.barrier_wait),
        ("decode", st.decode),
        ("aggregate", st.aggregate),
        ("update", st.update),
    ] {
        // A stage this node did not run this round (the server computes nothing,
        // a demoted peer only follows) is not an observation of zero.
        if secs > 0.0 {
            m.stage_seconds.with_label_values(&[name]).observe(secs);
        }
    }
    m.round.set(round as i64 + 1);
    m.epoch.set(epoch as i64 + 1);
    m.rounds.inc();
    m.train_loss.set(train_loss);
    m.learning_rate.set(lr);
}

/// The function tier's counters (from `seen` to now), state syncs and the cost
/// estimate into the metrics.
pub(crate) fn record_costs(lambda: Option<&mut LambdaExecutor>, seen: &mut exec::ExecStats, cfg: &ExecConfig, wall_secs: f64, bpr: usize, state_syncs: u64) {
    let Some(m) = get() else { return };
    m.state_syncs.inc_by(state_syncs.saturating_sub(m.state_syncs.get()));
    let stats = match lambda {
        Some(lx) => {
            m.function_stats(seen, &lx.stats, cfg.pricing.memory_mb, &std::mem::take(&mut lx.recent_ms));
            *seen = lx.stats.clone();
            lx.stats.clone()
        }
        None => exec::ExecStats::default(),
    };
    let cost = exec::cost(cfg, &stats, wall_secs, bpr).total_usd;
    m.cost_usd.inc_by((cost - m.cost_usd.get()).max(0.0));
}

/// An epoch's evaluation into the metrics.
pub(crate) fn record_epoch(test_accuracy: f64, test_loss: f64) {
    if let Some(m) = get() {
        m.test_accuracy.set(test_accuracy);
        m.test_loss.set(test_loss);
    }
}

