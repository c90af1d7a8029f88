//! SwiftFTP data plane: a splice(2)/epoll relay driven from Python.
use pyo3::prelude::*;

/// Version of the data-plane extension.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _splice(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
