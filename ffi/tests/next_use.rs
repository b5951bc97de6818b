//! Next-use eviction through the C ABI against `planner::NextUseForecast`: the same
//! estimates layer by layer; bad arguments are error codes with a message.

mod common;

use common::last_error;
use moecast::*;

/// The next-use forecaster through the C ABI estimates as `NextUseForecast` does, layer
/// by layer over a skewed routing (repeats in a layer's routing count once); an expert
/// its layer uses at almost every visit is expected sooner than one it rarely uses; bad
/// arguments are error codes.
#[test]
fn next_use_through_the_c_abi_estimates_as_next_use_forecast_does() {
    let (layers, experts) = (3u32, 8u32);
    let e = experts as usize;
    let mut f = std::ptr::null_mut();
    // SAFETY: each pointer below is either live or null on purpose.
    unsafe {
        assert_eq!(mc_next_use_new(0, 8, &mut f), MC_ERR_ARG);
        assert!(last_error().contains("from 1 to 65535"), "{}", last_error());
        assert_eq!(mc_next_use_new(1, 65_536, &mut f), MC_ERR_ARG);
        assert!(last_error().contains("from 1 to 65535"), "{}", last_error());
        assert_eq!(mc_next_use_new(65_536, 1, &mut f), MC_ERR_ARG);
        assert_eq!(mc_next_use_new(300, 65_535, &mut f), MC_ERR_ARG);
        assert_eq!(mc_next_use_new(3, 8, std::ptr::null_mut()), MC_ERR_NULL);
        assert_eq!(mc_next_use_new(layers, experts, &mut f), MC_OK);
        let mut rust = planner::NextUseForecast::new(3, e);
        let mut state = 12345u64;
        let mut out = vec![0.0f64; e];
        for step in 0..300 {
            let layer = step % 3;
            let mut routed_layer = vec![0.0f64; e];
            // Expert 0 at almost every visit (3 instead in 1 of 17), expert 1 in 1 of 10,
            // the rest at random; the second expert is named twice.
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (state >> 33) as usize;
            let first = if r.is_multiple_of(17) { 3 } else { 0 };
            let second = if r.is_multiple_of(10) {
                1
            } else {
                2 + r % (e - 2)
            };
            let routed = [first as u16, second as u16, second as u16];
            let code = mc_next_use_layer_routed(f, layer as u32, routed.as_ptr(), 3);
            assert_eq!(code, MC_OK, "{}", last_error());
            let mut used = vec![layer * e + first];
            if second != first {
                used.push(layer * e + second);
            }
            rust.visit(layer, &used);
            for l in 0..3 {
                assert_eq!(mc_next_use_layer(f, l, out.as_mut_ptr(), experts), MC_OK);
                for (x, &got) in out.iter().enumerate() {
                    let want = rust.next_use(l as usize * e + x) as f64 / 1000.0;
                    assert_eq!(got, want, "step {step}, layer {l}, expert {x}");
                }
                if l as usize == layer {
                    routed_layer.copy_from_slice(&out);
                }
            }
            if step >= 30 {
                // The layer just routed: its frequent expert 0 is due before the rare 1.
                assert!(
                    routed_layer[0] < routed_layer[1],
                    "step {step}: {routed_layer:?}"
                );
            }
        }
        let bad = [9u16];
        assert_eq!(mc_next_use_layer_routed(f, 0, bad.as_ptr(), 1), MC_ERR_ARG);
        assert!(last_error().contains("expert 9"), "{}", last_error());
        assert_eq!(mc_next_use_layer_routed(f, 3, bad.as_ptr(), 0), MC_ERR_ARG);
        assert!(
            last_error().contains("MoE layer 3 is outside"),
            "{}",
            last_error()
        );
        assert_eq!(
            mc_next_use_layer_routed(f, 0, std::ptr::null(), 1),
            MC_ERR_NULL
        );
        assert_eq!(mc_next_use_layer(f, 0, out.as_mut_ptr(), 7), MC_ERR_ARG);
        assert!(
            last_error().contains("7 values for a layer of 8 experts"),
            "{}",
            last_error()
        );
        assert_eq!(
            mc_next_use_layer(f, 0, std::ptr::null_mut(), 8),
            MC_ERR_NULL
        );
        assert_eq!(
            mc_next_use_layer(std::ptr::null(), 0, out.as_mut_ptr(), 8),
            MC_ERR_NULL
        );
        mc_next_use_free(f);
        mc_next_use_free(std::ptr::null_mut());
    }
}
