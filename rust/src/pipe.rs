//! The kernel pipe one relay direction splices through: socket → pipe → socket.
//!
//! Bytes never visit user space: `splice(2)` moves page references from the
//! source socket into the pipe and from the pipe into the destination socket.
//! Except at TCP's urgent mark, which splice cannot pass: [`Pipe::fill_by_recv`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{recv, MsgFlags};
use nix::unistd::{pipe2, write};

/// A non-blocking pipe plus the count of bytes sitting in it.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
    len: usize,
}

// No SPLICE_F_MORE on the way out: it corks small writes for ~200 ms, which
// kills interactive traffic such as an FTP control connection.
const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl Pipe {
    /// A pipe of about `size` bytes (0 = the kernel default, 64 KiB). A size
    /// the kernel refuses (over `/proc/sys/fs/pipe-max-size`, or the user's
    /// pipe page budget spent) falls back to the default instead of failing.
    pub fn new(size: usize) -> Result<Pipe, Errno> {
        let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if size > 0 {
            let _ = fcntl(
                &w,
                FcntlArg::F_SETPIPE_SZ(size.min(i32::MAX as usize) as i32),
            );
        }
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)? as usize;
        Ok(Pipe { r, w, cap, len: 0 })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes waiting in the pipe.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing waits in the pipe.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Free room, as far as byte counts go (the kernel may still refuse
    /// earlier when the data arrived in many small pieces: EAGAIN).
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.len)
    }

    /// Move up to `max` bytes from `src` into the pipe; Ok(0) is EOF on `src`.
    pub fn fill(&mut self, src: BorrowedFd<'_>, max: usize) -> Result<usize, Errno> {
        let n = retry(|| splice(src, None, self.w.as_fd(), None, max, FLAGS))?;
        self.len += n;
        Ok(n)
    }

    /// Move up to `max` bytes from the socket `src` into the pipe through user
    /// space: recv(2), then write(2). Ok(0) is EOF on `src`.
    ///
    /// For where splice cannot go: tcp_read_sock() stops at the urgent mark
    /// (MSG_OOB data), so splice says EAGAIN there forever, or 0 once the
    /// peer's FIN came too, while recv() reads on (and with SO_OOBINLINE keeps
    /// the urgent byte in the stream). Only into an empty pipe (else EAGAIN,
    /// reading nothing): a write of at most `PIPE_BUF` bytes is then atomic
    /// and takes them all, so no byte read from the socket is left in hand.
    /// A failed write (ENOMEM) loses them: an error that ends the session.
    pub fn fill_by_recv(&mut self, src: BorrowedFd<'_>, max: usize) -> Result<usize, Errno> {
        if !self.is_empty() {
            return Err(Errno::EAGAIN);
        }
        let mut buf = [0u8; libc::PIPE_BUF];
        let want = max.min(buf.len()).min(self.cap);
        let n = retry(|| recv(src.as_raw_fd(), &mut buf[..want], MsgFlags::MSG_DONTWAIT))?;
        if n > 0 {
            match retry(|| write(&self.w, &buf[..n])) {
                Ok(written) if written == n => self.len = n,
                // Cannot happen (see above), but the bytes are gone: an error,
                // not an EAGAIN that would pass for "nothing to read".
                Ok(_) | Err(Errno::EAGAIN) => return Err(Errno::EIO),
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Move what the pipe holds into `dst`, as much as `dst` takes.
    pub fn drain(&mut self, dst: BorrowedFd<'_>) -> Result<usize, Errno> {
        let n = retry(|| splice(self.r.as_fd(), None, dst, None, self.len, FLAGS))?;
        self.len -= n;
        Ok(n)
    }
}

fn retry(mut f: impl FnMut() -> Result<usize, Errno>) -> Result<usize, Errno> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{send_urgent, tcp_pair};
    use nix::poll::{poll, PollFd, PollFlags};
    use nix::sys::socket::{setsockopt, sockopt};
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    #[test]
    fn size_is_raised_when_asked_and_default_otherwise() {
        assert_eq!(Pipe::new(0).unwrap().capacity(), 65536);
        assert_eq!(Pipe::new(256 * 1024).unwrap().capacity(), 256 * 1024);
    }

    #[test]
    fn fill_and_drain_move_bytes_and_report_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut pipe = Pipe::new(0).unwrap();
        assert_eq!(pipe.fill(b.as_fd(), 1 << 20), Err(Errno::EAGAIN));
        a.write_all(b"hello").unwrap();
        assert_eq!(pipe.fill(b.as_fd(), 1 << 20), Ok(5));
        assert_eq!(pipe.len(), 5);
        assert_eq!(pipe.drain(c.as_fd()), Ok(5));
        assert!(pipe.is_empty());
        let mut got = [0u8; 5];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(a);
        assert_eq!(pipe.fill(b.as_fd(), 1 << 20), Ok(0));
    }

    #[test]
    fn fill_by_recv_steps_over_the_urgent_mark() {
        let (mut a, b) = tcp_pair();
        let (c, mut d) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        setsockopt(&b, sockopt::OobInline, &true).unwrap();
        a.write_all(b"before-").unwrap();
        send_urgent(&a, b"!");
        a.write_all(b"-after").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        // The urgent byte is in.
        let mut fds = [PollFd::new(b.as_fd(), PollFlags::POLLPRI)];
        assert_eq!(poll(&mut fds, 5000u16), Ok(1));
        let mut pipe = Pipe::new(0).unwrap();
        assert_eq!(pipe.fill(b.as_fd(), 1 << 20), Ok(7), "up to the mark");
        // Splice stops at the mark: EAGAIN, and 0 (not EOF!) once the FIN is in.
        for tries in 0.. {
            match pipe.fill(b.as_fd(), 1 << 20) {
                Ok(0) => break,
                Err(Errno::EAGAIN) if tries < 1000 => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            pipe.fill_by_recv(b.as_fd(), 1 << 20),
            Err(Errno::EAGAIN),
            "not into a pipe holding bytes"
        );
        assert_eq!(pipe.drain(c.as_fd()), Ok(7));
        let mut got = Vec::new();
        loop {
            // A few bytes at a time: `max` is obeyed.
            let n = pipe.fill_by_recv(b.as_fd(), 3).unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= 3);
            assert_eq!(pipe.drain(c.as_fd()), Ok(n));
        }
        drop(c);
        d.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"before-!-after");
        assert_eq!(pipe.fill(b.as_fd(), 1 << 20), Ok(0), "a real EOF now");
    }
}
