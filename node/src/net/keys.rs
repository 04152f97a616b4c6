//! Key files: the node's identity (kept across restarts) and a private swarm's
//! pre-shared key.

use libp2p::identity;
use libp2p::pnet::PreSharedKey;

/// Why a key file (the node's identity, or a private swarm's key) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read --swarm-key {}: {source}", .path.display())]
    ReadSwarmKey { path: std::path::PathBuf, source: std::io::Error },
    #[error("--swarm-key {} is not a swarm key ({reason}); write one with `p2pml-node swarm-key --out FILE` and give every peer the same file", .path.display())]
    NotSwarmKey { path: std::path::PathBuf, reason: String },
    #[error("cannot read the node key {}: {source}", .path.display())]
    ReadNodeKey { path: std::path::PathBuf, source: std::io::Error },
    #[error("the node key {} is empty (a write that did not finish?); delete it to start with a new identity (a new peer id)", .0.display())]
    EmptyNodeKey(std::path::PathBuf),
    // libp2p's own reason says little here (a damaged file reads as an
    // unsupported key type, e.g. "cargo feature 'rsa' is not enabled").
    #[error("the node key {} is corrupt ({len} bytes that are not a libp2p ed25519 key); delete it to start with a new identity (a new peer id)", .path.display())]
    CorruptNodeKey { path: std::path::PathBuf, len: usize },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// Reads a private swarm's pre-shared key (the go-libp2p key file format:
/// `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
pub fn load_swarm_key(path: &std::path::Path) -> Result<PreSharedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::ReadSwarmKey { path: path.into(), source })?;
    text.parse().map_err(|e: libp2p::pnet::KeyParseError| KeyError::NotSwarmKey { path: path.into(), reason: e.to_string() })
}

/// A new random pre-shared key.
pub fn generate_swarm_key() -> std::io::Result<PreSharedKey> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(PreSharedKey::new(bytes))
}

/// Loads the node's key from `path`, or creates and saves a new one, so that a
/// restarted node keeps its peer id.
pub fn load_or_create_key(path: &std::path::Path) -> Result<identity::Keypair, KeyError> {
    if path.exists() {
        let bytes = std::fs::read(path).map_err(|source| KeyError::ReadNodeKey { path: path.into(), source })?;
        if bytes.is_empty() {
            return Err(KeyError::EmptyNodeKey(path.into()));
        }
        return identity::Keypair::from_protobuf_encoding(&bytes).map_err(|_| KeyError::CorruptNodeKey { path: path.into(), len: bytes.len() });
    }
    let key = identity::Keypair::generate_ed25519();
    fn write(p: &std::path::Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
        move |source| KeyError::Write { path: p.into(), source }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write(dir))?;
    }
    let bytes = key.to_protobuf_encoding().expect("an ed25519 key encodes");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(write(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write(path))?;
    Ok(key)
}
