//! One relay session: two sockets, two directions, the state machine that
//! moves bytes between them. No threads, no polling here: the worker tells
//! the session which socket became ready and calls [`Session::run`], which
//! moves what it can without blocking and says when to call again.
//!
//! Readiness is edge-triggered (epoll via mio), so the session remembers it:
//! a side stays "readable" until a splice from it says EAGAIN, "writable"
//! until a splice to it says EAGAIN. Spurious readiness is harmless.
//!
//! Urgent data (TCP MSG_OOB, telnet's Synch before an FTP ABOR) stays in the
//! byte stream (SO_OOBINLINE), but splice cannot read past its mark: it says
//! EAGAIN there, or 0 if the FIN came too. So a side that reported urgent
//! data (EPOLLPRI), or a 0 from splice, sends the direction to recv() once its
//! pipe is empty; recv() steps over the mark, and splicing resumes. The usual
//! path pays nothing for it but one recv() per direction at EOF.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{getsockopt, setsockopt, shutdown, sockopt, Shutdown};

use crate::bucket::{Chain, Reservation};
use crate::pipe::Pipe;

/// Byte counts of the two directions: `a → b` (up) and `b → a` (down).
#[derive(Debug, Default)]
pub struct Counters {
    dirs: [AtomicU64; 2],
}

impl Counters {
    /// Bytes delivered so far, (up, down).
    pub fn get(&self) -> (u64, u64) {
        (
            self.dirs[0].load(Ordering::Relaxed),
            self.dirs[1].load(Ordering::Relaxed),
        )
    }

    pub(crate) fn add(&self, dir: usize, n: u64) {
        self.dirs[dir].fetch_add(n, Ordering::Relaxed);
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF and were delivered: final (up, down).
    Done(u64, u64),
    /// A socket failed (reset, broken pipe...): the errno.
    Failed(Errno),
    /// Failed for a reason the errno alone does not say (TLS): errno, message.
    FailedWith(Errno, String),
    /// No byte either way for the idle timeout.
    TimedOut,
    /// Cancelled by its owner.
    Cancelled,
}

/// Bytes one direction may move in one [`Session::run`] before it yields the
/// worker to its other sessions (a 10 Gbit/s stream yields every ~1.7 ms).
pub const BUDGET: usize = 2 << 20;

/// What [`Session::run`] leaves the worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for readiness, and for the timer if `Some` (throttled).
    Waiting(Option<Instant>),
    /// Used up its [`BUDGET`] with more to move: run it again soon, after
    /// the worker's other sessions had their turn (no readiness edge will
    /// come for bytes already waiting).
    Busy,
    /// Finished: both sockets may be closed (the outcome is `Done` or `Failed`).
    Finished,
}

/// Where one direction's pump stopped.
enum Next {
    /// Nothing more to do until a socket is ready again.
    Idle,
    /// Waiting for tokens until then.
    Sleep(Instant),
    /// Budget spent, more to move.
    Busy,
}

/// What a worker drives: the splice [`Session`] here, or a TLS session
/// ([`crate::tlsrelay::TlsRelay`]). See [`Session`]'s methods of the same names.
pub trait Relay: Send + std::fmt::Debug {
    /// The raw fds of sides a and b (for registering with the poller).
    fn fds(&self) -> [RawFd; 2];
    /// The poller reported `side` ready.
    fn ready(&mut self, side: usize, readable: bool, writable: bool, error: bool);
    /// The poller reported urgent data on `side`.
    fn urgent(&mut self, side: usize);
    /// True while a direction sleeps for tokens.
    fn is_throttled(&self) -> bool;
    /// When the session times out if nothing moves before.
    fn idle_deadline(&self) -> Option<Instant>;
    /// The outcome when that deadline passes.
    fn timeout_outcome(&self) -> Outcome {
        Outcome::TimedOut
    }
    /// The outcome, once finished.
    fn outcome(&self) -> Option<&Outcome>;
    /// End the session early (timeout, cancel).
    fn end(&mut self, outcome: Outcome, now: Instant);
    /// Move every byte that can move now.
    fn run(&mut self, now: Instant) -> Status;
}

