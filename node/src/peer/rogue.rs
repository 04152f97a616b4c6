//! Fault injection: a rogue node that only sends invalid messages (or heartbeats without a Hello).

use crate::report::*;
use crate::train::*;
use p2pml_proto::wire::{self, Announce, Gossip};
use std::time::{Duration, Instant};
use super::node::*;

/// Rogue mode (--fault-garbage, for tests of validation and peer scoring): the
/// node never joins the membership or trains; every heartbeat interval it
/// publishes invalid messages of every kind on the current epoch's topic, until
/// the run's peers have finished or gone.
pub(super) async fn run_rogue(mut node: Node, reporter: ReportBuilder) -> anyhow::Result<NodeReport> {
    let wall = Instant::now();
    if node.p2p.faults.heartbeat_only {
        tracing::warn!("rogue mode: heartbeats without a Hello until the run ends");
    } else {
        tracing::warn!("rogue mode: publishing invalid messages until the run ends");
    }
    let mut alone_since: Option<Instant> = None;
    node.wait_until("the run to end", |n| {
        let seen = !n.views.is_empty();
        let all_finished = seen && n.views.values().all(|v| v.finished);
        alone_since = if seen && n.connected.is_empty() { alone_since.or(Some(Instant::now())) } else { None };
        all_finished || alone_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
    })
    .await?;
    let report = reporter.build(
        wall.elapsed().as_secs_f64(),
        Outcome {
            peer_scores: node.scores_report(),
            garbage_sent: node.garbage_sent,
            membership_log: std::mem::take(&mut node.membership.events),
            ..Outcome::default()
        },
    );
    write_report(&node.p2p, &report)?;
    Ok(report)
}


impl Node {
    /// Fault injection (--fault-garbage): publishes invalid messages of every kind
    /// the validation must stop.
    pub(super) async fn publish_garbage(&mut self, round: u64, epoch: u64) {
        let topic = self.epoch_topic(epoch);
        let mut bad = vec![
            vec![0xff, 0x00, 0x13, 0x37],          // not CBOR
            wire::encode(&"a string, not a message"), // CBOR, wrong type
        ];
        let honest = Announce {
            run_id: self.run_id.clone(),
            round: round + 1,
            epoch,
            samples: 64,
            loss_sum: 1.0,
            val: None,
            len: 8,
            digest: *blake3::hash(&[0u8; 8]).as_bytes(),
            inline: Some(serde_bytes::ByteBuf::from(vec![0u8; 8])),
            joiners: vec![],
        };
        // A gradient of the wrong length (8 bytes for a model of many parameters).
        bad.push(wire::encode(&Gossip::Announce(honest.clone())));
        // A round far ahead of everyone.
        bad.push(wire::encode(&Gossip::Announce(Announce { round: round + 10_000, ..honest.clone() })));
        // An honest announcement cut short.
        let mut cut = wire::encode(&Gossip::Announce(honest.clone()));
        cut.truncate(cut.len() / 2);
        bad.push(cut);
        if self.p2p.faults.forge {
            // Forged (unsigned, "from" the first bootstrap peer): a well-formed
            // announcement of the next round's gradient that, were it accepted
            // first, would stand in for that peer's real one.
            let plain = self.numel as u64 * 4;
            bad.push(wire::encode(&Gossip::Announce(Announce {
                round: round + 1,
                samples: max_round_samples(&self.p2p, self.batch_size),
                len: plain,
                digest: *blake3::hash(b"forged").as_bytes(),
                inline: None,
                ..honest.clone()
            })));
        }
        // Another run's message.
        bad.push(wire::encode(&Gossip::Announce(Announce { run_id: "0000000000000000".into(), ..honest })));
        for b in bad {
            if self.client.publish(&topic, b).await.is_ok() {
                self.garbage_sent += 1;
            }
        }
    }
}
