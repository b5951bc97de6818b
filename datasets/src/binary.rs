//! The compact binary trace form (`.mctrace`), read through a memory map with
//! zero-copy access to any token's routing.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `MOECTRC1` |
//! | 8..16 | `u64` length `H` of the JSON header |
//! | 16..16+H | JSON header: `version`, `n_tokens`, `meta`, `sequences`, `sections` |
//! | ... | sections, each starting at a 64-byte-aligned offset |
//!
//! Each entry of `sections` is `{"name", "dtype", "offset", "len"}` (`len` in elements).
//! Sections of a trace: `seq` u32, `pos` u32, `token` u32, `phase` u8, `experts` u16
//! (`n_tokens x n_moe x top_k`), optional `weights` f32 (same shape), and one section
//! per channel of `meta.channels`, named after it, of its dtype (`f16` / `f32`) and
//! `n_tokens x n_moe x width` values (see [`crate::channel`]; for example
//! `router_inputs` f16, the vector each MoE layer's gate read). Readers ignore sections
//! they do not know.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::channel::{ChannelColumns, ChannelDtype, ChannelSlice};
use crate::error::{Result, TraceError};
use crate::store::write_atomic;
use crate::trace::{RoutingTrace, TraceMeta, TraceView, NOT_COMPUTED};

/// First 8 bytes of every `.mctrace` file.
pub const MAGIC: &[u8; 8] = b"MOECTRC1";
const ALIGN: u64 = 64;
const VERSION: u32 = 1;

/// One typed array in the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub name: String,
    pub dtype: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    n_tokens: u64,
    meta: TraceMeta,
    sequences: Vec<String>,
    sections: Vec<Section>,
}

/// Element types that can be stored in a section.
pub trait SectionType: bytemuck::Pod {
    /// The dtype tag written in the header.
    const DTYPE: &'static str;
}
impl SectionType for u8 {
    const DTYPE: &'static str = "u8";
}
impl SectionType for u16 {
    const DTYPE: &'static str = "u16";
}
impl SectionType for u32 {
    const DTYPE: &'static str = "u32";
}
impl SectionType for f32 {
    const DTYPE: &'static str = "f32";
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Writes `trace` to `path` in the binary form (atomically).
pub fn write_binary(trace: &RoutingTrace, path: &Path) -> Result<()> {
    let mut arrays: Vec<(&str, &str, &[u8], u64)> = vec![
        (
            "seq",
            u32::DTYPE,
            bytemuck::cast_slice(&trace.seq),
            trace.seq.len() as u64,
        ),
        (
            "pos",
            u32::DTYPE,
            bytemuck::cast_slice(&trace.pos),
            trace.pos.len() as u64,
        ),
        (
            "token",
            u32::DTYPE,
            bytemuck::cast_slice(&trace.token),
            trace.token.len() as u64,
        ),
        ("phase", u8::DTYPE, &trace.phase, trace.phase.len() as u64),
        (
            "experts",
            u16::DTYPE,
            bytemuck::cast_slice(&trace.experts),
            trace.experts.len() as u64,
        ),
    ];
    if let Some(w) = &trace.weights {
        arrays.push((
            "weights",
            f32::DTYPE,
            bytemuck::cast_slice(w),
            w.len() as u64,
        ));
    }
    for (c, x) in trace.meta.channels.iter().zip(&trace.channels) {
        let x = x.as_slice();
        arrays.push((&c.name, c.dtype.as_str(), x.as_bytes(), x.len() as u64));
    }
    let mut header = Header {
        version: VERSION,
        n_tokens: trace.n_tokens() as u64,
        meta: trace.meta.clone(),
        sequences: trace.seq_names.clone(),
        sections: Vec::new(),
    };
    // The data offsets depend on the header's length, which depends on the offsets:
    // iterate until the layout is stable (two rounds in practice).
    let mut data_start = ALIGN;
    let json = loop {
        let mut offset = data_start;
        header.sections = arrays
            .iter()
            .map(|(name, dtype, bytes, len)| {
                let s = Section {
                    name: name.to_string(),
                    dtype: dtype.to_string(),
                    offset,
                    len: *len,
                };
                offset = align_up(offset + bytes.len() as u64);
                s
            })
            .collect();
        let json = serde_json::to_vec(&header).map_err(|e| TraceError::Invalid(e.to_string()))?;
        let needed = align_up(16 + json.len() as u64);
        if needed == data_start {
            break json;
        }
        data_start = needed;
    };
    write_atomic(path, |w| {
        let io = |e| TraceError::io(path, e);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&json).map_err(io)?;
        let mut at = 16 + json.len() as u64;
        for ((_, _, bytes, _), s) in arrays.iter().zip(&header.sections) {
            w.write_all(&vec![0u8; (s.offset - at) as usize])
                .map_err(io)?;
            w.write_all(bytes).map_err(io)?;
            at = s.offset + bytes.len() as u64;
        }
        Ok(())
    })
}

