//! One TLS relay session: side `a` is a TLS client (we are the server,
//! rustls), side `b` is plain. Same contract as the splice [`Session`]:
//! the worker reports readiness, [`Relay::run`] moves what it can without
//! blocking, buckets throttle plaintext, counters count plaintext, half-close
//! is kept (a's close_notify or EOF → `shutdown(SHUT_WR)` on b once all was
//! delivered; b's EOF → close_notify to a, then `shutdown(SHUT_WR)` on a).
//!
//! Phases: the handshake (bounded by its own deadline), then either the
//! userspace path (rustls encrypts and decrypts here) or, where the kernel
//! has TLS and takes the negotiated suite, the kernel path: the traffic
//! secrets go to the socket (`TLS_TX`/`TLS_RX`) and a plain splice
//! [`Session`] takes over the same two fds. For that, the handshake reads
//! the client's records one at a time, so that no byte after its Finished is
//! read into user space, and the session tickets go out before the handover.

use std::io::{self, BufRead, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    getsockopt, recv, send, sendmsg, setsockopt, shutdown, sockopt, MsgFlags, Shutdown,
};
use rustls::{HandshakeKind, ServerConnection};

use crate::bucket::{Chain, Reservation};
use crate::ktls;
use crate::session::{Counters, Outcome, Relay, Session, Status, BUDGET};
use crate::tls::{with_tag, Loaded};

/// Buffer sizes of one TLS session.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Ciphertext read from the TLS socket per recv().
    pub cipher: usize,
    /// Plaintext read from the plain socket per recv().
    pub plain: usize,
    /// rustls's limit on encrypted bytes waiting to be sent.
    pub tls_out: usize,
}

/// Data connections. Measured with benches/tls_bench.py (1 GiB through one
/// session, 2 rounds, AES-128-GCM, aws-lc-rs, 2 vCPUs shared with both
/// traffic ends), relay CPU per GiB up/down for (cipher, plain, tls_out):
/// 16/16/64 KiB 1.340/1.095 s, 64/64/64 KiB 1.195/1.020 s, 256/64/256 KiB
/// 1.155/1.035 s, 256/256/1024 KiB 1.170/1.000 s. Reading 256 KiB of
/// ciphertext per recv() instead of 16 KiB saves 14 % upstream (rustls
/// takes it 4 KiB at a time from memory instead of one syscall each);
/// downstream, rustls's records go out in one sendmsg of up to 64 buffers
/// whatever the size, and larger buffers were within the noise (±3 %), so
/// they stay at 64 KiB (rustls's default output limit). Where the CPU goes
/// (perf, upstream): AES-GCM 32 %, kernel copies 14 %, copies in rustls 10 %.
pub const DATA_SIZES: Sizes = Sizes {
    cipher: 256 * 1024,
    plain: 64 * 1024,
    tls_out: 64 * 1024,
};

/// [`DATA_SIZES`], or `SWIFTFTP_TLS_SIZES=cipher,plain,tls_out` (KiB; for
/// benchmarking other sizes without a rebuild).
pub fn data_sizes() -> Sizes {
    static SIZES: std::sync::OnceLock<Sizes> = std::sync::OnceLock::new();
    *SIZES.get_or_init(|| {
        let custom = std::env::var("SWIFTFTP_TLS_SIZES").ok().and_then(|v| {
            let kib: Vec<usize> = v
                .split(',')
                .map(|n| n.trim().parse::<usize>().ok().filter(|&n| n > 0))
                .collect::<Option<_>>()?;
            match kib[..] {
                [cipher, plain, tls_out] => Some(Sizes {
                    cipher: cipher << 10,
                    plain: plain << 10,
                    tls_out: tls_out << 10,
                }),
                _ => None,
            }
        });
        custom.unwrap_or(DATA_SIZES)
    })
}

/// Control connections: a few lines at a time. The ciphertext buffer still
/// holds one whole record (16 KiB + overhead) for the record-at-a-time handshake.
pub const CONTROL_SIZES: Sizes = Sizes {
    cipher: 20 * 1024,
    plain: 16 * 1024,
    tls_out: 64 * 1024,
};

/// Largest TLS record on the wire: header, 2^14 plaintext, 2048 expansion.
const MAX_RECORD: usize = 5 + 16384 + 2048;

/// What Python can see of a TLS session.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// "handshake", then "rustls" (userspace) or "ktls" (kernel, splice).
    pub path: &'static str,
    /// Negotiated protocol version ("TLSv1_3").
    pub version: Option<String>,
    /// Negotiated cipher suite.
    pub cipher: Option<String>,
    /// The handshake resumed an earlier session.
    pub resumed: bool,
    /// The tag of the session it resumed.
    pub resumed_tag: Option<Vec<u8>>,
    /// Server name the client asked for (SNI).
    pub sni: Option<String>,
    /// Why the kernel path was not taken (when it was available).
    pub note: Option<String>,
}

/// Shared between the worker and the Python handle.
pub type SharedInfo = Arc<Mutex<TlsInfo>>;

