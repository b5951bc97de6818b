//! [`PrefetchPlan`]: the experts a prefetcher asks for, per token and moment.

/// Experts to fetch per token and moment: slot 0 is the token's start, slot `l + 1`
/// follows layer `l`'s routing; optionally also at each layer's start, before its
/// attention. Ids are `layer * n_experts + expert`, best first. A forecaster that knows
/// how likely each expert is also gives that probability (what the
/// [`crate::planner::PrefetchPlanner`] weighs); the others rank only.
#[derive(Debug, Clone, Default)]
pub struct PrefetchPlan {
    pub name: String,
    pub n_moe: usize,
    /// `[token * (n_moe + 1) + slot]`.
    pub events: Vec<Vec<u32>>,
    /// Probabilities beside `events` (NaN, or missing at a list's end, where unknown);
    /// absent when the plan ranks only.
    pub probs: Option<Vec<Vec<f32>>>,
    /// `[token * n_moe + layer]`: issued when layer `layer` starts, before its attention
    /// (absent when the plan issues nothing then).
    pub before_attention: Option<Vec<Vec<u32>>>,
}

impl PrefetchPlan {
    /// A plan with no prefetches for `n_tokens` tokens.
    pub fn empty(name: &str, n_tokens: usize, n_moe: usize) -> Self {
        PrefetchPlan {
            name: name.into(),
            n_moe,
            events: vec![Vec::new(); n_tokens * (n_moe + 1)],
            probs: None,
            before_attention: None,
        }
    }

    /// The union of `plans` (of the same trace): each event issues the experts of every
    /// plan, in plan order, each once, with the probability of the first plan that
    /// gives one. Named `a+b`.
    pub fn union(plans: &[&PrefetchPlan]) -> PrefetchPlan {
        let Some(first) = plans.first() else {
            return PrefetchPlan::default();
        };
        if plans.len() == 1 {
            return (*first).clone();
        }
        let with_probs = plans.iter().any(|p| p.probs.is_some());
        let mut events = Vec::with_capacity(first.events.len());
        let mut probs = Vec::new();
        for i in 0..first.events.len() {
            let mut ids: Vec<u32> = Vec::new();
            let mut ps: Vec<f32> = Vec::new();
            for p in plans {
                for (j, &x) in p.events[i].iter().enumerate() {
                    let prob = p
                        .probs
                        .as_ref()
                        .and_then(|q| q[i].get(j).copied())
                        .unwrap_or(f32::NAN);
                    match ids.iter().position(|&y| y == x) {
                        Some(at) if ps[at].is_nan() => ps[at] = prob,
                        Some(_) => {}
                        None => {
                            ids.push(x);
                            ps.push(prob);
                        }
                    }
                }
            }
            events.push(ids);
            if with_probs {
                probs.push(ps);
            }
        }
        let before_attention = plans.iter().any(|p| p.before_attention.is_some()).then(|| {
            let n = first.events.len() / (first.n_moe + 1) * first.n_moe;
            (0..n)
                .map(|i| {
                    let mut out: Vec<u32> = Vec::new();
                    for b in plans.iter().filter_map(|p| p.before_attention.as_ref()) {
                        for &x in &b[i] {
                            if !out.contains(&x) {
                                out.push(x);
                            }
                        }
                    }
                    out
                })
                .collect()
        });
        PrefetchPlan {
            name: plans
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            n_moe: first.n_moe,
            events,
            probs: with_probs.then_some(probs),
            before_attention,
        }
    }

    /// Mutable list of token `t` at the start of layer `layer`, before its attention.
    pub fn before_attention_mut(&mut self, t: usize, layer: usize) -> &mut Vec<u32> {
        let n = self.events.len() / (self.n_moe + 1) * self.n_moe;
        let lists = self
            .before_attention
            .get_or_insert_with(|| vec![Vec::new(); n]);
        &mut lists[t * self.n_moe + layer]
    }

    pub(crate) fn before_attention(&self, t: usize, layer: usize) -> &[u32] {
        self.before_attention
            .as_ref()
            .map_or(&[], |lists| &lists[t * self.n_moe + layer])
    }

    /// The list of token `t` at `slot`.
    pub fn at(&self, t: usize, slot: usize) -> &[u32] {
        &self.events[t * (self.n_moe + 1) + slot]
    }

    /// The probabilities of token `t`'s list at `slot` (`None`: the plan ranks only).
    pub fn probs_at(&self, t: usize, slot: usize) -> Option<&[f32]> {
        self.probs
            .as_ref()
            .map(|p| p[t * (self.n_moe + 1) + slot].as_slice())
    }

    /// Mutable list of token `t` at `slot`.
    pub fn at_mut(&mut self, t: usize, slot: usize) -> &mut Vec<u32> {
        &mut self.events[t * (self.n_moe + 1) + slot]
    }

    /// Appends `ids` with their probabilities to token `t`'s list at `slot`.
    pub fn push_scored(&mut self, t: usize, slot: usize, ids: &[u32], probs: &[f32]) {
        let i = t * (self.n_moe + 1) + slot;
        let n = self.events.len();
        let lists = self
            .probs
            .get_or_insert_with(|| (0..n).map(|_| Vec::new()).collect());
        // Ids listed before without a probability get NaN.
        lists[i].resize(self.events[i].len(), f32::NAN);
        self.events[i].extend_from_slice(ids);
        lists[i].extend_from_slice(probs);
    }

    /// The plan with at most `budget` experts per layer in every list (the best ones).
    pub fn truncated(&self, budget: usize, n_experts: usize) -> PrefetchPlan {
        let keep = |ids: &[u32]| -> Vec<bool> {
            let mut seen: Vec<(u32, usize)> = Vec::new();
            ids.iter()
                .map(|&id| {
                    let l = id / n_experts.max(1) as u32;
                    match seen.iter_mut().find(|(x, _)| *x == l) {
                        Some((_, n)) => {
                            *n += 1;
                            *n <= budget
                        }
                        None => {
                            seen.push((l, 1));
                            budget >= 1
                        }
                    }
                })
                .collect()
        };
        let filter = |ids: &[u32], mask: &[bool]| -> Vec<u32> {
            ids.iter()
                .zip(mask)
                .filter(|(_, &k)| k)
                .map(|(&x, _)| x)
                .collect()
        };
        let masks: Vec<Vec<bool>> = self.events.iter().map(|ids| keep(ids)).collect();
        PrefetchPlan {
            name: self.name.clone(),
            n_moe: self.n_moe,
            events: self
                .events
                .iter()
                .zip(&masks)
                .map(|(ids, m)| filter(ids, m))
                .collect(),
            probs: self.probs.as_ref().map(|lists| {
                lists
                    .iter()
                    .zip(&masks)
                    .map(|(ps, m)| {
                        ps.iter()
                            .zip(m)
                            .filter(|(_, &k)| k)
                            .map(|(&p, _)| p)
                            .collect()
                    })
                    .collect()
            }),
            before_attention: self
                .before_attention
                .as_ref()
                .map(|lists| lists.iter().map(|ids| filter(ids, &keep(ids))).collect()),
        }
    }
}
