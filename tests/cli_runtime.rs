//! The `moecast` binary end to end, the runtime: cache simulation, offloaded generation, and
//! router inputs feeding the gate baselines.

mod common;

use common::*;
use std::path::Path;

#[test]
fn simulate_policies_and_prefetchers() {
    let dir = tempfile::tempdir().unwrap();
    let trace = tmp(&dir, "t.mctrace");
    ok(&[
        "trace",
        "synth",
        "-o",
        &trace,
        "--layers",
        "4",
        "--experts",
        "16",
        "--top-k",
        "2",
        "--sequences",
        "4",
    ]);
    let json = tmp(&dir, "sim.json");
    let table = ok(&[
        "simulate",
        "--trace",
        &trace,
        "--expert-bytes",
        "10000",
        "--cache",
        "10%,32",
        "--policy",
        "lru,next-use,belady",
        "--prefetch",
        "none,previous,activation,oracle",
        "--json",
        &json,
    ]);
    assert_eq!(
        table
            .lines()
            .filter(|l| ["lru", "next-use", "belady"].iter().any(|p| l.contains(p)))
            .count(),
        2 * 3 * 4,
        "{table}"
    );
    assert!(
        table.contains("untimed hit") && table.contains("10%=6") && table.contains("32=32"),
        "{table}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 24);
    for r in rows.as_array().unwrap() {
        let (h, u) = (
            r["hit_rate"].as_f64().unwrap(),
            r["untimed_hit_rate"].as_f64().unwrap(),
        );
        // A fixed plan read instantly is never later; a planned row's untimed figure
        // reads every candidate, which can pollute the cache more than the planner.
        let planned = r["timed"]["budget"] == "auto";
        assert!(
            (0.0..=1.0).contains(&h) && (planned || u + 1e-12 >= h),
            "untimed prefetch is never later: {r}"
        );
        assert_eq!(planned, !r["timed"]["planner"].is_null(), "{r}");
        // The settings it ran with, and where the hits are, layer by layer.
        assert_eq!(r["settings"]["expert_bytes"], 10000.0, "{r}");
        assert_eq!(r["settings"]["link_order"], "deadline", "{r}");
        let layers = r["timed"]["per_layer"].as_array().unwrap();
        let hits: u64 = layers.iter().map(|l| l["hits"].as_u64().unwrap()).sum();
        assert_eq!(layers.len(), 4, "{r}");
        assert_eq!(hits, r["timed"]["hits"].as_u64().unwrap(), "{r}");
    }
    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fail(&["simulate", "--trace", &trace], "--expert-bytes");
    let sim = |extra: &[&str]| -> Vec<String> {
        ["simulate", "--trace", &trace, "--expert-bytes", "1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (extra, want) in [
        (&["--prefetch", "learned"][..], "--predictor"),
        (&["--cache", "0%"][..], "cache size"),
        (&["--policy", "mru"][..], "mru"),
    ] {
        let args = sim(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&args, want);
    }
}

#[test]
fn run_offloads_experts_with_learned_prefetch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("checkpoints/tiny-moe").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let trace = tmp(&dir, "t.mctrace");
    collect_tiny("demo.txt", "24", &trace, &[]);
    let pred = tmp(&dir, "pred");
    ok(&[
        "train",
        "--shards",
        "2",
        "--trace",
        &trace,
        "--task",
        "next-token",
        "-o",
        &pred,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--context",
        "32",
        "--epochs",
        "2",
        "--quiet",
    ]);
    let json = tmp(&dir, "run.json");
    let said = ok(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "16",
        "--expert-cache",
        "20%",
        "--predictor",
        &pred,
        // A fixed budget: the planner's reads depend on measured timings, and the
        // guard switches prefetch off for some steps.
        "--prefetch-budget",
        "2",
        "--json",
        &json,
    ]);
    assert!(said.contains("identical to the engine's: yes"), "{said}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &v["report"];
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("decode_tokens"), 16);
    assert_eq!(n("accesses"), 16 * 6 * 2);
    assert_eq!(n("hits") + n("late") + n("misses"), n("accesses"));
    assert_eq!(n("capacity"), 19, "20% of 96 experts");
    assert!(
        n("prefetches") > 0 && n("useful_prefetches") <= n("prefetch_reads"),
        "{r}"
    );
    assert_eq!(v["generated"][0].as_array().unwrap().len(), 16);

    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    let base = ["run", "--model", &model, "--prompt", "x"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let other = tmp(&dir, "other.mctrace");
    ok(&[
        "trace",
        "synth",
        "-o",
        &other,
        "--layers",
        "3",
        "--experts",
        "8",
    ]);
    let other_pred = tmp(&dir, "other-pred");
    train_tiny(&other, &other_pred, &["--context", "8"]);
    for (extra, want) in [
        (&["--expert-cache", "0"][..], "cache size"),
        (&["--expert-cache", "150%"][..], "percentage"),
        (&["--policy", "belady"][..], "belady"),
        (&["--predictor", &other_pred][..], "the model has 6 x 16"),
        (&["--predictor", &tmp(&dir, "nope")][..], "predictor.json"),
    ] {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&args, want);
    }
    fail(
        &["run", "--model", &tmp(&dir, "nope"), "--prompt", "x"],
        "nope",
    );
}

