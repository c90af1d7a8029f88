//! SwiftFTP data plane: a splice(2)/epoll relay driven from Python.
//!
//! The Python bindings live here and only here; the other modules are plain
//! Rust: [`bucket`] (token buckets), [`pipe`] (splice through a pipe),
//! [`session`] (one relay's state machine), [`worker`] (the epoll threads),
//! [`engine`] (the set of workers) and [`notify`] (completion notices for
//! asyncio). `swiftftp/_rustrelay.py` wraps this into the relay interface.

pub mod bucket;
pub mod engine;
pub mod notify;
pub mod pipe;
pub mod session;
#[cfg(test)]
mod testutil;
pub mod worker;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTimeoutError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::bucket::Chain;
use crate::engine::{Handle, Limits};
use crate::notify::Notifier;
use crate::session::Outcome;

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

/// Relay between the connected stream sockets ``a`` and ``b`` (raw fds,
/// e.g. from ``socket.detach()``: ownership passes here at once, even when
/// this raises) until both directions end; ``a → b`` is up. ``up`` and
/// ``down`` are sequences of ``Bucket``; ``idle_timeout`` in seconds. The
/// notifier is told when it ends.
#[pyfunction]
#[pyo3(signature = (a, b, notifier, up = None, down = None, idle_timeout = None))]
fn start(
    a: RawFd,
    b: RawFd,
    notifier: &PyNotifier,
    up: Option<&Bound<'_, PyAny>>,
    down: Option<&Bound<'_, PyAny>>,
    idle_timeout: Option<f64>,
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
    let idle = idle_timeout
        .map(|t| {
            Duration::try_from_secs_f64(t).map_err(|_| PyValueError::new_err("bad idle_timeout"))
        })
        .transpose()?;
    let limits = Limits {
        up: chain(up)?,
        down: chain(down)?,
        idle,
    };
    let engine = engine::init(None, None)?;
    let handle = engine.start(a, b, limits, notifier.inner.clone())?;
    Ok(PySession { handle })
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
    m.add_function(wrap_pyfunction!(start, m)?)?;
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(totals, m)?)?;
    m.add_function(wrap_pyfunction!(running, m)?)?;
    m.add_function(wrap_pyfunction!(default_burst, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
