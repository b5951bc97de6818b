//! Parquet form of a trace, for interchange with pandas, DuckDB and polars.
//!
//! One row per (token, MoE layer), token-major, layers ascending:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `seq` | string | sequence name |
//! | `pos` | uint32 | position in the sequence |
//! | `phase` | string | `prefill` / `decode` |
//! | `token` | uint32, nullable | token id |
//! | `layer` | uint32 | model layer index of this MoE layer |
//! | `experts` | `list<uint16>`, nullable | top-k ids in rank order; null = not computed |
//! | `weights` | `list<float32>`, nullable | router weights (column present only if recorded) |
//! | *channel name* | `list<float32>`, nullable | one column per channel of `meta.channels` (see [`crate::channel`]): `router_inputs` the vector the layer's gate read (stored f16 in `.mctrace`), `router_logits` the layer's logits over all experts, ... |
//!
//! Files written before channels named the router-input column `router_input`; it is
//! read as the `router_inputs` channel.
//!
//! The [`TraceMeta`] is stored as JSON in the file's key-value metadata under
//! `moecast.meta` (`pyarrow.parquet.read_schema(f).metadata[b"moecast.meta"]`).

use std::fs::File;
use std::path::Path;

use polars::prelude::*;

use crate::channel::{ChannelSlice, ChannelValues, ROUTER_INPUTS};
use crate::error::{Result, TraceError};
use crate::store::write_atomic;
use crate::trace::{Phase, RoutingTrace, TraceMeta, NOT_COMPUTED, UNKNOWN_TOKEN};

/// Key of the trace meta in the Parquet key-value metadata.
pub const META_KEY: &str = "moecast.meta";

/// Writes `trace` as Parquet (atomically).
pub fn write_parquet(trace: &RoutingTrace, path: &Path) -> Result<()> {
    let pe = |e: PolarsError| TraceError::Polars {
        path: path.to_path_buf(),
        source: e,
    };
    let meta = &trace.meta;
    let n_moe = meta.n_moe();
    let k = meta.top_k as usize;
    let rows = trace.n_tokens() * n_moe;
    let view = trace.view();
    let mut seq = Vec::with_capacity(rows);
    let mut pos = Vec::with_capacity(rows);
    let mut phase = Vec::with_capacity(rows);
    let mut token = Vec::with_capacity(rows);
    let mut layer = Vec::with_capacity(rows);
    let mut experts = ListPrimitiveChunkedBuilder::<UInt16Type>::new(
        "experts".into(),
        rows,
        rows * k,
        DataType::UInt16,
    );
    let mut weights = ListPrimitiveChunkedBuilder::<Float32Type>::new(
        "weights".into(),
        rows,
        rows * k,
        DataType::Float32,
    );
    let mut channels: Vec<_> = meta
        .channels
        .iter()
        .map(|c| {
            ListPrimitiveChunkedBuilder::<Float32Type>::new(
                c.name.as_str().into(),
                rows,
                rows * c.width as usize,
                DataType::Float32,
            )
        })
        .collect();
    for t in 0..trace.n_tokens() {
        let name = trace.seq_names[trace.seq[t] as usize].as_str();
        let ph = Phase::from_code(trace.phase[t])
            .unwrap_or(Phase::Decode)
            .as_str();
        let tok = (trace.token[t] != UNKNOWN_TOKEN).then_some(trace.token[t]);
        for (m, &l) in meta.moe_layers.iter().enumerate() {
            seq.push(name);
            pos.push(trace.pos[t]);
            phase.push(ph);
            token.push(tok);
            layer.push(l);
            experts.append_opt_slice(view.layer(t, m));
            weights.append_opt_slice(view.layer_weights(t, m));
            for (c, col) in channels.iter_mut().enumerate() {
                match view.channel(c, t, m) {
                    Some(ChannelSlice::F32(v)) => col.append_slice(v),
                    Some(v) => col.append_slice(&v.to_f32()),
                    None => col.append_opt_slice(None),
                }
            }
        }
    }
    let mut columns = vec![
        Column::new("seq".into(), seq),
        Column::new("pos".into(), pos),
        Column::new("phase".into(), phase),
        Column::new("token".into(), token),
        Column::new("layer".into(), layer),
        experts.finish().into_column(),
    ];
    if trace.weights.is_some() {
        columns.push(weights.finish().into_column());
    }
    columns.extend(channels.iter_mut().map(|c| c.finish().into_column()));
    let mut df = DataFrame::new(rows, columns).map_err(pe)?;
    let meta_json = serde_json::to_string(meta).map_err(|e| TraceError::Invalid(e.to_string()))?;
    write_atomic(path, |w| {
        ParquetWriter::new(w)
            .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![(
                META_KEY.to_string(),
                meta_json,
            )])))
            .finish(&mut df)
            .map_err(pe)?;
        Ok(())
    })
}

