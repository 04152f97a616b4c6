//! Benchmark: checkpoint write and restore time for `cnn` and `resnet18`
//! (target: ≤ 0.3 s each for resnet18), against the same bytes written to a
//! plain file with fsync and read back, measured in the same run.
//!
//!     cargo bench -p p2pml-node --bench checkpoint
//!
//! Write: encoding the record (checksum included), writing it to its file
//! (temporary name, sync, rename, directory sync), the sled index insert and
//! flush, and pruning to the last 3. It also prints the store's size on disk. Restore: reading the newest record, verifying
//! its checksum, decoding the state and loading the parameters into the model.
//! Environment: BENCH_REPS (default 5; the median is printed), BENCH_DIR (where
//! the store goes; default a temporary directory under target/).

use p2pml_lambda_grad::{Model, ModelSpec};
use p2pml_node::checkpoint::{CheckpointMeta, Checkpoints};
use p2pml_proto::{DatasetKind, ModelKind, StateHeader};
use std::io::{Read, Write};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let base = std::env::var("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-checkpoint")
    });
    std::fs::create_dir_all(&base)?;
    println!(
        "{:<10} {:>11} {:>9} {:>10} {:>10} {:>11} {:>11} {:>9} {:>9} {:>11}",
        "model", "params", "MB", "write s", "restore s", "file w s", "file r s", "w ratio", "r ratio", "on disk MB"
    );
    for kind in [ModelKind::Cnn, ModelKind::Resnet18] {
        let dir = tempfile::tempdir_in(&base)?;
        let mut model = Model::new(ModelSpec::for_dataset(kind, DatasetKind::FashionMnist), tch::Device::Cpu, 1)?;
        let params = model.params_vec();
        let numel = params.len();
        // SGD with momentum: one optimizer vector as large as the parameters.
        let momentum: Vec<f32> = params.iter().map(|x| x * 0.1).collect();
        let store = Checkpoints::open(dir.path(), "bench", 3)?;
        let (mut writes, mut restores, mut fwrites, mut freads) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0;
        // More writes than kept: the size on disk must stay at about 3 records.
        for round in 0..reps.max(5) as u64 {
            let h = StateHeader {
                round,
                epoch: 0,
                lr: 0.01,
                opt_steps: round,
                numel: numel as u64,
                opt_vectors: 1,
                plateau: (1.0, 0),
                stopping: (1.0, 0),
                epoch_start: 0,
                epoch_members: vec![serde_bytes::ByteBuf::from(vec![1u8; 38]); 4],
                active: vec![serde_bytes::ByteBuf::from(vec![1u8; 38]); 4],
                next_members: vec![],
                withheld: vec![],
            };
            let state = p2pml_proto::encode_state(&h, &params, std::slice::from_ref(&momentum));
            let meta = CheckpointMeta { run_id: "bench".into(), round, epoch: 0, incarnation: 1, written_unix_ms: 0, members: vec![] };
            let t = Instant::now();
            let w = store.write(&meta, &state, None)?;
            writes.push(t.elapsed().as_secs_f64());
            bytes = w.bytes;

            let t = Instant::now();
            let r = store.latest(numel as u64)?.expect("just written");
            model.set_params(&r.params)?;
            restores.push(t.elapsed().as_secs_f64());
            assert_eq!(r.meta.round, round);

            // Reference: the same bytes to a plain file, fsync'd, and read back.
            let path = dir.path().join(format!("plain-{round}"));
            let t = Instant::now();
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&state)?;
            f.sync_all()?;
            fwrites.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut back = Vec::new();
            std::fs::File::open(&path)?.read_to_end(&mut back)?;
            freads.push(t.elapsed().as_secs_f64());
            assert_eq!(back.len(), state.len());
        }
        let (w, r, fw, fr) = (median(writes), median(restores), median(fwrites), median(freads));
        println!(
            "{:<10} {:>11} {:>9.1} {:>10.3} {:>10.3} {:>11.3} {:>11.3} {:>9.2} {:>9.2} {:>11.1}",
            kind.to_string(),
            numel,
            bytes as f64 / 1e6,
            w,
            r,
            fw,
            fr,
            w / fw,
            r / fr,
            store.disk_bytes() as f64 / 1e6
        );
    }
    println!("(medians of {reps}; ratios: checkpoint time / plain file time)");
    Ok(())
}
