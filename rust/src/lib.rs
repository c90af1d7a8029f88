//! SwiftFTP data plane: a splice(2)/epoll relay driven from Python.
//!
//! The Python bindings live here and only here; the other modules are plain
//! Rust: [`bucket`] (token buckets), [`pipe`] (splice through a pipe),
//! [`session`] (one relay's state machine), [`worker`] (the epoll threads),
//! [`engine`] (the set of workers) and [`notify`] (completion notices for
//! asyncio); for FTPS, [`tls`] (certificate, session cache, tickets),
//! [`tlsrelay`] (a session with TLS terminated on one side), [`ktls`] (kernel
//! TLS) and [`cert`] (validity and names of a certificate).
//! `swiftftp/_rustrelay.py` wraps this into the relay interface.

pub mod bucket;
pub mod cert;
pub mod engine;
pub mod ktls;
pub mod notify;
pub mod pipe;
pub mod session;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod tlsrelay;
pub mod worker;

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTimeoutError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::bucket::Chain;
use crate::engine::{Handle, Limits};
use crate::notify::Notifier;
use crate::session::Outcome;
use crate::tlsrelay::{TlsOptions, CONTROL_SIZES};

/// A token bucket: ``rate`` bytes/s (0 = unlimited), ``burst`` bytes. May sit
/// in the chains of many sessions at once; ``set_rate`` applies at once.
#[pyclass(frozen, module = "swiftftp._splice", name = "Bucket")]
struct PyBucket {
    inner: Arc<bucket::Bucket>,
}

#[pymethods]
impl PyBucket {
    #[new]
    #[pyo3(signature = (rate = 0.0, burst = None))]
    fn new(rate: f64, burst: Option<f64>) -> PyResult<Self> {
        let inner =
            bucket::Bucket::new(rate, burst, Instant::now()).map_err(PyValueError::new_err)?;
        Ok(PyBucket {
            inner: Arc::new(inner),
        })
    }

    /// Refill rate in bytes/s (0 = unlimited).
    #[getter]
    fn rate(&self) -> f64 {
        self.inner.rate()
    }

    /// Capacity in bytes.
    #[getter]
    fn burst(&self) -> f64 {
        self.inner.burst()
    }

    /// Tokens available now (negative while sessions wait for tokens).
    #[getter]
    fn tokens(&self) -> f64 {
        self.inner.tokens(Instant::now())
    }

    /// Change the limits; sessions sleeping on this bucket re-plan at once.
    #[pyo3(signature = (rate, burst = None))]
    fn set_rate(&self, rate: f64, burst: Option<f64>) -> PyResult<()> {
        self.inner
            .set_rate(rate, burst, Instant::now())
            .map_err(PyValueError::new_err)?;
        if let Some(engine) = engine::get() {
            engine.rebucket();
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "Bucket(rate={}, burst={})",
            self.inner.rate(),
            self.inner.burst()
        )
    }
}

/// Completion notices for one event loop: watch ``fileno()`` for reading,
/// then ``drain()`` gives the ids of the sessions that finished.
#[pyclass(frozen, module = "swiftftp._splice", name = "Notifier")]
struct PyNotifier {
    inner: Arc<Notifier>,
}

#[pymethods]
impl PyNotifier {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyNotifier {
            inner: Arc::new(Notifier::new()?),
        })
    }

    /// The eventfd to watch (owned by the notifier; do not close it).
    fn fileno(&self) -> RawFd {
        self.inner.fd()
    }

    /// Ids of the sessions finished since the last call.
    fn drain(&self) -> Vec<u64> {
        self.inner.drain()
    }

    /// Close the eventfd now; sessions still running will not notify.
    fn close(&self) {
        self.inner.close()
    }
}

/// A session running on a worker thread (see ``start``).
#[pyclass(frozen, module = "swiftftp._splice", name = "Session")]
struct PySession {
    handle: Arc<Handle>,
}

#[pymethods]
impl PySession {
    /// The id that ``Notifier.drain`` reports when the session ends.
    #[getter]
    fn id(&self) -> u64 {
        self.handle.id
    }

