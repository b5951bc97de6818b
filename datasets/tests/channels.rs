//! Channels (per-(token, layer) vectors beside the routing) through every storage form:
//! any channel the meta lists round-trips through `.mctrace`, Parquet and JSONL; files
//! written before channels (meta `router_input_dim` / `router_logits`, Parquet column
//! `router_input`) keep reading; bad channel data is refused by name.

use std::collections::BTreeMap;
use std::path::Path;

use datasets::channel::{ChannelSlice, PRE_ATTENTION_LOGITS, ROUTER_INPUTS};
use datasets::{
    load_trace, save_trace, Channel, ChannelDtype, MappedTrace, Phase, RoutingTrace, TokenRecord,
    TraceBuilder, TraceFormat, TraceMeta,
};

const E: u32 = 6;

fn meta(channels: Vec<Channel>) -> TraceMeta {
    TraceMeta {
        model: "channels".into(),
        architecture: None,
        n_layers: 3,
        moe_layers: vec![0, 2],
        n_experts: E,
        top_k: 2,
        n_shared_experts: 0,
        source: Some("test".into()),
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
        channels,
    }
}

/// Deterministic values of channel `c` at (token, layer), `width` long.
fn values(c: usize, t: usize, m: usize, width: u32) -> Vec<f32> {
    (0..width)
        .map(|i| (c as f32 + 1.0) * 0.25 + t as f32 * 0.5 - m as f32 + i as f32 * 0.125)
        .collect()
}

/// Four tokens, two MoE layers; token 1 skips layer 1; token 2 records no custom
/// channel values at layer 0 (filled).
fn trace_with(channels: Vec<Channel>) -> RoutingTrace {
    let mut b = TraceBuilder::new(meta(channels.clone()), false).unwrap();
    for t in 0..4usize {
        let experts: Vec<Option<Vec<u32>>> = (0..2)
            .map(|m| (!(t == 1 && m == 1)).then(|| vec![(t + m) as u32 % E, 5]))
            .collect();
        let mut per_channel = BTreeMap::new();
        for (c, ch) in channels.iter().enumerate() {
            let cells = (0..2)
                .map(|m| {
                    let skipped = experts[m].is_none() || (t == 2 && m == 0 && c == 2);
                    (!skipped).then(|| values(c, t, m, ch.width))
                })
                .collect();
            per_channel.insert(ch.name.clone(), cells);
        }
        b.push(&TokenRecord {
            seq: "s".into(),
            pos: t as u32,
            phase: Phase::Decode,
            token: Some(t as u32),
            experts,
            weights: None,
            channels: per_channel,
        })
        .unwrap();
    }
    b.finish().unwrap()
}

fn three_channels() -> Vec<Channel> {
    vec![
        Channel::router_inputs(4),
        Channel::pre_attention_logits(E),
        Channel::new("attention_entropy", ChannelDtype::F32, 2),
    ]
}

