//! The kernel pipe one relay direction splices through: socket → pipe → socket.
//!
//! Bytes never visit user space: `splice(2)` moves page references from the
//! source socket into the pipe and from the pipe into the destination socket.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;

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
    use std::io::{Read, Write};
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
}