/// A `.mctrace` file mapped into memory. [`MappedTrace::view`] borrows its columns
/// straight from the map: opening a trace of any size costs one header parse and a
/// scan that checks ids are in range.
#[derive(Debug)]
pub struct MappedTrace {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl MappedTrace {
    /// Maps `path` and checks its structure.
    pub fn open(path: &Path) -> Result<MappedTrace> {
        if cfg!(target_endian = "big") {
            return Err(TraceError::format(
                path,
                "the binary form is little-endian only",
            ));
        }
        let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us by another
        // process is outside what any reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| TraceError::io(path, e))?;
        let fmt = |m: String| TraceError::format(path, m);
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(fmt("not a .mctrace file (bad magic)".into()));
        }
        let hlen = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes"));
        let hend = 16u64
            .checked_add(hlen)
            .filter(|&e| e <= map.len() as u64)
            .ok_or_else(|| fmt(format!("truncated: header of {hlen} bytes does not fit")))?;
        let header: Header = serde_json::from_slice(&map[16..hend as usize])
            .map_err(|e| fmt(format!("bad header: {e}")))?;
        if header.version != VERSION {
            return Err(fmt(format!("unsupported version {}", header.version)));
        }
        header.meta.validate().map_err(|e| fmt(e.to_string()))?;
        for s in &header.sections {
            let elem = match s.dtype.as_str() {
                "u8" => 1,
                "u16" => 2,
                "u32" | "f32" => 4,
                "f16" => 2,
                other => return Err(fmt(format!("section {}: unknown dtype {other}", s.name))),
            };
            let end = s
                .len
                .checked_mul(elem)
                .and_then(|b| b.checked_add(s.offset));
            if s.offset % ALIGN != 0 || s.offset < hend || end.is_none_or(|e| e > map.len() as u64)
            {
                return Err(fmt(format!(
                    "truncated or corrupt: section '{}' ({} x {}) at offset {} does not fit in {} bytes",
                    s.name, s.len, s.dtype, s.offset, map.len()
                )));
            }
        }
        let trace = MappedTrace {
            path: path.to_path_buf(),
            map,
            header,
        };
        trace.check_columns()?;
        Ok(trace)
    }

    /// The typed contents of section `name`, if present with element type `T`.
    pub fn section<T: SectionType>(&self, name: &str) -> Option<&[T]> {
        self.section_as(name, T::DTYPE)
    }

    /// Section `name` stored with dtype tag `dtype`, read as elements of type `T`.
    fn section_as<T: bytemuck::Pod>(&self, name: &str, dtype: &str) -> Option<&[T]> {
        let s = self
            .header
            .sections
            .iter()
            .find(|s| s.name == name && s.dtype == dtype)?;
        let bytes = &self.map[s.offset as usize..][..s.len as usize * std::mem::size_of::<T>()];
        bytemuck::try_cast_slice(bytes).ok()
    }