/// NaN-aware bitwise equality of every channel column.
fn assert_same_channels(a: &RoutingTrace, b: &RoutingTrace, what: &str) {
    assert_eq!(a.meta.channels, b.meta.channels, "{what}");
    assert_eq!(a.channels.len(), b.channels.len(), "{what}");
    for (x, y) in a.channels.iter().zip(&b.channels) {
        let (x, y) = (x.as_slice().to_f32(), y.as_slice().to_f32());
        assert_eq!(x.len(), y.len(), "{what}");
        for (p, q) in x.iter().zip(&y) {
            assert!(
                p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                "{what}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn every_channel_round_trips_through_every_form() {
    let trace = trace_with(three_channels());
    let view = trace.view();
    // Values as pushed: f16 rounding for router inputs, exact for f32 channels.
    assert_eq!(
        view.channel_f32(ROUTER_INPUTS, 3, 1).unwrap(),
        values(0, 3, 1, 4)
    );
    assert_eq!(
        view.channel_f32(PRE_ATTENTION_LOGITS, 0, 0).unwrap(),
        values(1, 0, 0, E)
    );
    // A layer not computed has no values; a computed one the source skipped is filled.
    assert!(view.channel_f32("attention_entropy", 1, 1).is_none());
    assert!(view.channel_f32("attention_entropy", 2, 0).unwrap()[0].is_nan());
    assert!(view.channel_f32("no_such_channel", 0, 0).is_none());

    let dir = tempfile::tempdir().unwrap();
    for (name, fmt) in [
        ("t.mctrace", TraceFormat::Binary),
        ("t.parquet", TraceFormat::Parquet),
        ("t.jsonl", TraceFormat::Jsonl),
    ] {
        let path = dir.path().join(name);
        save_trace(&trace, &path, Some(fmt)).unwrap();
        let back = load_trace(&path).unwrap();
        assert_same_channels(&trace, &back, name);
        assert_eq!(back.meta, trace.meta, "{name}");
        assert_eq!(back.view().record(3), trace.view().record(3), "{name}");
    }
    // The memory map hands out the same cells without copying; token ranges keep them.
    let mapped = MappedTrace::open(&dir.path().join("t.mctrace")).unwrap();
    let mv = mapped.view();
    let c = mv.meta.channel_index("attention_entropy").unwrap();
    assert_eq!(
        mv.channel(c, 3, 0),
        Some(ChannelSlice::F32(&values(2, 3, 0, 2)))
    );
    assert_eq!(
        mv.tokens(2..4).channel_f32(PRE_ATTENTION_LOGITS, 1, 1),
        view.channel_f32(PRE_ATTENTION_LOGITS, 3, 1)
    );
}

/// A trace with router inputs and logits, as older moecast wrote them.
fn legacy_meta_json(trace: &RoutingTrace) -> serde_json::Value {
    let mut m = serde_json::to_value(&trace.meta).unwrap();
    let o = m.as_object_mut().unwrap();
    o.remove("channels");
    o.insert("router_input_dim".into(), 4.into());
    o.insert("router_logits".into(), true.into());
    m
}

fn legacy_channels() -> Vec<Channel> {
    vec![Channel::router_inputs(4), Channel::router_logits(E)]
}

#[test]
fn files_written_before_channels_keep_reading() {
    let trace = trace_with(legacy_channels());
    let dir = tempfile::tempdir().unwrap();
    let legacy = legacy_meta_json(&trace);

    // JSONL: the meta line spelt the old way; records carry the same field names.
    let path = dir.path().join("t.jsonl");
    save_trace(&trace, &path, Some(TraceFormat::Jsonl)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[0] = serde_json::json!({ "meta": legacy }).to_string();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let back = load_trace(&path).unwrap();
    assert_same_channels(&trace, &back, "legacy jsonl");

    // .mctrace: the header's meta spelt the old way, sections as they were.
    let path = dir.path().join("t.mctrace");
    save_trace(&trace, &path, Some(TraceFormat::Binary)).unwrap();
    rewrite_mctrace_meta(&path, legacy.clone());
    let back = load_trace(&path).unwrap();
    assert_same_channels(&trace, &back, "legacy mctrace");
    assert_eq!(back.meta, trace.meta);

    // Parquet: the router-input column was called `router_input`.
    let path = dir.path().join("t.parquet");
    save_trace(&trace, &path, Some(TraceFormat::Parquet)).unwrap();
    rewrite_parquet_legacy(&path, &legacy);
    let back = load_trace(&path).unwrap();
    assert_same_channels(&trace, &back, "legacy parquet");
}

/// Rewrites a `.mctrace` header with `meta` (offsets moved to keep the data aligned).
fn rewrite_mctrace_meta(path: &Path, meta: serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[16..16 + hlen]).unwrap();
    header["meta"] = meta;
    let sections: Vec<(String, String, u64, u64)> = header["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["dtype"].as_str().unwrap().into(),
                s["offset"].as_u64().unwrap(),
                s["len"].as_u64().unwrap(),
            )
        })
        .collect();
    let elem = |d: &str| {
        if d == "u8" {
            1
        } else if d == "u16" || d == "f16" {
            2
        } else {
            4
        }
    };
    // Room for the longer header: shift every section by a multiple of 64 bytes.
    let shift = 4096u64;
    for (i, s) in sections.iter().enumerate() {
        header["sections"][i]["offset"] = (s.2 + shift).into();
    }
    let json = serde_json::to_vec(&header).unwrap();
    assert!(16 + json.len() as u64 <= sections[0].2 + shift);
    let mut out = Vec::new();
    out.extend_from_slice(b"MOECTRC1");
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for s in &sections {
        out.resize((s.2 + shift) as usize, 0);
        let n = (s.3 * elem(&s.1)) as usize;
        out.extend_from_slice(&bytes[s.2 as usize..s.2 as usize + n]);
    }
    std::fs::write(path, out).unwrap();
}

/// Renames the router-input column to `router_input` and stores `meta` the old way.
fn rewrite_parquet_legacy(path: &Path, meta: &serde_json::Value) {
    use polars::prelude::*;
    let mut df = ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap();
    df.rename(ROUTER_INPUTS, "router_input".into()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    ParquetWriter::new(file)
        .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![(
            datasets::parquet::META_KEY.to_string(),
            meta.to_string(),
        )])))
        .finish(&mut df)
        .unwrap();
}

