//! Helpers the C ABI tests share: synthetic traces and a trained predictor, the C
//! programs' input format, building and running `tests/*.c` against libmoecast, and the
//! library's error messages.
#![allow(dead_code)]

use std::ffi::{c_int, CStr};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use datasets::examples::{RoutingShape, SplitConfig};
use datasets::synth::{token_routed_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};
use moecast::*;
use predictor::device::BackendKind;
use predictor::{PredictorConfig, Task, TrainOptions};

pub const BUDGET: usize = 3;

pub fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A synthetic trace (4 MoE layers x 8 experts, top-2), saved as `dir/t.mctrace`.
pub fn synthetic_trace(dir: &Path) -> (PathBuf, datasets::RoutingTrace) {
    let trace = token_routed_trace(
        &SynthConfig {
            n_layers: 4,
            n_experts: 8,
            top_k: 2,
            sequences: 12,
            tokens_per_sequence: 20,
            seed: 4,
            ..SynthConfig::default()
        },
        30,
    );
    let path = dir.join("t.mctrace");
    save_trace(&trace, &path, Some(TraceFormat::Binary)).unwrap();
    (path, trace)
}

/// A small lookahead predictor trained on a synthetic trace, and the trace.
pub fn trained(dir: &Path) -> (PathBuf, datasets::RoutingTrace) {
    let (path, trace) = synthetic_trace(dir);
    let shape = RoutingShape::of(&trace.meta);
    let out = dir.join("predictor");
    let mut opts = TrainOptions {
        traces: vec![path],
        config: PredictorConfig::new(shape, Task::Lookahead)
            .with_horizon(2)
            .with_d_model(16)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_context(16),
        split: SplitConfig::default(),
        settings: predictor::TrainSettings {
            shards: 2,
            ..Default::default()
        },
        backend: BackendKind::from_test_env(),
        out: out.clone(),
        progress: false,
        run_steps: None,
    };
    opts.settings.max_epochs = 2;
    predictor::train(&opts).unwrap();
    (out, trace)
}

/// The C programs' input for `trace`: "S" starts a sequence, "T token ids..." is one
/// token with its routing, layer-major.
pub fn routing_input(trace: &datasets::RoutingTrace) -> String {
    let view = trace.view();
    let m = view.meta.n_moe();
    let mut input = String::new();
    for seq in view.sequence_ranges() {
        input += "S\n";
        for t in seq {
            let ids: Vec<String> = (0..m)
                .flat_map(|l| view.layer(t, l).unwrap().iter())
                .map(|x| x.to_string())
                .collect();
            writeln!(input, "T {} {}", view.token[t], ids.join(" ")).unwrap();
        }
    }
    input
}

pub fn line(out: &mut String, tag: &str, n: u32, ids: &[u16]) {
    write!(out, "{tag} {n}:").unwrap();
    for x in ids {
        write!(out, " {x}").unwrap();
    }
    out.push('\n');
}

/// The folder holding `libmoecast`: beside the test binary (`target/<profile>/deps/`,
/// where `cargo test` leaves it) or one level up (`cargo build`).
pub fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let up = deps.parent().unwrap().to_path_buf();
    [deps, up]
        .into_iter()
        .find(|d| d.join("libmoecast.so").exists())
        .expect("libmoecast.so built beside the tests")
}

/// Builds the C program `tests/<name>.c` against libmoecast into `dir`.
pub fn build_c(dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let lib = library_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(manifest().join("include"))
        .arg(manifest().join(format!("tests/{name}.c")))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lmoecast", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    exe
}

/// Runs the C program `exe` with `args`; its output, once it has succeeded.
pub fn run_c(exe: &Path, args: &[&Path]) -> String {
    let ran = Command::new(exe).args(args).output().unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    String::from_utf8(ran.stdout).unwrap()
}

pub fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(mc_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A call's result `code` is the error `want`, and the error message holds `message`.
pub fn assert_refused(code: c_int, want: c_int, message: &str) {
    assert_eq!(code, want, "{}", last_error());
    assert!(last_error().contains(message), "{}", last_error());
}

/// Sequence `s` of trace `t` through `mc_trace_sequence`: its token ids and its experts
/// (`width` a token).
///
/// # Safety
/// `t` is a live trace; the slices are valid while it lives.
pub unsafe fn trace_sequence<'a>(
    t: *const mc_trace,
    s: u32,
    width: usize,
) -> (&'a [u32], &'a [u16]) {
    let (mut len, mut tokens, mut experts) = (0u32, std::ptr::null(), std::ptr::null());
    // SAFETY: `t` is live (the caller's promise); the out pointers are locals.
    let code = unsafe { mc_trace_sequence(t, s, &mut len, &mut tokens, &mut experts) };
    assert_eq!(code, MC_OK, "{}", last_error());
    let n = len as usize;
    // SAFETY: the trace owns `n` ids and `n * width` experts while it lives.
    unsafe {
        (
            std::slice::from_raw_parts(tokens, n),
            std::slice::from_raw_parts(experts, n * width),
        )
    }
}
