//! Expert weights on disk: each routed expert's three projections are read from the
//! checkpoint's safetensors file with positioned reads (never memory-mapped), in chunks
//! of [`READ_CHUNK`] bytes: a prefetch's one after another (between them it pauses for
//! demand reads, or stops; see [`super::loader`]), a demand read's up to
//! [`DEFAULT_READ_STREAMS`] at once (a lookup waits for it: it takes what the device
//! gives to several requests in flight). Every load is a real read from the
//! device, as an expert that does not fit in memory would be: on Linux the files are
//! read with direct I/O (`O_DIRECT`: no page cache, no kernel copy; aligned reads into
//! an aligned buffer), and where the file system refuses it, with buffered reads whose
//! range is dropped from the page cache after each read (`posix_fadvise DONTNEED`). A
//! checkpoint on tmpfs is in memory either way. The reads, and the decode of each chunk
//! by the stream that read it, are [`super::chunked`]'s.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

use inference::checkpoint::{decode_into, value_size, Checkpoint, TensorRef};
use inference::error::{ModelError, Result};
use inference::layers::{Dense, GluActivation, SwiGlu};
use inference::moe::SparseMoe;

pub(super) use super::chunked::BeforeChunk;
pub use super::chunked::READ_CHUNK;
use super::chunked::{drop_cached, open_direct, read_range, ChunkedRead, ValueSink};

/// Chunks of one demand read in flight at once by default (its queue depth). Prefetches
/// read one chunk at a time: several would each hold a demand read up by a chunk.
pub const DEFAULT_READ_STREAMS: usize = 4;

/// A checkpoint file, open for buffered reads and, where the file system allows it, for
/// direct reads.
#[derive(Debug)]
struct ExpertFile {
    buffered: File,
    direct: Option<File>,
    /// Cleared when the file system refused a direct read: buffered from then on.
    direct_ok: AtomicBool,
}

/// Where one projection of one expert lives on disk.
#[derive(Debug, Clone)]
struct Part {
    file: usize,
    weight: TensorRef,
    bias: Option<TensorRef>,
}

/// Every routed expert's location, addressed as `moe_index * n_experts + expert`.
#[derive(Debug)]
pub struct ExpertStore {
    paths: Vec<PathBuf>,
    files: Vec<ExpertFile>,
    /// `[gate, up, down]` per expert.
    experts: Vec<[Part; 3]>,
    act: Vec<GluActivation>,
    /// Bytes of each expert as stored.
    bytes: Vec<u64>,
    device: Device,
    /// Chunks of one demand read in flight at once.
    streams: usize,
}

