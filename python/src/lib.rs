//! Python bindings (PyO3) of the moecast predictor: `moecast.Predictor`, its sessions,
//! the online blend `moecast.Blend`, the prefetch planner `moecast.Planner`, the
//! prefetch guard, next-use eviction estimates (`moecast.NextUse`), and
//! `moecast.read_trace`. The Python package (`python/moecast/__init__.py`) wraps
//! these with numpy conversions; errors raise `moecast.MoecastError` with the Rust
//! message.
//!
//! Every object may move between Python threads, and the forecasts and observations
//! run with the GIL released, so a runtime can forecast on a thread of its own while
//! its decode thread runs Python. One object is used by one thread at a time: PyO3's
//! borrow check raises `RuntimeError` for a second thread's call while one is running.
//! Inputs are copied out of their numpy arrays before the GIL is released.

use std::path::PathBuf;

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use datasets::examples::RoutingShape;
use planner::{LinkQueue, PlanTimings, PrefetchGuard, StagingPlanner};
use predictor::blend::OnlineBlend;
use predictor::device::BackendKind;
use predictor::{LoadedPredictor, OnlinePredictor, Task};

mod next_use;

pyo3::create_exception!(_moecast, MoecastError, PyException);

fn err(e: impl std::fmt::Display) -> PyErr {
    MoecastError::new_err(e.to_string())
}

/// A predictor loaded from a directory written by `moecast train`.
#[pyclass(module = "moecast._moecast")]
struct Predictor {
    /// Boxed: burn's types ask for 64-byte alignment, more than Python's allocator
    /// gives an object.
    loaded: Box<LoadedPredictor>,
}

#[pymethods]
impl Predictor {
    #[new]
    fn new(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let loaded = py
            .detach(|| LoadedPredictor::load(&dir, &BackendKind::Flex.device()))
            .map_err(err)?;
        Ok(Predictor {
            loaded: Box::new(loaded),
        })
    }

    #[getter]
    fn n_moe_layers(&self) -> usize {
        self.loaded.card.config.routing.n_moe
    }

    #[getter]
    fn n_experts(&self) -> usize {
        self.loaded.card.config.routing.n_experts
    }

    #[getter]
    fn top_k(&self) -> usize {
        self.loaded.card.config.routing.top_k
    }

    /// Layers a lookahead forecast covers (0 for next-token predictors).
    #[getter]
    fn horizon(&self) -> usize {
        self.loaded.card.config.lookahead_horizon()
    }

    /// Width of the router input lookahead forecasts read (0: none).
    #[getter]
    fn router_input_dim(&self) -> usize {
        let c = &self.loaded.card.config;
        if c.features.hidden() {
            c.router_input_dim
        } else {
            0
        }
    }

    /// A new session: one sequence's incremental state.
    fn session(&self) -> Session {
        Session {
            online: Box::new(OnlinePredictor::new((*self.loaded).clone())),
        }
    }
}

/// One sequence's incremental state.
#[pyclass(module = "moecast._moecast")]
struct Session {
    /// Boxed for the same reason as [`Predictor::loaded`].
    online: Box<OnlinePredictor>,
}

impl Session {
    fn budget(&self, budget: Option<usize>) -> PyResult<usize> {
        let r = self.online.predictor().card.config.routing;
        let b = budget.unwrap_or(r.top_k);
        if b == 0 || b > r.n_experts {
            return Err(err(format!("budget {b} is outside 1..={}", r.n_experts)));
        }
        Ok(b)
    }

    fn layers<'a>(&self, experts: &'a [u16], layers: usize) -> PyResult<Vec<&'a [u16]>> {
        let r = self.online.predictor().card.config.routing;
        let experts = checked_experts(experts, layers, r, "experts")?;
        Ok(experts.chunks(r.top_k).collect())
    }
}