/// How to terminate TLS on one session.
#[derive(Debug)]
pub struct TlsOptions {
    /// Certificate and server configuration for the handshake.
    pub loaded: Arc<Loaded>,
    /// Tag stored with sessions this connection issues.
    pub tag: Vec<u8>,
    /// The handshake must resume a session with this tag.
    pub require: Option<Vec<u8>>,
    /// Ciphertext already read from `a` (it comes first).
    pub initial: Vec<u8>,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Try kernel TLS after the handshake.
    pub ktls: bool,
    /// Buffer sizes.
    pub sizes: Sizes,
}

/// A byte buffer with a filled window `start..end`.
#[derive(Debug)]
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        Buf {
            data: vec![0; cap],
            start: 0,
            end: 0,
        }
    }
    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// Free room at the end (moving the filled bytes to the front first if
    /// the end is reached).
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }
    fn commit(&mut self, n: usize) {
        self.end += n;
    }
}

/// Writes to a non-blocking socket without SIGPIPE; vectored writes are one sendmsg.
struct FdWriter<'a>(BorrowedFd<'a>);

impl Write for FdWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        retry(|| send(self.0.as_raw_fd(), buf, SEND_FLAGS)).map_err(io::Error::from)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        retry(|| sendmsg::<()>(self.0.as_raw_fd(), bufs, &[], SEND_FLAGS, None))
            .map_err(io::Error::from)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL.union(MsgFlags::MSG_DONTWAIT);

fn retry(mut f: impl FnMut() -> Result<usize, Errno>) -> Result<usize, Errno> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// One direction's throttling and end state.
#[derive(Debug)]
struct Dir {
    chain: Chain,
    grant: u64,
    pending: Option<Reservation>,
    /// The source's stream ended (and, up, every plaintext byte is out of rustls).
    eof: bool,
    /// The destination was shut for writing (down: after close_notify went out).
    shut: bool,
}

enum Next {
    Idle,
    Sleep(Instant),
    Busy,
}

/// The TLS state machine before any kernel handover.
struct Core {
    socks: [OwnedFd; 2],
    conn: ServerConnection,
    readable: [bool; 2],
    writable: [bool; 2],
    dirs: [Dir; 2],
    /// Ciphertext from a not yet given to rustls.
    cipher: Buf,
    /// Plaintext from b not yet taken by rustls.
    plain: Buf,
    /// Plaintext rustls holds for b.
    plain_avail: usize,
    /// The client's close_notify came.
    peer_closed: bool,
    /// TCP EOF on a.
    a_eof: bool,
    close_sent: bool,
    handshaking: bool,
    handshake_deadline: Instant,
    /// Read whole records only (kernel handover possible after the handshake).
    exact: bool,
    /// Tickets are being flushed before the kernel handover.
    switching: bool,
    tag: Vec<u8>,
    require: Option<Vec<u8>>,
    resumed_tag: Option<Vec<u8>>,
    idle: Option<Duration>,
    last_active: Instant,
    error: Option<Errno>,
    outcome: Option<Outcome>,
    counters: Arc<Counters>,
    totals: Arc<Counters>,
    info: SharedInfo,
    pipe_size: usize,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCore")
            .field(
                "fds",
                &[self.socks[0].as_raw_fd(), self.socks[1].as_raw_fd()],
            )
            .field("handshaking", &self.handshaking)
            .field("outcome", &self.outcome)
            .finish()
    }
}

#[derive(Debug)]
enum Phase {
    Tls(Box<Core>),
    Kernel(Box<Session>),
    /// The splice session could not be made: the fds are closed already.
    Failed(Outcome),
    /// Only while handing over.
    Moving,
}

/// A TLS relay session (see the module docs).
#[derive(Debug)]
pub struct TlsRelay {
    fds: [RawFd; 2],
    phase: Phase,
}

fn protocol_error(handshaking: bool, e: &rustls::Error) -> Outcome {
    let what = if handshaking {
        "TLS handshake failed"
    } else {
        "TLS error"
    };
    Outcome::FailedWith(Errno::EPROTO, format!("{what}: {e}"))
}

