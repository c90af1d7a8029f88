//! The node's TLS server configuration: certificate, key, crypto provider,
//! and the session cache and ticketer shared by every connection, so that a
//! data connection can resume the TLS session of its control connection.
//!
//! **Which control connection a session came from.** rustls can store
//! application data in a session (`set_resumption_data`) but gives it back
//! on resumption for TLS 1.3 tickets only, not for TLS 1.2 (session ids or
//! tickets), which vsftpd-era clients still use. So the store and the
//! ticketer are wrapped instead: every session value they keep is prefixed
//! with the *tag* of the connection that made it, and a resumption reports
//! the tag it found. Both run synchronously inside `process_new_packets` on
//! the worker thread that drives the connection, so a thread-local carries
//! the tag in and the finding out ([`with_tag`]). This covers TLS 1.2 and 1.3
//! alike, stateful and stateless.

use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{CipherSuite, ServerConfig};

use crate::cert::{self, CertMeta};

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!("enable a crypto provider feature: aws-lc-rs (default) or ring");

/// Sessions kept for resumption by id (TLS 1.2 clients without tickets).
/// An entry is a few hundred bytes: 16384 of them stay under ~8 MiB, and an
/// FTP client needs its entry only while its control connection lives.
pub const SESSION_CACHE_SIZE: usize = 16384;

/// Longest tag a session can carry.
pub const MAX_TAG: usize = 1024;

/// The crypto provider in use ("aws-lc-rs" or "ring"). The `ring` feature
/// wins when both are on (the benchmark builds that way: ring in the relay,
/// aws-lc-rs in its traffic generator). aws-lc-rs is the default: ring was
/// no cheaper (benches/tls_bench.py, AES-128-GCM, relay CPU per GiB up/down:
/// ring 1.175/0.990 s, aws-lc-rs 1.155/1.035 s, within the machine's noise),
/// and aws-lc-rs is rustls's default with the wider choice of algorithms.
pub fn provider_name() -> &'static str {
    if cfg!(feature = "ring") {
        "ring"
    } else {
        "aws-lc-rs"
    }
}

/// Preference of a cipher suite (lower first). With `ignore_client_order`,
/// the server picks: AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305
/// (all three are what kernel TLS takes too). Measured with
/// benches/tls_bench.py (1 GiB through one session, 2 rounds, aws-lc-rs, this
/// project's 2-vCPU EPYC without VAES): relay CPU per GiB up/down was
/// AES-128-GCM 1.155/1.035 s, AES-256-GCM 1.210/1.050 s (OpenSSL clients,
/// curl, lftp, Python, list AES-256 first), ChaCha20 1.820/1.705 s.
fn suite_rank(suite: CipherSuite) -> u8 {
    let name = format!("{suite:?}");
    let tls13 = if name.starts_with("TLS13_") { 0 } else { 10 };
    let aead = if name.contains("AES_128_GCM") {
        0
    } else if name.contains("AES_256_GCM") {
        1
    } else {
        2
    };
    tls13 + aead
}

pub(crate) fn provider() -> CryptoProvider {
    #[cfg(not(feature = "ring"))]
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(feature = "ring")]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite()));
    p
}

fn new_ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    #[cfg(not(feature = "ring"))]
    return rustls::crypto::aws_lc_rs::Ticketer::new();
    #[cfg(feature = "ring")]
    return rustls::crypto::ring::Ticketer::new();
}

#[derive(Default)]
struct Context {
    /// Tag of the connection being processed: stored with new sessions.
    tag: Vec<u8>,
    /// Tag of a session looked up for resumption.
    found: Option<Vec<u8>>,
}

thread_local! {
    static CONTEXT: RefCell<Context> = RefCell::default();
}

/// Run `f` (a call into a connection: `process_new_packets`) with `tag` as
/// the tag of sessions it creates; a session it looks up for resumption
/// leaves its tag in `found`.
pub fn with_tag<R>(tag: &[u8], found: &mut Option<Vec<u8>>, f: impl FnOnce() -> R) -> R {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        c.tag.clear();
        c.tag.extend_from_slice(tag);
        c.found = None;
    });
    let result = f();
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(t) = c.found.take() {
            *found = Some(t);
        }
        c.tag.clear();
    });
    result
}

