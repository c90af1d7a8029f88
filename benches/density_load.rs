//! The load generator of the density bench (benches/test_density.py): many idle
//! devices, and FTP clients through them, in a process of its own, cheap enough
//! that the node is what the bench measures (a Python generator spent more CPU
//! per login than the node and capped a reconnect storm near 1,100/s).
//!
//!     density_load DEVICE_PORT FTP_PORT DEVICES [ADDRESSES]
//!
//! Devices dial 127.0.0.1:DEVICE_PORT from ADDRESSES (250) loopback addresses,
//! 127.1.x.y, and behave like the deployed phone: one object per write, each
//! request after the reply to the previous one, no json_stream; then they idle,
//! reading what the node sends. A `control_connection_waiting` is taken (connect,
//! login, then `331` to USER and `230` to PASS). Commands on stdin, one per line;
//! each prints one line of JSON when done:
//!
//!     connect          every device logs in and opens its command session
//!     drop             every device closes its connections at once
//!     clients K        K FTP clients log in, one through each of the first K devices
//!     close_clients    the clients and the devices' ends of them close

use std::collections::HashMap;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream as StdStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{
    bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

const CONCURRENCY: usize = 512;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    /// Command session: connecting, then the login's reply, then the prefix.
    Connecting,
    LoggedIn,
    Online,
    /// A control connection the device took: connecting, login reply, USER, PASS.
    CtlConnecting,
    CtlLogin,
    CtlUser,
    CtlPass,
    CtlIdle,
    /// An FTP client: the greeting, 331, 230.
    Client220,
    Client331,
    Client230,
    ClientIdle,
}

struct Conn {
    stream: TcpStream,
    step: Step,
    device: usize,
    buf: Vec<u8>,
}

struct Gen {
    poll: Poll,
    conns: HashMap<usize, Conn>,
    next_token: usize,
    device_port: u16,
    ftp_port: u16,
    addresses: usize,
    prefixes: Vec<String>,
    /// Token of each device's command session.
    sessions: Vec<Option<usize>>,
    pending: usize,
    online: usize,
    clients_done: usize,
}

fn source(n: usize, addresses: usize) -> Ipv4Addr {
    let k = n % addresses;
    Ipv4Addr::new(127, 1, (k / 250) as u8, (1 + k % 250) as u8)
}

fn dial(src: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    let to = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &to) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    // SAFETY: `fd` is a socket we own; into_raw_fd hands its ownership to the stream.
    Ok(TcpStream::from_std(unsafe { StdStream::from_raw_fd(fd.into_raw_fd()) }))
}

/// The first complete JSON object in `buf`, taken out of it (the node's replies are flat).
fn take_object(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'}')?;
    let text = String::from_utf8_lossy(&buf[..=end]).into_owned();
    buf.drain(..=end);
    Some(text)
}

fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let text = String::from_utf8_lossy(&buf[..=end]).into_owned();
    buf.drain(..=end);
    Some(text)
}

fn field(json: &str, name: &str) -> Option<String> {
    let at = json.find(&format!("\"{name}\""))? + name.len() + 2;
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return Some(s[..s.find('"')?].to_string());
    }
    Some(rest.chars().take_while(|c| c.is_ascii_digit()).collect())
}

