use super::*;

/// A node that does not read its queues (busy elsewhere) must not stall its
/// network task: requests beyond the queue are dropped and counted, the task
/// keeps answering the node's own commands, and no connection event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_sheds_requests_keeps_connection_events_and_never_blocks() {
    let lo: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
    let opts = |queue| NetOptions { psk: None, forge_as: None, queue, link: None };
    let (a, mut a_events, _a_requests, a_loop) = new(key_from_seed(1), std::slice::from_ref(&lo), &opts(1)).unwrap();
    let (b, _b_events, _b_requests, b_loop) = new(key_from_seed(2), std::slice::from_ref(&lo), &opts(0)).unwrap();
    tokio::spawn(a_loop.run());
    tokio::spawn(b_loop.run());
    let addr = loop {
        let addrs = a.listen_addrs().await.unwrap();
        if let Some(x) = addrs.into_iter().find(|x| !x.to_string().ends_with("/tcp/0")) {
            break x;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    b.dial(Some(a.peer_id), addr).await.unwrap();
    // B asks A many times; A never reads its requests (its queue holds one).
    let asks: Vec<_> = (0..20)
        .map(|i| {
            let b = b.clone();
            let to = a.peer_id;
            tokio::spawn(async move { b.request(to, Request::Chunk { owner: vec![], round: i, index: 0, part: None }).await })
        })
        .collect();
    // (The one request that fits in the queue waits for A; the others are dropped.)
    let t = std::time::Duration::from_secs(20);
    let since = std::time::Instant::now();
    while a.traffic.events_dropped.load(Ordering::Relaxed) == 0 {
        assert!(since.elapsed() < t, "requests beyond the queue are dropped and counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A's network task still answers A's own commands...
    let addrs = tokio::time::timeout(t, a.listen_addrs()).await.expect("the busy node's network task answers its commands");
    assert!(!addrs.unwrap().is_empty());
    // ...and the connection event waited for room instead of being dropped.
    let ev = tokio::time::timeout(t, a_events.recv()).await.expect("the connection event arrives");
    assert!(matches!(ev, Some(Event::Connected(p)) if p == b.peer_id), "{ev:?}");
    for ask in asks {
        ask.abort();
    }
}