fn tag_value(value: &[u8]) -> Vec<u8> {
    CONTEXT.with(|c| {
        let c = c.borrow();
        let mut out = Vec::with_capacity(2 + c.tag.len() + value.len());
        out.extend_from_slice(&(c.tag.len() as u16).to_be_bytes());
        out.extend_from_slice(&c.tag);
        out.extend_from_slice(value);
        out
    })
}

fn untag(stored: Vec<u8>) -> Option<Vec<u8>> {
    let n = u16::from_be_bytes([*stored.first()?, *stored.get(1)?]) as usize;
    let tag = stored.get(2..2 + n)?.to_vec();
    CONTEXT.with(|c| c.borrow_mut().found = Some(tag));
    Some(stored[2 + n..].to_vec())
}

/// The session-id cache, with tags (see the module docs).
#[derive(Debug)]
struct TaggedStore(Arc<ServerSessionMemoryCache>);

impl StoresServerSessions for TaggedStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.put(key, tag_value(&value))
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).and_then(untag)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.take(key).and_then(untag)
    }
    fn can_cache(&self) -> bool {
        true
    }
}

/// The ticketer (key rotation by rustls), with tags inside the encrypted ticket.
struct TaggedTicketer(Arc<dyn ProducesTickets>);

impl fmt::Debug for TaggedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TaggedTicketer")
    }
}

impl ProducesTickets for TaggedTicketer {
    fn enabled(&self) -> bool {
        self.0.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.0.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.encrypt(&tag_value(plain))
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.0.decrypt(cipher).and_then(untag)
    }
}

/// One certificate and key, ready for handshakes.
#[derive(Debug)]
pub struct Loaded {
    /// What new connections use.
    pub server: Arc<ServerConfig>,
    /// Facts about the end-entity certificate.
    pub meta: CertMeta,
}

/// The TLS server side of the node (see the module docs). Shared by every
/// connection; [`TlsConfig::reload`] swaps the certificate for new handshakes.
pub struct TlsConfig {
    provider: Arc<CryptoProvider>,
    store: Arc<TaggedStore>,
    ticketer: Arc<TaggedTicketer>,
    current: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("meta", &self.current().meta)
            .finish()
    }
}

fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl TlsConfig {
    /// Load `chain_pem` (end-entity certificate first) and `key_pem`; the
    /// error is one line saying what is wrong with them.
    pub fn new(chain_pem: &[u8], key_pem: &[u8]) -> Result<TlsConfig, String> {
        let provider = Arc::new(provider());
        let store = Arc::new(TaggedStore(ServerSessionMemoryCache::new(
            SESSION_CACHE_SIZE,
        )));
        let ticketer = Arc::new(TaggedTicketer(
            new_ticketer().map_err(|e| format!("TLS ticketer: {e}"))?,
        ));
        let loaded = load(
            &provider,
            &store,
            &ticketer,
            chain_pem,
            key_pem,
            now_epoch(),
        )?;
        Ok(TlsConfig {
            provider,
            store,
            ticketer,
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    /// What new handshakes use now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replace the certificate and key for new handshakes; running sessions
    /// keep theirs, and resumption across the swap still works (same cache
    /// and ticket keys). A bad pair changes nothing and says why.
    pub fn reload(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        let loaded = load(
            &self.provider,
            &self.store,
            &self.ticketer,
            chain_pem,
            key_pem,
            now_epoch(),
        )?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
        Ok(())
    }
}

fn load(
    provider: &Arc<CryptoProvider>,
    store: &Arc<TaggedStore>,
    ticketer: &Arc<TaggedTicketer>,
    chain_pem: &[u8],
    key_pem: &[u8],
    now: i64,
) -> Result<Loaded, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {}", pem_error(e)))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the certificate PEM".into());
    };
    let meta = cert::parse(leaf).map_err(|e| format!("bad certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => "no private key in the key PEM".to_string(),
        e => format!("bad private key PEM: {}", pem_error(e)),
    })?;
    if now > meta.not_after {
        return Err(format!(
            "certificate expired on {}",
            cert::format_utc(meta.not_after)
        ));
    }
    if now < meta.not_before {
        return Err(format!(
            "certificate not valid before {}",
            cert::format_utc(meta.not_before)
        ));
    }
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the private key does not match the certificate".to_string()
            }
            e => format!("unusable certificate or key: {e}"),
        })?;
    server.ignore_client_order = true;
    server.session_storage = store.clone();
    server.ticketer = ticketer.clone();
    // Only kernel TLS needs the traffic secrets out of rustls.
    server.enable_secret_extraction = crate::ktls::available();
    Ok(Loaded {
        server: Arc::new(server),
        meta,
    })
}