impl TlsRelay {
    /// Terminate TLS on `a` and relay its plaintext with `b` (both made
    /// non-blocking here). Plaintext counts go to `counters` and `totals`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: OwnedFd,
        b: OwnedFd,
        up: Chain,
        down: Chain,
        idle: Option<Duration>,
        pipe_size: usize,
        counters: Arc<Counters>,
        totals: Arc<Counters>,
        now: Instant,
        opts: TlsOptions,
        info: SharedInfo,
    ) -> Result<TlsRelay, Errno> {
        for s in [&a, &b] {
            let flags = OFlag::from_bits_retain(fcntl(s, FcntlArg::F_GETFL)?);
            fcntl(s, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
            // As in the splice session: forward what comes, at once.
            let _ = setsockopt(s, sockopt::TcpNoDelay, &true);
        }
        let mut conn =
            ServerConnection::new(opts.loaded.server.clone()).map_err(|_| Errno::EINVAL)?;
        conn.set_buffer_limit(Some(opts.sizes.tls_out));
        let mut cipher = Buf::new(opts.sizes.cipher.max(MAX_RECORD).max(opts.initial.len()));
        cipher.spare()[..opts.initial.len()].copy_from_slice(&opts.initial);
        cipher.commit(opts.initial.len());
        info.lock().unwrap_or_else(PoisonError::into_inner).path = "handshake";
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let dir = |chain| Dir {
            chain,
            grant: 0,
            pending: None,
            eof: false,
            shut: false,
        };
        let core = Core {
            socks: [a, b],
            conn,
            readable: [true, true],
            writable: [true, true],
            dirs: [dir(up), dir(down)],
            cipher,
            plain: Buf::new(opts.sizes.plain),
            plain_avail: 0,
            peer_closed: false,
            a_eof: false,
            close_sent: false,
            handshaking: true,
            handshake_deadline: now + opts.handshake_timeout,
            exact: opts.ktls,
            switching: false,
            tag: opts.tag,
            require: opts.require,
            resumed_tag: None,
            idle,
            last_active: now,
            error: None,
            outcome: None,
            counters,
            totals,
            info,
            pipe_size,
        };
        Ok(TlsRelay {
            fds,
            phase: Phase::Tls(Box::new(core)),
        })
    }

    /// Hand the sockets to the kernel and a splice session.
    fn handover(&mut self, now: Instant) -> Status {
        let Phase::Tls(core) = std::mem::replace(&mut self.phase, Phase::Moving) else {
            unreachable!("handover from the TLS phase only");
        };
        let Core {
            socks: [a, b],
            conn,
            mut dirs,
            idle,
            counters,
            totals,
            info,
            pipe_size,
            ..
        } = *core;
        for d in &mut dirs {
            let held = d.grant + d.pending.take().map_or(0, |r| r.amount());
            d.chain.refund(held, now);
        }
        let version = conn.protocol_version();
        let secrets = conn.dangerous_extract_secrets();
        let [up, down] = dirs.map(|d| d.chain);
        let mut session = match Session::new(a, b, up, down, idle, pipe_size, counters, totals, now)
        {
            Ok(s) => s,
            Err(e) => {
                // The fds are closed with the failed constructor's arguments.
                self.phase = Phase::Failed(Outcome::Failed(e));
                return Status::Finished;
            }
        };
        session.set_ktls(0);
        let setup = secrets
            .map_err(|e| format!("kernel TLS: cannot extract the secrets: {e}"))
            .and_then(|s| {
                let version = version.ok_or("kernel TLS: no protocol version")?;
                let tx = ktls::crypto_info(version, s.tx.0, &s.tx.1);
                let rx = ktls::crypto_info(version, s.rx.0, &s.rx.1);
                let (Some(tx), Some(rx)) = (tx, rx) else {
                    return Err("kernel TLS: suite without a kernel cipher".to_string());
                };
                ktls::enable(session.sock(0), &tx, &rx)
                    .map_err(|e| format!("kernel TLS setup failed: {e}"))
            });
        match setup {
            Ok(()) => info.lock().unwrap_or_else(PoisonError::into_inner).path = "ktls",
            Err(msg) => session.end(Outcome::FailedWith(Errno::EPROTO, msg), now),
        }
        self.phase = Phase::Kernel(Box::new(session));
        let Phase::Kernel(s) = &mut self.phase else {
            unreachable!()
        };
        s.run(now)
    }

    fn core(&self) -> Option<&Core> {
        match &self.phase {
            Phase::Tls(c) => Some(c),
            _ => None,
        }
    }
}

impl Relay for TlsRelay {
    fn fds(&self) -> [RawFd; 2] {
        match self.phase {
            // Closed (and so out of the epoll set): numbers another socket may have now.
            Phase::Failed(_) => [-1, -1],
            _ => self.fds,
        }
    }

    fn ready(&mut self, side: usize, readable: bool, writable: bool, error: bool) {
        match &mut self.phase {
            Phase::Tls(c) => c.ready(side, readable, writable, error),
            Phase::Kernel(s) => s.ready(side, readable, writable, error),
            _ => {}
        }
    }

    fn urgent(&mut self, side: usize) {
        match &mut self.phase {
            Phase::Tls(c) => c.readable[side] = true,
            Phase::Kernel(s) => s.urgent(side),
            _ => {}
        }
    }

    fn is_throttled(&self) -> bool {
        match &self.phase {
            Phase::Tls(c) => c.dirs.iter().any(|d| d.pending.is_some()),
            Phase::Kernel(s) => s.is_throttled(),
            _ => false,
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Tls(c) if c.handshaking || c.switching => Some(c.handshake_deadline),
            Phase::Tls(c) => c.idle.map(|d| c.last_active + d),
            Phase::Kernel(s) => s.idle_deadline(),
            _ => None,
        }
    }

    fn timeout_outcome(&self) -> Outcome {
        match self.core() {
            Some(c) if c.handshaking || c.switching => {
                Outcome::FailedWith(Errno::ETIMEDOUT, "TLS handshake timed out".into())
            }
            _ => Outcome::TimedOut,
        }
    }