    /// The column of channel `meta.channels[c]`, if its section is present with the
    /// channel's dtype.
    fn channel_section(&self, c: usize) -> Option<ChannelSlice<'_>> {
        let ch = self.header.meta.channels.get(c)?;
        Some(match ch.dtype {
            ChannelDtype::F16 => ChannelSlice::F16(self.section_as(&ch.name, "f16")?),
            ChannelDtype::F32 => ChannelSlice::F32(self.section_as(&ch.name, "f32")?),
        })
    }

    /// The sections listed in the header.
    pub fn sections(&self) -> &[Section] {
        &self.header.sections
    }

    fn required<T: SectionType>(&self, name: &str, len: usize) -> Result<&[T]> {
        let s = self.section::<T>(name).ok_or_else(|| {
            TraceError::format(
                &self.path,
                format!("missing section '{name}' ({})", T::DTYPE),
            )
        })?;
        if s.len() != len {
            return Err(TraceError::format(
                &self.path,
                format!("section '{name}' has {} elements, expected {len}", s.len()),
            ));
        }
        Ok(s)
    }

    fn check_columns(&self) -> Result<()> {
        let n = self.header.n_tokens as usize;
        let meta = &self.header.meta;
        let slots = n * meta.slots_per_token();
        let seq = self.required::<u32>("seq", n)?;
        self.required::<u32>("pos", n)?;
        self.required::<u32>("token", n)?;
        let phase = self.required::<u8>("phase", n)?;
        let experts = self.required::<u16>("experts", slots)?;
        if self.section::<f32>("weights").is_some() {
            self.required::<f32>("weights", slots)?;
        }
        let fmt = |m: String| TraceError::format(&self.path, m);
        for (c, ch) in meta.channels.iter().enumerate() {
            let want = n * meta.n_moe() * ch.width as usize;
            match self.channel_section(c) {
                Some(x) if x.len() == want => {}
                Some(x) => {
                    return Err(fmt(format!(
                        "section '{}' has {} values, expected {n} tokens x {} MoE layers x {}",
                        ch.name,
                        x.len(),
                        meta.n_moe(),
                        ch.width
                    )))
                }
                None => {
                    return Err(fmt(format!(
                        "meta lists channel {} but section '{}' ({}) is missing",
                        ch.describe(),
                        ch.name,
                        ch.dtype.as_str()
                    )))
                }
            }
        }
        let n_seq = self.header.sequences.len() as u32;
        if let Some(t) = seq.iter().position(|&s| s >= n_seq) {
            return Err(fmt(format!("token {t}: sequence index out of range")));
        }
        if let Some(t) = phase.iter().position(|&p| p > 1) {
            return Err(fmt(format!("token {t}: bad phase code {}", phase[t])));
        }
        let e_max = meta.n_experts as u16;
        if let Some(i) = experts
            .iter()
            .position(|&e| e >= e_max && e != NOT_COMPUTED)
        {
            return Err(fmt(format!(
                "token {}: expert id {} is not below n_experts = {}",
                i / meta.slots_per_token().max(1),
                experts[i],
                meta.n_experts
            )));
        }
        Ok(())
    }

    /// Zero-copy view of the routing.
    pub fn view(&self) -> TraceView<'_> {
        let n = self.header.n_tokens as usize;
        let get_u32 = |name| self.section::<u32>(name).unwrap_or(&[]);
        TraceView {
            meta: &self.header.meta,
            seq_names: &self.header.sequences,
            seq: &get_u32("seq")[..n],
            pos: &get_u32("pos")[..n],
            token: &get_u32("token")[..n],
            phase: &self.section::<u8>("phase").unwrap_or(&[])[..n],
            experts: self.section::<u16>("experts").unwrap_or(&[]),
            weights: self.section::<f32>("weights"),
            channels: ChannelColumns::collect(
                (0..self.header.meta.channels.len()).map(|c| self.channel_section(c)),
            ),
        }
    }

    /// Size of the mapped file in bytes.
    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    /// The file this trace was mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