fn pem_error(e: pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "no PEM section found".into(),
        e => format!("{e:?}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const CHAIN: &[u8] = include_bytes!("../testdata/server.pem");
    pub const KEY: &[u8] = include_bytes!("../testdata/server.key");
    pub const CA: &[u8] = include_bytes!("../testdata/ca.pem");
    pub const OTHER_KEY: &[u8] = include_bytes!("../testdata/other.key");
    pub const EXPIRED: &[u8] = include_bytes!("../testdata/expired.pem");
    pub const FUTURE: &[u8] = include_bytes!("../testdata/future.pem");

    #[test]
    fn loads_a_good_pair_and_reads_its_facts() {
        let config = TlsConfig::new(CHAIN, KEY).unwrap();
        let meta = &config.current().meta;
        assert_eq!(meta.names, ["localhost", "ftp.example.test"]);
        assert!(meta.not_after > now_epoch() + 86400 * 365 * 50);
        assert!(meta.not_before < now_epoch());
    }

    #[test]
    fn bad_pairs_are_one_clear_line() {
        let err = |chain: &[u8], key: &[u8]| TlsConfig::new(chain, key).unwrap_err();
        assert_eq!(err(b"", KEY), "no certificate in the certificate PEM");
        assert_eq!(err(CHAIN, b""), "no private key in the key PEM");
        assert_eq!(
            err(CHAIN, OTHER_KEY),
            "the private key does not match the certificate"
        );
        assert!(err(EXPIRED, KEY).starts_with("certificate expired on 2001-"));
        assert!(err(FUTURE, KEY).starts_with("certificate not valid before 2100-"));
        let garbled = String::from_utf8_lossy(CHAIN).replace("MII", "M!I");
        assert!(err(garbled.as_bytes(), KEY).starts_with("bad certificate"));
        for e in [err(EXPIRED, KEY), err(CHAIN, OTHER_KEY)] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn reload_keeps_the_old_pair_on_error() {
        let config = TlsConfig::new(CHAIN, KEY).unwrap();
        let before = config.current();
        assert!(config.reload(EXPIRED, KEY).is_err());
        assert!(Arc::ptr_eq(&before, &config.current()));
        config.reload(CHAIN, KEY).unwrap();
        assert!(!Arc::ptr_eq(&before, &config.current()));
    }

    #[test]
    fn tags_travel_through_store_and_ticketer() {
        let config = TlsConfig::new(CHAIN, KEY).unwrap();
        let mut found = None;
        let ticket = with_tag(b"ctl7", &mut found, || {
            config.store.put(b"id".to_vec(), b"value".to_vec());
            config.ticketer.encrypt(b"session").unwrap()
        });
        assert_eq!(found, None);
        let got = with_tag(b"", &mut found, || config.ticketer.decrypt(&ticket));
        assert_eq!(got.as_deref(), Some(&b"session"[..]));
        assert_eq!(found.as_deref(), Some(&b"ctl7"[..]));
        let mut found = None;
        let got = with_tag(b"", &mut found, || config.store.get(b"id"));
        assert_eq!(got.as_deref(), Some(&b"value"[..]));
        assert_eq!(found.as_deref(), Some(&b"ctl7"[..]));
    }

    #[test]
    fn suites_prefer_aes128() {
        let p = provider();
        let names: Vec<String> = p
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256");
        assert!(names[1].starts_with("TLS13_AES_256"));
    }
}
