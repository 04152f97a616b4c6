//! The function tier's event parser: JSON bytes as the Runtime API delivers
//! them, then the task (deny_unknown_fields, tagged by `op`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use p2pml_proto::task::Task;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(t) = Task::from_event(v) {
            // What parses re-serializes and parses to the same task.
            let again = serde_json::to_value(&t).expect("tasks serialize");
            assert_eq!(Task::from_event(again).expect("round trip"), t);
        }
    }
});
