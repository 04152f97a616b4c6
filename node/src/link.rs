//! Emulated WAN links in user space (`--link bw=100mbit,delay=25ms[,jitter=5ms]`),
//! for tests and experiments on a kernel without `netem`: every socket of the
//! node is wrapped so that what it sends goes through one uplink token bucket
//! (the node's bandwidth, shared by all its connections, as a host's uplink
//! is) and arrives a one-way delay later, in order. What it receives is not
//! touched: the sender's own link shapes it. Off unless asked.
//!
//! Writes are accepted into a per-connection queue stamped with the time the
//! bucket has sent them by plus the delay; a pump task writes each chunk to
//! the socket at its time. A writer is held back (its write is pending) while
//! the bucket is more than a window ahead of the clock, so that a fast sender
//! cannot queue without bound and the transport's flow control still works.

use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use p2pml_proto::LinkSpec;

/// How far ahead of the clock the bucket may run before writers wait.
const WINDOW: Duration = Duration::from_millis(20);

/// A node's uplink: the bucket shared by all its connections.
#[derive(Debug)]
pub struct Link {
    spec: LinkSpec,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// When the bucket has sent everything accepted so far.
    free_at: Instant,
    /// The jitter's generator (xorshift; seeded per node).
    rng: u64,
}

impl Link {
    pub fn new(spec: LinkSpec, seed: u64) -> Arc<Link> {
        Arc::new(Link { spec, state: Mutex::new(Bucket { free_at: Instant::now(), rng: seed | 1 }) })
    }

    /// Takes `len` bytes through the bucket: when they arrive at the far end,
    /// or `Err(when)` to try again at `when` (the bucket is a window ahead).
    fn take(&self, len: usize) -> Result<Instant, Instant> {
        let now = Instant::now();
        let mut b = self.state.lock().expect("link lock");
        let start = b.free_at.max(now);
        if start > now + WINDOW {
            return Err(start - WINDOW);
        }
        let tx = self.spec.bits_per_sec.map_or(Duration::ZERO, |bps| Duration::from_secs_f64(len as f64 * 8.0 / bps as f64));
        b.free_at = start + tx;
        let mut delay = self.spec.delay;
        if !self.spec.jitter.is_zero() {
            b.rng ^= b.rng << 13;
            b.rng ^= b.rng >> 7;
            b.rng ^= b.rng << 17;
            let u = (b.rng >> 11) as f64 / (1u64 << 53) as f64;
            delay = delay.saturating_sub(self.spec.jitter) + self.spec.jitter.mul_f64(2.0 * u);
        }
        Ok(b.free_at + delay)
    }

    /// Wraps a socket: what is written to it goes through this link.
    pub fn shape<S>(self: &Arc<Self>, socket: S) -> Shaped<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (read, mut write) = futures::io::AsyncReadExt::split(socket);
        let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
        let failed = Arc::new(Mutex::new(None::<io::ErrorKind>));
        let f = failed.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            while let Some(c) = rx.recv().await {
                let r = match c {
                    Chunk::Data(at, data) => {
                        // In order: a chunk never overtakes the one before it.
                        last = last.max(at);
                        tokio::time::sleep_until(last).await;
                        write.write_all(&data).await.and(write.flush().await)
                    }
                    Chunk::Close => {
                        let _ = write.close().await;
                        return;
                    }
                };
                if let Err(e) = r {
                    *f.lock().expect("link lock") = Some(e.kind());
                    return;
                }
            }
            let _ = write.close().await;
        });
        Shaped { read, tx, link: self.clone(), failed, wait: None }
    }
}

enum Chunk {
    Data(Instant, Vec<u8>),
    Close,
}

/// A socket whose writes go through a [`Link`].
pub struct Shaped<S> {
    read: futures::io::ReadHalf<S>,
    tx: mpsc::UnboundedSender<Chunk>,
    link: Arc<Link>,
    failed: Arc<Mutex<Option<io::ErrorKind>>>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Shaped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Shaped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(kind) = *self.failed.lock().expect("link lock") {
            return Poll::Ready(Err(io::Error::new(kind, "the shaped link's socket failed")));
        }
        if let Some(w) = self.wait.as_mut() {
            if w.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = None;
        }
        // Chunks of at most 16 KiB, so that one large write does not hold the bucket alone.
        let n = buf.len().min(16 * 1024);
        match self.link.take(n) {
            Ok(at) => {
                if self.tx.send(Chunk::Data(at, buf[..n].to_vec())).is_err() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the shaped link is closed")));
                }
                Poll::Ready(Ok(n))
            }
            Err(when) => {
                let mut w = Box::pin(tokio::time::sleep_until(when));
                let _ = w.as_mut().poll(cx);
                self.wait = Some(w);
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued chunks are on their way; the pump flushes each as it writes it.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.tx.send(Chunk::Close);
        Poll::Ready(Ok(()))
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncReadExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// The shaping is what it says: 10 MB over 100 Mbit/s takes about 0.8 s
    /// (never less), and a one-byte ping's round trip is about the one-way
    /// delay when only one direction is shaped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_megabytes_over_100_mbit_take_about_0_8_s_and_a_ping_about_the_delay() {
        let spec: LinkSpec = "bw=100mbit,delay=25ms".parse().unwrap();
        let link = Link::new(spec, 1);
        let (a, b) = pair().await;
        let mut a = link.shape(a.compat());
        let mut b = b.compat();
        // Ping: a's byte arrives after the delay; b answers unshaped.
        let t = std::time::Instant::now();
        a.write_all(&[7]).await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        b.write_all(&one).await.unwrap();
        a.read_exact(&mut one).await.unwrap();
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(24) && rtt < Duration::from_millis(500), "ping {rtt:?}");
        // Bulk: 10 MB.
        let data = vec![3u8; 10_000_000];
        let t = std::time::Instant::now();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 10_000_000];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        a.write_all(&data).await.unwrap();
        let got = reader.await.unwrap();
        let took = t.elapsed();
        assert_eq!(got, data);
        eprintln!("10 MB over {spec}: {took:?}, ping {rtt:?}");
        assert!(took >= Duration::from_millis(800) && took < Duration::from_millis(3000), "10 MB took {took:?} (at least 0.8 s: the bucket; the upper bound leaves room for a loaded machine)");
    }
}
