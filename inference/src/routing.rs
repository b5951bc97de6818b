//! Turning router scores into a top-k choice, and the hook through which every MoE
//! layer reports its routing.
//!
//! The selection runs on the host in f32 on the router logits `[T, E]` the model
//! computed, so the chosen ids and their order are exactly reproducible.

/// How a router turns logits into the top-k experts and their weights, in one general
/// form: `s = score(logits)`; experts are chosen by `s + selection_bias`, optionally only
/// inside the best `topk_group` of `n_group` contiguous expert groups; the chosen
/// experts' weights come from the unbiased `s`, are post-processed by `weights` and
/// multiplied by `scaling`. Ids are reported largest weight first (ties keep the
/// selection order). Every supported architecture is an instance: see
/// [`RouterScoring::softmax_topk`], [`RouterScoring::deepseek_v2`],
/// [`RouterScoring::deepseek_v3`], [`RouterScoring::gpt_oss`].
#[derive(Debug, Clone, PartialEq)]
pub struct RouterScoring {
    /// Logits -> scores.
    pub score: ScoreFn,
    /// Added to the scores for selection only (DeepSeek-V3 `e_score_correction_bias`).
    pub selection_bias: Option<Vec<f32>>,
    /// Group-limited selection, if any.
    pub groups: Option<GroupLimit>,
    /// Chosen scores -> weights.
    pub weights: TopKWeights,
    /// Final multiplier (`routed_scaling_factor`).
    pub scaling: f32,
}

/// How router logits become per-expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFn {
    /// softmax over all experts.
    Softmax,
    /// elementwise sigmoid.
    Sigmoid,
    /// the logits themselves.
    Logits,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// the largest selection score in the group (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// the sum of the two largest selection scores in the group (DeepSeek-V3).
    SumTop2,
}

/// Restricts the choice to the best `topk_group` of `n_group` contiguous, equal groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of groups (`n_group`); experts `[g * E / n_group, (g + 1) * E / n_group)`.
    pub n_group: usize,
    /// Groups kept (`topk_group`).
    pub topk_group: usize,
    /// How a group is scored.
    pub score: GroupScore,
}

/// What the chosen experts' scores become before `scaling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKWeights {
    /// the scores as they are.
    Scores,
    /// divided by their sum (+1e-20).
    Renormalise,
    /// softmax over the chosen scores only (GPT-OSS, whose scores are logits).
    SoftmaxOfSelected,
}

/// The routing of one token at one MoE layer: ids in rank order and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Receives what the model computes, read only: every MoE layer's routing and, when
/// asked for, router inputs, router logits and pre-attention logits. Steering the model
/// is left to the two other roles an observer may also play, each its own trait: a
/// [`RoutingPolicy`] (cache-aware routing) and an [`ExpertSource`] (the weights of
/// offloaded experts), which the model asks for through [`RoutingObserver::policy`] and
/// [`RoutingObserver::expert_source`].
pub trait RoutingObserver {
    /// `layer` is the model layer index; `first_pos` the position of `decisions[0]`.
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]);

    /// Whether [`RoutingObserver::on_router_inputs`] should be called for model layer
    /// `layer` (copying the router inputs to the host costs time).
    fn wants_router_inputs(&self, _layer: usize) -> bool {
        false
    }

    /// The vectors `layer`'s gate read, `[T, hidden]` row-major, for positions
    /// `first_pos..`.
    fn on_router_inputs(
        &mut self,
        _layer: usize,
        _first_pos: usize,
        _inputs: &[f32],
        _hidden: usize,
    ) {
    }

    /// Whether [`RoutingObserver::on_router_logits`] should be called.
    fn wants_router_logits(&self) -> bool {
        false
    }

    /// `layer`'s router logits over all experts, `[T, n_experts]` row-major, for
    /// positions `first_pos..`.
    fn on_router_logits(
        &mut self,
        _layer: usize,
        _first_pos: usize,
        _logits: &[f32],
        _n_experts: usize,
    ) {
    }

    /// Whether [`RoutingObserver::on_pre_attention_logits`] should be called.
    fn wants_pre_attention_logits(&self) -> bool {
        false
    }

    /// `layer`'s router applied to the layer's input before attention (normalised by the
    /// layer's own pre-MoE norm), `[T, n_experts]`: the pre-attention gate, available one
    /// attention block before the true routing.
    fn on_pre_attention_logits(
        &mut self,
        _layer: usize,
        _first_pos: usize,
        _logits: &[f32],
        _n_experts: usize,
    ) {
    }

    /// A forward of `tokens` at positions `first_pos..` begins.
    fn on_forward(&mut self, _first_pos: usize, _tokens: &[u32]) {}

    /// The forward finished; an error here fails it (its output is discarded).
    fn on_forward_done(&mut self) -> crate::error::Result<()> {
        Ok(())
    }

    /// The routing policy applied with this observer, if any (none: the router's own
    /// choice).
    fn policy(&mut self) -> Option<&mut dyn RoutingPolicy> {
        None
    }

    /// Where the weights of offloaded experts come from, if this observer supplies them.
    fn expert_source(&mut self) -> Option<&mut dyn ExpertSource> {
        None
    }
}