/// `experts`, `layers` layers of `top_k` ids each, every id below `n_experts`; errors
/// name `what`.
fn checked_experts<'a>(
    experts: &'a [u16],
    layers: usize,
    shape: RoutingShape,
    what: &str,
) -> PyResult<&'a [u16]> {
    let (e, k) = (shape.n_experts, shape.top_k);
    if experts.len() != layers * k {
        return Err(err(format!(
            "{what} has {} values, expected {layers} layers x top-{k}",
            experts.len()
        )));
    }
    if let Some(x) = experts.iter().find(|&&x| x as usize >= e) {
        return Err(err(format!("{what}: expert {x} is outside 0..{e}")));
    }
    Ok(experts)
}

#[pymethods]
impl Session {
    /// Starts a new sequence.
    fn reset(&mut self) {
        self.online.reset();
    }

    /// Flat `[n_moe_layers * budget]` forecast of every layer of the token `token`.
    #[pyo3(signature = (token, budget=None))]
    fn predict_next<'py>(
        &mut self,
        py: Python<'py>,
        token: u32,
        budget: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<u16>>> {
        let b = self.budget(budget)?;
        let m = self.online.predictor().card.config.routing.n_moe;
        let online = &mut self.online;
        let top = py.detach(|| online.predict_next(token).map(|f| f.top_rows(b, m)));
        Ok(PyArray1::from_vec(py, top.map_err(err)?))
    }

    /// Flat forecast of every layer of the next token before its id is sampled.
    #[pyo3(signature = (budget=None))]
    fn predict_next_unknown<'py>(
        &mut self,
        py: Python<'py>,
        budget: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<u16>>> {
        let b = self.budget(budget)?;
        let m = self.online.predictor().card.config.routing.n_moe;
        let online = &mut self.online;
        let top = py.detach(|| online.predict_next_unknown().map(|f| f.top_rows(b, m)));
        Ok(PyArray1::from_vec(py, top.map_err(err)?))
    }

    /// Flat `[horizon * budget]` forecast of the layers after the `known` routed ones
    /// (`experts`: `known * top_k` ids), 0xFFFF past the last layer.
    #[pyo3(signature = (token, known, experts, budget=None, router_input=None))]
    fn predict_lookahead<'py>(
        &mut self,
        py: Python<'py>,
        token: u32,
        known: usize,
        experts: PyReadonlyArray1<'py, u16>,
        budget: Option<usize>,
        router_input: Option<PyReadonlyArray1<'py, f32>>,
    ) -> PyResult<Bound<'py, PyArray1<u16>>> {
        let b = self.budget(budget)?;
        let c = self.online.predictor().card.config.clone();
        if c.task != Task::Lookahead {
            return Err(err(
                "this predictor was trained for next-token forecasts, not lookahead",
            ));
        }
        let m = c.routing.n_moe;
        if known == 0 || known >= m {
            return Err(err(format!("known {known} is outside 1..{m}")));
        }
        let experts = experts.as_slice().map_err(err)?.to_vec();
        let given = self.layers(&experts, known)?;
        let x = match &router_input {
            Some(x) => Some(x.as_slice().map_err(err)?.to_vec()),
            None => None,
        };
        let horizon = c.lookahead_horizon();
        let online = &mut self.online;
        let top = py.detach(|| {
            online
                .predict_lookahead_with_input(token, &given, x.as_deref())
                .map(|f| f.top_rows(b, horizon))
        });
        Ok(PyArray1::from_vec(py, top.map_err(err)?))
    }

    /// The token's full routing (`n_moe_layers * top_k` ids); advances the session.
    fn observe(
        &mut self,
        py: Python<'_>,
        token: u32,
        experts: PyReadonlyArray1<'_, u16>,
    ) -> PyResult<()> {
        let m = self.online.predictor().card.config.routing.n_moe;
        let experts = experts.as_slice().map_err(err)?.to_vec();
        let layers: Vec<Option<&[u16]>> = self.layers(&experts, m)?.into_iter().map(Some).collect();
        let online = &mut self.online;
        py.detach(|| online.observe(token, &layers)).map_err(err)
    }
}

