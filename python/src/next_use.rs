//! `moecast.NextUse`: next-use eviction estimates (`planner::NextUseForecast`) for a
//! runtime that owns its expert cache.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use planner::NextUseForecast;

use crate::err;

/// When each expert is expected next, from its layer's reuse gaps and its own use rate.
#[pyclass(module = "moecast._moecast")]
pub(crate) struct NextUse {
    forecast: NextUseForecast,
}

#[pymethods]
impl NextUse {
    #[new]
    fn new(n_moe_layers: usize, n_experts: usize) -> PyResult<Self> {
        let forecast = NextUseForecast::checked(n_moe_layers, n_experts).map_err(err)?;
        Ok(NextUse { forecast })
    }

    /// MoE layer `layer` of a decode step routed to `experts` (indices within the layer;
    /// repeats count once).
    fn layer_routed(&mut self, layer: usize, experts: PyReadonlyArray1<'_, u16>) -> PyResult<()> {
        let experts = experts.as_slice().map_err(err)?;
        self.forecast.layer_routed(layer, experts).map_err(err)
    }

    /// The expected next use of each of layer `layer`'s experts, in layer steps since
    /// the first routed layer.
    fn layer<'py>(&self, py: Python<'py>, layer: usize) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let mut out = vec![0.0; self.forecast.n_experts()];
        self.forecast.layer_due(layer, &mut out).map_err(err)?;
        Ok(PyArray1::from_vec(py, out))
    }
}
