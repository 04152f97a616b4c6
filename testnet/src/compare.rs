//! `testnet compare`: the same run, data and fault schedule in P2P mode and in
//! parameter-server mode, one after the other, and what each made of it:
//! DIR/compare.md, DIR/compare.json, DIR/accuracy.svg, DIR/progress.svg.
//!
//! Fairness: a random kill draws its victim among the nodes that exist, so in
//! PS mode the server is hit as often as any one worker. `ps` in an explicit
//! schedule (`--kill ps@20 --revive ps@30`) names the server; the P2P run
//! kills peer 0 in its place (the peer every other one bootstrapped from).

use crate::report::Report;
use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;

/// One mode's row of the comparison.
#[derive(Debug, Serialize)]
pub(crate) struct ModeSummary {
    pub(crate) mode: String,
    pub(crate) ok: bool,
    pub(crate) rounds: u64,
    pub(crate) wall_seconds: f64,
    pub(crate) stalled_seconds: f64,
    /// Seconds from the start until an epoch's test accuracy reached the target.
    pub(crate) time_to_target_s: Option<f64>,
    pub(crate) final_accuracy: f64,
    /// Mean over kills of the stall that followed (seconds).
    pub(crate) mean_stall_after_kill_s: Option<f64>,
    /// Mean over revivals of the time until the node did its part again.
    pub(crate) mean_back_in_step_s: Option<f64>,
    /// Bytes the whole system sends per round: for each role (peer, worker,
    /// server), the mean over its nodes of bytes sent per round in their last
    /// life (a killed life writes no report), times the number of such nodes.
    pub(crate) bytes_per_round: f64,
    /// Every node provisioned for the whole run: for each role, the mean cost
    /// per second of its nodes' last lives, times nodes, times the run's wall time.
    pub(crate) cost_usd: f64,
    pub(crate) problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct FaultRow {
    pub(crate) at_s: f64,
    pub(crate) p2p_event: String,
    pub(crate) p2p_stall_s: Option<f64>,
    pub(crate) p2p_back_in_step_s: Option<f64>,
    pub(crate) ps_event: String,
    pub(crate) ps_stall_s: Option<f64>,
    pub(crate) ps_back_in_step_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Comparison {
    pub(crate) peers: usize,
    pub(crate) target_accuracy: f64,
    pub(crate) node_args: Vec<String>,
    pub(crate) modes: Vec<ModeSummary>,
    pub(crate) faults: Vec<FaultRow>,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub(crate) fn summarize(mode: &str, r: &Report, target: f64) -> ModeSummary {
    let rounds = r.progress.last().map_or(0, |p| p.1);
    let kills: Vec<f64> = r.faults.iter().filter(|e| e.spec.contains("kill")).filter_map(|e| e.stalled_s).collect();
    let back: Vec<f64> = r.faults.iter().filter_map(|e| e.in_step_s).collect();
    // Per role: (nodes of that role in the run, per-round byte rates, per-second cost rates).
    let workers = if r.role == "ps" { r.peers - 1 } else { r.peers };
    let mut bytes = 0.0;
    let mut cost = 0.0;
    for (role, count) in [("peer", workers), ("worker", workers), ("ps", 1)] {
        let nodes: Vec<_> = r.peer_reports.iter().filter(|p| p.role == role).collect();
        if nodes.is_empty() {
            continue;
        }
        // A last life that ran no round (revived at the very end) says nothing of the rate.
        let per_round: Vec<f64> = nodes
            .iter()
            .filter_map(|p| {
                let n = p.rounds_log.as_array().map_or(0, Vec::len);
                (n > 0).then(|| p.bytes_sent as f64 / n as f64)
            })
            .collect();
        let per_s: Vec<f64> = nodes
            .iter()
            .map(|p| p.cost["total_usd"].as_f64().unwrap_or(0.0) / p.cost["wall_seconds"].as_f64().unwrap_or(1.0).max(1e-9))
            .collect();
        bytes += mean(&per_round).unwrap_or(0.0) * count as f64;
        cost += mean(&per_s).unwrap_or(0.0) * count as f64 * r.wall_seconds;
    }
    ModeSummary {
        mode: mode.into(),
        ok: r.ok,
        rounds,
        wall_seconds: r.wall_seconds,
        stalled_seconds: r.stalled_seconds,
        time_to_target_s: r.accuracy_timeline.iter().find(|(_, _, a)| *a >= target).map(|(t, _, _)| *t),
        final_accuracy: r.accuracy_by_epoch.last().copied().unwrap_or(0.0),
        mean_stall_after_kill_s: mean(&kills),
        mean_back_in_step_s: mean(&back),
        bytes_per_round: bytes,
        cost_usd: cost,
        problems: r.problems.clone(),
    }
}

pub(crate) fn compare(peers: usize, target: f64, node_args: &[String], p2p: &Report, ps: &Report) -> Comparison {
    let n = p2p.faults.len().max(ps.faults.len());
    let faults = (0..n)
        .map(|i| {
            let (a, b) = (p2p.faults.get(i), ps.faults.get(i));
            FaultRow {
                at_s: a.or(b).map_or(0.0, |e| e.at_s),
                p2p_event: a.map(|e| e.spec.clone()).unwrap_or_default(),
                p2p_stall_s: a.and_then(|e| e.stalled_s),
                p2p_back_in_step_s: a.and_then(|e| e.in_step_s),
                ps_event: b.map(|e| e.spec.clone()).unwrap_or_default(),
                ps_stall_s: b.and_then(|e| e.stalled_s),
                ps_back_in_step_s: b.and_then(|e| e.in_step_s),
            }
        })
        .collect();
    Comparison {
        peers,
        target_accuracy: target,
        node_args: node_args.to_vec(),
        modes: vec![summarize("p2p", p2p, target), summarize("ps", ps, target)],
        faults,
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub(crate) fn markdown(c: &Comparison, command: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# P2P vs parameter server, {} peers / workers\n\nReproduce: `{command}`\n\n",
        c.peers
    ));
    s.push_str(&format!(
        "| mode | rounds | wall s | stalled s | time to {:.0} % s | final accuracy | mean stall after a kill s | mean back in step s | bytes per round | cost $ | problems |\n",
        100.0 * c.target_accuracy
    ));
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for m in &c.modes {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} % | {} | {} | {} | {:.6} | {} |\n",
            m.mode,
            m.rounds,
            m.wall_seconds,
            m.stalled_seconds,
            opt(m.time_to_target_s, 1),
            100.0 * m.final_accuracy,
            opt(m.mean_stall_after_kill_s, 2),
            opt(m.mean_back_in_step_s, 2),
            crate::units::human_bytes(m.bytes_per_round.max(0.0).round() as u64),
            m.cost_usd,
            if m.problems.is_empty() { "none".to_string() } else { m.problems.join("; ") }
        ));
    }
    if !c.faults.is_empty() {
        s.push_str("\n| at s | P2P event | P2P stall s | P2P back in step s | PS event | PS stall s | PS back in step s |\n");
        s.push_str("|---|---|---|---|---|---|---|\n");
        for f in &c.faults {
            s.push_str(&format!(
                "| {:.1} | {} | {} | {} | {} | {} | {} |\n",
                f.at_s,
                f.p2p_event,
                opt(f.p2p_stall_s, 2),
                opt(f.p2p_back_in_step_s, 2),
                f.ps_event,
                opt(f.ps_stall_s, 2),
                opt(f.ps_back_in_step_s, 2)
            ));
        }
    }
    s
}