#[test]
fn router_inputs_feed_the_cross_layer_gate_in_eval_and_simulate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("checkpoints/tiny-moe").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (trace, plain) = (tmp(&dir, "h.mctrace"), tmp(&dir, "p.mctrace"));
    collect_tiny("heldout.txt", "24", &trace, &["--hidden-states"]);
    collect_tiny("heldout.txt", "4", &plain, &[]);
    let json = tmp(&dir, "sim.json");
    let simulate = |prefetch: &str, timing: &[&str]| {
        let mut args = vec![
            "simulate",
            "--trace",
            &trace,
            "--model",
            &model,
            "--cache",
            "25%",
            "--prefetch",
            prefetch,
            "--bandwidth",
            "16",
            "--json",
            &json,
        ];
        args.extend_from_slice(timing);
        ok(&args)
    };
    let table = simulate("none,gate", &[]);
    assert!(table.contains(" gate "), "{table}");
    let hit = |p: &str| sim_hit_rate(&json, p);
    assert!(
        hit("gate") > hit("none") + 0.1,
        "gate {} none {}",
        hit("gate"),
        hit("none")
    );
    // The logit lens forecasts each next token's layer 0 after the token before it.
    simulate("none,lens", &[]);
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let layer0 = |p: &str| {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["timed"]["prefetch"] == p);
        let l = &row.unwrap()["timed"]["per_layer"][0];
        let n = |k: &str| l[k].as_f64().unwrap();
        n("hits") / (n("hits") + n("late") + n("misses"))
    };
    assert!(
        layer0("lens") > layer0("none") + 0.2,
        "layer 0: lens {} none {}",
        layer0("lens"),
        layer0("none")
    );
    // With attention time before each layer's routing, the pre-attention gate prefetches
    // at the layer's start; alone and in union with the cross-layer gate.
    simulate(
        "none,pre-attention,gate+pre-attention",
        &[
            "--compute-us-per-layer",
            "20",
            "--attention-us-per-layer",
            "10",
        ],
    );
    assert!(
        hit("pre-attention") > hit("none") + 0.1,
        "{} vs {}",
        hit("pre-attention"),
        hit("none")
    );
    assert!(hit("gate+pre-attention") >= hit("pre-attention") - 0.02);
    let out = moecast(&["simulate", "--trace", &trace, "--prefetch", "pre-attention"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("need --model DIR"),
        "{err}"
    );

    let pred = tmp(&dir, "pred");
    ok(&[
        "train",
        "--shards",
        "2",
        "--trace",
        &trace,
        "--task",
        "lookahead",
        "--features",
        "hidden",
        "--token-dropout",
        "0.2",
        "-o",
        &pred,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--context",
        "32",
        "--epochs",
        "1",
        "--quiet",
    ]);
    let (said, notes) = ok_with_notes(&[
        "eval",
        "--predictor",
        &pred,
        "--trace",
        &trace,
        "--model",
        &model,
        "--quiet",
        "--json",
        &json,
    ]);
    assert!(said.contains("cross-layer gate"), "{said}");
    // Trained with token-id dropout: the forecast before the id is scored too.
    assert!(said.contains("next token, before its id"), "{said}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Eval says at which horizons the model's own gate beats the predictor, and only those.
    let f1 = |m: usize, g: usize| report["methods"][m]["groups"][g]["overall"]["f1"].as_f64();
    let gate = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m["method"] == "cross-layer gate")
        .expect("cross-layer gate scored");
    for (g, name) in report["groups"].as_array().unwrap().iter().enumerate() {
        let lost =
            report["methods"][gate]["groups"][g]["overall"]["sets"] != 0 && f1(gate, g) > f1(0, g);
        let named = format!(
            "cross-layer gate baseline beats the predictor at {} (F1",
            name.as_str().unwrap()
        );
        assert_eq!(notes.contains(&named), lost, "group {name}: {notes}");
    }
    // The pre-attention gate forecasts one block ahead: the +1 group only.
    let pre = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "pre-attention gate")
        .expect("pre-attention gate scored");
    let sets = |g: usize| pre["groups"][g]["overall"]["sets"].as_u64().unwrap();
    assert!(sets(1) > 0 && sets(0) == 0 && sets(2) == 0, "{pre}");
    let f1 = pre["groups"][1]["overall"]["f1"].as_f64().unwrap();
    assert!(f1 > 0.3 && f1 <= 1.0, "pre-attention gate F1 {f1}");
    // The logit lens forecasts the first layer before the id: that group, layer 0 only,
    // and well above frequency there (the demo model's LM head knows the next token).
    let method = |name: &str| {
        report["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["method"] == name)
            .unwrap_or_else(|| panic!("{name} scored"))
            .clone()
    };
    let (lens, freq) = (method("lens (layer 0)"), method("frequency"));
    let before = report["groups"].as_array().unwrap().len() - 1;
    let layer0 =
        |m: &serde_json::Value| m["groups"][before]["per_layer"][0]["f1"].as_f64().unwrap();
    assert!(lens["groups"][before]["per_layer"][1].is_null(), "{lens}");
    assert_eq!(lens["groups"][0]["overall"]["sets"], 0, "{lens}");
    assert!(
        layer0(&lens) > layer0(&freq) + 0.1,
        "lens {} frequency {}",
        layer0(&lens),
        layer0(&freq)
    );
    // Refined by the predictor's per-token counts, the lens is scored beside it.
    let counted = method("lens + counts (layer 0)");
    assert!(layer0(&counted) > layer0(&freq) + 0.1, "{counted}");
    // The engine feeds the router input of each layer to such a predictor, and (trained
    // with token-id dropout) it forecasts each next token's layer 0 before the id.
    let said = ok(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--predictor",
        &pred,
        "--layer-forecasts",
    ]);
    assert!(
        said.contains("next token + layer lookahead")
            && said.contains("identical to the engine's: yes"),
        "{said}"
    );

    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fail(
        &["simulate", "--trace", &trace, "--prefetch", "gate"],
        "--model",
    );
    fail(
        &[
            "simulate",
            "--trace",
            &plain,
            "--model",
            &model,
            "--prefetch",
            "gate",
        ],
        "--hidden-states",
    );
    fail(
        &["eval", "--predictor", &pred, "--trace", &plain],
        "--hidden-states",
    );
    fail(
        &[
            "train",
            "--shards",
            "2",
            "--trace",
            &plain,
            "--task",
            "lookahead",
            "--features",
            "hidden",
            "-o",
            &tmp(&dir, "x"),
        ],
        "p.mctrace: --features hidden reads router inputs",
    );
    fail(
        &[
            "simulate",
            "--trace",
            &plain,
            "--predictor",
            &pred,
            "--prefetch",
            "learned",
        ],
        "p.mctrace: the predictor reads router inputs",
    );
    // A predictor of expert ids evaluates on both traces; the gate, which needs router
    // inputs in every trace, is left out with a note naming the one without them.
    let ids = tmp(&dir, "ids");
    train_tiny(&trace, &ids, &["--task", "lookahead"]);
    let (said, notes) = ok_with_notes(&[
        "eval",
        "--predictor",
        &ids,
        "--trace",
        &trace,
        &plain,
        "--model",
        &model,
        "--quiet",
    ]);
    assert!(
        notes.contains("no cross-layer gate baseline: ")
            && notes.contains("p.mctrace: the trace has no router inputs"),
        "{notes}"
    );
    assert!(!said.contains("cross-layer gate"), "{said}");
}