#[test]
fn bad_channel_data_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // A JSONL field of per-layer vectors the meta does not list.
    let trace = trace_with(vec![Channel::router_logits(E)]);
    let path = dir.path().join("t.jsonl");
    save_trace(&trace, &path, Some(TraceFormat::Jsonl)).unwrap();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"router_logits\":", "\"router_logitz\":");
    std::fs::write(&path, text).unwrap();
    let err = load_trace(&path).unwrap_err().to_string();
    assert!(
        err.contains("t.jsonl:2:") && err.contains("no channel 'router_logitz'"),
        "{err}"
    );

    // A channel value that is not a number.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"router_logitz\":", "\"router_logits\":");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut rec: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    rec["router_logits"][1][2] = "high".into();
    lines[3] = rec.to_string();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let err = load_trace(&path).unwrap_err().to_string();
    assert!(
        err.contains("t.jsonl:4:") && err.contains("'router_logits', MoE layer index 1"),
        "{err}"
    );

    // Metas that cannot be: a name twice, a reserved name, a known channel mis-sized.
    for (channels, want) in [
        (
            vec![Channel::router_logits(E), Channel::router_logits(E)],
            "listed twice",
        ),
        (
            vec![Channel::new("experts", ChannelDtype::F32, 2)],
            "reserved",
        ),
        (vec![Channel::router_logits(E + 1)], "n_experts = 6"),
        (
            vec![Channel::new("Bad-Name", ChannelDtype::F32, 1)],
            "lower-case",
        ),
    ] {
        let err = meta(channels).validate().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }

    // An .mctrace whose meta lists a channel without its section.
    let trace = trace_with(vec![Channel::pre_attention_logits(E)]);
    let path = dir.path().join("t.mctrace");
    save_trace(&trace, &path, Some(TraceFormat::Binary)).unwrap();
    let mut m = serde_json::to_value(&trace.meta).unwrap();
    m["channels"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::to_value(Channel::router_logits(E)).unwrap());
    rewrite_mctrace_meta(&path, m);
    let err = MappedTrace::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("t.mctrace") && err.contains("section 'router_logits' (f32) is missing"),
        "{err}"
    );
}

#[test]
fn unknown_jsonl_fields_that_are_not_per_layer_vectors_are_ignored() {
    let trace = trace_with(vec![Channel::router_logits(E)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    save_trace(&trace, &path, Some(TraceFormat::Jsonl)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                return l.to_string();
            }
            let mut rec: serde_json::Value = serde_json::from_str(l).unwrap();
            rec["text_ids"] = serde_json::json!([1, 2, 3]);
            rec["note"] = "free text".into();
            rec["empty"] = serde_json::json!([]);
            rec.to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let back = load_trace(&path).unwrap();
    assert_same_channels(&trace, &back, "extra fields");
}
