//! A worker thread: one mio poller (epoll, edge-triggered) driving many
//! sessions, a deadline heap for throttle and idle timers, and an inbox
//! through which other threads hand it work. Workers never touch Python.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::errno::Errno;

use crate::engine::Handle;
use crate::session::{Outcome, Relay, Status};

const WAKE: Token = Token(usize::MAX);

/// Work handed to a worker.
#[derive(Debug)]
pub enum Command {
    /// Take over this session.
    Start(Box<dyn Relay>, Arc<Handle>),
    /// Close this session's sockets; its outcome becomes `Cancelled`.
    Cancel(u64),
    /// A bucket's rate changed: re-evaluate throttled sessions now.
    Rebucket,
    /// Finish every session as cancelled and end the thread.
    Stop,
}

/// The way into a worker: a queue of commands and the waker that makes the
/// worker's poll return to read it.
#[derive(Debug)]
pub struct Inbox {
    commands: Mutex<Vec<Command>>,
    waker: Waker,
    /// Sessions the worker owns (for placing new ones on the least loaded).
    pub load: AtomicUsize,
}

impl Inbox {
    /// Queue `cmd` and wake the worker.
    pub fn send(&self, cmd: Command) {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cmd);
        // Fails only if the eventfd counter is saturated: the worker wakes anyway.
        let _ = self.waker.wake();
    }

    fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.commands.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Throttle,
    Idle,
}

#[derive(Debug)]
struct Entry {
    session: Box<dyn Relay>,
    handle: Arc<Handle>,
    /// Earliest throttle timer queued for this session.
    throttle_at: Option<Instant>,
    /// The idle timer queued for this session.
    idle_at: Option<Instant>,
}

struct Worker {
    poll: Poll,
    inbox: Arc<Inbox>,
    sessions: HashMap<u64, Entry>,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    /// Sessions that spent their budget with bytes still waiting: run again
    /// after the next (non-blocking) poll.
    again: Vec<u64>,
    stopping: bool,
}

/// Start worker number `index`; returns its inbox.
pub fn spawn(index: usize) -> io::Result<Arc<Inbox>> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKE)?;
    let inbox = Arc::new(Inbox {
        commands: Mutex::new(Vec::new()),
        waker,
        load: AtomicUsize::new(0),
    });
    let mut worker = Worker {
        poll,
        inbox: inbox.clone(),
        sessions: HashMap::new(),
        timers: BinaryHeap::new(),
        again: Vec::new(),
        stopping: false,
    };
    std::thread::Builder::new()
        .name(format!("swiftftp-relay-{index}"))
        .spawn(move || worker.run())?;
    Ok(inbox)
}