impl Gen {
    fn open(&mut self, src: Ipv4Addr, port: u16, step: Step, device: usize) -> io::Result<()> {
        let mut stream = dial(src, port)?;
        let token = self.next_token;
        self.next_token += 1;
        self.poll
            .registry()
            .register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)?;
        if step == Step::Connecting {
            self.sessions[device] = Some(token);
        }
        self.conns.insert(token, Conn { stream, step, device, buf: Vec::new() });
        Ok(())
    }

    fn login(device: usize) -> Vec<u8> {
        format!(r#"{{"action": "login", "android_id": "density-{device}", "swiftp_version": "2.16"}}"#)
            .into_bytes()
    }

    /// Move connection `token` along after an event; false if it is done with.
    fn advance(&mut self, token: usize, writable: bool) -> io::Result<bool> {
        let mut opened: Option<(u16, usize)> = None;
        {
            let Some(conn) = self.conns.get_mut(&token) else { return Ok(false) };
            if writable && matches!(conn.step, Step::Connecting | Step::CtlConnecting) {
                if conn.stream.peer_addr().is_err() {
                    return Ok(true); // not connected yet
                }
                conn.stream.write_all(&Self::login(conn.device))?;
                conn.step = if conn.step == Step::Connecting { Step::LoggedIn } else { Step::CtlLogin };
            }
            let mut chunk = [0u8; 4096];
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => return Ok(false),
                    Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
            loop {
                let progressed = match conn.step {
                    Step::LoggedIn => match take_object(&mut conn.buf) {
                        Some(_) => {
                            conn.stream.write_all(br#"{"action": "start_command_session"}"#)?;
                            conn.step = Step::Online;
                            conn.buf.clear();
                            false
                        }
                        None => false,
                    },
                    Step::Online => match take_object(&mut conn.buf) {
                        Some(obj) => {
                            if let (Some(prefix), false) = (field(&obj, "prefix"), obj.contains("action")) {
                                self.prefixes[conn.device] = prefix;
                                self.online += 1;
                            } else if obj.contains("control_connection_waiting") {
                                let port: u16 = field(&obj, "port").unwrap_or_default().parse().unwrap_or(0);
                                opened = Some((port, conn.device));
                            }
                            true
                        }
                        None => false,
                    },
                    Step::CtlLogin => take_object(&mut conn.buf).map(|_| conn.step = Step::CtlUser).is_some(),
                    Step::CtlUser => match take_line(&mut conn.buf) {
                        Some(_) => {
                            conn.stream.write_all(b"331 Password please.\r\n")?;
                            conn.step = Step::CtlPass;
                            true
                        }
                        None => false,
                    },
                    Step::CtlPass => match take_line(&mut conn.buf) {
                        Some(_) => {
                            conn.stream.write_all(b"230 Logged in.\r\n")?;
                            conn.step = Step::CtlIdle;
                            false
                        }
                        None => false,
                    },
                    Step::Client220 | Step::Client331 | Step::Client230 => match take_line(&mut conn.buf) {
                        Some(line) if line.starts_with("220 ") => {
                            let prefix = &self.prefixes[conn.device];
                            conn.stream.write_all(format!("USER {prefix}_u\r\n").as_bytes())?;
                            conn.step = Step::Client331;
                            true
                        }
                        Some(line) if line.starts_with("331") => {
                            conn.stream.write_all(b"PASS p\r\n")?;
                            conn.step = Step::Client230;
                            true
                        }
                        Some(line) if line.starts_with("230") => {
                            conn.step = Step::ClientIdle;
                            self.clients_done += 1;
                            true
                        }
                        Some(line) if line.starts_with('2') || line.as_bytes().get(3) == Some(&b'-') => true,
                        Some(line) => return Err(io::Error::other(format!("client got {line:?}"))),
                        None => false,
                    },
                    _ => {
                        conn.buf.clear();
                        false
                    }
                };
                if !progressed {
                    break;
                }
            }
        }
        if let Some((port, device)) = opened {
            self.open(source(device, self.addresses), port, Step::CtlConnecting, device)?;
        }
        Ok(true)
    }

    fn close(&mut self, token: usize) {
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if conn.step == Step::Online && self.sessions[conn.device] == Some(token) {
                self.sessions[conn.device] = None;
            }
        }
    }

    /// Run the loop until `done()`, opening what `more()` still has to open.
    fn run(&mut self, mut more: impl FnMut(&mut Gen) -> io::Result<bool>, done: impl Fn(&Gen) -> bool) -> io::Result<()> {
        let mut events = Events::with_capacity(4096);
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done(self) {
            while more(self)? {}
            self.poll.poll(&mut events, Some(Duration::from_millis(100)))?;
            if Instant::now() > deadline {
                return Err(io::Error::other("timed out"));
            }
            for ev in events.iter() {
                let token = ev.token().0;
                match self.advance(token, ev.is_writable()) {
                    Ok(true) => {}
                    Ok(false) => self.close(token),
                    Err(e) => {
                        eprintln!("connection {token}: {e}");
                        self.close(token);
                    }
                }
            }
        }
        Ok(())
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let device_port: u16 = args[1].parse().expect("DEVICE_PORT");
    let ftp_port: u16 = args[2].parse().expect("FTP_PORT");
    let devices: usize = args[3].parse().expect("DEVICES");
    let addresses: usize = args.get(4).map_or(250, |a| a.parse().expect("ADDRESSES"));
    let mut gen = Gen {
        poll: Poll::new()?,
        conns: HashMap::new(),
        next_token: 0,
        device_port,
        ftp_port,
        addresses,
        prefixes: vec![String::new(); devices],
        sessions: vec![None; devices],
        pending: 0,
        online: 0,
        clients_done: 0,
    };
    println!("{{\"ready\": true}}");
    for line in io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let began = Instant::now();
        match words.next() {
            Some("connect") => {
                gen.online = 0;
                gen.pending = devices;
                let mut next = 0;
                let port = gen.device_port;
                gen.run(
                    |g| {
                        if next < devices && g.conns.len() < g.online + CONCURRENCY {
                            g.open(source(next, g.addresses), port, Step::Connecting, next)?;
                            next += 1;
                            return Ok(true);
                        }
                        Ok(false)
                    },
                    |g| g.online == devices,
                )?;
                println!("{{\"logins\": {devices}, \"seconds\": {}}}", began.elapsed().as_secs_f64());
            }
            Some("drop") => {
                let tokens: Vec<usize> = gen.conns.keys().copied().collect();
                for token in tokens {
                    gen.close(token);
                }
                println!("{{\"dropped\": {devices}}}");
            }
            Some("clients") => {
                let count: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                gen.clients_done = 0;
                let mut next = 0;
                let port = gen.ftp_port;
                gen.run(
                    |g| {
                        if next < count && next < g.clients_done + 64 {
                            g.open(Ipv4Addr::LOCALHOST, port, Step::Client220, next)?;
                            next += 1;
                            return Ok(true);
                        }
                        Ok(false)
                    },
                    |g| g.clients_done == count,
                )?;
                println!("{{\"clients\": {count}, \"seconds\": {}}}", began.elapsed().as_secs_f64());
            }
            Some("close_clients") => {
                let tokens: Vec<usize> = gen
                    .conns
                    .iter()
                    .filter(|(_, c)| !matches!(c.step, Step::Online))
                    .map(|(&t, _)| t)
                    .collect();
                for token in tokens {
                    gen.close(token);
                }
                println!("{{\"closed\": true}}");
            }
            _ => break,
        }
        io::stdout().flush()?;
    }
    Ok(())
}