/// The online blend: forecasts of the next layers from counts (a predictor directory's
/// or a trace's) and the request's recent routing, weighed by a logistic model that
/// learns while the model decodes.
#[pyclass(module = "moecast._moecast")]
struct Blend {
    blend: Box<OnlineBlend>,
    shape: RoutingShape,
}

#[pymethods]
impl Blend {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let counts = py
            .detach(|| predictor::blend::load_counts(&path, usize::MAX))
            .map_err(err)?;
        let shape = counts.shape;
        Ok(Blend {
            blend: Box::new(OnlineBlend::new(counts, OnlineBlend::HORIZON)),
            shape,
        })
    }

    #[getter]
    fn n_moe_layers(&self) -> usize {
        self.shape.n_moe
    }

    #[getter]
    fn n_experts(&self) -> usize {
        self.shape.n_experts
    }

    #[getter]
    fn top_k(&self) -> usize {
        self.shape.top_k
    }

    /// Layers each forecast covers.
    #[getter]
    fn horizon(&self) -> usize {
        self.blend.horizon()
    }

    /// A new request: recent tokens and the request's use are forgotten.
    fn reset(&mut self) {
        self.blend.start_request();
    }

    /// After layer `layer` routed to `experts` (`earlier`: layer `layer - 1`): flat
    /// `[horizon * budget]` ids of the layers after it, best first (past the last MoE
    /// layer the next token's first layers), and their probabilities.
    #[pyo3(signature = (layer, experts, earlier=None, budget=None))]
    #[allow(clippy::type_complexity)]
    fn forecast<'py>(
        &mut self,
        py: Python<'py>,
        layer: usize,
        experts: PyReadonlyArray1<'py, u16>,
        earlier: Option<PyReadonlyArray1<'py, u16>>,
        budget: Option<usize>,
    ) -> PyResult<(Bound<'py, PyArray1<u16>>, Bound<'py, PyArray1<f32>>)> {
        let (m, e) = (self.shape.n_moe, self.shape.n_experts);
        let b = budget.unwrap_or(self.shape.top_k);
        if b == 0 || b > e {
            return Err(err(format!("budget {b} is outside 1..={e}")));
        }
        if layer >= m {
            return Err(err(format!("layer {layer} is outside 0..{m}")));
        }
        let given = checked_experts(experts.as_slice().map_err(err)?, 1, self.shape, "experts")?;
        let given = given.to_vec();
        let earlier = match (&earlier, layer) {
            (Some(x), 1..) => {
                let x = x.as_slice().map_err(err)?;
                Some(checked_experts(x, 1, self.shape, "earlier")?.to_vec())
            }
            _ => None,
        };
        let h = self.blend.horizon();
        let (mut ids, mut probs) = (vec![u16::MAX; h * b], vec![0f32; h * b]);
        let blend = &mut self.blend;
        py.detach(|| {
            let earlier = earlier.as_deref();
            blend.forecast_top(layer, &given, earlier, b, &mut ids, Some(&mut probs))
        });
        Ok((PyArray1::from_vec(py, ids), PyArray1::from_vec(py, probs)))
    }

    /// The token's full routing (`n_moe_layers * top_k` ids): the blend learns from
    /// its forecasts of this token and counts it.
    fn observe(
        &mut self,
        py: Python<'_>,
        token: u32,
        experts: PyReadonlyArray1<'_, u16>,
    ) -> PyResult<()> {
        let (m, k) = (self.shape.n_moe, self.shape.top_k);
        let experts = checked_experts(experts.as_slice().map_err(err)?, m, self.shape, "experts")?;
        let experts = experts.to_vec();
        let layers: Vec<Option<&[u16]>> = experts.chunks(k).map(Some).collect();
        let blend = &mut self.blend;
        py.detach(|| blend.token_routed(token, &layers));
        Ok(())
    }
}

