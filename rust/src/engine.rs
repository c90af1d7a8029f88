//! The relay engine: a fixed set of worker threads, created once per process,
//! and the handles through which Python starts, watches and cancels sessions.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::bucket::Chain;
use crate::notify::Notifier;
use crate::session::{Counters, Outcome, Relay, Session};
use crate::tlsrelay::{SharedInfo, TlsInfo, TlsOptions, TlsRelay};
use crate::worker::{Command, Inbox};

/// Pipe size per direction, bytes (F_SETPIPE_SZ). Measured with one iperf3
/// stream through one session on loopback (2 cores, 10 interleaved rounds of
/// 1 GiB): 64 KiB (the kernel default) 15.3 Gbit/s at 0.23 CPU s/GiB,
/// 256 KiB 16.9 Gbit/s at 0.19, 1 MiB 16.0 at 0.19 (haproxy: 15.8 at 0.20).
/// 256 KiB it is: the speed of the large pipes, a quarter of the memory a
/// backlogged session can pin.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

/// What Python holds for a running (or finished) session.
#[derive(Debug)]
pub struct Handle {
    /// Unique per process; also the id the notifier reports.
    pub id: u64,
    /// Live byte counts.
    pub counters: Arc<Counters>,
    /// TLS facts of a TLS session (None for a plain one).
    pub tls: Option<SharedInfo>,
    outcome: Mutex<Option<Outcome>>,
    /// Released once told, so a loop's notifier (and its eventfd) goes away
    /// with the last session it waits for, not with the last handle.
    notifier: Mutex<Option<Arc<Notifier>>>,
    inbox: Arc<Inbox>,
}

impl Handle {
    /// A copy of the TLS facts (None for a plain session).
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.tls
            .as_ref()
            .map(|i| i.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// The outcome, once the worker has finished the session.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ask the worker to close both sockets; the outcome becomes `Cancelled`
    /// unless the session ended first.
    pub fn cancel(&self) {
        if self.outcome().is_none() {
            self.inbox.send(Command::Cancel(self.id));
        }
    }

    /// Called by the worker once the session's sockets are closed.
    pub(crate) fn complete(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        let notifier = self
            .notifier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(notifier) = notifier {
            notifier.push(self.id);
        }
    }
}

/// The worker threads of this process.
#[derive(Debug)]
pub struct Engine {
    inboxes: Vec<Arc<Inbox>>,
    next_id: AtomicU64,
    pipe_size: usize,
    totals: Arc<Counters>,
}

/// Limits of one new session.
#[derive(Debug, Default)]
pub struct Limits {
    /// Buckets of the a → b direction.
    pub up: Chain,
    /// Buckets of the b → a direction.
    pub down: Chain,
    /// Fail with `TimedOut` after this long without a byte either way.
    pub idle: Option<Duration>,
}

static ENGINE: OnceLock<Engine> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// The engine, started on first use: `workers` threads (default
/// `SWIFTFTP_RELAY_WORKERS`, else one per CPU) and pipes of `pipe_size`
/// bytes (default `SWIFTFTP_RELAY_PIPE_SIZE`, else [`DEFAULT_PIPE_SIZE`]).
/// Arguments given after the engine started must match it.
pub fn init(workers: Option<usize>, pipe_size: Option<usize>) -> io::Result<&'static Engine> {
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(engine) = ENGINE.get() {
        if workers.is_some_and(|w| w != engine.workers())
            || pipe_size.is_some_and(|p| p != engine.pipe_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "relay engine already started with other settings",
            ));
        }
        return Ok(engine);
    }
    let workers = workers
        .or_else(|| env_usize("SWIFTFTP_RELAY_WORKERS"))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pipe_size = pipe_size
        .or_else(|| env_usize("SWIFTFTP_RELAY_PIPE_SIZE"))
        .unwrap_or(DEFAULT_PIPE_SIZE);
    let engine = Engine::new(workers, pipe_size)?;
    Ok(ENGINE.get_or_init(|| engine))
}

