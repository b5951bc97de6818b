//! [`TraceBuilder`]: a [`RoutingTrace`] assembled token by token, each record validated
//! as it comes (importers and the collector build traces this way).

use crate::channel::ChannelValues;
use crate::error::Result;
use crate::trace::{check_topk, RoutingTrace, TokenRecord, TraceMeta, NOT_COMPUTED, UNKNOWN_TOKEN};

/// Builds a [`RoutingTrace`] token by token, validating each record as it comes. The
/// error string is meant to be wrapped with the file and line by the importer.
#[derive(Debug)]
pub struct TraceBuilder {
    trace: RoutingTrace,
    has_weights: bool,
    seq_index: std::collections::HashMap<String, u32>,
}

impl TraceBuilder {
    /// Starts an empty trace; `with_weights` reserves the weight column.
    pub fn new(meta: TraceMeta, with_weights: bool) -> Result<Self> {
        meta.validate()?;
        let channels = meta
            .channels
            .iter()
            .map(|c| ChannelValues::with_capacity(c.dtype, 0))
            .collect();
        Ok(TraceBuilder {
            trace: RoutingTrace {
                channels,
                meta,
                seq_names: Vec::new(),
                seq: Vec::new(),
                pos: Vec::new(),
                token: Vec::new(),
                phase: Vec::new(),
                experts: Vec::new(),
                weights: with_weights.then(Vec::new),
            },
            has_weights: with_weights,
            seq_index: Default::default(),
        })
    }

    /// The meta the trace is built for.
    pub fn meta(&self) -> &TraceMeta {
        &self.trace.meta
    }

    /// Number of tokens pushed so far.
    pub fn n_tokens(&self) -> usize {
        self.trace.n_tokens()
    }

    /// Appends one token. Sequences must be contiguous and positions increasing.
    pub fn push(&mut self, rec: &TokenRecord) -> Result<(), String> {
        let meta = &self.trace.meta;
        let n_moe = meta.n_moe();
        let k = meta.top_k as usize;
        if rec.experts.len() != n_moe {
            return Err(format!(
                "{} expert lists for {n_moe} MoE layers",
                rec.experts.len()
            ));
        }
        if let Some(w) = &rec.weights {
            if w.len() != n_moe {
                return Err(format!("{} weight lists for {n_moe} MoE layers", w.len()));
            }
        }
        for (name, x) in &rec.channels {
            let Some(c) = meta.channel(name) else {
                let known: Vec<&str> = meta.channels.iter().map(|c| c.name.as_str()).collect();
                return Err(format!(
                    "'{name}' holds per-layer vectors but the meta has no channel '{name}' (meta.channels: [{}])",
                    known.join(", ")
                ));
            };
            if x.len() != n_moe {
                return Err(format!("{} '{name}' lists for {n_moe} MoE layers", x.len()));
            }
            for (m, v) in x.iter().enumerate() {
                match v {
                    Some(v) if v.len() != c.width as usize => {
                        return Err(format!(
                            "MoE layer index {m}: {} '{name}' values, expected {}",
                            v.len(),
                            c.width
                        ))
                    }
                    Some(_) if rec.experts[m].is_none() => {
                        return Err(format!(
                            "MoE layer index {m}: '{name}' values for a layer without experts"
                        ))
                    }
                    _ => {}
                }
            }
        }
        for (m, ids) in rec.experts.iter().enumerate() {
            let w = rec.weights.as_ref().and_then(|w| w[m].as_deref());
            match ids {
                Some(ids) => check_topk(meta, ids, w)
                    .map_err(|e| format!("MoE layer {} (index {m}): {e}", meta.moe_layers[m]))?,
                None if w.is_some() => {
                    return Err(format!("MoE layer index {m}: weights without experts"))
                }
                None => {}
            }
        }
        let next_index = self.trace.seq_names.len() as u32;
        let s = *self.seq_index.entry(rec.seq.clone()).or_insert(next_index);
        let t = &mut self.trace;
        if s == next_index {
            t.seq_names.push(rec.seq.clone());
        } else if t.seq.last() != Some(&s) {
            return Err(format!(
                "sequence '{}' resumes after another sequence (sequences must be contiguous)",
                rec.seq
            ));
        } else if t.pos.last().is_some_and(|&p| rec.pos <= p) {
            return Err(format!(
                "position {} of sequence '{}' does not follow position {}",
                rec.pos,
                rec.seq,
                t.pos.last().copied().unwrap_or(0)
            ));
        }
        if rec.token == Some(UNKNOWN_TOKEN) {
            return Err(format!("token id {UNKNOWN_TOKEN} is reserved for unknown"));
        }
        t.seq.push(s);
        t.pos.push(rec.pos);
        t.token.push(rec.token.unwrap_or(UNKNOWN_TOKEN));
        t.phase.push(rec.phase.code());
        for (m, ids) in rec.experts.iter().enumerate() {
            match ids {
                Some(ids) => t.experts.extend(ids.iter().map(|&e| e as u16)),
                None => t.experts.extend(std::iter::repeat_n(NOT_COMPUTED, k)),
            }
            if self.has_weights {
                let w = rec.weights.as_ref().and_then(|w| w[m].as_deref());
                let col = t.weights.get_or_insert_with(Vec::new);
                match w {
                    Some(w) => col.extend_from_slice(w),
                    None => col.extend(std::iter::repeat_n(f32::NAN, k)),
                }
            }
        }
        for (c, col) in t.meta.channels.iter().zip(&mut t.channels) {
            let values = rec.channels.get(&c.name);
            for m in 0..n_moe {
                col.push(values.and_then(|x| x[m].as_deref()), c.width as usize);
            }
        }
        Ok(())
    }

    /// Finishes the trace; an empty trace is an error.
    pub fn finish(self) -> Result<RoutingTrace, String> {
        if self.trace.n_tokens() == 0 {
            return Err("no tokens".into());
        }
        Ok(self.trace)
    }
}
