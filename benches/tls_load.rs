//! Traffic ends and a bare relay for the TLS measurement (driven by
//! benches/tls_bench.py, which reads the relay process's CPU time):
//!
//!     tls_load sink DIRECTION BYTES          plain server: read to EOF (up) or send BYTES (down)
//!     tls_load relay TARGET [CERT KEY]       relay each connection to TARGET, TLS on the client side if given
//!     tls_load client PORT DIRECTION BYTES [CA SUITE]
//!
//! The relay is the extension's own engine (the code Python drives); the
//! client is rustls (aws-lc-rs), so neither end is the bottleneck that
//! Python's ssl would be. Ports are on 127.0.0.1; servers print `PORT n`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use _splice::engine::{self, Limits};
use _splice::notify::Notifier;
use _splice::tls::TlsConfig;
use _splice::tlsrelay::{data_sizes, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const CHUNK: usize = 256 * 1024;

fn listen() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("PORT {}", l.local_addr().unwrap().port());
    l
}

fn sink(direction: &str, bytes: u64) {
    let l = listen();
    for conn in l.incoming() {
        let mut s = conn.unwrap();
        let up = direction == "up";
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            if up {
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            } else {
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown(Shutdown::Write);
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
        });
    }
}

fn relay(target: u16, tls: Option<(String, String)>) {
    let engine = engine::init(None, None).unwrap();
    let notifier = Arc::new(Notifier::new().unwrap());
    let config = tls.map(|(cert, key)| {
        TlsConfig::new(&std::fs::read(cert).unwrap(), &std::fs::read(key).unwrap()).unwrap()
    });
    eprintln!("{}", _splice::ktls::status().1);
    let l = listen();
    for conn in l.incoming() {
        let a = conn.unwrap();
        let b = TcpStream::connect(("127.0.0.1", target)).unwrap();
        match &config {
            None => engine.start(a.into(), b.into(), Limits::default(), notifier.clone()),
            Some(config) => {
                let opts = TlsOptions {
                    loaded: config.current(),
                    tag: Vec::new(),
                    require: None,
                    initial: Vec::new(),
                    handshake_timeout: std::time::Duration::from_secs(10),
                    ktls: _splice::ktls::available(),
                    sizes: data_sizes(),
                };
                engine.start_tls(
                    a.into(),
                    b.into(),
                    Limits::default(),
                    notifier.clone(),
                    opts,
                )
            }
        }
        .unwrap();
        notifier.drain();
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

fn client(port: u16, direction: &str, bytes: u64, tls: Option<(String, String)>) {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_nodelay(true).unwrap();
    let mut stream = match tls {
        None => Stream::Plain(sock),
        Some((ca, suite)) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&std::fs::read(ca).unwrap()) {
                roots.add(c.unwrap()).unwrap();
            }
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .retain(|s| format!("{:?}", s.suite()).contains(&suite));
            assert!(!provider.cipher_suites.is_empty(), "no suite {suite}");
            let config = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let conn =
                ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
            let mut s = StreamOwned::new(conn, sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            Stream::Tls(Box::new(s))
        }
    };
    let t0 = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut moved = 0u64;
    match (&mut stream, direction) {
        (Stream::Plain(s), "up") => {
            while moved < bytes {
                let n = (bytes - moved).min(CHUNK as u64) as usize;
                s.write_all(&buf[..n]).unwrap();
                moved += n as u64;
            }
            s.shutdown(Shutdown::Write).unwrap();
            while s.read(&mut buf).unwrap() > 0 {}
        }
        (Stream::Tls(s), "up") => {
            while moved < bytes {
                let n = (bytes - moved).min(CHUNK as u64) as usize;
                s.write_all(&buf[..n]).unwrap();
                moved += n as u64;
            }
            s.conn.send_close_notify();
            s.flush().unwrap();
            s.sock.shutdown(Shutdown::Write).unwrap();
            while s.read(&mut buf).unwrap() > 0 {}
        }
        (Stream::Plain(s), _) => loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            moved += n as u64;
        },
        (Stream::Tls(s), _) => {
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                moved += n as u64;
            }
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(moved, bytes, "moved {moved} of {bytes}");
    println!("{secs} {}", moved as f64 * 8.0 / secs / 1e9);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned();
    let pair = |i: usize| Some((arg(i)?, arg(i + 1)?));
    match args.first().map(String::as_str) {
        Some("sink") => sink(&args[1], args[2].parse().unwrap()),
        Some("relay") => relay(args[1].parse().unwrap(), pair(2)),
        Some("client") => client(
            args[1].parse().unwrap(),
            &args[2],
            args[3].parse().unwrap(),
            pair(4),
        ),
        _ => panic!("usage: see the module docs"),
    }
}