/// Rounds per second over a sliding window, sampled every second.
fn rate(progress: &[(f64, u64)], window: f64) -> Vec<(f64, f64)> {
    let end = progress.last().map_or(0.0, |p| p.0);
    let mut out = Vec::new();
    let mut t = window;
    while t <= end + 1e-9 {
        let at = |x: f64| progress.iter().rev().find(|p| p.0 <= x).map_or(0, |p| p.1);
        out.push((t, (at(t) - at(t - window)) as f64 / window));
        t += 1.0;
    }
    out
}

const P2P_COLOR: RGBColor = RGBColor(31, 119, 180);
const PS_COLOR: RGBColor = RGBColor(255, 127, 14);

/// A line chart of both modes with the fault times marked.
fn chart(path: &Path, title: &str, y_desc: &str, series: [&[(f64, f64)]; 2], faults: &[(f64, bool)], from_zero: bool) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let x_max = series.iter().flat_map(|s| s.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_max = series.iter().flat_map(|s| s.iter().map(|p| p.1)).fold(0.0, f64::max).max(1e-3) * 1.1;
    let y_min = match from_zero {
        true => 0.0,
        false => (series.iter().flat_map(|s| s.iter().map(|p| p.1)).fold(f64::INFINITY, f64::min) - 5.0).clamp(0.0, y_max * 0.9),
    };
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, y_min..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh().x_desc("seconds since start").y_desc(y_desc).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    // Fault markers: kills red, everything else (revivals, partitions) grey.
    for (t, kill) in faults {
        let color = if *kill { RED.mix(0.35) } else { BLACK.mix(0.15) };
        c.draw_series(LineSeries::new(vec![(*t, y_min), (*t, y_max)], color)).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for (pts, (name, color)) in series.iter().zip([("P2P", P2P_COLOR), ("parameter server", PS_COLOR)]) {
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Writes compare.json, compare.md and the two plots into `out`.
pub(crate) fn write(out: &Path, c: &Comparison, command: &str, p2p: &Report, ps: &Report) -> anyhow::Result<()> {
    std::fs::write(out.join("compare.json"), serde_json::to_string_pretty(c)?).with_context(|| format!("cannot write into {}", out.display()))?;
    std::fs::write(out.join("compare.md"), markdown(c, command))?;
    // Kills red, other events grey; the PS run's own times where they differ.
    let mut faults: Vec<(f64, bool)> = Vec::new();
    for e in p2p.faults.iter().chain(&ps.faults) {
        let m = (e.at_s, e.spec.contains("kill"));
        if !faults.iter().any(|f| (f.0 - m.0).abs() < 0.5 && f.1 == m.1) {
            faults.push(m);
        }
    }
    let acc = |r: &Report| -> Vec<(f64, f64)> { r.accuracy_timeline.iter().map(|(t, _, a)| (*t, 100.0 * a)).collect() };
    chart(&out.join("accuracy.svg"), "Test accuracy after each epoch (red: kills)", "test accuracy %", [&acc(p2p), &acc(ps)], &faults, false)?;
    let (r1, r2) = (rate(&p2p.progress, 5.0), rate(&ps.progress, 5.0));
    chart(&out.join("progress.svg"), "Progress: rounds per second over 5 s (red: kills)", "rounds / s", [&r1, &r2], &faults, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rate_counts_rounds_in_the_window() {
        let p: Vec<(f64, u64)> = (1..=10).map(|i| (i as f64, i)).collect();
        let r = rate(&p, 5.0);
        assert_eq!(r.first(), Some(&(5.0, 1.0)));
        assert!(r.iter().all(|(_, v)| (*v - 1.0).abs() < 1e-9), "{r:?}");
        // A stall shows as zero.
        let stalled = vec![(1.0, 1), (2.0, 2), (20.0, 3)];
        assert!(rate(&stalled, 5.0).iter().any(|(_, v)| *v == 0.0));
    }
}
