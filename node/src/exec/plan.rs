//! How a round's batches become tasks, and who uploads the round's parameters.

/// One function task of a round: which of the round's batches, and its dropout seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskPlan {
    pub index: usize,
    /// Positions in the round's batch list.
    pub batches: std::ops::Range<usize>,
    pub dropout_seed: u64,
}

/// Cuts a round of `n_batches` batches into tasks of at most `per_task`.
pub fn plan_round(n_batches: usize, per_task: usize, run_seed: u64, round: u64, peer: &[u8]) -> Vec<TaskPlan> {
    (0..n_batches.div_ceil(per_task.max(1)))
        .map(|i| {
            let lo = i * per_task;
            let mut h = blake3::Hasher::new();
            h.update(b"p2pml dropout");
            h.update(&run_seed.to_le_bytes());
            h.update(&round.to_le_bytes());
            h.update(peer);
            h.update(&(i as u64).to_le_bytes());
            let seed = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
            // tch seeds are i64: keep it positive.
            TaskPlan { index: i, batches: lo..(lo + per_task).min(n_batches), dropout_seed: seed >> 1 }
        })
        .collect()
}


/// Whether this peer is the one to upload the parameters with `digest`: the
/// member with the highest hash of (digest, member) among `members` (the live
/// members computing this round), so that every peer agrees without a message
/// and one upload is made per digest. A member that is not the uploader waits
/// for the object, then uploads it itself if it did not come.
pub fn params_uploader<'a>(digest: &str, members: impl IntoIterator<Item = &'a str>, me: &str) -> bool {
    let score = |m: &str| {
        let mut h = blake3::Hasher::new();
        h.update(b"p2pml params uploader");
        h.update(digest.as_bytes());
        h.update(m.as_bytes());
        *h.finalize().as_bytes()
    };
    members.into_iter().max_by_key(|m| score(m)).is_none_or(|m| m == me)
}