impl ExpertStore {
    /// Locates every expert of `layers` (the model's MoE blocks, in order) in `ck`.
    pub fn open(
        ck: &Checkpoint,
        layers: &[&mut SparseMoe],
        device: &Device,
    ) -> Result<ExpertStore> {
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut experts = Vec::new();
        let mut act = Vec::new();
        let mut bytes = Vec::new();
        for moe in layers {
            if moe.expert_tensors.is_empty() {
                return Err(ModelError::file(
                    ck.dir(),
                    "this architecture stores all experts of a layer in one fused tensor; the offloading engine reads per-expert tensors (Mixtral, Qwen-MoE, OLMoE, DeepSeek)",
                ));
            }
            let a = moe.experts.first().map_or(GluActivation::Silu, |x| x.act);
            for names in &moe.expert_tensors {
                let mut parts = Vec::with_capacity(3);
                let mut size = 0u64;
                for name in names {
                    let weight = ck.tensor_ref(&format!("{name}.weight"))?;
                    let bias_name = format!("{name}.bias");
                    let bias = if ck.contains(&bias_name) {
                        Some(ck.tensor_ref(&bias_name)?)
                    } else {
                        None
                    };
                    if weight.shape.len() != 2 {
                        return Err(ModelError::file(
                            &weight.file,
                            format!(
                                "tensor {name}.weight: expected 2 dimensions, found {:?}",
                                weight.shape
                            ),
                        ));
                    }
                    size += (weight.len + bias.as_ref().map_or(0, |b| b.len)) as u64;
                    let file = match paths.iter().position(|p| *p == weight.file) {
                        Some(i) => i,
                        None => {
                            paths.push(weight.file.clone());
                            paths.len() - 1
                        }
                    };
                    parts.push(Part { file, weight, bias });
                }
                let parts: [Part; 3] = parts.try_into().expect("three projections");
                experts.push(parts);
                act.push(a);
                bytes.push(size);
            }
        }
        let files = paths
            .iter()
            .map(|p| {
                let buffered = File::open(p).map_err(|e| ModelError::io(p, e))?;
                drop_cached(&buffered, 0, 0);
                let direct = open_direct(p);
                Ok(ExpertFile {
                    buffered,
                    direct_ok: AtomicBool::new(direct.is_some()),
                    direct,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ExpertStore {
            paths,
            files,
            experts,
            act,
            bytes,
            device: device.clone(),
            streams: DEFAULT_READ_STREAMS,
        })
    }

    /// Reads each demand read `streams` chunks at a time (at least 1: one after another).
    pub fn with_read_streams(mut self, streams: usize) -> ExpertStore {
        self.streams = streams.max(1);
        self
    }

    /// Bytes of expert `id` as stored.
    pub fn expert_bytes(&self, id: usize) -> u64 {
        self.bytes[id]
    }

    /// Reads expert `id` from disk into `buf` (reused) and builds its projections: a
    /// demand read, the configured number of chunks at a time.
    pub fn read(&self, id: usize, buf: &mut Vec<u8>) -> Result<SwiGlu> {
        self.read_chunked(id, buf, self.streams, &|| true)
    }

    /// [`ExpertStore::read`], `streams` chunks at a time, calling `before_chunk` before
    /// each [`READ_CHUNK`] bytes (where a prefetch waits for demand reads in flight;
    /// from each stream); the read stops with an error where it returns false.
    pub(super) fn read_chunked(
        &self,
        id: usize,
        buf: &mut Vec<u8>,
        streams: usize,
        before_chunk: &BeforeChunk<'_>,
    ) -> Result<SwiGlu> {
        let mut dense = Vec::with_capacity(3);
        for part in &self.experts[id] {
            let w = self.read_tensor(part.file, &part.weight, buf, streams, before_chunk)?;
            let b = match &part.bias {
                Some(r) => Some(self.read_tensor(part.file, r, buf, streams, before_chunk)?),
                None => None,
            };
            let (out, inp) = (part.weight.shape[0], part.weight.shape[1]);
            dense.push(Dense::from_f32(w, b, out, inp, &self.device));
        }
        let [gate, up, down]: [Dense; 3] = dense.try_into().expect("three projections");
        Ok(SwiGlu {
            gate,
            up,
            down,
            act: self.act[id],
        })
    }

    /// Reads tensor `r` and decodes it to f32. Read by several streams, each decodes the
    /// chunks it reads, beside the others' reads, where the tensor's values do not
    /// straddle chunks (its offset a multiple of its value size, as in files that align
    /// their tensors); else (one stream: a prefetch, which may be stopped part-read, when
    /// decoding what it read would be wasted) the tensor is decoded after the read.
    fn read_tensor(
        &self,
        file: usize,
        r: &TensorRef,
        buf: &mut Vec<u8>,
        streams: usize,
        before_chunk: &BeforeChunk<'_>,
    ) -> Result<Vec<f32>> {
        let path = &self.paths[file];
        let f = &self.files[file];
        let size = value_size(r.dtype).map_err(|m| ModelError::file(path, m))?;
        let n = r.len / size;
        let mut values: Vec<f32> = Vec::with_capacity(n);
        let chunked = streams > 1 && r.offset.is_multiple_of(size);
        let mut read = |file: &File, direct: bool| {
            let how = ChunkedRead {
                streams,
                before_chunk,
                sink: chunked.then(|| ValueSink::new(&mut values, n, r.dtype, size)),
            };
            read_range(file, direct, r.offset, r.len, buf, how)
        };
        let mut at = None;
        if let Some(d) = f
            .direct
            .as_ref()
            .filter(|_| f.direct_ok.load(Ordering::Relaxed))
        {
            match read(d, true) {
                Ok(start) => at = Some(start),
                // The file system took O_DIRECT at open but not its reads.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    f.direct_ok.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(ModelError::io(path, e)),
            }
        }
        let at = match at {
            Some(start) => start,
            None => read(&f.buffered, false).map_err(|e| ModelError::io(path, e))?,
        };
        if !chunked {
            decode_into(
                &buf[at..at + r.len],
                r.dtype,
                &mut values.spare_capacity_mut()[..n],
            )
            .map_err(|m| ModelError::file(path, m))?;
        }
        // SAFETY: every value was written: by the chunks' decodes (`read_chunks` checks
        // that their values add up to `n`), or by the decode after the read (the read
        // holds `n` values).
        unsafe { values.set_len(n) };
        Ok(values)
    }

    /// Whether every checkpoint file is read with direct I/O (so far).
    pub fn direct_io(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.direct_ok.load(Ordering::Relaxed))
    }
}