    /// Bytes delivered so far: (up, down). Live; valid after the end too.
    fn counters(&self) -> (u64, u64) {
        self.handle.counters.get()
    }

    /// Close both sockets now (asynchronously, on the worker).
    fn cancel(&self) {
        self.handle.cancel();
    }

    /// How TLS is done on this session: "handshake" (not done yet),
    /// "rustls" (in user space), "ktls" (kernel TLS, then splice); None for
    /// a plain session.
    #[getter]
    fn tls_path(&self) -> Option<&'static str> {
        self.handle.tls_info().map(|i| i.path)
    }

    /// TLS facts once the handshake is done: path, version, cipher, resumed,
    /// resumed_tag, sni, note (why not kernel TLS); None for a plain session.
    fn tls_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(info) = self.handle.tls_info() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("path", info.path)?;
        d.set_item("version", info.version)?;
        d.set_item("cipher", info.cipher)?;
        d.set_item("resumed", info.resumed)?;
        d.set_item(
            "resumed_tag",
            info.resumed_tag.map(|t| PyBytes::new(py, &t)),
        )?;
        d.set_item("sni", info.sni)?;
        d.set_item("note", info.note)?;
        Ok(Some(d))
    }

    /// True once the worker has closed the sockets and stored the outcome.
    fn done(&self) -> bool {
        self.handle.outcome().is_some()
    }

    /// The error the session ended with, as an exception object not raised
    /// (no traceback, so no frames kept alive); None if it did not fail.
    fn exception(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        outcome_error(self.handle.outcome()?).map(|e| e.into_value(py).into_any())
    }

    /// The final (up, down); None if cancelled; raises the OSError (with
    /// errno: ``ConnectionResetError``..., ``TimeoutError`` when idle) it
    /// ended with; RuntimeError while still running.
    fn result(&self) -> PyResult<Option<(u64, u64)>> {
        let outcome = self
            .handle
            .outcome()
            .ok_or_else(|| PyRuntimeError::new_err("relay still running"))?;
        match outcome {
            Outcome::Done(up, down) => Ok(Some((up, down))),
            Outcome::Cancelled => Ok(None),
            failed => Err(outcome_error(failed).expect("a failure")),
        }
    }
}

/// The Python exception of a failed outcome.
fn outcome_error(outcome: Outcome) -> Option<PyErr> {
    match outcome {
        Outcome::Done(..) | Outcome::Cancelled => None,
        Outcome::TimedOut => Some(PyTimeoutError::new_err((
            libc::ETIMEDOUT,
            "relay idle timeout",
        ))),
        // OSError(errno, text) builds the matching subclass (ConnectionResetError...).
        Outcome::Failed(e) => Some(PyOSError::new_err((e as i32, e.desc()))),
        Outcome::FailedWith(e, msg) => Some(PyOSError::new_err((e as i32, msg))),
    }
}

fn chain(buckets: Option<&Bound<'_, PyAny>>) -> PyResult<Chain> {
    let Some(buckets) = buckets else {
        return Ok(Chain::default());
    };
    let mut chain = Vec::new();
    for item in buckets.try_iter()? {
        let item = item?;
        let bucket = item.cast::<PyBucket>().map_err(|_| {
            PyTypeError::new_err("relay buckets must be swiftftp._splice.Bucket objects")
        })?;
        chain.push(bucket.get().inner.clone());
    }
    Ok(Chain::new(chain))
}

/// The TLS server side: certificate chain and key (PEM), crypto provider,
/// and the session cache and ticket keys shared by every session that uses
/// it (so data connections can resume their control connection's session).
#[pyclass(frozen, module = "swiftftp._splice", name = "TlsConfig")]
struct PyTlsConfig {
    inner: Arc<tls::TlsConfig>,
}

#[pymethods]
impl PyTlsConfig {
    /// Load a pair; ValueError with one line saying what is wrong (no
    /// certificate, bad PEM, key not matching, expired or not yet valid).
    #[new]
    fn new(cert_chain_pem: &[u8], key_pem: &[u8]) -> PyResult<Self> {
        let inner = tls::TlsConfig::new(cert_chain_pem, key_pem).map_err(PyValueError::new_err)?;
        Ok(PyTlsConfig {
            inner: Arc::new(inner),
        })
    }

