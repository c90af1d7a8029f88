//! Kernel TLS (Linux `tls` ULP): after rustls has done the handshake, the
//! kernel encrypts and decrypts records on the socket, so splice(2) works on
//! the TLS leg too and the bytes never visit user space.
//!
//! Detected once per process ([`available`]): `tls` listed in
//! `/proc/sys/net/ipv4/tcp_available_ulp`, or else setting `TCP_ULP` to
//! `tls` on a throwaway loopback connection, which loads the module where
//! the kernel permits autoloading. `SWIFTFTP_KTLS=0` turns it off.
//!
//! What the kernel path does not cover falls back or fails cleanly:
//! a suite the kernel lacks keeps the session in rustls (decided before the
//! secrets leave rustls); once in the kernel, a control record from the
//! client (a TLS 1.3 KeyUpdate, or an alert other than close_notify) ends
//! the session with an error, since the kernel cannot rekey without rustls.

use std::io;
use std::mem::size_of;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use nix::errno::Errno;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;
/// TLS record content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// `struct tls_crypto_info` (linux/tls.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Info {
    version: u16,
    cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_128`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AesGcm128 {
    info: Info,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AesGcm256 {
    info: Info,
    iv: [u8; 8],
    key: [u8; 32],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305` (no salt).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Chacha20Poly1305 {
    info: Info,
    iv: [u8; 12],
    key: [u8; 32],
    rec_seq: [u8; 8],
}

/// What `setsockopt(SOL_TLS, TLS_TX/TLS_RX)` takes for one direction.
#[derive(Debug, Clone, Copy)]
pub enum CryptoInfo {
    /// AES-128-GCM.
    AesGcm128(AesGcm128Info),
    /// AES-256-GCM.
    AesGcm256(AesGcm256Info),
    /// ChaCha20-Poly1305 (Linux 5.11+).
    Chacha20Poly1305(ChachaInfo),
}

/// Opaque wrappers (the structs stay private to this module).
#[derive(Debug, Clone, Copy)]
pub struct AesGcm128Info(AesGcm128);
/// See [`CryptoInfo`].
#[derive(Debug, Clone, Copy)]
pub struct AesGcm256Info(AesGcm256);
/// See [`CryptoInfo`].
#[derive(Debug, Clone, Copy)]
pub struct ChachaInfo(Chacha20Poly1305);

fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: only called on the repr(C) structs above, made of u16 and u8
    // arrays with no padding (sizes checked in the tests), so every byte of
    // the value is initialised; the slice borrows `value`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

impl CryptoInfo {
    /// The struct's bytes, as setsockopt wants them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CryptoInfo::AesGcm128(i) => as_bytes(&i.0),
            CryptoInfo::AesGcm256(i) => as_bytes(&i.0),
            CryptoInfo::Chacha20Poly1305(i) => as_bytes(&i.0),
        }
    }

    /// (key, salt, iv, rec_seq) as laid out for the kernel.
    pub fn parts(&self) -> (&[u8], &[u8], &[u8], [u8; 8]) {
        match self {
            CryptoInfo::AesGcm128(i) => (&i.0.key, &i.0.salt, &i.0.iv, i.0.rec_seq),
            CryptoInfo::AesGcm256(i) => (&i.0.key, &i.0.salt, &i.0.iv, i.0.rec_seq),
            CryptoInfo::Chacha20Poly1305(i) => (&i.0.key, &[], &i.0.iv, i.0.rec_seq),
        }
    }
}

