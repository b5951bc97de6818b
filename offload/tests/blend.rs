//! The online blend prefetcher: it learns the routing's regularities while it runs, and
//! forecasts each token only from what exists when its prefetches are issued.

use datasets::examples::RoutingShape;
use datasets::synth::{synthetic_trace, SynthConfig};
use offload::prefetch;
use offload::simulate::PrefetchPlan;
use predictor::baselines::BaselineStats;

fn sticky_trace() -> datasets::RoutingTrace {
    synthetic_trace(&SynthConfig {
        n_layers: 6,
        n_experts: 16,
        top_k: 2,
        sequences: 2,
        tokens_per_sequence: 300,
        stickiness: 0.7,
        zipf: 0.3,
        seed: 3,
    })
}

fn fitted(view: &datasets::TraceView<'_>, seqs: &[std::ops::Range<usize>]) -> BaselineStats {
    let mut stats = BaselineStats::new(RoutingShape::of(view.meta), 1);
    for r in seqs {
        stats.add_tokens(view, r.clone());
    }
    stats
}

/// Share of the forecast experts of layer `l + 1`, issued after layer `l`, that layer
/// `l + 1` then uses, over the second half of every sequence.
fn precision(
    view: &datasets::TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    plan: &PrefetchPlan,
) -> f64 {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let (mut used, mut listed) = (0usize, 0usize);
    for r in seqs {
        for t in r.start + r.len() / 2..r.end {
            for l in 0..m - 1 {
                let routed = view.layer(t, l + 1).expect("every layer routed");
                for &id in plan.at(t, l + 1) {
                    listed += 1;
                    used += routed.contains(&((id as usize % e) as u16)) as usize;
                }
            }
        }
    }
    used as f64 / listed as f64
}

#[test]
fn blend_learns_previous_token_reuse_that_coactivation_cannot_see() {
    // Each expert stays with the next token with probability 0.7 and layers are drawn
    // independently: the layer before says nothing, the token before says much.
    let trace = sticky_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let stats = fitted(&view, &seqs);
    let co = prefetch::coactivation(&view, &seqs, &stats, 2, 1);
    let (blend, model) = prefetch::blend(&view, &seqs, &stats, 2, 1);
    let (p_co, p_blend) = (
        precision(&view, &seqs, &co),
        precision(&view, &seqs, &blend),
    );
    assert!(
        p_blend > p_co + 0.2,
        "blend {p_blend:.3} against co-activation {p_co:.3}"
    );
    let w = model.weights(1, false);
    assert!(w[2] > 1.0, "weight on the previous token's experts: {w:?}");
    let probs = blend.probs.as_ref().expect("the blend gives probabilities");
    assert!(probs.iter().flatten().all(|p| (0.0..=1.0).contains(p)));
}

#[test]
fn blend_forecasts_a_token_only_from_the_tokens_before_it() {
    let trace = sticky_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let stats = fitted(&view, &seqs);
    let whole = seqs.last().expect("a sequence").clone();
    let half = whole.start..whole.start + whole.len() / 2;
    let (full, _) = prefetch::blend(&view, std::slice::from_ref(&whole), &stats, 3, 1);
    let (cut, _) = prefetch::blend(&view, std::slice::from_ref(&half), &stats, 3, 1);
    let m = view.meta.n_moe();
    for t in half.clone() {
        for slot in 0..=m {
            assert_eq!(full.at(t, slot), cut.at(t, slot), "token {t}, slot {slot}");
        }
    }
    // The tokens after the cut were forecast, with weights learned from the first half.
    assert!((half.end..whole.end).any(|t| !full.at(t, 1).is_empty()));
}

#[test]
fn blend_forecasts_the_next_tokens_first_layer_after_the_last() {
    // Sticky routing: the token before says most about a token's first layer, and the
    // blend forecasts it once the last layer has routed, before the next token's id.
    let trace = sticky_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let stats = fitted(&view, &seqs);
    let (plan, model) = prefetch::blend(&view, &seqs, &stats, 2, 1);
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let (mut used, mut listed) = (0usize, 0usize);
    for r in &seqs {
        for t in r.start + r.len() / 2..r.end - 1 {
            let ids = plan.at(t, m);
            assert_eq!(ids.len(), 2, "token {t}: the next token's layer 0");
            assert!(
                ids.iter().all(|&id| (id as usize) < e),
                "{ids:?}: layer 0 only"
            );
            let routed = view.layer(t + 1, 0).expect("every layer routed");
            listed += ids.len();
            used += ids
                .iter()
                .filter(|&&id| routed.contains(&(id as u16)))
                .count();
        }
    }
    let precision = used as f64 / listed as f64;
    assert!(
        precision > 0.5,
        "next token's layer 0: precision {precision:.3}"
    );
    let w = model.weights(1, true);
    assert!(
        w[2] > 1.0,
        "weight on this token's experts for the next: {w:?}"
    );
}