    /// Swap the pair for new handshakes (running sessions keep theirs); on
    /// error (ValueError) the old pair stays.
    fn reload(&self, cert_chain_pem: &[u8], key_pem: &[u8]) -> PyResult<()> {
        self.inner
            .reload(cert_chain_pem, key_pem)
            .map_err(PyValueError::new_err)
    }

    /// The certificate's notAfter, epoch seconds.
    #[getter]
    fn not_after(&self) -> i64 {
        self.inner.current().meta.not_after
    }

    /// The certificate's notBefore, epoch seconds.
    #[getter]
    fn not_before(&self) -> i64 {
        self.inner.current().meta.not_before
    }

    /// The certificate's subjectAltName DNS names.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.inner.current().meta.names.clone()
    }

    fn __repr__(&self) -> String {
        let meta = &self.inner.current().meta;
        format!(
            "TlsConfig(names={:?}, not_after={:?})",
            meta.names,
            cert::format_utc(meta.not_after)
        )
    }
}

fn seconds(value: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    value
        .map(|t| {
            Duration::try_from_secs_f64(t).map_err(|_| PyValueError::new_err(format!("bad {what}")))
        })
        .transpose()
}

fn tag(value: Option<&[u8]>, what: &str) -> PyResult<Option<Vec<u8>>> {
    match value {
        Some(t) if t.len() > tls::MAX_TAG => Err(PyValueError::new_err(format!(
            "{what} longer than {} bytes",
            tls::MAX_TAG
        ))),
        other => Ok(other.map(<[u8]>::to_vec)),
    }
}

/// Relay between the connected stream sockets ``a`` and ``b`` (raw fds,
/// e.g. from ``socket.detach()``: ownership passes here at once, even when
/// this raises) until both directions end; ``a → b`` is up. ``up`` and
/// ``down`` are sequences of ``Bucket``; ``idle_timeout`` in seconds. The
/// notifier is told when it ends. With ``tls`` (a ``TlsConfig``), ``a`` is
/// a TLS client and the node the server: see ``_splice.pyi``.
#[pyfunction]
#[pyo3(signature = (a, b, notifier, up = None, down = None, idle_timeout = None, *,
                    tls = None, tls_tag = None, require_tag = None, handshake_timeout = 10.0))]
#[allow(clippy::too_many_arguments)]
fn start(
    a: RawFd,
    b: RawFd,
    notifier: &PyNotifier,
    up: Option<&Bound<'_, PyAny>>,
    down: Option<&Bound<'_, PyAny>>,
    idle_timeout: Option<f64>,
    tls: Option<&PyTlsConfig>,
    tls_tag: Option<&[u8]>,
    require_tag: Option<&[u8]>,
    handshake_timeout: f64,
) -> PyResult<PySession> {
    if a < 0 || b < 0 || a == b {
        return Err(PyValueError::new_err(
            "need two distinct open file descriptors",
        ));
    }
    // SAFETY: the caller hands over two open fds it no longer uses (the
    // documented contract: Python detached them from their socket objects),
    // so these OwnedFds are their only owners and close them exactly once.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) };
    let limits = Limits {
        up: chain(up)?,
        down: chain(down)?,
        idle: seconds(idle_timeout, "idle_timeout")?,
    };
    let engine = engine::init(None, None)?;
    let handle = match tls {
        None => {
            if tls_tag.is_some() || require_tag.is_some() {
                return Err(PyValueError::new_err("tls_tag and require_tag need tls"));
            }
            engine.start(a, b, limits, notifier.inner.clone())?
        }
        Some(config) => {
            let opts = TlsOptions {
                loaded: config.inner.current(),
                tag: tag(tls_tag, "tls_tag")?.unwrap_or_default(),
                require: tag(require_tag, "require_tag")?,
                initial: Vec::new(),
                handshake_timeout: seconds(Some(handshake_timeout), "handshake_timeout")?
                    .unwrap_or_default(),
                ktls: ktls::available(),
                sizes: tlsrelay::data_sizes(),
            };
            engine.start_tls(a, b, limits, notifier.inner.clone(), opts)?
        }
    };
    Ok(PySession { handle })
}