/// The kernel's crypto info for one direction: record sequence number `seq`
/// and the traffic secrets rustls extracted. None for a version the kernel
/// does not do. The GCM salt is the first 4 bytes of rustls's 12-byte IV and
/// the kernel's `iv` the other 8 (for TLS 1.2 too: rustls hands out salt ||
/// explicit-nonce seed), ChaCha20 takes all 12 as `iv`.
pub fn crypto_info(
    version: ProtocolVersion,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Option<CryptoInfo> {
    let version = match version {
        ProtocolVersion::TLSv1_2 => TLS_1_2_VERSION,
        ProtocolVersion::TLSv1_3 => TLS_1_3_VERSION,
        _ => return None,
    };
    let rec_seq = seq.to_be_bytes();
    Some(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let iv = iv.as_ref();
            CryptoInfo::AesGcm128(AesGcm128Info(AesGcm128 {
                info: Info {
                    version,
                    cipher_type: TLS_CIPHER_AES_GCM_128,
                },
                iv: iv[4..12].try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: iv[..4].try_into().ok()?,
                rec_seq,
            }))
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let iv = iv.as_ref();
            CryptoInfo::AesGcm256(AesGcm256Info(AesGcm256 {
                info: Info {
                    version,
                    cipher_type: TLS_CIPHER_AES_GCM_256,
                },
                iv: iv[4..12].try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: iv[..4].try_into().ok()?,
                rec_seq,
            }))
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            CryptoInfo::Chacha20Poly1305(ChachaInfo(Chacha20Poly1305 {
                info: Info {
                    version,
                    cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: iv.as_ref().try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                rec_seq,
            }))
        }
        _ => return None,
    })
}

/// True if a negotiated suite (by name) has a kernel cipher.
pub fn suite_supported(suite: rustls::CipherSuite) -> bool {
    let name = format!("{suite:?}");
    ["AES_128_GCM", "AES_256_GCM", "CHACHA20_POLY1305"]
        .iter()
        .any(|c| name.contains(c))
}

static STATUS: OnceLock<(bool, String)> = OnceLock::new();

/// True when sessions can use kernel TLS (detected once; see the module docs).
pub fn available() -> bool {
    status().0
}

/// Whether kernel TLS is used, and why, in one line for the start-up log.
pub fn status() -> &'static (bool, String) {
    STATUS.get_or_init(detect)
}

const ULP_LIST: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

fn ulps() -> String {
    std::fs::read_to_string(ULP_LIST).unwrap_or_default()
}

fn detect() -> (bool, String) {
    let setting = std::env::var("SWIFTFTP_KTLS").unwrap_or_default();
    if matches!(setting.trim(), "0" | "off" | "no" | "false") {
        return (false, "kernel TLS off (SWIFTFTP_KTLS)".into());
    }
    let listed = |ulps: &str| ulps.split_whitespace().any(|u| u == "tls");
    let before = ulps();
    if listed(&before) {
        return (true, "kernel TLS available".into());
    }
    match probe() {
        Ok(()) => (true, "kernel TLS available (tls module loaded)".into()),
        Err(e) => (
            false,
            format!(
                "no kernel TLS: {ULP_LIST} lists {:?}, and loading tls failed: {e}",
                before.trim()
            ),
        ),
    }
}

/// Set the tls ULP on a throwaway loopback connection (autoloads the module).
fn probe() -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let stream = TcpStream::connect(listener.local_addr()?)?;
    let _peer = listener.accept()?;
    set_ulp(stream.as_fd())
}

fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is a live buffer of `value.len()` bytes and `fd` an open
    // socket for the duration of the call; the kernel only reads them.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attach the tls ULP to a connected TCP socket (still plain TCP until
/// [`enable`] gives it keys).
pub fn set_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_ULP, b"tls")
}

/// Give the kernel both directions' keys (after [`set_ulp`]).
pub fn enable(fd: BorrowedFd<'_>, tx: &CryptoInfo, rx: &CryptoInfo) -> io::Result<()> {
    setsockopt_bytes(fd, libc::SOL_TLS, TLS_TX, tx.as_bytes())?;
    setsockopt_bytes(fd, libc::SOL_TLS, TLS_RX, rx.as_bytes())
}

/// A non-data record the kernel stopped at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The peer's close_notify alert: end of its stream.
    CloseNotify,
    /// Another record: (content type, first payload bytes).
    Other(u8, Vec<u8>),
}

