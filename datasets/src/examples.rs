//! Training examples for expert predictors, read straight from (memory-mapped) traces.
//!
//! A predictor sees a window of consecutive tokens of one sequence. Position `i` of a
//! window carries the id of token `t = start + i` and the routing of token `t - 1`;
//! its targets are the routing of token `t`. Both forecasting tasks use this one layout:
//!
//! - **next-token**: predict every MoE layer of token `t` from the ids of tokens `<= t`
//!   and the routing of tokens `< t` (the id of `t` is known once it is sampled);
//! - **cross-layer lookahead**: additionally given layers `0..=l` of token `t`, predict
//!   layers `l+1 ..= l+D`.
//!
//! Sequences (never tokens) are split into train / validation / test with a seed.
//! [`ExampleSet`] keeps only window coordinates; [`ExampleSet::batch`] copies the few
//! rows a batch needs out of the traces, so a trace is never loaded whole into RAM.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TraceError};
use crate::store::{open_trace, OpenedTrace};
use crate::trace::{TraceMeta, TraceView, UNKNOWN_TOKEN};

/// The routing shape a predictor is built for; every trace it reads must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingShape {
    /// MoE layers.
    pub n_moe: usize,
    /// Routed experts per layer.
    pub n_experts: usize,
    /// Experts chosen per token and layer.
    pub top_k: usize,
}

impl RoutingShape {
    /// The shape of a trace's metadata.
    pub fn of(meta: &TraceMeta) -> Self {
        RoutingShape {
            n_moe: meta.n_moe(),
            n_experts: meta.n_experts as usize,
            top_k: meta.top_k as usize,
        }
    }

    /// `n_moe x n_experts`: the width of a multi-hot routing row.
    pub fn width(&self) -> usize {
        self.n_moe * self.n_experts
    }

    /// Checks that `meta` (of the trace at `path`) has this shape.
    pub fn check(&self, meta: &TraceMeta, path: &Path) -> Result<()> {
        let other = RoutingShape::of(meta);
        if other != *self {
            return Err(TraceError::format(
                path,
                format!(
                    "routing shape {} MoE layers x {} experts, top-{} does not match the \
                     expected {} x {}, top-{}",
                    other.n_moe,
                    other.n_experts,
                    other.top_k,
                    self.n_moe,
                    self.n_experts,
                    self.top_k
                ),
            ));
        }
        Ok(())
    }
}

/// Which part of the sequence-level split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

/// Fractions and seed of the sequence-level split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Share of sequences held out for validation (at least one sequence when > 0).
    pub validation: f64,
    /// Share of sequences held out for testing (0 when testing on other traces).
    pub test: f64,
    /// Seed of the shuffle.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            validation: 0.1,
            test: 0.1,
            seed: 0,
        }
    }
}

/// One sequence of one trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceRef {
    /// Index of the trace in the set.
    pub trace: usize,
    /// Sequence name.
    pub name: String,
    /// Token range in the trace.
    pub tokens: Range<usize>,
    /// The split it belongs to.
    pub split: Split,
}

/// A window of consecutive tokens of one sequence; positions before `first_target`
/// are context only (they were targets of the previous window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub trace: usize,
    /// First token of the window's sequence.
    pub seq_start: usize,
    pub start: usize,
    pub len: usize,
    pub first_target: usize,
}

/// A batch of windows as flat row-major arrays, ready to become tensors.
#[derive(Debug, Clone, Default)]
pub struct WindowBatch {
    /// Windows in the batch.
    pub batch: usize,
    /// Positions per window (the longest window; shorter ones are padded).
    pub len: usize,
    /// `[batch, len]` token bucket ids (see [`token_bucket`]).
    pub tokens: Vec<i64>,
    /// `[batch, len, n_moe * n_experts]`: multi-hot routing of the previous token.
    pub prev_routing: Vec<f32>,
    /// `[batch, len, n_moe * n_experts]`: multi-hot routing of the token itself.
    pub routing: Vec<f32>,
    /// `[batch, len, n_moe]`: 1 where the token is a target and the layer was computed.
    pub target_mask: Vec<f32>,
    /// `[batch, len]` global token index in its trace (`usize::MAX` for padding), for
    /// metrics that need the trace (baselines).
    pub token_index: Vec<usize>,
    /// `[batch]` trace index of each window.
    pub trace: Vec<usize>,
    /// `[batch, len, n_moe, router_input_dim]` router inputs (zeros where not recorded),
    /// when asked for.
    pub router_inputs: Option<Vec<f32>>,
}

