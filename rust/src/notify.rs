//! Completion notices from worker threads to one asyncio loop, GIL-free.
//!
//! A worker that finishes a session pushes the session id on the notifier's
//! queue and bumps its eventfd; the loop watches the eventfd
//! (`loop.add_reader`) and drains the ids, then resolves the matching futures
//! itself. Workers thus never touch Python objects nor wait for the GIL.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Mutex, PoisonError};

use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd plus the ids of the sessions finished since the last drain.
#[derive(Debug)]
pub struct Notifier {
    efd: EventFd,
    done: Mutex<Vec<u64>>,
}

impl Notifier {
    /// A new notifier with a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Notifier {
            efd,
            done: Mutex::new(Vec::new()),
        })
    }

    /// The fd to watch for readability.
    pub fn fd(&self) -> RawFd {
        self.efd.as_fd().as_raw_fd()
    }

    /// Called by a worker: session `id` has its outcome stored.
    pub fn push(&self, id: u64) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
        // EAGAIN only if the counter reached u64::MAX - 1: it is readable anyway.
        let _ = self.efd.write(1);
    }

    /// Called by the loop: the ids finished so far. Reads the eventfd first so
    /// an id pushed after the read is also followed by a fresh wake-up.
    pub fn drain(&self) -> Vec<u64> {
        // EAGAIN (nothing pushed) is the only error an eventfd read can give.
        let _ = self.efd.read();
        std::mem::take(&mut *self.done.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    fn readable(n: &Notifier) -> bool {
        let mut fds = [PollFd::new(n.efd.as_fd(), PollFlags::POLLIN)];
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
