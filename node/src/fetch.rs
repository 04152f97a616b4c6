//! Moving blobs between peers over request-response: chunked fetches with
//! their retry policy, and the responder that serves the shared store.

use crate::net::{Client, InboundRequest};
use crate::store::{chunks, SharedStore};
use libp2p::PeerId;
use p2pml_proto::wire::{Request, Response, RunSpec};
use std::time::Instant;
use tokio::sync::mpsc;

/// A gradient fetched (or failed to fetch) by a background task.
pub(crate) struct Fetched {
    pub(crate) round: u64,
    pub(crate) owner: PeerId,
    pub(crate) result: Result<Vec<u8>, String>,
}

pub(crate) async fn fetch_blob(client: &Client, src: PeerId, owner: PeerId, round: u64, len: u64) -> Result<Vec<u8>, String> {
    let t0 = Instant::now();
    let r = fetch_chunks(client, src, owner, round, len).await;
    if r.is_ok() {
        crate::metrics::stage("receive", t0.elapsed().as_secs_f64());
    }
    r
}

async fn fetch_chunks(client: &Client, src: PeerId, owner: PeerId, round: u64, len: u64) -> Result<Vec<u8>, String> {
    let n = chunks(len);
    let reqs = (0..n).map(|index| {
        let client = client.clone();
        async move { client.request(src, Request::Chunk { owner: owner.to_bytes(), round, index }).await }
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

/// Serves inbound requests from the shared store until the network stops.
pub(crate) async fn responder(client: Client, store: SharedStore, spec: RunSpec, mut requests: mpsc::Receiver<InboundRequest>) {
    while let Some(r) = requests.recv().await {
        let response = store.lock().expect("store lock").answer(&spec, r.peer, r.request);
        if client.respond(r.channel, response).await.is_err() {
            return;
        }
    }
}

