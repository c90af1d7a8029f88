//! Helpers shared by the unit tests: real loopback TCP connections.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

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
