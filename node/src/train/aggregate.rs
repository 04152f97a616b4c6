//! A round's gradients: this peer's encoded for the wire, everyone's decoded
//! and combined by the run's aggregation rule.

use crate::config::P2pConfig;
use p2pml_proto::{Aggregation, Attack};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Decodes a round's gradients (in the order given: the same on every node) and
/// combines them with `rule`: `mean` streams the sample-weighted mean; the robust
/// rules combine the per-peer mean gradients ([`p2pml_proto::robust`]). Returns the
/// gradient, the samples and loss summed, and the seconds spent decoding and
/// aggregating. A gradient that does not decode (wrong length, NaN) or claims more
/// than `max_samples` is dropped with a warning.
pub(crate) fn aggregate(
    inputs: &[(u64, f64, Arc<Vec<u8>>)],
    compression: &p2pml_proto::Compression,
    numel: usize,
    rule: &Aggregation,
    max_samples: u64,
) -> (Vec<f32>, u64, f64, f64, f64) {
    let mut acc = vec![0f32; if rule.is_mean() { numel } else { 0 }];
    let mut per_peer: Vec<Vec<f32>> = Vec::new();
    let mut weights = Vec::new();
    let (mut samples, mut loss) = (0u64, 0f64);
    let (mut dec, mut agg) = (Duration::ZERO, Duration::ZERO);
    let drop_invalid = |why: String| {
        tracing::warn!("dropping a gradient: {why}");
        if let Some(m) = crate::metrics::get() {
            m.invalid_pushes.inc();
        }
    };
    for (s, l, blob) in inputs {
        if *s > max_samples {
            drop_invalid(format!("{s} samples in a round of at most {max_samples}"));
            continue;
        }
        if *s == 0 && !rule.is_mean() {
            // A peer without a batch this round: no vote (the mean gives it no weight).
            continue;
        }
        let t = Instant::now();
        let decoded = p2pml_proto::decode_gradient(blob, compression, numel);
        dec += t.elapsed();
        match decoded {
            Ok(mut v) => {
                let t = Instant::now();
                if rule.is_mean() {
                    for (a, x) in acc.iter_mut().zip(&v) {
                        *a += *x;
                    }
                } else {
                    let scale = 1.0 / (*s).max(1) as f32;
                    v.iter_mut().for_each(|x| *x *= scale);
                    per_peer.push(v);
                    weights.push(*s);
                }
                agg += t.elapsed();
                samples += s;
                loss += l;
            }
            Err(e) => drop_invalid(format!("it does not decode ({e})")),
        }
    }
    let t = Instant::now();
    if rule.is_mean() {
        let scale = 1.0 / samples.max(1) as f32;
        for a in acc.iter_mut() {
            *a *= scale;
        }
    } else if per_peer.is_empty() {
        acc = vec![0f32; numel];
    } else {
        let (g, chosen) = p2pml_proto::robust::combine(rule, &per_peer, &weights);
        if let Some(i) = chosen {
            tracing::debug!("{rule} chose input {i} of {}", per_peer.len());
        }
        acc = g;
    }
    agg += t.elapsed();
    (acc, samples, loss, dec.as_secs_f64(), agg.as_secs_f64())
}

/// The most samples one peer's gradient of a round can sum.
pub(crate) fn max_round_samples(p2p: &P2pConfig, batch_size: usize) -> u64 {
    (p2p.batches_per_round * batch_size) as u64
}

/// Encodes this peer's gradient for the wire; a byzantine peer (--byzantine)
/// poisons it first.
/// A gradient that cannot be encoded (not finite): the run diverged.
#[derive(Debug, thiserror::Error)]
#[error("round {round}: cannot encode the gradient ({reason}); the run diverged: lower --lr, or, if a peer may be byzantine, use a robust --aggregation (median, trimmed-mean:BETA, krum:F)")]
pub(crate) struct Diverged {
    pub(crate) round: u64,
    pub(crate) reason: String,
}

pub(crate) fn encode_own(
    grad: &mut [f32],
    samples: u64,
    compression: &p2pml_proto::Compression,
    seed: u64,
    attack: Option<&Attack>,
    round: u64,
) -> Result<Vec<u8>, Diverged> {
    if let Some(a) = attack {
        a.apply(grad, samples, seed);
    }
    let mut blob = p2pml_proto::encode_gradient(grad, compression, seed)
        .map_err(|e| Diverged { round, reason: e.to_string() })?;
    if let Some(a) = attack {
        a.poison(&mut blob);
    }
    Ok(blob)
}


/// Sharded exchange: encodes each of `ranges` of this peer's gradient on its
/// own (each with its own seed from `seed`), for the shard's owner; a
/// byzantine peer poisons the whole gradient first and every part after.
pub(crate) fn encode_own_shards(
    grad: &mut [f32],
    samples: u64,
    compression: &p2pml_proto::Compression,
    seed: u64,
    attack: Option<&Attack>,
    round: u64,
    ranges: &[std::ops::Range<usize>],
) -> Result<Vec<Vec<u8>>, Diverged> {
    if let Some(a) = attack {
        a.apply(grad, samples, seed);
    }
    ranges
        .iter()
        .enumerate()
        .map(|(j, r)| {
            let s = p2pml_proto::shard::contribution_seed(seed, j);
            let mut blob = p2pml_proto::encode_gradient(&grad[r.clone()], compression, s).map_err(|e| Diverged { round, reason: e.to_string() })?;
            if let Some(a) = attack {
                a.poison(&mut blob);
            }
            Ok(blob)
        })
        .collect()
}