/// Planned prefetch for a runtime that owns its cache and reads: told when each token
/// starts, each layer routes and how long reads take, it answers each forecast with the
/// experts worth a read now.
#[pyclass(module = "moecast._moecast")]
struct Planner {
    planner: StagingPlanner,
}

#[pymethods]
impl Planner {
    #[new]
    #[pyo3(signature = (n_moe_layers, n_experts, top_k, capacity, read_us=None, layer_us=None))]
    fn new(
        n_moe_layers: usize,
        n_experts: usize,
        top_k: usize,
        capacity: usize,
        read_us: Option<f64>,
        layer_us: Option<f64>,
    ) -> PyResult<Self> {
        let stated = match (read_us, layer_us) {
            (None, None) => None,
            (r, l) => Some(PlanTimings {
                read_us: r.unwrap_or(0.0),
                layer_us: l.unwrap_or(0.0),
            }),
        };
        let planner = StagingPlanner::new(n_moe_layers, n_experts, top_k, capacity, stated);
        Ok(Planner {
            planner: planner.map_err(err)?,
        })
    }

    /// A decode step starts.
    fn token_started(&mut self) {
        self.planner.token_started();
    }

    /// Layer `layer` routed to `experts`, `demand_reads` of them read on demand.
    fn layer_routed(
        &mut self,
        layer: usize,
        experts: PyReadonlyArray1<'_, u16>,
        demand_reads: usize,
    ) -> PyResult<()> {
        let experts = experts.as_slice().map_err(err)?;
        self.planner
            .layer_routed(layer, experts, demand_reads)
            .map_err(err)
    }

    /// A staged read evicted `id` (`layer * n_experts + expert`).
    fn evicted(&mut self, id: u32) -> PyResult<()> {
        self.planner.evicted(id).map_err(err)
    }

    /// A read took `seconds` of the link.
    fn read_done(&mut self, seconds: f64) -> PyResult<()> {
        self.planner.read_done(seconds).map_err(err)
    }

    /// Issuing a staged read took `seconds` of the decoding thread.
    fn read_issued(&mut self, seconds: f64) -> PyResult<()> {
        self.planner.read_issued(seconds).map_err(err)
    }

    /// A layer's demand reads held the decode thread `seconds` (waiting for them, or
    /// working meanwhile, as on a forecast): the layer's own compute excludes it.
    fn stalled(&mut self, seconds: f64) -> PyResult<()> {
        self.planner.stalled(seconds).map_err(err)
    }

    /// Layer `layer`'s forecast (best first, with probabilities or ranks only): the
    /// experts to stage now as `layer * n_experts + expert`.
    #[pyo3(signature = (layer, ranking, probs=None, resident=None, queued_reads=0, free_slots=0, room=None))]
    #[allow(clippy::too_many_arguments)]
    fn plan<'py>(
        &mut self,
        py: Python<'py>,
        layer: usize,
        ranking: PyReadonlyArray1<'py, u16>,
        probs: Option<PyReadonlyArray1<'py, f32>>,
        resident: Option<PyReadonlyArray1<'py, bool>>,
        queued_reads: usize,
        free_slots: usize,
        room: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let ranking = ranking.as_slice().map_err(err)?;
        let probs = probs
            .as_ref()
            .map(|p| p.as_slice())
            .transpose()
            .map_err(err)?;
        let resident = resident
            .as_ref()
            .map(|r| r.as_slice())
            .transpose()
            .map_err(err)?;
        let queue = LinkQueue {
            queued_reads,
            free_slots,
        };
        let staged = self
            .planner
            .plan(
                layer,
                ranking,
                probs,
                resident,
                queue,
                room.unwrap_or(usize::MAX),
            )
            .map_err(err)?;
        Ok(PyArray1::from_vec(py, staged))
    }

    /// What it decided and the timings it plans with.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (c, s) = (self.planner.counts(), self.planner.state());
        let d = PyDict::new(py);
        d.set_item("offered", c.offered)?;
        d.set_item("staged", c.issued)?;
        d.set_item("late", c.late)?;
        d.set_item("not_worth", c.not_worth)?;
        d.set_item("read_us", s.read_us)?;
        d.set_item("layer_us", s.layer_period_us)?;
        d.set_item("calibrated_probability", s.calibrated_probability)?;
        d.set_item("break_even_precision", s.break_even_precision)?;
        Ok(d)
    }
}

