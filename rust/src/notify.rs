//! Completion notices from worker threads to one asyncio loop, GIL-free.
//!
//! A worker that finishes a session pushes the session id on the notifier's
//! queue and bumps its eventfd; the loop watches the eventfd
//! (`loop.add_reader`) and drains the ids, then resolves the matching futures
//! itself. Workers thus never touch Python objects nor wait for the GIL.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd plus the ids of the sessions finished since the last drain.
#[derive(Debug)]
pub struct Notifier {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// None once closed: pushes are then dropped (nobody listens any more).
    efd: Option<EventFd>,
    done: Vec<u64>,
}

impl Notifier {
    /// A new notifier with a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Notifier {
            inner: Mutex::new(Inner {
                efd: Some(efd),
                done: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fd to watch for readability; -1 once closed.
    pub fn fd(&self) -> RawFd {
        self.lock()
            .efd
            .as_ref()
            .map_or(-1, |e| e.as_fd().as_raw_fd())
    }

    /// Called by a worker: session `id` has its outcome stored.
    pub fn push(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(efd) = &inner.efd {
            // EAGAIN only if the counter reached u64::MAX - 1: it is readable anyway.
            let _ = efd.write(1);
            inner.done.push(id);
        }
    }

    /// Called by the loop: the ids finished so far (and the eventfd reset).
    pub fn drain(&self) -> Vec<u64> {
        let mut inner = self.lock();
        if let Some(efd) = &inner.efd {
            // EAGAIN (nothing pushed) is the only error an eventfd read can give.
            let _ = efd.read();
        }
        std::mem::take(&mut inner.done)
    }

    /// Close the eventfd now rather than when the last reference goes (the
    /// loop no longer watches it); later pushes are ignored.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.efd = None;
        inner.done.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    fn readable(n: &Notifier) -> bool {
        let inner = n.lock();
        let mut fds = [PollFd::new(
            inner.efd.as_ref().unwrap().as_fd(),
            PollFlags::POLLIN,
        )];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn push_wakes_and_drain_clears() {
        let n = Notifier::new().unwrap();
        assert!(!readable(&n));
        assert!(n.drain().is_empty());
        n.push(7);
        n.push(9);
        assert!(readable(&n));
        assert_eq!(n.drain(), vec![7, 9]);
        assert!(!readable(&n));
    }

    #[test]
    fn close_releases_the_fd_and_ignores_later_pushes() {
        let n = Notifier::new().unwrap();
        assert!(n.fd() >= 0);
        n.push(1);
        n.close();
        assert_eq!(n.fd(), -1);
        n.push(2);
        assert!(n.drain().is_empty());
    }

    #[test]
    fn pushes_from_threads_all_arrive() {
        let n = std::sync::Arc::new(Notifier::new().unwrap());
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let n = n.clone();
                std::thread::spawn(move || (0..100).for_each(|i| n.push(t * 1000 + i)))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        let mut got = n.drain();
        got.sort_unstable();
        assert_eq!(got.len(), 400);
        got.dedup();
        assert_eq!(got.len(), 400);
    }
}
