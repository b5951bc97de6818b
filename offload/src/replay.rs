//! `moecast run --replay`: the engine over a recorded trace's sequences, each token's
//! routing forced to the recorded experts (see [`crate::engine::replay`]).

use std::path::Path;

use crate::engine::replay::replay_sequence;
use crate::engine::OffloadEngine;
use datasets::open_trace;
use indicatif::ProgressBar;
use inference::MoeModel;

use inference::ModelError;

use crate::OffloadError;

/// What a replay ran: sequences, tokens, routings that could not be forced, and the
/// notes a user should see (layers cut, token ids folded).
#[derive(Debug, Clone, Default)]
pub struct ReplaySummary {
    pub sequences: usize,
    pub tokens: usize,
    pub unforced: u64,
    pub notes: Vec<String>,
}

/// One recorded sequence: token ids and, per token, each MoE layer's experts and (where
/// the trace has them; else empty) router inputs.
struct Sequence {
    tokens: Vec<u32>,
    experts: Vec<Vec<Option<Vec<u16>>>>,
    router_inputs: Vec<Vec<Option<Vec<f32>>>>,
}

/// Reads `path`'s sequences for `model`: the trace must route over the model's experts
/// with its top-k; a trace with more MoE layers is replayed over the model's first ones
/// (said in the notes); token ids beyond the model's vocabulary are folded into it.
/// At most `max_tokens` tokens in all (0: every token). Recorded router inputs are read
/// (said in the notes) unless the trace has none; `lens`: the run's logit lens reads
/// them with the model's own gate, so they must be the model's width.
fn sequences(
    path: &Path,
    model: &MoeModel,
    max_tokens: usize,
    lens: bool,
    notes: &mut Vec<String>,
) -> Result<Vec<Sequence>, OffloadError> {
    let shape = model.shape();
    let opened = open_trace(path)?;
    let view = opened.view();
    let bad = |msg: String| OffloadError::Model(ModelError::file(path, msg));
    let (m, e, k) = (shape.moe_layers.len(), shape.n_experts, shape.top_k);
    if view.meta.n_experts as usize != e || view.meta.top_k as usize != k {
        return Err(bad(format!(
            "the trace routes top-{} of {} experts, the model top-{k} of {e}: replay needs the same (make a checkpoint of that shape: `moecast checkpoint synth`)",
            view.meta.top_k, view.meta.n_experts
        )));
    }
    if view.meta.n_moe() < m {
        return Err(bad(format!(
            "the trace has {} MoE layers, the model {m}: replay needs at least as many",
            view.meta.n_moe()
        )));
    }
    if view.meta.n_moe() > m {
        notes.push(format!(
            "the trace has {} MoE layers; its first {m} are replayed (the model's)",
            view.meta.n_moe()
        ));
    }
    let folded = view
        .token
        .iter()
        .filter(|&&t| t as usize >= shape.vocab_size)
        .count();
    if folded > 0 {
        notes.push(format!(
            "{folded} token ids beyond the model's vocabulary ({}) folded into it",
            shape.vocab_size
        ));
    }
    let inputs = view.meta.router_input_dim();
    match inputs {
        Some(d) if lens && d as usize != shape.hidden_size => {
            return Err(bad(format!(
                "the trace records router inputs of width {d}, which the replay gives to the engine, and the logit lens (--lens) reads them with the model's gate of width {}: replay without --lens",
                shape.hidden_size
            )))
        }
        Some(d) => notes.push(format!(
            "forecasters read the trace's recorded router inputs (width {d}), not the checkpoint's"
        )),
        None => {}
    }
    let mut out = Vec::new();
    let mut left = if max_tokens == 0 {
        usize::MAX
    } else {
        max_tokens
    };
    for r in view.sequence_ranges() {
        if left == 0 {
            break;
        }
        let end = r.end.min(r.start + left);
        left -= end - r.start;
        let tokens = (r.start..end)
            .map(|t| view.token[t] % shape.vocab_size as u32)
            .collect();
        let experts = (r.start..end)
            .map(|t| {
                (0..m)
                    .map(|l| view.layer(t, l).map(<[u16]>::to_vec))
                    .collect()
            })
            .collect();
        let router_inputs = match inputs {
            Some(_) => (r.start..end)
                .map(|t| (0..m).map(|l| view.router_input_f32(t, l)).collect())
                .collect(),
            None => Vec::new(),
        };
        out.push(Sequence {
            tokens,
            experts,
            router_inputs,
        });
    }
    Ok(out)
}

/// Replays `path` through `engine` (which `model`'s experts were offloaded to).
pub fn replay_trace(
    path: &Path,
    model: &MoeModel,
    engine: &mut OffloadEngine,
    max_tokens: usize,
) -> Result<ReplaySummary, OffloadError> {
    let mut summary = ReplaySummary::default();
    let lens = engine.config().lens;
    let seqs = sequences(path, model, max_tokens, lens, &mut summary.notes)?;
    let bar = ProgressBar::new(seqs.iter().map(|s| s.tokens.len() as u64).sum());
    for (i, s) in seqs.iter().enumerate() {
        engine.new_request();
        engine.replay_routing(&s.experts);
        summary.unforced += replay_sequence(model, &s.tokens, &s.experts, &s.router_inputs, engine)
            .map_err(|source| {
                ModelError::in_prompt(format!("{} sequence {i}", path.display()), source)
            })?;
        summary.sequences += 1;
        summary.tokens += s.tokens.len();
        bar.inc(s.tokens.len() as u64);
    }
    bar.finish_and_clear();
    Ok(summary)
}