/// Decode steps in windows with prefetch on or off, the faster setting kept
/// (`planner::PrefetchGuard`, as in `moecast run`).
#[pyclass(module = "moecast._moecast")]
struct Guard {
    guard: PrefetchGuard,
}

#[pymethods]
impl Guard {
    #[new]
    fn new(window: usize, explore_every: usize) -> PyResult<Self> {
        if window == 0 || explore_every == 0 {
            return Err(MoecastError::new_err(
                "window and explore_every must be at least 1",
            ));
        }
        Ok(Guard {
            guard: PrefetchGuard::new(window, explore_every),
        })
    }

    /// Whether the next decode step prefetches.
    fn enabled(&self) -> bool {
        self.guard.enabled()
    }

    /// A decode step took `seconds`: when it ends a measured window, (whether
    /// prefetch ran, the window's mean step seconds).
    fn step_done(&mut self, seconds: f64) -> PyResult<Option<(bool, f64)>> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(MoecastError::new_err(format!(
                "step time {seconds} s is not a duration"
            )));
        }
        Ok(self.guard.step_done(seconds))
    }

    /// Decode steps run without prefetch so far.
    fn steps_off(&self) -> u64 {
        self.guard.steps_off
    }
}

/// A trace file (`.mctrace`, `.parquet`, `.jsonl`, a dataset folder's part) as flat
/// arrays plus its shape; `moecast.read_trace` reshapes them.
#[pyfunction]
fn read_trace_flat<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let opened = datasets::open_trace(&path).map_err(err)?;
    let v = opened.view();
    let d = PyDict::new(py);
    d.set_item("n_moe_layers", v.meta.n_moe())?;
    d.set_item("n_experts", v.meta.n_experts)?;
    d.set_item("top_k", v.meta.top_k)?;
    d.set_item("model", v.meta.model.clone())?;
    d.set_item("seq_names", v.seq_names.to_vec())?;
    d.set_item("seq", PyArray1::from_slice(py, v.seq))?;
    d.set_item("pos", PyArray1::from_slice(py, v.pos))?;
    d.set_item("token", PyArray1::from_slice(py, v.token))?;
    d.set_item("experts", PyArray1::from_slice(py, v.experts))?;
    if let Some(w) = v.weights {
        d.set_item("weights", PyArray1::from_slice(py, w))?;
    }
    let widths = PyDict::new(py);
    for (c, ch) in v.meta.channels.iter().enumerate() {
        if let Some(x) = v.channels.get(c) {
            d.set_item(ch.name.as_str(), PyArray1::from_vec(py, x.to_f32()))?;
            widths.set_item(ch.name.as_str(), ch.width)?;
        }
    }
    d.set_item("channels", widths)?;
    if let Some(dim) = v.meta.router_input_dim() {
        d.set_item("router_input_dim", dim)?;
    }
    Ok(d)
}

#[pymodule]
fn _moecast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Predictor>()?;
    m.add_class::<Session>()?;
    m.add_class::<Blend>()?;
    m.add_class::<Planner>()?;
    m.add_class::<Guard>()?;
    m.add_class::<next_use::NextUse>()?;
    m.add_function(wrap_pyfunction!(read_trace_flat, m)?)?;
    m.add("MoecastError", m.py().get_type::<MoecastError>())?;
    Ok(())
}
