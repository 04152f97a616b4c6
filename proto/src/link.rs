//! An emulated WAN link's shape (`--link bw=100mbit,delay=25ms[,jitter=5ms]`):
//! parsed here so that testnet checks it before it starts a node; the
//! shaping itself is the node's (p2pml_node::link).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A link's shape.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkSpec {
    /// Uplink bandwidth, bits per second (None: unlimited).
    pub bits_per_sec: Option<u64>,
    /// One-way delay on what is sent.
    pub delay: Duration,
    /// Each chunk's delay varies by up to this much either way (in order still).
    pub jitter: Duration,
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(b) = self.bits_per_sec {
            parts.push(if b % 1_000_000 == 0 { format!("bw={}mbit", b / 1_000_000) } else { format!("bw={}kbit", b / 1000) });
        }
        parts.push(format!("delay={}ms", self.delay.as_millis()));
        if !self.jitter.is_zero() {
            parts.push(format!("jitter={}ms", self.jitter.as_millis()));
        }
        f.write_str(&parts.join(","))
    }
}

const LINK_HELP: &str = "expected bw=RATE,delay=TIME[,jitter=TIME], e.g. bw=100mbit,delay=25ms (RATE in kbit, mbit or gbit; TIME in us, ms or s)";

fn rate(v: &str) -> Option<u64> {
    let v = v.to_ascii_lowercase();
    let (num, mul) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)].iter().find_map(|(u, m)| v.strip_suffix(u).map(|n| (n.to_string(), *m)))?;
    let x: f64 = num.trim().parse().ok()?;
    (x.is_finite() && x > 0.0 && x * mul >= 8_000.0 && x * mul <= 1e12).then(|| (x * mul) as u64)
}

fn time(v: &str) -> Option<Duration> {
    let v = v.to_ascii_lowercase();
    let (num, mul) = [("us", 1e-6), ("ms", 1e-3), ("s", 1.0)].iter().find_map(|(u, m)| v.strip_suffix(u).map(|n| (n.to_string(), *m)))?;
    let x: f64 = num.trim().parse().ok()?;
    (x.is_finite() && (0.0..=10.0).contains(&(x * mul))).then(|| Duration::from_secs_f64(x * mul))
}

impl FromStr for LinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = LinkSpec { bits_per_sec: None, delay: Duration::ZERO, jitter: Duration::ZERO };
        let mut any = false;
        for kv in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else { return Err(format!("'{kv}' in --link {s}: {LINK_HELP}")) };
            let bad = || format!("{k}={v} in --link {s}: {LINK_HELP} (bandwidth 8kbit..1000gbit, times up to 10 s)");
            match k.trim() {
                "bw" => spec.bits_per_sec = Some(rate(v).ok_or_else(bad)?),
                "delay" => spec.delay = time(v).ok_or_else(bad)?,
                "jitter" => spec.jitter = time(v).ok_or_else(bad)?,
                other => return Err(format!("unknown key '{other}' in --link {s}: {LINK_HELP}")),
            }
            any = true;
        }
        if !any {
            return Err(format!("--link is empty: {LINK_HELP}"));
        }
        if spec.jitter > spec.delay {
            return Err(format!("--link {s}: the jitter must not exceed the delay"));
        }
        Ok(spec)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_expected() {
        let s: LinkSpec = "bw=100mbit,delay=25ms,jitter=5ms".parse().unwrap();
        assert_eq!(s, LinkSpec { bits_per_sec: Some(100_000_000), delay: Duration::from_millis(25), jitter: Duration::from_millis(5) });
        assert_eq!("delay=1s".parse::<LinkSpec>().unwrap().delay, Duration::from_secs(1));
        for bad in ["", "bw=fast", "bw=100", "delay=25", "color=red", "bw=100mbit,delay=5ms,jitter=10ms", "delay=99s", "bw=1bit"] {
            let e = bad.parse::<LinkSpec>().unwrap_err();
            assert!(e.contains("--link"), "{bad}: {e}");
        }
    }

}
