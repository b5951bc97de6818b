//! The online blend's prefetch plan: a trace replayed through
//! [`predictor::blend::OnlineBlend`] (see there for its features and how it learns).

use datasets::TraceView;
use predictor::baselines::BaselineStats;
pub use predictor::blend::OnlineBlend;

use crate::simulate::PrefetchPlan;

/// The blend's plan: after layer `l`, the top `budget` experts of the `horizon` layers
/// after it (past the last MoE layer, the next token's first ones) by the online blend,
/// with their probabilities. Returns the plan
/// and the blend as it ended (its weights say what it learned).
pub fn blend(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    stats: &BaselineStats,
    budget: usize,
    horizon: usize,
) -> (PrefetchPlan, OnlineBlend) {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut model = OnlineBlend::new(stats.clone(), horizon);
    let mut plan = PrefetchPlan::empty("blend", view.n_tokens(), m);
    let mut ranking = Vec::with_capacity(e);
    let mut layers = Vec::with_capacity(m);
    for r in seqs {
        model.start_request();
        for t in r.clone() {
            for l in 0..m {
                let Some(given) = view.layer(t, l) else {
                    continue;
                };
                let earlier = l.checked_sub(1).and_then(|p| view.layer(t, p));
                model.forecast(l, given, earlier, |target, scores| {
                    predictor::metrics::rank_top(scores, budget, &mut ranking);
                    let ids: Vec<u32> = ranking
                        .iter()
                        .map(|&x| (target * e + x as usize) as u32)
                        .collect();
                    let ps: Vec<f32> = ranking
                        .iter()
                        .map(|&x| OnlineBlend::probability(scores[x as usize]))
                        .collect();
                    plan.push_scored(t, l + 1, &ids, &ps);
                });
            }
            layers.clear();
            layers.extend((0..m).map(|l| view.layer(t, l)));
            model.token_routed(view.token[t], &layers);
        }
    }
    (plan, model)
}