impl WindowBatch {
    /// The batch cut into at most `parts` consecutive groups of windows, as equal as
    /// possible (the first ones one window longer), each padded to the same `len`: the
    /// shards of a data-parallel training step.
    pub fn split(&self, parts: usize) -> Vec<WindowBatch> {
        let parts = parts.clamp(1, self.batch.max(1));
        let rows = |v: &[f32]| v.len() / (self.batch * self.len).max(1);
        let (w, m) = (rows(&self.routing), rows(&self.target_mask));
        let d = self.router_inputs.as_deref().map(rows);
        let mut out = Vec::with_capacity(parts);
        let mut first = 0;
        for p in 0..parts {
            let n = self.batch / parts + usize::from(p < self.batch % parts);
            let (a, b) = (first * self.len, (first + n) * self.len);
            out.push(WindowBatch {
                batch: n,
                len: self.len,
                tokens: self.tokens[a..b].to_vec(),
                prev_routing: self.prev_routing[a * w..b * w].to_vec(),
                routing: self.routing[a * w..b * w].to_vec(),
                target_mask: self.target_mask[a * m..b * m].to_vec(),
                token_index: self.token_index[a..b].to_vec(),
                trace: self.trace[first..first + n].to_vec(),
                router_inputs: self
                    .router_inputs
                    .as_ref()
                    .zip(d)
                    .map(|(x, d)| x[a * d..b * d].to_vec()),
            });
            first += n;
        }
        out
    }
}

/// Maps a token id to one of `buckets` embedding rows; unknown ids get row `buckets`.
pub fn token_bucket(token: u32, buckets: usize) -> i64 {
    if token == UNKNOWN_TOKEN {
        buckets as i64
    } else {
        (token as usize % buckets) as i64
    }
}

/// Writes the multi-hot routing of token `t` into `row` (`n_moe * n_experts` wide);
/// returns which layers were computed.
pub fn multi_hot(view: &TraceView<'_>, t: usize, row: &mut [f32], computed: &mut [bool]) {
    let e = view.meta.n_experts as usize;
    for (m, done) in computed.iter_mut().enumerate() {
        *done = false;
        if let Some(ids) = view.layer(t, m) {
            *done = true;
            for &id in ids {
                row[m * e + id as usize] = 1.0;
            }
        }
    }
}

/// Traces opened for training or evaluation, their sequences and split.
pub struct ExampleSet {
    paths: Vec<PathBuf>,
    traces: Vec<OpenedTrace>,
    shape: RoutingShape,
    sequences: Vec<SequenceRef>,
}

impl ExampleSet {
    /// Opens `paths` (memory-mapped when binary; a dataset folder as its parts'
    /// memory-mapped shards), checks they share one routing shape
    /// and splits their sequences with `split`.
    pub fn open(paths: &[PathBuf], split: &SplitConfig) -> Result<Self> {
        let mut set = Self::open_all(paths, None)?;
        set.assign_split(split)?;
        Ok(set)
    }

    /// Opens `paths` with every sequence in [`Split::Test`] (evaluation on other traces).
    /// When `shape` is given every trace must have it.
    pub fn open_for_test(paths: &[PathBuf], shape: Option<RoutingShape>) -> Result<Self> {
        Self::open_all(paths, shape)
    }

    fn open_all(paths: &[PathBuf], shape: Option<RoutingShape>) -> Result<Self> {
        if paths.is_empty() {
            return Err(TraceError::Invalid("no trace files given".into()));
        }
        let paths = crate::dataset::expand_paths(paths, |_, _, _| {})?;
        let mut traces = Vec::new();
        let mut sequences = Vec::new();
        let mut shape = shape;
        for (i, p) in paths.iter().enumerate() {
            let tr = open_trace(p)?;
            let view = tr.view();
            match shape {
                Some(s) => s.check(view.meta, p)?,
                None => shape = Some(RoutingShape::of(view.meta)),
            }
            for r in view.sequence_ranges() {
                let name = view.seq_names[view.seq[r.start] as usize].clone();
                sequences.push(SequenceRef {
                    trace: i,
                    name,
                    tokens: r,
                    split: Split::Test,
                });
            }
            traces.push(tr);
        }
        Ok(ExampleSet {
            paths,
            traces,
            shape: shape.expect("at least one trace"),
            sequences,
        })
    }