    fn outcome(&self) -> Option<&Outcome> {
        match &self.phase {
            Phase::Tls(c) => c.outcome.as_ref(),
            Phase::Kernel(s) => s.outcome(),
            Phase::Failed(o) => Some(o),
            Phase::Moving => None,
        }
    }

    fn end(&mut self, outcome: Outcome, now: Instant) {
        match &mut self.phase {
            Phase::Tls(c) => c.end(outcome, now),
            Phase::Kernel(s) => s.end(outcome, now),
            _ => {}
        }
    }

    fn run(&mut self, now: Instant) -> Status {
        match &mut self.phase {
            Phase::Tls(c) => {
                let status = c.run(now);
                if c.switching && c.outcome.is_none() && !c.conn.wants_write() {
                    return self.handover(now);
                }
                status
            }
            Phase::Kernel(s) => s.run(now),
            _ => Status::Finished,
        }
    }
}

impl Core {
    fn ready(&mut self, side: usize, readable: bool, writable: bool, error: bool) {
        if readable {
            self.readable[side] = true;
        }
        if writable {
            self.writable[side] = true;
        }
        if error && self.error.is_none() {
            match getsockopt(&self.socks[side], sockopt::SocketError) {
                Ok(0) => {}
                Ok(e) => self.error = Some(Errno::from_raw(e)),
                Err(e) => self.error = Some(e),
            }
        }
    }

    fn end(&mut self, outcome: Outcome, now: Instant) {
        if self.outcome.is_none() {
            for d in &mut self.dirs {
                let held = d.grant + d.pending.take().map_or(0, |r| r.amount());
                d.chain.refund(held, now);
                d.grant = 0;
            }
            self.outcome = Some(outcome);
        }
    }

    fn run(&mut self, now: Instant) -> Status {
        if self.outcome.is_some() {
            return Status::Finished;
        }
        if let Some(e) = self.error {
            self.end(Outcome::Failed(e), now);
            return Status::Finished;
        }
        if self.handshaking {
            match self.handshake(now) {
                Err(outcome) => {
                    self.end(outcome, now);
                    return Status::Finished;
                }
                Ok(false) => return Status::Waiting(None),
                Ok(true) => {}
            }
        }
        if self.switching {
            // Nothing moves until the tickets are out and the kernel has the keys.
            return match self.flush() {
                Err(e) => {
                    self.end(Outcome::Failed(e), now);
                    Status::Finished
                }
                Ok(()) => Status::Waiting(None),
            };
        }
        let mut wake = None;
        let mut busy = false;
        for dir in 0..2 {
            let next = if dir == 0 {
                self.pump_up(now)
            } else {
                self.pump_down(now)
            };
            match next {
                Err(outcome) => {
                    self.end(outcome, now);
                    return Status::Finished;
                }
                Ok(Next::Idle) => {}
                Ok(Next::Busy) => busy = true,
                Ok(Next::Sleep(at)) => wake = Some(wake.map_or(at, |w: Instant| w.min(at))),
            }
        }
        if self.dirs.iter().all(|d| d.shut) {
            let (up, down) = self.counters.get();
            self.outcome = Some(Outcome::Done(up, down));
            Status::Finished
        } else if busy {
            Status::Busy
        } else {
            Status::Waiting(wake)
        }
    }