impl Relay for Session {
    fn fds(&self) -> [RawFd; 2] {
        Session::fds(self)
    }
    fn ready(&mut self, side: usize, readable: bool, writable: bool, error: bool) {
        Session::ready(self, side, readable, writable, error)
    }
    fn urgent(&mut self, side: usize) {
        Session::urgent(self, side)
    }
    fn is_throttled(&self) -> bool {
        Session::is_throttled(self)
    }
    fn idle_deadline(&self) -> Option<Instant> {
        Session::idle_deadline(self)
    }
    fn outcome(&self) -> Option<&Outcome> {
        Session::outcome(self)
    }
    fn end(&mut self, outcome: Outcome, now: Instant) {
        Session::end(self, outcome, now)
    }
    fn run(&mut self, now: Instant) -> Status {
        Session::run(self, now)
    }
}

/// Side 0 is `a`, side 1 is `b`; direction 0 (up) goes a → b, 1 (down) b → a.
#[derive(Debug)]
struct Direction {
    pipe: Pipe,
    chain: Chain,
    /// Tokens granted and not yet used (throttled directions only).
    grant: u64,
    /// Tokens reserved and not yet covered: the direction sleeps.
    pending: Option<Reservation>,
    /// The source said EAGAIN while the pipe held bytes: it is the pipe that
    /// is full, or the socket is empty, or at its urgent mark (which only an
    /// empty pipe lets it step over); either way, wait for the pipe to drain.
    pipe_full: bool,
    eof: bool,
    shut: bool,
}

/// The state machine of one relay (see the module docs).
#[derive(Debug)]
pub struct Session {
    socks: [OwnedFd; 2],
    readable: [bool; 2],
    writable: [bool; 2],
    /// The side reported urgent data: until recv() on it says EAGAIN, an
    /// EAGAIN from splice may be the urgent mark, not an empty socket.
    urgent: [bool; 2],
    dirs: [Direction; 2],
    idle: Option<Duration>,
    last_active: Instant,
    error: Option<Errno>,
    /// What the error was, when the errno alone does not say (kernel TLS).
    fail_msg: Option<String>,
    /// The side has kernel TLS on it: splice stops at non-data records.
    ktls: [bool; 2],
    outcome: Option<Outcome>,
    counters: Arc<Counters>,
    totals: Arc<Counters>,
}

