//! Moving blobs between peers over request-response: chunked fetches with
//! their retry policy, and the responder that serves the shared store.

use crate::net::{Client, InboundRequest};
use crate::store::{chunks, SharedStore};
use libp2p::PeerId;
use p2pml_proto::wire::{self, Digest, Part, Request, Response, RunSpec};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A gradient fetched (or failed to fetch) by a background task.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) round: u64,
    pub(crate) owner: PeerId,
    /// The part of the round fetched (sharded exchange), or the whole gradient.
    pub(crate) part: Option<Part>,
    pub(crate) result: Result<Vec<u8>, String>,
}

pub(crate) async fn fetch_blob(client: &Client, src: PeerId, owner: PeerId, round: u64, part: Option<Part>, len: u64) -> Result<Vec<u8>, String> {
    let t0 = Instant::now();
    let r = fetch_chunks(client, src, owner, round, part, len).await;
    if r.is_ok() {
        crate::metrics::stage("receive", t0.elapsed().as_secs_f64());
    }
    r
}

async fn fetch_chunks(client: &Client, src: PeerId, owner: PeerId, round: u64, part: Option<Part>, len: u64) -> Result<Vec<u8>, String> {
    let n = chunks(len);
    let reqs = (0..n).map(|index| {
        let client = client.clone();
        async move { client.request(src, Request::Chunk { owner: owner.to_bytes(), round, index, part }).await }
    });
    let parts = futures::future::join_all(reqs).await;
    let mut blob = Vec::with_capacity(len as usize);
    for p in parts {
        match p.map_err(|e| e.to_string())? {
            Response::Chunk { total_len, data } if total_len == len => blob.extend_from_slice(&data),
            Response::Chunk { .. } => return Err(format!("{src} has a different blob")),
            Response::Missing => return Err(format!("{src} does not have it")),
            other => return Err(format!("unexpected answer {other:?}")),
        }
    }
    if blob.len() as u64 != len {
        return Err(format!("got {} of {len} bytes", blob.len()));
    }
    Ok(blob)
}

/// Attempts of a gradient fetch, over its sources in turn, with a backoff from
/// 100 ms to 1.6 s between them.
pub(crate) const FETCH_ATTEMPTS: usize = 6;

/// Fetches `owner`'s gradient of `round` (`len` bytes) from `sources` in turn
/// until one gives a blob of blake3 `digest`.
pub(crate) async fn fetch_verified(client: &Client, sources: &[PeerId], owner: PeerId, round: u64, part: Option<Part>, len: u64, digest: Digest) -> Result<Vec<u8>, String> {
    let mut last_err = String::from("no source");
    if sources.is_empty() {
        return Err(last_err);
    }
    for attempt in 0..FETCH_ATTEMPTS {
        let src = sources[attempt % sources.len()];
        match fetch_blob(client, src, owner, round, part, len).await {
            Ok(blob) if *blake3::hash(&blob).as_bytes() == digest => return Ok(blob),
            Ok(_) => last_err = format!("digest mismatch from {src}"),
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
    }
    Err(last_err)
}

/// How long a state transfer waits for its source to have the state asked for.
const STATE_WAIT: Duration = Duration::from_secs(30);

/// Fetches `peer`'s state after round `min_round` or later, in chunks: the
/// first from its newest state (asked again every 100 ms, for 30 s, until it
/// has one that recent), the others from that same round's state. Returns the
/// state's round and bytes.
pub(crate) async fn fetch_state(client: &Client, peer: PeerId, min_round: u64) -> Result<(u64, Vec<u8>), String> {
    let deadline = Instant::now() + STATE_WAIT;
    let (round, total_len, data) = loop {
        match client.request(peer, Request::State { round: min_round, index: 0 }).await {
            Ok(Response::State { round: r, total_len, data, .. }) if r >= min_round => break (r, total_len, data),
            Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(other) => return Err(format!("no state for round {min_round}: {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    };
    if total_len > wire::MAX_BLOB_BYTES * 3 {
        return Err(format!("state of {total_len} bytes is too large"));
    }
    let mut bytes = data.into_vec();
    for index in 1..chunks(total_len) {
        match client.request(peer, Request::State { round, index }).await {
            Ok(Response::State { round: r, data, .. }) if r == round => bytes.extend_from_slice(&data),
            other => return Err(format!("state chunk {index}: {other:?}")),
        }
    }
    Ok((round, bytes))
}

/// Serves inbound requests from the shared store until the network stops.
pub(crate) async fn responder(client: Client, store: SharedStore, spec: RunSpec, mut requests: mpsc::Receiver<InboundRequest>) {
    while let Some(r) = requests.recv().await {
        let response = store.lock().expect("store lock").answer(&spec, r.peer, r.request);
        if client.respond(r.channel, response).await.is_err() {
            return;
        }
    }
}

