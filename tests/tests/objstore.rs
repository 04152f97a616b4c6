//! The object store client against the real `testnet s3` process, over the real
//! S3 protocol (SigV4, path-style, on loopback).

use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig, StoreError};
use p2pml_tests::{wait_for, S3Proc};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ACCESS_KEY: &str = "objstore-test";
const SECRET_KEY: &str = "objstore-test-secret";

fn start_s3(root: &Path) -> S3Proc {
    p2pml_tests::start_s3(root, "p2pml", ACCESS_KEY, SECRET_KEY)
}

fn store_at(endpoint: &str, bucket: &str) -> ObjectStore {
    let cfg = StoreConfig { endpoint: Some(endpoint.to_string()), bucket: bucket.into(), region: "us-east-1".into(), path_style: true };
    ObjectStore::with_credentials(&cfg, ACCESS_KEY, SECRET_KEY, None).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn round_trips_through_testnet_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = start_s3(dir.path());
    let store = store_at(&s3.endpoint, "p2pml");
    assert_eq!(store.bucket(), "p2pml");
    rt().block_on(async {
        // The bucket exists (testnet s3 made it); ensuring it again is fine,
        // and so is creating a new one.
        store.ensure_bucket().await.unwrap();
        store.ensure_bucket().await.unwrap();
        let other = store_at(&s3.endpoint, "other-bucket");
        other.ensure_bucket().await.unwrap();
        other.put("k", b"v".to_vec()).await.unwrap();

        let big: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        store.put("run/r1/params/big", big.clone()).await.unwrap();
        store.put("run/r1/result.json", b"{\"loss\":0.5}".to_vec()).await.unwrap();
        store.put("run/r2/x", vec![]).await.unwrap();
        assert_eq!(store.get("run/r1/params/big").await.unwrap(), big);
        assert_eq!(store.get("run/r1/result.json").await.unwrap(), b"{\"loss\":0.5}");
        assert_eq!(store.get("run/r2/x").await.unwrap(), Vec::<u8>::new());
        // Overwrite.
        store.put("run/r1/result.json", b"2".to_vec()).await.unwrap();
        assert_eq!(store.get("run/r1/result.json").await.unwrap(), b"2");

        assert!(store.exists("run/r1/params/big").await.unwrap());
        assert!(!store.exists("run/r1/nope").await.unwrap());

        let e = store.get("run/r1/missing").await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "object s3://p2pml/run/r1/missing not found");

        assert_eq!(store.delete_prefix("run/r1/").await.unwrap(), 2);
        assert!(!store.exists("run/r1/params/big").await.unwrap());
        assert!(store.exists("run/r2/x").await.unwrap());
        assert_eq!(store.delete_prefix("run/r1/").await.unwrap(), 0);
        assert!(matches!(store.delete_prefix("").await, Err(StoreError::Config(_))));
        assert!(matches!(store.get("").await, Err(StoreError::Config(_))));
        assert_eq!(other.get("k").await.unwrap(), b"v");
    });
}

#[test]
fn delete_prefix_pages_through_more_than_one_listing() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = start_s3(dir.path());
    let store = store_at(&s3.endpoint, "p2pml");
    rt().block_on(async {
        // A listing page holds at most 1000 keys.
        for i in 0..1003u32 {
            store.put(&format!("many/{i:04}"), vec![i as u8]).await.unwrap();
        }
        store.put("manyx", vec![1]).await.unwrap();
        assert_eq!(store.delete_prefix("many/").await.unwrap(), 1003);
        assert!(store.exists("manyx").await.unwrap());
    });
}

#[test]
fn wrong_credentials_and_missing_buckets_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = start_s3(dir.path());
    let cfg = StoreConfig { endpoint: Some(s3.endpoint.clone()), bucket: "p2pml".into(), region: "us-east-1".into(), path_style: true };
    let wrong = ObjectStore::with_credentials(&cfg, ACCESS_KEY, "not-the-secret", None).unwrap();
    let nobucket = store_at(&s3.endpoint, "no-such-bucket");
    rt().block_on(async {
        let e = wrong.put("k", vec![1]).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Service { op: "put", .. }), "{e:?}");
        assert!(msg.contains("AWS_SECRET_ACCESS_KEY") && !msg.contains('\n'), "{msg}");

        let e = nobucket.get("k").await.unwrap_err();
        assert!(matches!(e, StoreError::Service { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("NoSuchBucket") && msg.contains("no-such-bucket") && msg.contains("aws s3 mb s3://no-such-bucket") && msg.contains("mc mb") && !msg.contains("ensure_bucket"), "{msg}");
        let e = nobucket.exists("k").await.unwrap_err();
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");

        // https:// to a plain-HTTP store: the TLS handshake fails, in one line.
        let tls = store_at(&s3.endpoint.replace("http://", "https://"), "p2pml");
        let msg = tls.get("k").await.unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    });
}

#[test]
fn a_closed_port_is_unreachable_within_seconds() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let store = store_at(&endpoint, "p2pml");
    // The client gives up by itself (connect timeout, three attempts); the
    // outer limit only keeps a regression from hanging the test.
    let e = rt()
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), store.get("k")).await })
        .expect("the client kept retrying for 30 s")
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(&e, StoreError::Unreachable { endpoint: ep, .. } if *ep == endpoint), "{e:?}");
    assert!(msg.contains(&endpoint) && msg.contains("P2PML_S3_ENDPOINT") && !msg.contains('\n'), "{msg}");
}

#[test]
fn testnet_s3_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = start_s3(dir.path());
    let pid = s3.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut status = None;
    wait_for("testnet s3 to exit", Duration::from_secs(20), || {
        status = s3.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    // It removed its address file: no stale endpoint for the next reader.
    assert!(!dir.path().join("s3.addr").exists());
}