/// Read the control record at the head of a kTLS socket's receive queue
/// (splice says EINVAL there; recvmsg with room for a cmsg gets it).
pub fn recv_control(fd: BorrowedFd<'_>) -> Result<Control, Errno> {
    let mut data = [0u8; 512];
    // Room for one cmsg with one byte (the record type), 8-byte aligned.
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null name, no iov yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>() as _;
    let n = loop {
        // SAFETY: msg points at `iov`, `data` and `cbuf`, all live and of the
        // sizes given, for the duration of the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            other => break other? as usize,
        }
    };
    let mut record_type = None;
    // SAFETY: the kernel filled `msg.msg_control` with well-formed cmsgs
    // within `msg_controllen`; CMSG_FIRSTHDR/CMSG_NXTHDR/CMSG_DATA walk only
    // within it, and the one-byte read is inside a TLS_GET_RECORD_TYPE cmsg.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    match record_type {
        Some(ALERT) if n >= 2 && data[1] == 0 => Ok(Control::CloseNotify),
        Some(t) => Ok(Control::Other(t, data[..n.min(8)].to_vec())),
        // Application data after all: the caller asked at the wrong time.
        None => Ok(Control::Other(23, data[..n.min(8)].to_vec())),
    }
}

/// Describe a control record for an error message.
pub fn describe(control: &Control) -> String {
    match control {
        Control::CloseNotify => "close_notify".into(),
        Control::Other(ALERT, p) => format!("TLS alert {p:?} from the client"),
        Control::Other(HANDSHAKE, p) if p.first() == Some(&24) => {
            "TLS key update from the client, which kernel TLS cannot follow".into()
        }
        Control::Other(t, _) => format!("TLS record of type {t} the kernel path does not handle"),
    }
}

/// Send a close_notify alert on a kTLS socket (EAGAIN when its buffer is full).
pub fn send_close_notify(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut alert = [1u8, 0u8]; // warning, close_notify
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: alert.as_mut_ptr().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null name, no iov yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: msg_control points at `cbuf` (64 bytes, 8-aligned), larger than
    // CMSG_SPACE(1); the header and its one data byte are written inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = ALERT;
    }
    loop {
        // SAFETY: msg points at live `iov`, `alert` and `cbuf`.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_layout() {
        assert_eq!(size_of::<AesGcm128>(), 40);
        assert_eq!(size_of::<AesGcm256>(), 56);
        assert_eq!(size_of::<Chacha20Poly1305>(), 56);
    }

    #[test]
    fn detection_agrees_with_the_kernel() {
        let (on, why) = status();
        let listed = ulps().split_whitespace().any(|u| u == "tls");
        let loadable = probe().is_ok();
        if std::env::var("SWIFTFTP_KTLS").is_err() {
            assert_eq!(*on, listed || loadable, "{why}");
        }
        if !on {
            assert!(why.starts_with("no kernel TLS") || why.contains("SWIFTFTP_KTLS"));
        }
    }

    #[test]
    fn control_records_are_described() {
        let key_update = Control::Other(HANDSHAKE, vec![24, 0, 0, 1, 0]);
        assert!(describe(&key_update).contains("key update"));
        assert!(describe(&Control::Other(ALERT, vec![2, 40])).contains("alert"));
    }
}

/// The kernel's crypto info, checked without a kernel: a record the client
/// sent after the handshake opens with the key, salt, IV and sequence number
/// that [`crypto_info`] lays out for `TLS_RX` (the kernel's own nonce
/// construction, done here by hand).
#[cfg(test)]
mod record_tests {
    use super::*;
    use crate::tls::tests::{CA, CHAIN, KEY};
    use crate::tls::TlsConfig;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
    use std::io::Write;
    use std::sync::Arc;