/// An owner's aggregate of one shard: the contributions (in the order given)
/// combined by `rule` over the shard's `len` values as [`aggregate`] combines
/// whole gradients, then encoded with the shard's seed (the same on every peer).
#[derive(Debug)]
pub(crate) struct ShardAggregate {
    pub(crate) blob: Vec<u8>,
    pub(crate) samples: u64,
    pub(crate) loss_sum: f64,
    pub(crate) decode_secs: f64,
    pub(crate) aggregate_secs: f64,
    pub(crate) encode_secs: f64,
}

pub(crate) fn aggregate_shard(
    inputs: &[(u64, f64, Arc<Vec<u8>>)],
    compression: &p2pml_proto::Compression,
    len: usize,
    rule: &Aggregation,
    max_samples: u64,
    seed: u64,
) -> Result<ShardAggregate, String> {
    let (g, samples, loss_sum, decode_secs, aggregate_secs) = aggregate(inputs, compression, len, rule, max_samples);
    let t = Instant::now();
    let blob = p2pml_proto::encode_gradient(&g, compression, seed).map_err(|e| format!("cannot encode the aggregated shard: {e}"))?;
    Ok(ShardAggregate { blob, samples, loss_sum, decode_secs, aggregate_secs, encode_secs: t.elapsed().as_secs_f64() })
}

/// Sharded exchange: the round's gradient from its decoded aggregated shards.
pub(crate) fn assemble(parts: &[(std::ops::Range<usize>, Arc<Vec<u8>>)], compression: &p2pml_proto::Compression, numel: usize) -> Result<(Vec<f32>, f64), String> {
    let t = Instant::now();
    let mut g = vec![0f32; numel];
    for (r, blob) in parts {
        if r.end > numel {
            return Err(format!("shard {r:?} is past the model's {numel} values"));
        }
        let v = p2pml_proto::decode_gradient(blob, compression, r.len()).map_err(|e| format!("aggregated shard {r:?}: {e}"))?;
        g[r.clone()].copy_from_slice(&v);
    }
    Ok((g, t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_applies_the_rule_to_per_peer_means_and_drops_poison() {
        let none = p2pml_proto::Compression::None;
        // Summed gradients of 2, 4 and 2 samples: per-peer means 1, 2 and -10.
        let blob = |v: &[f32]| Arc::new(p2pml_proto::encode_f32(v).unwrap());
        let mut nan = (*blob(&[0.0, 0.0])).clone();
        Attack::Nan.poison(&mut nan);
        let inputs = vec![
            (2, 1.0, blob(&[2.0, 2.0])),
            (4, 1.0, blob(&[8.0, 8.0])),
            (2, 1.0, blob(&[-20.0, -20.0])),
            (9, 1.0, Arc::new(nan)),
            // Over the round's cap of 8 samples, and a peer without a batch.
            (80, 1.0, blob(&[1e6, 1e6])),
            (0, 0.0, blob(&[0.0, 0.0])),
        ];
        let (mean, samples, loss, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Mean, 8);
        assert_eq!((mean, samples, loss), (vec![-1.25, -1.25], 8, 3.0), "weighted by samples; NaN and over-cap blobs dropped");
        let (median, samples, _, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Median, 8);
        assert_eq!((median, samples), (vec![1.0, 1.0], 8), "the empty peer has no vote");
        let (krum, _, _, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Krum { f: 0 }, 8);
        assert_eq!(krum, vec![1.0, 1.0], "the input closest to the others");
        let (empty, samples, _, _, _) = aggregate(&inputs[3..4], &none, 2, &Aggregation::Median, 8);
        assert_eq!((empty, samples), (vec![0.0, 0.0], 0));
    }
}

/// This peer's announcement of its encoded gradient `blob` (inline when small).
pub(crate) fn announcement(
    run_id: &str,
    round: u64,
    epoch: u64,
    (samples, loss_sum): (u64, f64),
    blob: &[u8],
    val: Option<p2pml_proto::wire::ValStats>,
    joiners: Vec<serde_bytes::ByteBuf>,
) -> p2pml_proto::wire::Announce {
    p2pml_proto::wire::Announce {
        run_id: run_id.to_string(),
        round,
        epoch,
        samples,
        loss_sum,
        val,
        len: blob.len() as u64,
        digest: *blake3::hash(blob).as_bytes(),
        inline: (blob.len() <= p2pml_proto::wire::INLINE_MAX_BYTES).then(|| serde_bytes::ByteBuf::from(blob.to_vec())),
        joiners,
        shards: Vec::new(),
    }
}