fn token(id: u64, side: usize) -> Token {
    Token(((id as usize) << 1) | side)
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut dirty: Vec<u64> = Vec::new();
        while !self.stopping {
            let timeout = if self.again.is_empty() {
                self.timers
                    .peek()
                    .map(|Reverse((at, _, _))| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // epoll_wait only fails on programming errors (EBADF, EINVAL).
                panic!("relay worker: epoll_wait failed: {e}");
            }
            let now = Instant::now();
            let mut woken = false;
            for ev in events.iter() {
                if ev.token() == WAKE {
                    woken = true;
                    continue;
                }
                let (id, side) = ((ev.token().0 >> 1) as u64, ev.token().0 & 1);
                if let Some(entry) = self.sessions.get_mut(&id) {
                    if ev.is_priority() {
                        entry.session.urgent(side);
                    }
                    entry.session.ready(
                        side,
                        ev.is_readable() || ev.is_read_closed(),
                        ev.is_writable() || ev.is_write_closed(),
                        ev.is_error(),
                    );
                    dirty.push(id);
                }
            }
            dirty.append(&mut self.again);
            dirty.sort_unstable();
            dirty.dedup();
            for id in dirty.drain(..) {
                self.advance(id, now);
            }
            if woken {
                for cmd in self.inbox.take() {
                    self.command(cmd, now);
                }
            }
            self.fire_timers(now);
        }
    }

    fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Start(session, handle) => self.adopt(session, handle, now),
            Command::Cancel(id) => self.end(id, Outcome::Cancelled, now),
            Command::Rebucket => {
                let ids: Vec<u64> = self
                    .sessions
                    .iter()
                    .filter(|(_, e)| e.session.is_throttled())
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    self.advance(id, now);
                }
            }
            Command::Stop => {
                let ids: Vec<u64> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.end(id, Outcome::Cancelled, now);
                }
                self.stopping = true;
            }
        }
    }

    fn adopt(&mut self, session: Box<dyn Relay>, handle: Arc<Handle>, now: Instant) {
        let id = handle.id;
        let registry = self.poll.registry();
        let mut registered = 0;
        let mut result = Ok(());
        for (side, fd) in session.fds().iter().enumerate() {
            result = registry.register(
                &mut SourceFd(fd),
                token(id, side),
                // PRIORITY: urgent data, which splice cannot read past (see session).
                Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY,
            );
            if result.is_err() {
                break;
            }
            registered += 1;
        }
        let idle_at = session.idle_deadline();
        self.sessions.insert(
            id,
            Entry {
                session,
                handle,
                throttle_at: None,
                idle_at,
            },
        );
        if let Err(e) = result {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL));
            self.finish(id, registered, Some(Outcome::Failed(errno)), now);
            return;
        }
        if let Some(at) = idle_at {
            self.timers.push(Reverse((at, id, Timer::Idle)));
        }
        self.advance(id, now);
    }

    /// Let session `id` move what it can; schedule its timer or finish it.
    fn advance(&mut self, id: u64, now: Instant) {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        let status = entry.session.run(now);
        // A deadline that moved earlier (a TLS session past its handshake:
        // from the handshake timeout to the idle one) needs its own timer.
        if let Some(at) = entry.session.idle_deadline() {
            if entry.idle_at.is_none_or(|t| at < t) {
                entry.idle_at = Some(at);
                self.timers.push(Reverse((at, id, Timer::Idle)));
            }
        }
        match status {
            Status::Finished => self.finish(id, 2, None, now),
            Status::Waiting(Some(at)) => {
                if entry.throttle_at.is_none_or(|t| at < t) {
                    entry.throttle_at = Some(at);
                    self.timers.push(Reverse((at, id, Timer::Throttle)));
                }
            }
            Status::Waiting(None) => {}
            Status::Busy => self.again.push(id),
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, id, kind))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.sessions.get_mut(&id) else {
                continue;
            };
            match kind {
                Timer::Throttle if entry.throttle_at == Some(at) => {
                    entry.throttle_at = None;
                    self.advance(id, now);
                }
                Timer::Idle if entry.idle_at == Some(at) => match entry.session.idle_deadline() {
                    Some(deadline) if deadline > now => {
                        entry.idle_at = Some(deadline);
                        self.timers.push(Reverse((deadline, id, Timer::Idle)));
                    }
                    // No timeout any more (a TLS session past its handshake, without idle timeout).
                    None => entry.idle_at = None,
                    Some(_) => {
                        let outcome = entry.session.timeout_outcome();
                        self.end(id, outcome, now)
                    }
                },
                _ => {} // superseded by an earlier timer of the same kind
            }
        }
    }

    fn end(&mut self, id: u64, outcome: Outcome, now: Instant) {
        if self.sessions.contains_key(&id) {
            self.finish(id, 2, Some(outcome), now);
        }
    }

    /// Remove session `id`: unregister its first `registered` sockets, close
    /// everything, then publish the outcome (so sockets are closed by the
    /// time Python sees it).
    fn finish(&mut self, id: u64, registered: usize, outcome: Option<Outcome>, now: Instant) {
        let Some(mut entry) = self.sessions.remove(&id) else {
            return;
        };
        if let Some(outcome) = outcome {
            entry.session.end(outcome, now);
        }
        for fd in entry.session.fds().iter().take(registered) {
            // Closing the fd would unregister it too; this keeps mio's books straight.
            let _ = self.poll.registry().deregister(&mut SourceFd(fd));
        }
        let outcome = entry
            .session
            .outcome()
            .cloned()
            .unwrap_or(Outcome::Cancelled);
        drop(entry.session);
        self.inbox.load.fetch_sub(1, Ordering::Relaxed);
        entry.handle.complete(outcome);
    }
}