    fn pump(from: &mut dyn FnMut(&mut Vec<u8>), to: &mut dyn FnMut(&[u8])) -> bool {
        let mut buf = Vec::new();
        from(&mut buf);
        if !buf.is_empty() {
            to(&buf);
        }
        !buf.is_empty()
    }

    fn client_record(tls13: bool) -> (ProtocolVersion, CryptoInfo, Vec<u8>) {
        let mut server_config = (*TlsConfig::new(CHAIN, KEY).unwrap().current().server).clone();
        server_config.enable_secret_extraction = true;
        let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(CA) {
            roots.add(c.unwrap()).unwrap();
        }
        let version = if tls13 {
            &rustls::version::TLS13
        } else {
            &rustls::version::TLS12
        };
        let mut provider = crate::tls::provider();
        provider
            .cipher_suites
            .retain(|s| format!("{:?}", s.suite()).contains("AES_128_GCM"));
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            let a = pump(
                &mut |b| {
                    client.write_tls(b).unwrap();
                },
                &mut |b| {
                    server.read_tls(&mut &b[..]).unwrap();
                    server.process_new_packets().unwrap();
                },
            );
            let b = pump(
                &mut |b| {
                    server.write_tls(b).unwrap();
                },
                &mut |b| {
                    client.read_tls(&mut &b[..]).unwrap();
                    client.process_new_packets().unwrap();
                },
            );
            assert!(a || b || !client.is_handshaking(), "handshake stuck");
        }
        client.writer().write_all(b"hello kernel").unwrap();
        let mut record = Vec::new();
        client.write_tls(&mut record).unwrap();
        let negotiated = server.protocol_version().unwrap();
        let secrets = server.dangerous_extract_secrets().unwrap();
        let rx = crypto_info(negotiated, secrets.rx.0, &secrets.rx.1).unwrap();
        assert!(matches!(rx, CryptoInfo::AesGcm128(_)));
        (negotiated, rx, record)
    }

    fn open(rx: &CryptoInfo, nonce: [u8; 12], aad: &[u8], sealed: &mut [u8]) -> Vec<u8> {
        let (key, ..) = rx.parts();
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key).unwrap());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
            .expect("the record opens with the kernel's key material");
        plain.to_vec()
    }

    #[test]
    fn tls13_record_opens_with_the_kernel_rx_info() {
        let (version, rx, mut record) = client_record(true);
        assert_eq!(version, ProtocolVersion::TLSv1_3);
        let (_, salt, iv, rec_seq) = rx.parts();
        let len = u16::from_be_bytes([record[3], record[4]]) as usize;
        let (header, body) = record.split_at_mut(5);
        // RFC 8446 5.3: (salt || iv) XOR the 64-bit sequence number, right-aligned.
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(salt);
        nonce[4..].copy_from_slice(iv);
        for (n, s) in nonce[4..].iter_mut().zip(rec_seq) {
            *n ^= s;
        }
        let plain = open(&rx, nonce, header, &mut body[..len]);
        assert_eq!(
            plain, b"hello kernel\x17",
            "data, then the inner content type"
        );
    }

    #[test]
    fn tls12_record_opens_with_the_kernel_rx_info() {
        let (version, rx, mut record) = client_record(false);
        assert_eq!(version, ProtocolVersion::TLSv1_2);
        let (_, salt, _, rec_seq) = rx.parts();
        let len = u16::from_be_bytes([record[3], record[4]]) as usize;
        // RFC 5288: salt || explicit nonce (the first 8 bytes of the record body).
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(salt);
        nonce[4..].copy_from_slice(&record[5..13]);
        let plain_len = (len - 8 - 16) as u16;
        let mut aad = rec_seq.to_vec();
        aad.extend_from_slice(&[23, 3, 3]);
        aad.extend_from_slice(&plain_len.to_be_bytes());
        let plain = open(&rx, nonce, &aad, &mut record[13..5 + len]);
        assert_eq!(plain, b"hello kernel");
    }
}