/// Steers routing: cache-aware routing biases the choice towards resident experts.
pub trait RoutingPolicy {
    /// Added to the selection scores of `layer`'s experts before the top-k; the weights
    /// still come from the unbiased scores. `None`: unmodified.
    fn selection_bonus(&mut self, layer: usize) -> Option<Vec<f32>>;

    /// Called when a selection bonus was given: the routing without it (`plain`) and the
    /// routing used (`chosen`), token by token.
    fn on_rerouted(&mut self, _layer: usize, _plain: &[RouteDecision], _chosen: &[RouteDecision]) {}
}

/// Supplies the weights of routed experts a model does not hold in memory (offloaded
/// with [`crate::moe::SparseMoe::offload_experts`]).
pub trait ExpertSource {
    /// The weights of expert `id` of model layer `layer`; an error (a failed read, named
    /// with its file) fails the forward.
    fn expert(&mut self, layer: usize, id: usize) -> crate::error::Result<crate::layers::SwiGlu>;
}

/// An observer that ignores everything.
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_routing(&mut self, _: usize, _: usize, _: &[RouteDecision]) {}
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

impl RouterScoring {
    /// Mixtral, Qwen2/3-MoE, OLMoE: softmax over all experts, the k largest, optionally
    /// renormalised to sum to 1 (Mixtral always, the others per `norm_topk_prob`).
    pub fn softmax_topk(norm_topk_prob: bool) -> RouterScoring {
        RouterScoring {
            score: ScoreFn::Softmax,
            selection_bias: None,
            groups: None,
            weights: if norm_topk_prob {
                TopKWeights::Renormalise
            } else {
                TopKWeights::Scores
            },
            scaling: 1.0,
        }
    }

    /// DeepSeek-V2: softmax; with `n_group` > 1 `group_limited_greedy` (group score = its
    /// largest probability); weights = probabilities * `scaling`, never renormalised
    /// (transformers' V2 router ignores `norm_topk_prob`).
    pub fn deepseek_v2(n_group: usize, topk_group: usize, scaling: f32) -> RouterScoring {
        RouterScoring {
            score: ScoreFn::Softmax,
            selection_bias: None,
            groups: (n_group > 1).then_some(GroupLimit {
                n_group,
                topk_group,
                score: GroupScore::Max,
            }),
            weights: TopKWeights::Scores,
            scaling,
        }
    }

    /// DeepSeek-V3: sigmoid; selection by sigmoid + `bias` inside the best `topk_group`
    /// groups (group score = sum of its two best); weights = unbiased sigmoid,
    /// renormalised if `norm_topk_prob`, times `scaling`.
    pub fn deepseek_v3(
        bias: Option<Vec<f32>>,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        scaling: f32,
    ) -> RouterScoring {
        RouterScoring {
            score: ScoreFn::Sigmoid,
            selection_bias: bias,
            groups: (n_group > 1).then_some(GroupLimit {
                n_group,
                topk_group,
                score: GroupScore::SumTop2,
            }),
            weights: if norm_topk_prob {
                TopKWeights::Renormalise
            } else {
                TopKWeights::Scores
            },
            scaling,
        }
    }

    /// GPT-OSS: top-k of the logits, softmax over those k.
    pub fn gpt_oss() -> RouterScoring {
        RouterScoring {
            score: ScoreFn::Logits,
            selection_bias: None,
            groups: None,
            weights: TopKWeights::SoftmaxOfSelected,
            scaling: 1.0,
        }
    }

    /// Logits -> per-expert scores (the weights' source).
    fn scores(&self, logits: &[f32]) -> Vec<f32> {
        match self.score {
            ScoreFn::Softmax => softmax(logits),
            ScoreFn::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            ScoreFn::Logits => logits.to_vec(),
        }
    }

    /// Scores -> what the top-k is taken over: bias added, experts outside the kept
    /// groups at `-inf`.
    fn selection(&self, s: &[f32]) -> Vec<f32> {
        let mut choice: Vec<f32> = match &self.selection_bias {
            Some(b) => s.iter().zip(b).map(|(x, b)| x + b).collect(),
            None => s.to_vec(),
        };
        if let Some(g) = &self.groups {
            limit_to_groups(&mut choice, g);
        }
        choice
    }

    /// The scores the router ranks experts by, from its logits (ranking them gives the
    /// router's own top-k first): the basis of gate-based forecasts.
    pub fn selection_scores(&self, logits: &[f32]) -> Vec<f32> {
        self.selection(&self.scores(logits))
    }