impl Session {
    /// Relay between the connected sockets `a` and `b` (made non-blocking
    /// here), through pipes of `pipe_size` bytes.
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
    ) -> Result<Session, Errno> {
        for s in [&a, &b] {
            let flags = OFlag::from_bits_retain(fcntl(s, FcntlArg::F_GETFL)?);
            fcntl(s, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
            // Forward bytes as they come: the sender already chose its segments.
            // With Nagle on, a request written in two pieces (iperf3's 4-byte
            // length, then 126 bytes) waited for a delayed ACK: +40 ms per
            // exchange. Not TCP (a socketpair in tests): nothing to do.
            let _ = setsockopt(s, sockopt::TcpNoDelay, &true);
            // Urgent data (MSG_OOB) is read in its place in the stream, like
            // every other byte; without this recv() would skip it.
            let _ = setsockopt(s, sockopt::OobInline, &true);
        }
        let dir = |chain: Chain| -> Result<Direction, Errno> {
            Ok(Direction {
                pipe: Pipe::new(pipe_size)?,
                chain,
                grant: 0,
                pending: None,
                pipe_full: false,
                eof: false,
                shut: false,
            })
        };
        Ok(Session {
            socks: [a, b],
            readable: [true, true],
            writable: [true, true],
            urgent: [false, false],
            dirs: [dir(up)?, dir(down)?],
            idle,
            last_active: now,
            error: None,
            fail_msg: None,
            ktls: [false, false],
            outcome: None,
            counters,
            totals,
        })
    }

    /// `side` carries kernel TLS: a close_notify from it is its EOF, other
    /// control records fail the session, and its EOF is a close_notify.
    pub fn set_ktls(&mut self, side: usize) {
        self.ktls[side] = true;
    }

    /// The raw fds of sides a and b (for registering with the poller).
    pub fn fds(&self) -> [RawFd; 2] {
        [self.socks[0].as_raw_fd(), self.socks[1].as_raw_fd()]
    }

    /// The socket of `side`.
    pub fn sock(&self, side: usize) -> std::os::fd::BorrowedFd<'_> {
        self.socks[side].as_fd()
    }

    /// The poller reported `side` ready. On an error event the socket's
    /// pending error (SO_ERROR) ends the session at the next [`Session::run`].
    pub fn ready(&mut self, side: usize, readable: bool, writable: bool, error: bool) {
        if readable {
            self.readable[side] = true;
            // New data: the pipe may have room after all (see `pipe_full`).
            self.dirs[side].pipe_full = false;
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

    /// The poller reported urgent data on `side` (EPOLLPRI): splice stops at
    /// its mark, so the next EAGAIN from it is checked with recv().
    pub fn urgent(&mut self, side: usize) {
        self.urgent[side] = true;
        self.readable[side] = true;
        self.dirs[side].pipe_full = false;
    }

    /// True while a direction sleeps for tokens (a rate change concerns it).
    pub fn is_throttled(&self) -> bool {
        self.dirs.iter().any(|d| d.pending.is_some())
    }

    /// When the idle timeout strikes if nothing moves before.
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.idle.map(|d| self.last_active + d)
    }

    /// The outcome, once [`Session::run`] said `Finished` or after [`Session::end`].
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// End the session early (timeout, cancel); tokens held are given back.
    pub fn end(&mut self, outcome: Outcome, now: Instant) {
        if self.outcome.is_none() {
            self.release_tokens(now);
            self.outcome = Some(outcome);
        }
    }

    fn release_tokens(&mut self, now: Instant) {
        for d in &mut self.dirs {
            let held = d.grant + d.pending.take().map_or(0, |r| r.amount());
            d.chain.refund(held, now);
            d.grant = 0;
        }
    }

    /// Move every byte that can move now. Call after readiness, after the
    /// timer it asked for, and after a bucket's rate changed.
    pub fn run(&mut self, now: Instant) -> Status {
        if self.outcome.is_some() {
            return Status::Finished;
        }
        let mut wake = None;
        let mut busy = false;
        let mut result = self.error.map_or(Ok(()), Err);
        for dir in 0..2 {
            if result.is_err() {
                break;
            }
            result = self.pump(dir, now).map(|next| match next {
                Next::Idle => {}
                Next::Busy => busy = true,
                Next::Sleep(at) => wake = Some(wake.map_or(at, |w: Instant| w.min(at))),
            });
        }
        match result {
            Err(e) => {
                let outcome = match self.fail_msg.take() {
                    Some(msg) => Outcome::FailedWith(e, msg),
                    None => Outcome::Failed(e),
                };
                self.end(outcome, now);
                Status::Finished
            }
            Ok(()) if self.dirs.iter().all(|d| d.shut) => {
                let (up, down) = self.counters.get();
                self.outcome = Some(Outcome::Done(up, down));
                Status::Finished
            }
            Ok(()) if busy => Status::Busy,
            Ok(()) => Status::Waiting(wake),
        }
    }

    /// Pump one direction until nothing moves (or its budget is spent).
    fn pump(&mut self, dir: usize, now: Instant) -> Result<Next, Errno> {
        let (src, dst) = (dir, 1 - dir);
        let mut moved = 0;
        loop {
            if moved >= BUDGET {
                return Ok(Next::Busy);
            }
            let mut progress = false;
            let d = &mut self.dirs[dir];
            if !d.pipe.is_empty() && self.writable[dst] {
                match d.pipe.drain(self.socks[dst].as_fd()) {
                    Ok(n) => {
                        moved += n;
                        self.counters.add(dir, n as u64);
                        self.totals.add(dir, n as u64);
                        self.last_active = now;
                        d.pipe_full = false;
                        progress = true;
                    }
                    Err(Errno::EAGAIN) => self.writable[dst] = false,
                    Err(e) => return Err(e),
                }
            }
            if !d.eof && self.readable[src] && !d.pipe_full && d.pipe.room() > 0 {
                let mut max = d.pipe.room();
                if !d.chain.is_empty() {
                    if d.grant == 0 {
                        let r = match d.pending.take() {
                            Some(r) => Some(r),
                            None => d.chain.reserve(max as u64, now),
                        };
                        if let Some(r) = r {
                            if let Some(wait) = d.chain.wait(&r, now) {
                                d.pending = Some(r);
                                return Ok(Next::Sleep(now + wait));
                            }
                            d.grant = r.amount();
                        }
                    }
                    if d.grant > 0 {
                        max = max.min(d.grant as usize);
                    }
                }
                let src_fd = self.socks[src].as_fd();
                let mut got = d.pipe.fill(src_fd, max);
                // 0 or EAGAIN may be the urgent mark (see the module docs): recv()
                // tells, and steps over it. Into an empty pipe only (else EAGAIN:
                // wait for the pipe to drain, then splice and come here again).
                let maybe_mark = match got {
                    Ok(0) => true,
                    Err(Errno::EAGAIN) => self.urgent[src],
                    _ => false,
                };
                if maybe_mark {
                    got = d.pipe.fill_by_recv(src_fd, max);
                }
                if self.ktls[src] && matches!(got, Err(Errno::EINVAL | Errno::EIO)) {
                    // Kernel TLS stopped at a record that is not data.
                    got = match crate::ktls::recv_control(src_fd) {
                        Ok(crate::ktls::Control::CloseNotify) => Ok(0),
                        Ok(other) => {
                            self.fail_msg = Some(crate::ktls::describe(&other));
                            Err(Errno::EPROTO)
                        }
                        Err(e) => Err(e),
                    };
                }
                match got {
                    Ok(0) => {
                        d.eof = true;
                        d.chain.refund(std::mem::take(&mut d.grant), now);
                        progress = true;
                    }
                    Ok(n) => {
                        d.grant = d.grant.saturating_sub(n as u64);
                        self.last_active = now;
                        progress = true;
                    }
                    Err(Errno::EAGAIN) if d.pipe.is_empty() => {
                        // Really nothing to read: an idle session holds no tokens.
                        self.readable[src] = false;
                        self.urgent[src] = false;
                        d.chain.refund(std::mem::take(&mut d.grant), now);
                    }
                    Err(Errno::EAGAIN) => d.pipe_full = true,
                    Err(e) => return Err(e),
                }
            }
            if d.eof && d.pipe.is_empty() && !d.shut {
                // Half-close: everything before the EOF was delivered. A peer
                // already gone shows up on the other direction, not here.
                let mut close = true;
                if self.ktls[dst] {
                    // Sent, or the peer is gone (which the other way reports):
                    // shut. Its buffer full: try again once writable.
                    let sent = crate::ktls::send_close_notify(self.socks[dst].as_fd());
                    if sent == Err(Errno::EAGAIN) {
                        self.writable[dst] = false;
                        close = false;
                    }
                }
                if close {
                    let _ = shutdown(self.socks[dst].as_raw_fd(), Shutdown::Write);
                    d.shut = true;
                }
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
    use crate::testutil::{reset, send_urgent, tcp_pair};
    use nix::poll::{poll, PollFd, PollFlags};
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown as NetShutdown, TcpStream};

    struct Rig {
        client: TcpStream,
        server: TcpStream,
        session: Session,
        counters: Arc<Counters>,
    }

    fn rig(up: Chain, down: Chain, idle: Option<Duration>) -> Rig {
        let (client, ra) = tcp_pair();
        let (rb, server) = tcp_pair();
        let counters = Arc::new(Counters::default());
        let session = Session::new(
            ra.into(),
            rb.into(),
            up,
            down,
            idle,
            0,
            counters.clone(),
            Arc::new(Counters::default()),
            Instant::now(),
        )
        .unwrap();
        Rig {
            client,
            server,
            session,
            counters,
        }
    }

    /// Drive the session (as a worker would, with every side "ready", and
    /// urgent data reported as epoll's EPOLLPRI would) until it finishes or
    /// `until` holds; sleeps a little between rounds.
    fn drive(s: &mut Session, mut until: impl FnMut() -> bool) -> Status {
        for _ in 0..5000 {
            for side in 0..2 {
                let mut fds = [PollFd::new(s.socks[side].as_fd(), PollFlags::POLLPRI)];
                if poll(&mut fds, 0u8) == Ok(1) {
                    s.urgent(side);
                }
                s.ready(side, true, true, false);
            }
            let st = s.run(Instant::now());
            if st == Status::Finished || until() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("session stuck");
    }

    fn read_available(s: &mut TcpStream, into: &mut Vec<u8>) -> bool {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => into.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn relays_both_ways_and_half_closes() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        r.client.write_all(b"request").unwrap();
        r.client.shutdown(NetShutdown::Write).unwrap();
        let mut got = Vec::new();
        let server = &mut r.server;
        drive(&mut r.session, || read_available(server, &mut got));
        assert_eq!(got, b"request", "EOF came after the bytes");
        assert_eq!(
            r.session.outcome(),
            None,
            "still running: the other way is open"
        );
        r.server.set_nonblocking(false).unwrap();
        r.server.write_all(b"response after eof").unwrap();
        drop(r.server);
        assert_eq!(drive(&mut r.session, || false), Status::Finished);
        assert_eq!(r.session.outcome(), Some(&Outcome::Done(7, 18)));
        let mut back = Vec::new();
        r.client.set_nonblocking(false).unwrap();
        r.client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"response after eof");
        assert_eq!(r.counters.get(), (7, 18));
    }

    #[test]
    fn large_transfer_is_intact() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut client = r.client.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(NetShutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        let server = &mut r.server;
        drive(&mut r.session, || read_available(server, &mut got));
        writer.join().unwrap();
        assert!(got == data, "bytes differ");
    }

    #[test]
    fn a_fast_session_yields_after_its_budget() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        let mut client = r.client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..64 {
                if client.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut sink = r.server.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while sink.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let mut busy = 0;
        for _ in 0..5000 {
            for side in 0..2 {
                r.session.ready(side, true, true, false);
            }
            let before = r.counters.get().0;
            match r.session.run(Instant::now()) {
                Status::Busy => {
                    busy += 1;
                    let moved = (r.counters.get().0 - before) as usize;
                    assert!(
                        moved < BUDGET + 2 * r.session.dirs[0].pipe.capacity(),
                        "{moved}"
                    );
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
            if r.counters.get().0 == 64 << 20 {
                break;
            }
        }
        assert_eq!(r.counters.get().0, 64 << 20);
        assert!(busy > 0, "never yielded");
        writer.join().unwrap();
        drop(r.session);
        reader.join().unwrap();
    }

    #[test]
    fn reset_fails_the_session() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        r.client.write_all(&[7u8; 100_000]).unwrap();
        let server = &mut r.server;
        let mut got = Vec::new();
        drive(&mut r.session, || {
            read_available(server, &mut got);
            !got.is_empty()
        });
        // SO_LINGER 0: close sends RST.
        reset(r.server);
        r.client.write_all(&[8u8; 100_000]).unwrap();
        assert_eq!(drive(&mut r.session, || false), Status::Finished);
        assert!(
            matches!(
                r.session.outcome(),
                Some(Outcome::Failed(Errno::ECONNRESET | Errno::EPIPE))
            ),
            "{:?}",
            r.session.outcome()
        );
    }

    #[test]
    fn error_event_reports_so_error() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        reset(r.server);
        std::thread::sleep(Duration::from_millis(20));
        r.session.ready(1, false, false, true);
        assert_eq!(r.session.run(Instant::now()), Status::Finished);
        assert_eq!(
            r.session.outcome(),
            Some(&Outcome::Failed(Errno::ECONNRESET))
        );
    }

    #[test]
    fn throttled_direction_sleeps_until_tokens_come() {
        let t0 = Instant::now();
        let bucket = Arc::new(Bucket::new(100_000.0, Some(10_000.0), t0).unwrap());
        let mut r = rig(Chain::new(vec![bucket]), Chain::default(), None);
        r.client.write_all(&[1u8; 50_000]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        for side in 0..2 {
            r.session.ready(side, true, true, false);
        }
        // The burst (10 kB, two 5 kB quanta) goes at once, then a timer.
        let Status::Waiting(Some(wake)) = r.session.run(now) else {
            panic!("not throttled")
        };
        assert!(r.session.is_throttled());
        assert_eq!(r.counters.get().0, 10_000);
        let wait = wake - now;
        assert!(
            wait > Duration::from_millis(40) && wait <= Duration::from_millis(51),
            "{wait:?}"
        );
        // Woken early (another event): still waiting, same deadline or so.
        let Status::Waiting(Some(again)) = r.session.run(now + Duration::from_millis(10)) else {
            panic!("should still wait")
        };
        assert!(again.duration_since(wake) < Duration::from_millis(1));
        // At the deadline: one more quantum.
        assert!(matches!(r.session.run(wake), Status::Waiting(Some(_))));
        assert_eq!(r.counters.get().0, 15_000);
    }

    #[test]
    fn idle_deadline_moves_with_traffic() {
        let mut r = rig(
            Chain::default(),
            Chain::default(),
            Some(Duration::from_secs(5)),
        );
        let first = r.session.idle_deadline().unwrap();
        r.client.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        r.session.ready(0, true, false, false);
        r.session.run(Instant::now());
        assert!(r.session.idle_deadline().unwrap() > first);
        r.session.end(Outcome::TimedOut, Instant::now());
        assert_eq!(r.session.run(Instant::now()), Status::Finished);
        assert_eq!(r.session.outcome(), Some(&Outcome::TimedOut));
    }

    #[test]
    fn urgent_data_is_relayed_in_its_place() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        r.client.write_all(b"before-").unwrap();
        send_urgent(&r.client, b"!");
        r.client.write_all(b"-after").unwrap();
        let mut got = Vec::new();
        let server = &mut r.server;
        // No EOF: splice says EAGAIN at the mark, and only the report of
        // urgent data tells it from an empty socket.
        drive(&mut r.session, || {
            read_available(server, &mut got);
            got.len() >= 14
        });
        assert_eq!(got, b"before-!-after");
        send_urgent(&r.client, b"?");
        r.client.write_all(b"end").unwrap();
        r.client.shutdown(NetShutdown::Write).unwrap();
        r.server.shutdown(NetShutdown::Write).unwrap();
        let server = &mut r.server;
        assert_eq!(
            drive(&mut r.session, || read_available(server, &mut got)),
            Status::Finished
        );
        read_available(&mut r.server, &mut got);
        assert_eq!(got, b"before-!-after?end");
        assert_eq!(r.session.outcome(), Some(&Outcome::Done(18, 0)));
    }

    #[test]
    fn zero_from_splice_at_the_urgent_mark_is_not_eof() {
        let mut r = rig(Chain::default(), Chain::default(), None);
        r.client.write_all(b"before-").unwrap();
        send_urgent(&r.client, b"!");
        r.client.write_all(b"-after").unwrap();
        r.client.shutdown(NetShutdown::Write).unwrap();
        r.server.shutdown(NetShutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Never told of the urgent data: the 0 from splice alone sends it to recv().
        let mut status = Status::Busy;
        for _ in 0..100 {
            for side in 0..2 {
                r.session.ready(side, true, true, false);
            }
            status = r.session.run(Instant::now());
            if status == Status::Finished {
                break;
            }
        }
        assert_eq!(status, Status::Finished);
        assert_eq!(r.session.outcome(), Some(&Outcome::Done(14, 0)));
        let mut got = Vec::new();
        r.server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"before-!-after");
    }

    #[test]
    fn throttled_direction_takes_tokens_for_urgent_bytes() {
        let t0 = Instant::now();
        // Slow refill: the tokens left show what was taken.
        let bucket = Arc::new(Bucket::new(1_000.0, Some(10_000.0), t0).unwrap());
        let mut r = rig(Chain::new(vec![bucket.clone()]), Chain::default(), None);
        r.client.write_all(&[1u8; 3000]).unwrap();
        send_urgent(&r.client, b"!");
        r.client.write_all(&[2u8; 3000]).unwrap();
        let mut got = Vec::new();
        let server = &mut r.server;
        drive(&mut r.session, || {
            read_available(server, &mut got);
            got.len() >= 6001
        });
        assert_eq!(got.len(), 6001);
        assert_eq!(got[3000], b'!');
        // Idle again: the tokens granted and not used went back.
        assert!(!r.session.is_throttled());
        assert_eq!(r.session.dirs[0].grant, 0);
        let left = bucket.tokens(Instant::now());
        let refill = t0.elapsed().as_secs_f64() * 1_000.0;
        assert!(
            (left - (10_000.0 - 6001.0)).abs() <= refill + 1.0,
            "{left} tokens left"
        );
    }

    #[test]
    fn urgent_bytes_in_a_large_transfer_both_ways() {
        const SIZE: usize = 4 << 20;
        const EVERY: usize = 512 << 10;
        let mut r = rig(Chain::default(), Chain::default(), None);
        let stream = |seed: u32| -> Vec<u8> {
            (0..SIZE as u32)
                .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
                .collect()
        };
        let send = |mut sock: TcpStream, data: Vec<u8>| {
            std::thread::spawn(move || {
                for chunk in data.chunks(EVERY) {
                    let (urgent, mut rest) = chunk.split_last().unwrap();
                    // The reader's read_available makes the shared file description
                    // non-blocking: wait for room rather than fail on WouldBlock.
                    while !rest.is_empty() {
                        match sock.write(rest) {
                            Ok(n) => rest = &rest[n..],
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                                let _ = poll(&mut fds, 100u16);
                            }
                            Err(e) => panic!("write: {e}"),
                        }
                    }
                    send_urgent(&sock, &[*urgent]);
                }
                sock.shutdown(NetShutdown::Write).unwrap();
            })
        };
        let (up, down) = (stream(1), stream(2));
        let w1 = send(r.client.try_clone().unwrap(), up.clone());
        let w2 = send(r.server.try_clone().unwrap(), down.clone());
        let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
        let (server, client) = (&mut r.server, &mut r.client);
        let st = drive(&mut r.session, || {
            read_available(server, &mut at_server);
            read_available(client, &mut at_client);
            false
        });
        assert_eq!(st, Status::Finished);
        read_available(&mut r.server, &mut at_server);
        read_available(&mut r.client, &mut at_client);
        w1.join().unwrap();
        w2.join().unwrap();
        assert!(at_server == up, "up differs: {} bytes", at_server.len());
        assert!(at_client == down, "down differs: {} bytes", at_client.len());
        let size = SIZE as u64;
        assert_eq!(r.session.outcome(), Some(&Outcome::Done(size, size)));
    }
}