/// Reads only the footer of a Parquet trace: its [`TraceMeta`] and number of rows.
pub fn read_parquet_meta(path: &Path) -> Result<(TraceMeta, usize)> {
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    footer_meta(&mut ParquetReader::new(file), path)
}

fn footer_meta(reader: &mut ParquetReader<File>, path: &Path) -> Result<(TraceMeta, usize)> {
    let fmt = |m: String| TraceError::format(path, m);
    let footer = reader.get_metadata().map_err(|e| TraceError::Polars {
        path: path.to_path_buf(),
        source: e,
    })?;
    let meta_json = footer
        .key_value_metadata()
        .iter()
        .flatten()
        .find(|kv| kv.key == META_KEY)
        .and_then(|kv| kv.value.clone())
        .ok_or_else(|| {
            fmt(format!(
                "no '{META_KEY}' entry in the Parquet key-value metadata"
            ))
        })?;
    let meta: TraceMeta = serde_json::from_str(&meta_json)
        .map_err(|e| fmt(format!("bad '{META_KEY}' metadata: {e}")))?;
    meta.validate().map_err(|e| fmt(e.to_string()))?;
    Ok((meta, footer.num_rows))
}

/// Reads a Parquet trace written by [`write_parquet`] (or by any tool that keeps its
/// schema and metadata), validating every row.
pub fn read_parquet(path: &Path) -> Result<RoutingTrace> {
    let pe = |e: PolarsError| TraceError::Polars {
        path: path.to_path_buf(),
        source: e,
    };
    let fmt = |m: String| TraceError::format(path, m);
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    let mut reader = ParquetReader::new(file);
    let (meta, _) = footer_meta(&mut reader, path)?;
    let df = reader.finish().map_err(pe)?;

    let col = |name: &str, dtype: DataType| -> Result<Series> {
        let c = df
            .column(name)
            .map_err(|_| fmt(format!("missing column '{name}'")))?;
        c.as_materialized_series()
            .strict_cast(&dtype)
            .map_err(|e| fmt(format!("column '{name}': {e}")))
    };
    let seq = col("seq", DataType::String)?;
    let pos = col("pos", DataType::UInt32)?;
    let phase = col("phase", DataType::String)?;
    let token = col("token", DataType::UInt32)?;
    let layer = col("layer", DataType::UInt32)?;
    let experts = col("experts", DataType::List(Box::new(DataType::UInt16)))?;
    let weights = if df.column("weights").is_ok() {
        Some(col("weights", DataType::List(Box::new(DataType::Float32)))?)
    } else {
        None
    };
    let channel_cols = meta
        .channels
        .iter()
        .map(|c| {
            let legacy =
                (c.name == ROUTER_INPUTS && df.column(&c.name).is_err()).then_some("router_input");
            let name = legacy.unwrap_or(&c.name);
            if df.column(name).is_err() {
                return Err(fmt(format!(
                    "meta lists channel {} but column '{}' is missing",
                    c.describe(),
                    c.name
                )));
            }
            col(name, DataType::List(Box::new(DataType::Float32)))
        })
        .collect::<Result<Vec<_>>>()?;
    let n_moe = meta.n_moe();
    let k = meta.top_k as usize;
    let rows = df.height();
    if rows % n_moe != 0 {
        return Err(fmt(format!(
            "{rows} rows is not a multiple of {n_moe} MoE layers"
        )));
    }
    let n = rows / n_moe;
    let (e_off, e_val, e_valid) = flat_list::<UInt16Type>(&experts).map_err(pe)?;
    let w_flat = match &weights {
        Some(w) => Some(flat_list::<Float32Type>(w).map_err(pe)?),
        None => None,
    };
    let c_flat = channel_cols
        .iter()
        .map(|x| flat_list::<Float32Type>(x).map_err(pe))
        .collect::<Result<Vec<_>>>()?;
    let seq = seq.str().map_err(pe)?;
    let phase = phase.str().map_err(pe)?;
    let pos = pos.u32().map_err(pe)?;
    let token = token.u32().map_err(pe)?;
    let layer = layer.u32().map_err(pe)?;

    let mut trace = RoutingTrace {
        channels: meta
            .channels
            .iter()
            .map(|c| ChannelValues::with_capacity(c.dtype, n * n_moe * c.width as usize))
            .collect(),
        meta,
        seq_names: Vec::new(),
        seq: Vec::with_capacity(n),
        pos: Vec::with_capacity(n),
        token: Vec::with_capacity(n),
        phase: Vec::with_capacity(n),
        experts: Vec::with_capacity(n * n_moe * k),
        weights: w_flat.as_ref().map(|_| Vec::with_capacity(n * n_moe * k)),
    };
    let row_err = |r: usize, m: String| fmt(format!("row {r}: {m}"));
    let channel_what: Vec<String> = trace
        .meta
        .channels
        .iter()
        .map(|ch| format!("'{}' values", ch.name))
        .collect();
    for r in 0..rows {
        let m = r % n_moe;
        let want_layer = trace.meta.moe_layers[m];
        if layer.get(r) != Some(want_layer) {
            return Err(row_err(
                r,
                format!("expected layer {want_layer}, found {:?}", layer.get(r)),
            ));
        }
        if m == 0 {
            let name = seq.get(r).ok_or_else(|| row_err(r, "seq is null".into()))?;
            if trace.seq_names.last().map(String::as_str) != Some(name) {
                if trace.seq_names.iter().any(|s| s == name) {
                    return Err(row_err(r, format!("sequence '{name}' is not contiguous")));
                }
                trace.seq_names.push(name.to_string());
            }
            trace.seq.push(trace.seq_names.len() as u32 - 1);
            trace
                .pos
                .push(pos.get(r).ok_or_else(|| row_err(r, "pos is null".into()))?);
            trace.token.push(token.get(r).unwrap_or(UNKNOWN_TOKEN));
            let ph = phase.get(r).and_then(Phase::parse).ok_or_else(|| {
                row_err(r, format!("phase {:?} is not prefill/decode", phase.get(r)))
            })?;
            trace.phase.push(ph.code());
        }
        let (s, e) = (e_off[r] as usize, e_off[r + 1] as usize);
        if e_valid(r) {
            if e - s != k {
                return Err(row_err(
                    r,
                    format!("{} experts, expected top_k = {k}", e - s),
                ));
            }
            trace.experts.extend_from_slice(&e_val[s..e]);
        } else {
            trace.experts.extend(std::iter::repeat_n(NOT_COMPUTED, k));
        }
        let computed = e_valid(r);
        if let (Some(out), Some(w)) = (&mut trace.weights, &w_flat) {
            match list_row(w, r, computed, k, "weights").map_err(|m| row_err(r, m))? {
                Some(v) => out.extend_from_slice(v),
                None => out.extend(std::iter::repeat_n(f32::NAN, k)),
            }
        }
        for (((ch, out), x), what) in trace
            .meta
            .channels
            .iter()
            .zip(&mut trace.channels)
            .zip(&c_flat)
            .zip(&channel_what)
        {
            let w = ch.width as usize;
            let v = list_row(x, r, computed, w, what).map_err(|m| row_err(r, m))?;
            out.push(v, w);
        }
    }
    trace.validate().map_err(|e| fmt(e.to_string()))?;
    Ok(trace)
}

