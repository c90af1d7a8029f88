//! Helpers shared by the unit tests: real loopback TCP connections.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{send, setsockopt, sockopt, MsgFlags};

/// Two ends of one loopback TCP connection.
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Close `stream` with a RST instead of a FIN (SO_LINGER 0).
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&stream.as_fd(), sockopt::Linger, &linger).unwrap();
    drop(stream);
}

/// Send `data` as TCP urgent data (MSG_OOB): its last byte is the urgent
/// byte, and the receiver's urgent mark sits before it.
pub fn send_urgent(stream: &TcpStream, data: &[u8]) {
    // A test may have made the socket non-blocking (a shared file description):
    // wait for room rather than fail.
    loop {
        match send(stream.as_raw_fd(), data, MsgFlags::MSG_OOB) {
            Ok(n) => return assert_eq!(n, data.len()),
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(e) => panic!("send MSG_OOB: {e}"),
        }
    }
}