/// The engine if it has started.
pub fn get() -> Option<&'static Engine> {
    ENGINE.get()
}

impl Engine {
    /// Start `workers` threads (they live as long as the process, or until
    /// the engine is dropped, which only tests do).
    pub fn new(workers: usize, pipe_size: usize) -> io::Result<Engine> {
        let totals = Arc::new(Counters::default());
        let inboxes = (0..workers.max(1))
            .map(crate::worker::spawn)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Engine {
            inboxes,
            next_id: AtomicU64::new(1),
            pipe_size,
            totals,
        })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.inboxes.len()
    }

    /// Pipe size asked for each direction.
    pub fn pipe_size(&self) -> usize {
        self.pipe_size
    }

    /// Bytes moved by every session so far, (up, down).
    pub fn totals(&self) -> (u64, u64) {
        self.totals.get()
    }

    /// Relay between `a` and `b` (ownership passes here; they are closed on
    /// error too) on the least loaded worker. Completion is pushed to `notifier`.
    pub fn start(
        &self,
        a: OwnedFd,
        b: OwnedFd,
        limits: Limits,
        notifier: Arc<Notifier>,
    ) -> io::Result<Arc<Handle>> {
        let counters = Arc::new(Counters::default());
        let session = Session::new(
            a,
            b,
            limits.up,
            limits.down,
            limits.idle,
            self.pipe_size,
            counters.clone(),
            self.totals.clone(),
            Instant::now(),
        )?;
        Ok(self.launch(Box::new(session), counters, None, notifier))
    }

    /// Like [`Engine::start`], with TLS terminated on `a` (see [`TlsRelay`]).
    pub fn start_tls(
        &self,
        a: OwnedFd,
        b: OwnedFd,
        limits: Limits,
        notifier: Arc<Notifier>,
        opts: TlsOptions,
    ) -> io::Result<Arc<Handle>> {
        let counters = Arc::new(Counters::default());
        let info: SharedInfo = Arc::default();
        let session = TlsRelay::new(
            a,
            b,
            limits.up,
            limits.down,
            limits.idle,
            self.pipe_size,
            counters.clone(),
            self.totals.clone(),
            Instant::now(),
            opts,
            info.clone(),
        )?;
        Ok(self.launch(Box::new(session), counters, Some(info), notifier))
    }

    fn launch(
        &self,
        session: Box<dyn Relay>,
        counters: Arc<Counters>,
        tls: Option<SharedInfo>,
        notifier: Arc<Notifier>,
    ) -> Arc<Handle> {
        let inbox = self
            .inboxes
            .iter()
            .min_by_key(|i| i.load.load(Ordering::Relaxed))
            .expect("at least one worker")
            .clone();
        let handle = Arc::new(Handle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            counters,
            tls,
            outcome: Mutex::new(None),
            notifier: Mutex::new(Some(notifier)),
            inbox: inbox.clone(),
        });
        inbox.load.fetch_add(1, Ordering::Relaxed);
        inbox.send(Command::Start(session, handle.clone()));
        handle
    }

    /// A bucket's rate changed: every worker re-evaluates its sleepers now.
    pub fn rebucket(&self) {
        for inbox in &self.inboxes {
            inbox.send(Command::Rebucket);
        }
    }

    /// Sessions running now, over all workers.
    pub fn running(&self) -> usize {
        self.inboxes
            .iter()
            .map(|i| i.load.load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for inbox in &self.inboxes {
            inbox.send(Command::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Bucket;
    use crate::testutil::{send_urgent, tcp_pair};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    fn wait_done(h: &Handle) -> Outcome {
        for _ in 0..2000 {
            if let Some(o) = h.outcome() {
                return o;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("session did not finish");
    }

    fn relay(
        engine: &Engine,
        limits: Limits,
        n: &Arc<Notifier>,
    ) -> (TcpStream, TcpStream, Arc<Handle>) {
        let (client, ra) = tcp_pair();
        let (rb, server) = tcp_pair();
        let h = engine
            .start(ra.into(), rb.into(), limits, n.clone())
            .unwrap();
        (client, server, h)
    }

    #[test]
    fn sessions_complete_and_notify() {
        let engine = Engine::new(2, 0).unwrap();
        let n = Arc::new(Notifier::new().unwrap());
        let mut ids = Vec::new();
        for i in 0..20u8 {
            let (mut c, mut s, h) = relay(&engine, Limits::default(), &n);
            c.write_all(&[i; 1000]).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(got, vec![i; 1000]);
            assert_eq!(wait_done(&h), Outcome::Done(1000, 0));
            ids.push(h.id);
        }
        let mut notified = n.drain();
        notified.sort_unstable();
        assert_eq!(notified, ids);
        assert_eq!(engine.totals(), (20_000, 0));
        assert_eq!(
            Arc::strong_count(&n),
            1,
            "finished sessions let go of the notifier"
        );
        assert_eq!(engine.running(), 0);
    }

    #[test]
    fn cancel_closes_both_sockets() {
        let engine = Engine::new(1, 0).unwrap();
        let n = Arc::new(Notifier::new().unwrap());
        let (mut c, mut s, h) = relay(&engine, Limits::default(), &n);
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        h.cancel();
        assert_eq!(wait_done(&h), Outcome::Cancelled);
        assert_eq!(h.counters.get(), (5, 0));
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn idle_timeout_strikes() {
        let engine = Engine::new(1, 0).unwrap();
        let n = Arc::new(Notifier::new().unwrap());
        let limits = Limits {
            idle: Some(Duration::from_millis(100)),
            ..Limits::default()
        };
        let t0 = Instant::now();
        let (_c, _s, h) = relay(&engine, limits, &n);
        assert_eq!(wait_done(&h), Outcome::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn throttled_rate_and_live_rate_change() {
        let engine = Engine::new(1, 0).unwrap();
        let n = Arc::new(Notifier::new().unwrap());
        let bucket = Arc::new(Bucket::new(1_000_000.0, Some(20_000.0), Instant::now()).unwrap());
        let limits = Limits {
            up: Chain::new(vec![bucket.clone()]),
            ..Limits::default()
        };
        let (mut c, mut s, h) = relay(&engine, limits, &n);
        let writer = std::thread::spawn(move || {
            let chunk = [0u8; 65536];
            while c.write_all(&chunk).is_ok() {}
        });
        let mut buf = vec![0u8; 65536];
        let measure = |s: &mut TcpStream, buf: &mut [u8], secs: f64| {
            let t0 = Instant::now();
            let mut total = 0usize;
            while t0.elapsed().as_secs_f64() < secs {
                total += s.read(buf).unwrap();
            }
            total as f64 / t0.elapsed().as_secs_f64()
        };
        s.read_exact(&mut buf[..1]).unwrap();
        let slow = measure(&mut s, &mut buf, 1.0);
        bucket.set_rate(0.0, None, Instant::now()).unwrap();
        engine.rebucket();
        let fast = measure(&mut s, &mut buf, 0.5);
        assert!((slow - 1e6).abs() < 0.05e6, "{slow}");
        assert!(fast > 20e6, "{fast}");
        h.cancel();
        assert_eq!(wait_done(&h), Outcome::Cancelled);
        writer.join().unwrap();
    }

    #[test]
    fn urgent_data_mid_stream_goes_through() {
        let engine = Engine::new(1, 0).unwrap();
        let n = Arc::new(Notifier::new().unwrap());
        let (mut c, mut s, h) = relay(&engine, Limits::default(), &n);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 7];
        for round in 0..3 {
            // No EOF to come: only EPOLLPRI tells the worker of the mark.
            c.write_all(b"abc").unwrap();
            send_urgent(&c, b"!");
            c.write_all(b"def").unwrap();
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"abc!def", "round {round}");
        }
        h.cancel();
        assert_eq!(wait_done(&h), Outcome::Cancelled);
        assert_eq!(h.counters.get(), (21, 0));
    }
}