    /// Chooses the experts of one token from its router logits.
    pub fn route(&self, logits: &[f32], k: usize) -> RouteDecision {
        self.route_with_bonus(logits, k, None)
    }

    /// [`RouterScoring::route`] with `bonus[e]` added to expert `e`'s selection score
    /// (not to its weight): cache-aware routing prefers resident experts this way.
    pub fn route_with_bonus(
        &self,
        logits: &[f32],
        k: usize,
        bonus: Option<&[f32]>,
    ) -> RouteDecision {
        let s = self.scores(logits);
        let mut choice = self.selection(&s);
        if let Some(b) = bonus {
            choice.iter_mut().zip(b).for_each(|(c, b)| *c += b);
        }
        let ids = top_k(&choice, k);
        let mut w: Vec<f32> = ids.iter().map(|&i| s[i]).collect();
        match self.weights {
            TopKWeights::Scores => {}
            TopKWeights::Renormalise => {
                let sum = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= sum);
            }
            TopKWeights::SoftmaxOfSelected => w = softmax(&w),
        }
        w.iter_mut().for_each(|x| *x *= self.scaling);
        // largest weight first; the stable sort keeps the selection order on ties
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        RouteDecision {
            ids: order.iter().map(|&r| ids[r] as u32).collect(),
            weights: order.iter().map(|&r| w[r]).collect(),
        }
    }
}

/// Sets the scores outside the best `topk_group` groups to `-inf`.
fn limit_to_groups(choice: &mut [f32], g: &GroupLimit) {
    let size = choice.len() / g.n_group.max(1);
    if size == 0 || g.topk_group >= g.n_group {
        return;
    }
    let group_scores: Vec<f32> = choice
        .chunks(size)
        .take(g.n_group)
        .map(|c| match g.score {
            GroupScore::Max => c.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            GroupScore::SumTop2 => top_k(c, 2).iter().map(|&i| c[i]).sum(),
        })
        .collect();
    let kept = top_k(&group_scores, g.topk_group);
    for (gi, chunk) in choice.chunks_mut(size).enumerate() {
        if !kept.contains(&gi) {
            chunk.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_k_ranks_and_normalises() {
        let r = RouterScoring::softmax_topk(true);
        let d = r.route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(d.ids, vec![1, 2]);
        let e = 1f32.exp();
        assert!((d.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((d.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let raw = RouterScoring::softmax_topk(false).route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert!(raw.weights.iter().sum::<f32>() < 0.99);
    }

    #[test]
    fn deepseek_v2_group_limit_changes_the_choice() {
        // groups {0,1} and {2,3}; group 1 holds the single best expert but group 0 is
        // kept by max: p = softmax(l); best p is expert 0 -> group 0 kept, so the
        // second choice is expert 1 although expert 2 scores higher.
        let logits = [3.0, 0.0, 2.0, 1.9];
        let r = RouterScoring::deepseek_v2(2, 1, 1.5);
        let d = r.route(&logits, 2);
        assert_eq!(d.ids, vec![0, 1]);
        let p = softmax(&logits);
        assert!((d.weights[0] - 1.5 * p[0]).abs() < 1e-6);
        assert!((d.weights[1] - 1.5 * p[1]).abs() < 1e-6);
        // without the limit (one group) it is the plain top-2
        assert_eq!(
            RouterScoring::deepseek_v2(1, 1, 1.0).route(&logits, 2).ids,
            vec![0, 2]
        );
    }

    #[test]
    fn deepseek_v3_bias_selects_and_weights_rank() {
        // the bias makes expert 3 win the selection, but its unbiased score is the
        // lowest of the chosen, so it is reported last.
        let logits = [1.0, 0.5, -2.0, -1.0];
        let bias = vec![0.0, 0.0, 0.0, 2.0];
        let r = RouterScoring::deepseek_v3(Some(bias), 2, 2, true, 2.5);
        let d = r.route(&logits, 2);
        assert_eq!(d.ids, vec![0, 3]);
        let sg = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (a, b) = (sg(1.0), sg(-1.0));
        assert!((d.weights[0] - 2.5 * a / (a + b)).abs() < 1e-6);
        assert!((d.weights[1] - 2.5 * b / (a + b)).abs() < 1e-6);
        // group score = sum of the top two: group {2,3} = sg(-2)+sg(-1)+2 wins alone
        let g = RouterScoring::deepseek_v3(Some(vec![0.0, 0.0, 0.0, 2.0]), 2, 1, false, 1.0);
        let d = g.route(&logits, 2);
        assert_eq!(d.ids, vec![3, 2]);
        assert!((d.weights[0] - sg(-1.0)).abs() < 1e-6);
    }

    #[test]
    fn gpt_oss_softmax_over_selected_logits() {
        let d = RouterScoring::gpt_oss().route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(d.ids, vec![1, 2]);
        let e = 1f32.exp();
        assert!((d.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((d.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