type FlatList<T> = (Vec<i64>, Vec<T>, Box<dyn Fn(usize) -> bool>);

/// Row `r` of a flattened list column, when the row is not null and its layer was
/// computed; it must hold `want` values (`what` names them in the error).
fn list_row<'a, T>(
    list: &'a FlatList<T>,
    r: usize,
    computed: bool,
    want: usize,
    what: &str,
) -> std::result::Result<Option<&'a [T]>, String> {
    let (offsets, values, valid) = list;
    if !(computed && valid(r)) {
        return Ok(None);
    }
    let (s, e) = (offsets[r] as usize, offsets[r + 1] as usize);
    if e - s != want {
        return Err(format!("{} {what}, expected {want}", e - s));
    }
    Ok(Some(&values[s..e]))
}

/// Offsets, values and row validity of a list column, flattened into one chunk.
fn flat_list<T>(s: &Series) -> PolarsResult<FlatList<T::Native>>
where
    T: PolarsNumericType,
{
    let ca = s.list()?.rechunk();
    let arr = ca
        .downcast_iter()
        .next()
        .ok_or_else(|| polars_err!(ComputeError: "empty list column"))?;
    let offsets: Vec<i64> = arr.offsets().as_slice().to_vec();
    let validity = arr.validity().cloned();
    let inner = ca.get_inner();
    let values = inner.unpack::<T>()?;
    if values.null_count() > 0 {
        polars_bail!(ComputeError: "null inside an expert or weight list");
    }
    let values: Vec<T::Native> = values.into_no_null_iter().collect();
    let valid: Box<dyn Fn(usize) -> bool> = match validity {
        Some(b) => Box::new(move |i| b.get_bit(i)),
        None => Box::new(|_| true),
    };
    Ok((offsets, values, valid))
}
