use super::check::check_dial_addr;
use super::*;

#[test]
fn every_float_of_the_optimizer_is_checked() {
    let ok = TrainConfig::default();
    assert_eq!(ok.validate(), Ok(()));
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = TrainConfig::default();
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    for m in [f64::NAN, -5.0, 1.0, f64::INFINITY] {
        assert!(with(&|c| c.optimizer.momentum = m).starts_with("--momentum"), "{m}");
    }
    for w in [f64::NAN, -0.1, f64::INFINITY] {
        assert!(with(&|c| c.optimizer.weight_decay = w).starts_with("--weight-decay"), "{w}");
    }
    for lr in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
        assert!(with(&|c| c.optimizer.lr = lr).starts_with("--lr"), "{lr}");
    }
    assert!(with(&|c| c.optimizer.beta2 = 1.0).contains("beta2"));
    assert!(with(&|c| c.optimizer.eps = 0.0).contains("eps"));
    assert!(with(&|c| c.threads = 100_000).starts_with("--threads 100000"));
    let mut c = TrainConfig::default();
    c.threads = available_cores();
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn addresses_are_checked_before_the_network_starts() {
    let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    for ok in [format!("/ip4/10.0.0.1/tcp/4001/p2p/{id}"), format!("/dns4/localhost/tcp/1/p2p/{id}"), format!("/dns/h.example/tcp/1/p2p/{id}"), format!("/dns6/h/tcp/1/p2p/{id}")] {
        assert!(check_dial_addr("--bootstrap", &ok).is_ok(), "{ok}");
    }
    for bad in ["x".to_string(), "/ip4/10.0.0.1/tcp/4001".into(), format!("/ip4/1.2.3.4/udp/1/p2p/{id}"), format!("/ip4/1.2.3.4/tcp/0/p2p/{id}")] {
        assert!(check_dial_addr("--bootstrap", &bad).is_err(), "{bad}");
    }
    let mut p = P2pConfig { listen: vec!["/dns4/localhost/tcp/0".into()], ..P2pConfig::default() };
    p.min_peers = 3;
    assert!(p.validate().unwrap_err().to_string().starts_with("--listen"));
    p.listen = vec!["/ip4/0.0.0.0/tcp/0".into()];
    p.bootstrap = vec![format!("/ip4/10.0.0.1/tcp/4001/p2p/{id}")];
    let addrs = p.validate().unwrap();
    assert_eq!(addrs.listen, vec!["/ip4/0.0.0.0/tcp/0".parse::<libp2p::Multiaddr>().unwrap()]);
    assert_eq!(addrs.bootstrap[0].0.to_string(), id);
    assert_eq!(addrs.ps, None);
    // Each refusal is a typed value whose line names the flag.
    assert!(matches!(check_dial_addr("--ps", "/ip4/1.2.3.4/tcp/0/p2p/x"), Err(DialAddrError::NotMultiaddr { flag: "--ps", .. })));
    assert_eq!(check_dial_addr("--ps", &format!("/ip4/1.2.3.4/tcp/0/p2p/{id}")).unwrap_err(), DialAddrError::PortZero { flag: "--ps", addr: format!("/ip4/1.2.3.4/tcp/0/p2p/{id}") });
    p.min_peers = 9;
    assert_eq!(p.validate().unwrap_err(), P2pConfigError::MinPeers(p.peers));
}