    /// Send what rustls has queued, as far as the socket takes it.
    fn flush(&mut self) -> Result<(), Errno> {
        while self.writable[0] && self.conn.wants_write() {
            match self.conn.write_tls(&mut FdWriter(self.socks[0].as_fd())) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable[0] = false,
                Err(e) => return Err(errno(&e)),
            }
        }
        Ok(())
    }

    /// Bytes of the first record in `cipher` if it is complete, else 0.
    fn complete_record(&self) -> usize {
        let b = self.cipher.filled();
        if b.len() < 5 {
            return 0;
        }
        let len = 5 + u16::from_be_bytes([b[3], b[4]]) as usize;
        if b.len() >= len {
            len
        } else {
            0
        }
    }

    /// Bytes to read to complete the first record in `cipher`.
    fn record_need(&self) -> usize {
        let b = self.cipher.filled();
        if b.len() < 5 {
            5 - b.len()
        } else {
            (5 + u16::from_be_bytes([b[3], b[4]]) as usize).saturating_sub(b.len())
        }
    }

    /// Give rustls the ciphertext held (whole records only in exact mode)
    /// and process it. Returns whether any was taken.
    fn feed(&mut self) -> Result<bool, Outcome> {
        let mut taken = false;
        while !self.cipher.is_empty() {
            let avail = if self.exact {
                self.complete_record()
            } else {
                self.cipher.len()
            };
            if avail == 0 {
                break;
            }
            let mut slice = &self.cipher.filled()[..avail];
            match self.conn.read_tls(&mut slice) {
                Ok(0) => break, // after close_notify rustls takes nothing more
                Ok(n) => {
                    self.cipher.consume(n);
                    taken = true;
                }
                // Its plaintext buffer is full: deliver some first.
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(e) => {
                    return Err(Outcome::FailedWith(Errno::EPROTO, format!("TLS: {e}")));
                }
            }
            self.process()?;
            if self.plain_avail > 0 && !self.handshaking {
                break;
            }
        }
        Ok(taken)
    }

    fn process(&mut self) -> Result<(), Outcome> {
        let mut found = None;
        let conn = &mut self.conn;
        let result = with_tag(&self.tag, &mut found, || conn.process_new_packets());
        if found.is_some() {
            self.resumed_tag = found;
        }
        match result {
            Ok(state) => {
                self.plain_avail = state.plaintext_bytes_to_read();
                self.peer_closed |= state.peer_has_closed();
                Ok(())
            }
            Err(e) => {
                let outcome = protocol_error(self.conn.is_handshaking(), &e);
                // The alert rustls queued, if the socket takes it.
                let _ = self.flush();
                Err(outcome)
            }
        }
    }

    /// Drive the handshake; Ok(true) once it is complete (and allowed).
    fn handshake(&mut self, now: Instant) -> Result<bool, Outcome> {
        loop {
            self.flush().map_err(Outcome::Failed)?;
            if !self.conn.is_handshaking() {
                break;
            }
            if self.feed()? {
                continue;
            }
            if !self.readable[0] {
                return Ok(false);
            }
            let want = if self.exact {
                self.record_need()
            } else {
                usize::MAX
            };
            let spare = self.cipher.spare();
            let want = want.min(spare.len());
            let fd = self.socks[0].as_raw_fd();
            match retry(|| recv(fd, &mut spare[..want], MsgFlags::MSG_DONTWAIT)) {
                Ok(0) => {
                    return Err(Outcome::FailedWith(
                        Errno::ECONNRESET,
                        "connection closed during the TLS handshake".into(),
                    ))
                }
                Ok(n) => self.cipher.commit(n),
                Err(Errno::EAGAIN) => self.readable[0] = false,
                Err(e) => return Err(Outcome::Failed(e)),
            }
        }
        self.handshaking = false;
        self.last_active = now;
        let resumed = self.conn.handshake_kind() == Some(HandshakeKind::Resumed);
        let shared = self.info.clone();
        let mut info = shared.lock().unwrap_or_else(PoisonError::into_inner);
        info.version = self.conn.protocol_version().map(|v| format!("{v:?}"));
        info.cipher = self
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()));
        info.resumed = resumed;
        info.resumed_tag = if resumed {
            self.resumed_tag.clone()
        } else {
            None
        };
        info.sni = self.conn.server_name().map(str::to_owned);
        info.path = "rustls";
        if let Some(required) = &self.require {
            if !resumed || self.resumed_tag.as_ref() != Some(required) {
                drop(info);
                // A reset, not close_notify: a clean close would be an empty file to
                // the client (ftplib: an empty listing, no error); a reset is an error
                // in every client, as vsftpd's 522 reply is.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                let _ = setsockopt(&self.socks[0], sockopt::Linger, &linger);
                return Err(Outcome::FailedWith(
                    Errno::EACCES,
                    "TLS session not resumed from the control connection".into(),
                ));
            }
        }
        if self.exact {
            let suite = self.conn.negotiated_cipher_suite().map(|s| s.suite());
            let note = if !suite.is_some_and(ktls::suite_supported) {
                Some(format!(
                    "no kernel cipher for {}",
                    info.cipher.as_deref().unwrap_or("?")
                ))
            } else if !self.cipher.is_empty() || self.plain_avail > 0 {
                Some("client data arrived with the handshake".to_string())
            } else {
                match ktls::set_ulp(self.socks[0].as_fd()) {
                    Ok(()) => None,
                    Err(e) => Some(format!("setting the tls ULP failed: {e}")),
                }
            };
            match note {
                None => self.switching = true,
                Some(note) => {
                    info.note = Some(note);
                    self.exact = false;
                }
            }
        }
        Ok(true)
    }

    /// Take tokens for up to `max` bytes of direction `dir`: Err(wake) to sleep.
    fn throttle(d: &mut Dir, max: usize, now: Instant) -> Result<usize, Instant> {
        if d.chain.is_empty() {
            return Ok(max);
        }
        if d.grant == 0 {
            let r = match d.pending.take() {
                Some(r) => Some(r),
                None => d.chain.reserve(max as u64, now),
            };
            if let Some(r) = r {
                if let Some(wait) = d.chain.wait(&r, now) {
                    d.pending = Some(r);
                    return Err(now + wait);
                }
                d.grant = r.amount();
            }
        }
        Ok(if d.grant > 0 {
            max.min(d.grant as usize)
        } else {
            max
        })
    }

    /// a → b: ciphertext in, plaintext out.
    fn pump_up(&mut self, now: Instant) -> Result<Next, Outcome> {
        let mut moved = 0;
        loop {
            if moved >= BUDGET {
                return Ok(Next::Busy);
            }
            let mut progress = false;
            if self.plain_avail > 0 && self.writable[1] {
                let mut reader = self.conn.reader();
                match reader.fill_buf() {
                    Ok(buf) if !buf.is_empty() => {
                        let d = &mut self.dirs[0];
                        let max = match Self::throttle(d, buf.len(), now) {
                            Ok(max) => max,
                            Err(wake) => return Ok(Next::Sleep(wake)),
                        };
                        let fd = self.socks[1].as_raw_fd();
                        match retry(|| send(fd, &buf[..max], SEND_FLAGS)) {
                            Ok(n) => {
                                reader.consume(n);
                                self.plain_avail -= n;
                                d.grant = d.grant.saturating_sub(n as u64);
                                moved += n;
                                self.counters.add(0, n as u64);
                                self.totals.add(0, n as u64);
                                self.last_active = now;
                                progress = true;
                            }
                            Err(Errno::EAGAIN) => self.writable[1] = false,
                            Err(e) => return Err(Outcome::Failed(e)),
                        }
                    }
                    Ok(_) => self.plain_avail = 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plain_avail = 0,
                    Err(_) => self.plain_avail = 0, // unexpected EOF: see below
                }
            }
            let d = &mut self.dirs[0];
            if self.plain_avail == 0 && !d.eof {
                if !self.cipher.is_empty() {
                    progress |= self.feed()?;
                } else if self.readable[0] && !self.a_eof {
                    let spare = self.cipher.spare();
                    let fd = self.socks[0].as_raw_fd();
                    match retry(|| recv(fd, &mut spare[..], MsgFlags::MSG_DONTWAIT)) {
                        Ok(0) => {
                            self.a_eof = true;
                            // Tell rustls (it may hold a partial record: truncated).
                            let _ = self.conn.read_tls(&mut &[][..]);
                            self.process()?;
                            progress = true;
                        }
                        Ok(n) => {
                            self.cipher.commit(n);
                            self.last_active = now;
                            progress = true;
                        }
                        Err(Errno::EAGAIN) => {
                            self.readable[0] = false;
                            let d = &mut self.dirs[0];
                            d.chain.refund(std::mem::take(&mut d.grant), now);
                        }
                        Err(e) => return Err(Outcome::Failed(e)),
                    }
                }
                let d = &mut self.dirs[0];
                // The client's stream ends at its close_notify, or (leniently,
                // like most FTP servers) at a TCP EOF without one.
                if self.plain_avail == 0
                    && (self.peer_closed || (self.a_eof && self.cipher.is_empty()))
                {
                    d.eof = true;
                    d.chain.refund(std::mem::take(&mut d.grant), now);
                }
            }
            let d = &mut self.dirs[0];
            if d.eof && self.plain_avail == 0 && !d.shut {
                let _ = shutdown(self.socks[1].as_raw_fd(), Shutdown::Write);
                d.shut = true;
            }
            if !progress {
                return Ok(Next::Idle);
            }
        }
    }

    /// b → a: plaintext in, records out.
    fn pump_down(&mut self, now: Instant) -> Result<Next, Outcome> {
        let mut moved = 0;
        loop {
            if moved >= BUDGET {
                return Ok(Next::Busy);
            }
            let mut progress = false;
            if self.writable[0] && self.conn.wants_write() {
                match self.conn.write_tls(&mut FdWriter(self.socks[0].as_fd())) {
                    Ok(n) => progress |= n > 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable[0] = false,
                    Err(e) => return Err(Outcome::Failed(errno(&e))),
                }
            }
            let d = &mut self.dirs[1];
            if !self.plain.is_empty() {
                let n = self
                    .conn
                    .writer()
                    .write(self.plain.filled())
                    .map_err(|e| Outcome::Failed(errno(&e)))?;
                if n > 0 {
                    self.plain.consume(n);
                    moved += n;
                    self.counters.add(1, n as u64);
                    self.totals.add(1, n as u64);
                    progress = true;
                }
            } else if !d.eof && self.readable[1] {
                let spare = self.plain.spare();
                let max = match Self::throttle(d, spare.len(), now) {
                    Ok(max) => max,
                    Err(wake) => return Ok(Next::Sleep(wake)),
                };
                let fd = self.socks[1].as_raw_fd();
                match retry(|| recv(fd, &mut spare[..max], MsgFlags::MSG_DONTWAIT)) {
                    Ok(0) => {
                        d.eof = true;
                        d.chain.refund(std::mem::take(&mut d.grant), now);
                        progress = true;
                    }
                    Ok(n) => {
                        self.plain.commit(n);
                        d.grant = d.grant.saturating_sub(n as u64);
                        self.last_active = now;
                        progress = true;
                    }
                    Err(Errno::EAGAIN) => {
                        self.readable[1] = false;
                        d.chain.refund(std::mem::take(&mut d.grant), now);
                    }
                    Err(e) => return Err(Outcome::Failed(e)),
                }
            }
            let d = &mut self.dirs[1];
            if d.eof && self.plain.is_empty() && !self.close_sent {
                self.conn.send_close_notify();
                self.close_sent = true;
                progress = true;
            }
            if self.close_sent && !self.conn.wants_write() && !d.shut {
                let _ = shutdown(self.socks[0].as_raw_fd(), Shutdown::Write);
                d.shut = true;
            }
            if !progress {
                return Ok(Next::Idle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Bucket;
    use crate::engine::{Engine, Handle, Limits};
    use crate::notify::Notifier;
    use crate::testutil::tcp_pair;
    use crate::tls::tests::{CA, CHAIN, KEY};
    use crate::tls::TlsConfig;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use std::io::Read;
    use std::net::{Shutdown as NetShutdown, TcpStream};

    type Client = StreamOwned<ClientConnection, TcpStream>;

    fn client_config(tls13: bool) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(CA) {
            roots.add(c.unwrap()).unwrap();
        }
        let version = if tls13 {
            &rustls::version::TLS13
        } else {
            &rustls::version::TLS12
        };
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    fn connect(config: &Arc<ClientConfig>, sock: TcpStream) -> Client {
        let conn = ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
        StreamOwned::new(conn, sock)
    }

    struct Rig {
        engine: Engine,
        config: TlsConfig,
        notifier: Arc<Notifier>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                engine: Engine::new(1, 0).unwrap(),
                config: TlsConfig::new(CHAIN, KEY).unwrap(),
                notifier: Arc::new(Notifier::new().unwrap()),
            }
        }

        fn opts(&self, tag: &[u8], require: Option<&[u8]>) -> TlsOptions {
            TlsOptions {
                loaded: self.config.current(),
                tag: tag.to_vec(),
                require: require.map(<[u8]>::to_vec),
                initial: Vec::new(),
                handshake_timeout: Duration::from_secs(5),
                ktls: false,
                sizes: DATA_SIZES,
            }
        }

        /// client socket, plain server end, handle.
        fn start(&self, limits: Limits, opts: TlsOptions) -> (TcpStream, TcpStream, Arc<Handle>) {
            let (client, ra) = tcp_pair();
            let (rb, server) = tcp_pair();
            let h = self
                .engine
                .start_tls(ra.into(), rb.into(), limits, self.notifier.clone(), opts)
                .unwrap();
            (client, server, h)
        }
    }

    fn wait_done(h: &Handle) -> Outcome {
        for _ in 0..2000 {
            if let Some(o) = h.outcome() {
                return o;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("session did not finish");
    }

    fn close_write(c: &mut Client) {
        c.conn.send_close_notify();
        c.flush().unwrap();
        c.sock.shutdown(NetShutdown::Write).unwrap();
    }

    #[test]
    fn relays_both_ways_and_half_closes() {
        for tls13 in [true, false] {
            let rig = Rig::new();
            let (sock, mut server, h) = rig.start(Limits::default(), rig.opts(b"", None));
            let mut c = connect(&client_config(tls13), sock);
            c.write_all(b"request").unwrap();
            close_write(&mut c);
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request", "EOF came after the bytes");
            server.write_all(b"response after eof").unwrap();
            drop(server);
            let mut back = Vec::new();
            c.read_to_end(&mut back)
                .expect("close_notify, not a bare EOF");
            assert_eq!(back, b"response after eof");
            assert_eq!(wait_done(&h), Outcome::Done(7, 18));
            let info = h.tls_info().unwrap();
            assert_eq!(info.path, "rustls");
            let want = if tls13 { "TLSv1_3" } else { "TLSv1_2" };
            assert_eq!(info.version.as_deref(), Some(want));
            assert!(info.cipher.unwrap().contains("AES_128_GCM"));
            assert_eq!(info.sni.as_deref(), Some("localhost"));
        }
    }

    #[test]
    fn large_transfers_are_intact() {
        let rig = Rig::new();
        let (sock, server, h) = rig.start(Limits::default(), rig.opts(b"", None));
        let mut c = connect(&client_config(true), sock);
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut reader = server.try_clone().unwrap();
        let sink = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        c.write_all(&data).unwrap();
        close_write(&mut c);
        assert!(sink.join().unwrap() == data, "up differs");
        let mut writer = server;
        let sent = data.clone();
        let source = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        source.join().unwrap();
        assert!(back == data, "down differs");
        let n = data.len() as u64;
        assert_eq!(wait_done(&h), Outcome::Done(n, n));
    }

    /// A control connection with `tag`, its handshake done and tickets read.
    fn control(
        rig: &Rig,
        config: &Arc<ClientConfig>,
        tag: &[u8],
    ) -> (Client, TcpStream, Arc<Handle>) {
        let (sock, mut server, h) = rig.start(Limits::default(), rig.opts(tag, None));
        let mut c = connect(config, sock);
        server.write_all(b"220 hi\r\n").unwrap();
        let mut line = [0u8; 8];
        c.read_exact(&mut line).unwrap(); // TLS 1.3 tickets come with it
        (c, server, h)
    }

    fn data_outcome(rig: &Rig, config: &Arc<ClientConfig>, require: &[u8]) -> (Outcome, TlsInfo) {
        let (sock, mut server, h) = rig.start(Limits::default(), rig.opts(b"", Some(require)));
        let mut c = connect(config, sock);
        if c.write_all(b"x").is_ok() {
            c.conn.send_close_notify();
            let _ = c.flush();
            let _ = c.sock.shutdown(NetShutdown::Write);
        }
        let _ = server.read_to_end(&mut Vec::new());
        drop(server);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        drop(c);
        (wait_done(&h), h.tls_info().unwrap())
    }

    #[test]
    fn data_connections_must_resume_their_control_session() {
        for tls13 in [true, false] {
            let rig = Rig::new();
            let config = client_config(tls13);
            let (_c1, _s1, _h1) = control(&rig, &config, b"ctl1");
            let (outcome, info) = data_outcome(&rig, &config, b"ctl1");
            assert!(info.resumed, "tls13={tls13} {info:?}");
            assert_eq!(info.resumed_tag.as_deref(), Some(&b"ctl1"[..]));
            assert!(matches!(outcome, Outcome::Done(1, 0)), "{outcome:?}");
            // A fresh client: no session to resume.
            let (outcome, _) = data_outcome(&rig, &client_config(tls13), b"ctl1");
            let refused = Outcome::FailedWith(
                Errno::EACCES,
                "TLS session not resumed from the control connection".into(),
            );
            assert_eq!(outcome, refused);
            // The session of another control connection (same client cache, newest session).
            let (_c2, _s2, _h2) = control(&rig, &config, b"ctl2");
            let (outcome, info) = data_outcome(&rig, &config, b"ctl1");
            assert!(info.resumed);
            assert_eq!(info.resumed_tag.as_deref(), Some(&b"ctl2"[..]));
            assert_eq!(outcome, refused);
        }
    }

    #[test]
    fn handshake_timeout_and_garbage() {
        let rig = Rig::new();
        let mut opts = rig.opts(b"", None);
        opts.handshake_timeout = Duration::from_millis(100);
        let (_sock, _server, h) = rig.start(Limits::default(), opts);
        assert_eq!(
            wait_done(&h),
            Outcome::FailedWith(Errno::ETIMEDOUT, "TLS handshake timed out".into())
        );
        let (mut sock, _server, h) = rig.start(Limits::default(), rig.opts(b"", None));
        sock.write_all(b"USER anonymous\r\n").unwrap();
        let Outcome::FailedWith(e, msg) = wait_done(&h) else {
            panic!("not a TLS failure")
        };
        assert_eq!(e, Errno::EPROTO);
        assert!(msg.starts_with("TLS handshake failed"), "{msg}");
    }

    #[test]
    fn timeouts_after_the_handshake() {
        let rig = Rig::new();
        // No idle timeout: the handshake's deadline passing changes nothing.
        let mut opts = rig.opts(b"", None);
        opts.handshake_timeout = Duration::from_millis(200);
        let (sock, _server, h) = rig.start(Limits::default(), opts);
        let mut c = connect(&client_config(true), sock);
        c.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(h.outcome(), None);
        // An idle timeout shorter than the handshake's strikes on time.
        let limits = Limits {
            idle: Some(Duration::from_millis(100)),
            ..Limits::default()
        };
        let t0 = Instant::now();
        let (sock, _server2, h2) = rig.start(limits, rig.opts(b"", None));
        let mut c2 = connect(&client_config(true), sock);
        c2.write_all(b"x").unwrap();
        assert_eq!(wait_done(&h2), Outcome::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        h.cancel();
        assert_eq!(wait_done(&h), Outcome::Cancelled);
    }

    #[test]
    fn throttled_upload() {
        let rig = Rig::new();
        let bucket = Arc::new(Bucket::new(2_000_000.0, Some(50_000.0), Instant::now()).unwrap());
        let limits = Limits {
            up: Chain::new(vec![bucket]),
            ..Limits::default()
        };
        let (sock, mut server, h) = rig.start(limits, rig.opts(b"", None));
        let mut c = connect(&client_config(true), sock);
        let writer = std::thread::spawn(move || {
            let chunk = vec![0u8; 65536];
            while c.write_all(&chunk).is_ok() {}
        });
        let mut buf = vec![0u8; 65536];
        server.read_exact(&mut buf[..1]).unwrap();
        let t0 = Instant::now();
        let mut total = 0;
        while t0.elapsed() < Duration::from_secs(1) {
            total += server.read(&mut buf).unwrap();
        }
        let rate = total as f64 / t0.elapsed().as_secs_f64();
        assert!((rate - 2e6).abs() < 0.05 * 2e6, "{rate}");
        h.cancel();
        assert_eq!(wait_done(&h), Outcome::Cancelled);
        drop(server);
        writer.join().unwrap();
    }

    #[test]
    fn kernel_tls_unavailable_falls_back_after_a_record_exact_handshake() {
        if ktls::available() {
            return; // the kernel path is taken instead; see the Python tests
        }
        let rig = Rig::new();
        let mut opts = rig.opts(b"", None);
        opts.ktls = true;
        let (sock, mut server, h) = rig.start(Limits::default(), opts);
        let mut c = connect(&client_config(true), sock);
        // Data right behind the client's Finished, in the same write.
        c.write_all(b"pipelined").unwrap();
        close_write(&mut c);
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pipelined");
        drop(server);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(wait_done(&h), Outcome::Done(9, 0));
        let info = h.tls_info().unwrap();
        assert_eq!(info.path, "rustls");
        assert!(info.note.unwrap().contains("ULP"));
    }
}
