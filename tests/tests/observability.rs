//! Observability end to end: a testnet run scraped by a real Prometheus. Every
//! node's /metrics passes `promtool check metrics`, and every PromQL expression
//! of every dashboard panel in dashboards/ returns at least one series from
//! that Prometheus while the run goes on.

use p2pml_tests::{bin, root, small_run};
use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GET `url` (http://host:port/path?query) over HTTP/1.0: (status, body).
fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {} HTTP/1.0\r\nHost: {hostport}\r\n\r\n", if path.is_empty() { "/" } else { path })?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every (dashboard, panel title, expression) in dashboards/*.json.
fn dashboard_exprs() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = root().join("dashboards");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let name = d["title"].as_str().unwrap().to_string();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((name.clone(), p["title"].as_str().unwrap().to_string(), t["expr"].as_str().unwrap().to_string()));
            }
        }
    }
    out
}

/// Stops testnet (and so its nodes and Prometheus) if the test fails midway.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
        }
    }
}

/// Figures that must have moved by the end of the run, whatever the dashboards
/// show: a metric that is registered but never updated would pass the panel
/// check (a flat zero is a series).
fn moved() -> Vec<String> {
    let mut q: Vec<String> = [
        "min(p2pml_rounds_total) > 0",
        "max(p2pml_epoch) >= 2",
        "max(p2pml_test_accuracy_ratio) > 0.3",
        "max(p2pml_live_members) >= 3",
        "max(p2pml_connected_peers) >= 2",
        "sum by (kind) (p2pml_sent_bytes_total) > 0",
        "sum by (kind) (p2pml_received_messages_total) > 0",
        "sum(p2pml_function_invocations_total) > 0",
        "sum(p2pml_function_duration_seconds_count) > 0",
        "sum(p2pml_function_billed_gigabyte_seconds_total) > 0",
        "sum(p2pml_function_cold_starts_total) > 0",
        "sum(p2pml_estimated_cost_usd_total) > 0",
        "min(process_resident_memory_bytes{job=\"p2pml\"}) > 0",
    ]
    .map(String::from)
    .to_vec();
    for stage in ["compute", "encode", "send", "barrier_wait", "receive", "decode", "aggregate", "update", "checkpoint", "convergence_check", "evaluate"] {
        q.push(format!("sum(p2pml_stage_duration_seconds_count{{stage=\"{stage}\"}}) > 0"));
    }
    q
}

#[test]
fn a_real_prometheus_scrapes_every_node_and_every_dashboard_panel_has_data() {
    let exprs = dashboard_exprs();
    let dashboards: std::collections::BTreeSet<&str> = exprs.iter().map(|(d, _, _)| d.as_str()).collect();
    assert_eq!(dashboards.len(), 3, "training, faults and serverless dashboards: {dashboards:?}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    // The function tier too, so that the serverless dashboard has real data.
    let args = small_run(4500, 500, 300, 2, &["--executor", "lambda", "--failure-timeout-ms", "10000"]);
    let child = Command::new(bin("testnet"))
        .args(["run", "--peers", "3", "--prometheus", "--timeout", "300", "--out", out.to_str().unwrap(), "--"])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start testnet");
    let mut child = StopOnDrop(child);

    // Prometheus is up and knows the three nodes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (prom, targets) = loop {
        assert!(Instant::now() < deadline, "no Prometheus URL and three targets within 90 s");
        assert!(child.0.try_wait().unwrap().is_none(), "testnet ended before Prometheus had its targets");
        let url = std::fs::read_to_string(out.join("prometheus.url")).unwrap_or_default();
        let targets: Vec<String> = std::fs::read(out.join("prometheus/targets.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| v.as_array().unwrap().iter().map(|t| t["targets"][0].as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        if !url.trim().is_empty() && targets.len() == 3 {
            break (url.trim().to_string(), targets);
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Every endpoint passes promtool's checks (names, types, help, units).
    for t in &targets {
        let (status, body) = http_get(&format!("http://{t}/metrics")).unwrap();
        assert_eq!(status, 200, "{t}");
        assert!(body.contains("p2pml_rounds_total") && body.contains("process_resident_memory_bytes"), "{body}");
        let mut check = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("promtool (apt-get install prometheus)");
        check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let o = check.wait_with_output().unwrap();
        assert!(o.status.success(), "promtool check metrics on {t}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }

    // Every panel's expression returns a series while the run goes on, and the
    // figures that must move have moved.
    let moved = moved();
    let mut missing: Vec<(String, String, String)> = exprs.clone();
    missing.extend(moved.iter().map(|q| ("(moved)".to_string(), String::new(), q.clone())));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !missing.is_empty() {
        assert!(Instant::now() < deadline, "no data within 120 s for: {missing:#?}");
        assert!(child.0.try_wait().unwrap().is_none(), "the run ended before every panel had data; still without: {missing:#?}");
        missing.retain(|(_, _, expr)| {
            let (status, body) = http_get(&format!("{prom}/api/v1/query?query={}", urlencode(expr))).unwrap_or_default();
            assert!(status == 200 || status == 0, "Prometheus refused {expr}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            v["data"]["result"].as_array().is_none_or(|r| r.is_empty())
        });
        std::thread::sleep(Duration::from_millis(500));
    }

    // And the run itself is fine.
    let status = child.0.wait().unwrap();
    assert!(status.success(), "testnet exited with {status}");
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["all_final_digests_equal"], true);
}