    fn assign_split(&mut self, cfg: &SplitConfig) -> Result<()> {
        let n = self.sequences.len();
        let frac_ok = |f: f64| (0.0..1.0).contains(&f);
        if !frac_ok(cfg.validation) || !frac_ok(cfg.test) || cfg.validation + cfg.test >= 1.0 {
            return Err(TraceError::Invalid(format!(
                "split fractions validation {} + test {} must each be in [0, 1) and sum below 1",
                cfg.validation, cfg.test
            )));
        }
        let count = |f: f64| {
            if f > 0.0 {
                ((n as f64 * f).round() as usize).max(1)
            } else {
                0
            }
        };
        let (n_val, n_test) = (count(cfg.validation), count(cfg.test));
        if n_val + n_test >= n {
            return Err(TraceError::Invalid(format!(
                "{n} sequence(s) cannot be split into train / validation ({n_val}) / test \
                 ({n_test}) by sequence; give more sequences or lower the fractions"
            )));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
        for (rank, &i) in order.iter().enumerate() {
            self.sequences[i].split = if rank < n_test {
                Split::Test
            } else if rank < n_test + n_val {
                Split::Validation
            } else {
                Split::Train
            };
        }
        Ok(())
    }

    /// The routing shape shared by all traces.
    pub fn shape(&self) -> RoutingShape {
        self.shape
    }

    /// The trace files, in order (a dataset folder's shards in its place).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The metadata of the first trace.
    pub fn meta(&self) -> &TraceMeta {
        self.traces[0].view().meta
    }

    /// The column view of trace `i`.
    pub fn view(&self, i: usize) -> TraceView<'_> {
        self.traces[i].view()
    }

    /// All sequences with their split.
    pub fn sequences(&self) -> &[SequenceRef] {
        &self.sequences
    }

    /// Sequences of one split.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &SequenceRef> {
        self.sequences.iter().filter(move |s| s.split == split)
    }

    /// Tokens in one split.
    pub fn split_tokens(&self, split: Split) -> usize {
        self.split(split).map(|s| s.tokens.len()).sum()
    }

    /// Windows of `len` tokens covering the sequences of `split`. Consecutive windows
    /// overlap by half, so every target but a sequence's first ones has at least
    /// `len / 2` tokens of context; each token is a target exactly once.
    pub fn windows(&self, split: Split, len: usize) -> Vec<Window> {
        let len = len.max(2);
        let stride = len - len / 2;
        let mut out = Vec::new();
        for s in self.split(split) {
            let r = &s.tokens;
            let mut target_from = r.start;
            while target_from < r.end {
                let start = if target_from == r.start {
                    r.start
                } else {
                    target_from - (len - stride)
                };
                let end = (start + len).min(r.end);
                out.push(Window {
                    trace: s.trace,
                    seq_start: r.start,
                    start,
                    len: end - start,
                    first_target: target_from - start,
                });
                target_from = end;
            }
        }
        out
    }

    /// Copies the rows of `windows` into a [`WindowBatch`]; token ids are folded into
    /// `token_buckets` rows.
    pub fn batch(&self, windows: &[Window], token_buckets: usize) -> WindowBatch {
        self.batch_with(windows, token_buckets, None)
    }

    /// [`ExampleSet::batch`], also copying `input_dim`-wide router inputs when given.
    pub fn batch_with(
        &self,
        windows: &[Window],
        token_buckets: usize,
        input_dim: Option<usize>,
    ) -> WindowBatch {
        let width = self.shape.width();
        let n_moe = self.shape.n_moe;
        let b = windows.len();
        let len = windows.iter().map(|w| w.len).max().unwrap_or(0);
        let mut out = WindowBatch {
            batch: b,
            len,
            tokens: vec![token_buckets as i64; b * len],
            prev_routing: vec![0.0; b * len * width],
            routing: vec![0.0; b * len * width],
            target_mask: vec![0.0; b * len * n_moe],
            token_index: vec![usize::MAX; b * len],
            trace: windows.iter().map(|w| w.trace).collect(),
            router_inputs: input_dim.map(|d| vec![0.0; b * len * n_moe * d]),
        };
        let mut computed = vec![false; n_moe];
        for (wi, w) in windows.iter().enumerate() {
            let view = self.view(w.trace);
            for i in 0..w.len {
                let t = w.start + i;
                let row = wi * len + i;
                out.tokens[row] = token_bucket(view.token[t], token_buckets);
                out.token_index[row] = t;
                if t > w.seq_start {
                    let dst = &mut out.prev_routing[row * width..(row + 1) * width];
                    multi_hot(&view, t - 1, dst, &mut computed);
                }
                let dst = &mut out.routing[row * width..(row + 1) * width];
                multi_hot(&view, t, dst, &mut computed);
                if let (Some(x), Some(d)) = (&mut out.router_inputs, input_dim) {
                    for m in 0..n_moe {
                        if let Some(v) = view.router_input(t, m) {
                            let dst = &mut x[(row * n_moe + m) * d..][..d];
                            for (o, &bits) in dst.iter_mut().zip(v) {
                                *o = half::f16::from_bits(bits).to_f32();
                            }
                        }
                    }
                }
                if i >= w.first_target {
                    for (m, &c) in computed.iter().enumerate() {
                        out.target_mask[row * n_moe + m] = if c { 1.0 } else { 0.0 };
                    }
                }
            }
        }
        out
    }
}