/// Terminate TLS on the connected socket ``fd`` (ownership passes here at
/// once) and expose its plaintext on a new socket: returns that socket's fd
/// (the caller owns it) and the session. See ``_splice.pyi``.
#[pyfunction]
#[pyo3(signature = (fd, notifier, tls, *, tag = None, initial = None, idle_timeout = None,
                    handshake_timeout = 10.0))]
fn wrap_tls(
    fd: RawFd,
    notifier: &PyNotifier,
    tls: &PyTlsConfig,
    tag: Option<&[u8]>,
    initial: Option<&[u8]>,
    idle_timeout: Option<f64>,
    handshake_timeout: f64,
) -> PyResult<(RawFd, PySession)> {
    if fd < 0 {
        return Err(PyValueError::new_err("need an open file descriptor"));
    }
    // SAFETY: as in `start`: the caller hands over an open fd it no longer uses.
    let a = unsafe { OwnedFd::from_raw_fd(fd) };
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let opts = TlsOptions {
        loaded: tls.inner.current(),
        tag: self::tag(tag, "tag")?.unwrap_or_default(),
        require: None,
        initial: initial.unwrap_or_default().to_vec(),
        handshake_timeout: seconds(Some(handshake_timeout), "handshake_timeout")?
            .unwrap_or_default(),
        ktls: ktls::available(),
        sizes: CONTROL_SIZES,
    };
    let limits = Limits {
        idle: seconds(idle_timeout, "idle_timeout")?,
        ..Limits::default()
    };
    let engine = engine::init(None, None)?;
    let handle = engine.start_tls(a, ours, limits, notifier.inner.clone(), opts)?;
    Ok((theirs.into_raw_fd(), PySession { handle }))
}

/// True when TLS sessions can hand their records to kernel TLS (the ``tls``
/// ULP), so that splice works on the TLS side too. Detected once.
#[pyfunction]
fn ktls_available() -> bool {
    ktls::available()
}

/// One line for the start-up log: kernel TLS used or not, and why.
#[pyfunction]
fn ktls_status() -> &'static str {
    &ktls::status().1
}

/// The TLS crypto provider built in: "aws-lc-rs" or "ring".
#[pyfunction]
fn tls_provider() -> &'static str {
    tls::provider_name()
}

/// Start the worker threads now (they start on the first ``start`` anyway):
/// ``workers`` threads, pipes of ``pipe_size`` bytes; returns what is in use.
#[pyfunction]
#[pyo3(signature = (workers = None, pipe_size = None))]
fn init(workers: Option<usize>, pipe_size: Option<usize>) -> PyResult<(usize, usize)> {
    let engine = engine::init(workers, pipe_size)?;
    Ok((engine.workers(), engine.pipe_size()))
}

/// Bytes moved by every session of this process: (up, down).
#[pyfunction]
fn totals() -> (u64, u64) {
    engine::get().map_or((0, 0), |e| e.totals())
}

/// Sessions running now on the worker threads.
#[pyfunction]
fn running() -> usize {
    engine::get().map_or(0, |e| e.running())
}

/// Burst used when none is given: 50 ms worth of rate, at least 16 KiB.
#[pyfunction]
fn default_burst(rate: f64) -> f64 {
    bucket::default_burst(rate)
}

/// Version of the data-plane extension.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _splice(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBucket>()?;
    m.add_class::<PyNotifier>()?;
    m.add_class::<PySession>()?;
    m.add_class::<PyTlsConfig>()?;
    m.add_function(wrap_pyfunction!(start, m)?)?;
    m.add_function(wrap_pyfunction!(wrap_tls, m)?)?;
    m.add_function(wrap_pyfunction!(ktls_available, m)?)?;
    m.add_function(wrap_pyfunction!(ktls_status, m)?)?;
    m.add_function(wrap_pyfunction!(tls_provider, m)?)?;
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(totals, m)?)?;
    m.add_function(wrap_pyfunction!(running, m)?)?;
    m.add_function(wrap_pyfunction!(default_burst, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
