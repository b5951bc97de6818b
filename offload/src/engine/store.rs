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
//! checkpoint on tmpfs is in memory either way.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

use inference::checkpoint::{decode_f32, Checkpoint, TensorRef};
use inference::error::{ModelError, Result};
use inference::layers::{Dense, GluActivation, SwiGlu};
use inference::moe::SparseMoe;

/// Bytes a prefetch reads between checks for demand reads in flight.
pub const READ_CHUNK: usize = 1 << 20;

/// Chunks of one demand read in flight at once by default (its queue depth). Prefetches
/// read one chunk at a time: several would each hold a demand read up by a chunk.
pub const DEFAULT_READ_STREAMS: usize = 4;

/// Alignment of direct reads' offsets, lengths and buffers (a multiple of the logical
/// block size of common devices, 512 or 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

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
        let mut at = None;
        if let Some(d) = f
            .direct
            .as_ref()
            .filter(|_| f.direct_ok.load(Ordering::Relaxed))
        {
            match read_direct(d, r.offset, r.len, buf, streams, before_chunk) {
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
            None => read_buffered(&f.buffered, r.offset, r.len, buf, streams, before_chunk)
                .map(|()| 0)
                .map_err(|e| ModelError::io(path, e))?,
        };
        decode_f32(&buf[at..at + r.len], r.dtype).map_err(|m| ModelError::file(path, m))
    }

    /// Whether every checkpoint file is read with direct I/O (so far).
    pub fn direct_io(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.direct_ok.load(Ordering::Relaxed))
    }
}

/// Called before each chunk of a read, from any of its streams: false stops the read.
pub(super) type BeforeChunk<'a> = dyn Fn() -> bool + Sync + 'a;

/// Reads `len` bytes at `offset` into `buf` in [`READ_CHUNK`] chunks, `streams` at a
/// time, then drops the range from the page cache.
fn read_buffered(
    f: &File,
    offset: usize,
    len: usize,
    buf: &mut Vec<u8>,
    streams: usize,
    before_chunk: &BeforeChunk<'_>,
) -> io::Result<()> {
    buf.resize(len, 0);
    read_chunks(f, buf, offset, len, streams, before_chunk)?;
    drop_cached(f, offset as i64, len as i64);
    Ok(())
}

/// Reads `len` bytes at `offset` of a file opened with `O_DIRECT` into `buf`: the
/// aligned range around them, in [`READ_CHUNK`] chunks `streams` at a time, into an
/// aligned window of `buf`. Returns where the bytes start in `buf`.
fn read_direct(
    f: &File,
    offset: usize,
    len: usize,
    buf: &mut Vec<u8>,
    streams: usize,
    before_chunk: &BeforeChunk<'_>,
) -> io::Result<usize> {
    let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (offset + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    buf.resize(end - start + DIRECT_ALIGN, 0);
    let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
    // A short direct read happens only at the end of the file; a read after one would
    // be misaligned, which the kernel refuses (InvalidInput: read buffered instead).
    read_chunks(
        f,
        &mut buf[pad..pad + end - start],
        start,
        offset + len - start,
        streams,
        before_chunk,
    )?;
    Ok(pad + offset - start)
}

/// Reads at least `need` bytes of `window` from file offset `at` in chunks of up to
/// [`READ_CHUNK`] bytes (each up to the window's end, so an aligned window keeps direct
/// reads aligned), `streams` chunks at a time (chunk `i` on stream `i % streams`, so
/// the front of the window comes first), calling `before_chunk` before each (false:
/// stop, with an error); interrupted reads are retried. The first error any stream
/// meets is returned, and the other streams stop at their next chunk.
fn read_chunks(
    f: &File,
    window: &mut [u8],
    at: usize,
    need: usize,
    streams: usize,
    before_chunk: &BeforeChunk<'_>,
) -> io::Result<()> {
    let chunks: Vec<(usize, &mut [u8])> = window
        .chunks_mut(READ_CHUNK)
        .enumerate()
        .map(|(i, c)| (i * READ_CHUNK, c))
        .take_while(|&(start, _)| start < need)
        .collect();
    let streams = streams.clamp(1, chunks.len().max(1));
    let failed = AtomicBool::new(false);
    let mut lanes: Vec<Vec<(usize, &mut [u8])>> = (0..streams).map(|_| Vec::new()).collect();
    for (i, c) in chunks.into_iter().enumerate() {
        lanes[i % streams].push(c);
    }
    let mut lanes = lanes.into_iter();
    let first = lanes.next().unwrap_or_default();
    let read = |lane| read_lane(f, lane, at, need, before_chunk, &failed);
    std::thread::scope(|s| {
        let others: Vec<_> = lanes.map(|lane| s.spawn(|| read(lane))).collect();
        let mut result = read(first);
        for h in others {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a read stream panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Reads one stream's chunks (file offset `at` + their start) of a read of `need`
/// bytes, in order; stops early, with no error of its own, once another stream failed.
fn read_lane(
    f: &File,
    lane: Vec<(usize, &mut [u8])>,
    at: usize,
    need: usize,
    before_chunk: &BeforeChunk<'_>,
    failed: &AtomicBool,
) -> io::Result<()> {
    let fail = |e: io::Error| {
        failed.store(true, Ordering::Relaxed);
        Err(e)
    };
    for (start, chunk) in lane {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !before_chunk() {
            return fail(io::Error::other("read stopped"));
        }
        let want = (need - start).min(chunk.len());
        let mut done = 0;
        while done < want {
            match f.read_at(&mut chunk[done..], (at + start + done) as u64) {
                Ok(0) => return fail(io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => done += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return fail(e),
            }
        }
    }
    Ok(())
}

/// Opens `p` for direct reads, or `None` where the file system refuses `O_DIRECT`.
#[cfg(target_os = "linux")]
fn open_direct(p: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<File> {
    None
}

/// Drops a file range (`len` 0: to the end) from the page cache so the next read of it
/// goes to the device.
#[cfg(target_os = "linux")]
fn drop_cached(f: &File, offset: i64, len: i64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_: &File, _: i64, _: i64) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read stops before the chunk `before_chunk` refuses, having read the chunks
    /// before it; read several chunks at a time, it reads exactly the chunks allowed.
    #[test]
    fn a_read_stops_before_the_chunk_it_is_told_to() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bytes.bin");
        std::fs::write(&path, vec![1u8; 6 * READ_CHUNK]).unwrap();
        let f = File::open(&path).unwrap();
        for streams in [1, 3] {
            let mut window = vec![0u8; 6 * READ_CHUNK];
            let chunks = AtomicUsize::new(0);
            let two = || chunks.fetch_add(1, Ordering::SeqCst) < 2;
            let e = read_chunks(&f, &mut window, 0, 6 * READ_CHUNK, streams, &two).unwrap_err();
            assert_eq!(e.to_string(), "read stopped");
            let read: Vec<bool> = window
                .chunks(READ_CHUNK)
                .map(|c| c.iter().all(|&b| b == 1))
                .collect();
            assert_eq!(read.iter().filter(|&&r| r).count(), 2, "{streams} streams");
            assert!(window
                .chunks(READ_CHUNK)
                .all(|c| c.iter().all(|&b| b == 1) || c.iter().all(|&b| b == 0)));
            if streams == 1 {
                assert_eq!(chunks.load(Ordering::SeqCst), 3);
                assert_eq!(read[..3], [true, true, false]);
            }
        }
    }

    /// Direct and buffered reads return the same bytes for ranges that start and end off
    /// the alignment, span chunks, and run to the file's unaligned end.
    #[test]
    fn direct_reads_match_buffered_reads_at_any_offset() {
        let dir = std::env::temp_dir().join(format!("moecast-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bytes.bin");
        let size = 3 * READ_CHUNK + 12_345;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let buffered = File::open(&path).unwrap();
        let direct = open_direct(&path);
        if direct.is_none() {
            eprintln!(
                "{}: O_DIRECT refused here; only buffered reads checked",
                dir.display()
            );
        }
        let mut buf = Vec::new();
        let chunks = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            chunks.fetch_add(1, Ordering::SeqCst);
            true
        };
        for streams in [1, 3] {
            for (offset, len) in [
                (0, 10),
                (1, DIRECT_ALIGN),
                (4095, READ_CHUNK + 3),
                (READ_CHUNK - 17, 2 * READ_CHUNK),
                (size - 5000, 5000),
                (0, size),
            ] {
                read_buffered(&buffered, offset, len, &mut buf, streams, &count).unwrap();
                assert_eq!(
                    &buf[..len],
                    &bytes[offset..offset + len],
                    "buffered {offset}+{len}, {streams} streams"
                );
                if let Some(d) = &direct {
                    chunks.store(0, Ordering::SeqCst);
                    let at = read_direct(d, offset, len, &mut buf, streams, &count).unwrap();
                    assert_eq!(
                        &buf[at..at + len],
                        &bytes[offset..offset + len],
                        "direct {offset}+{len}, {streams} streams"
                    );
                    assert!(
                        chunks.load(Ordering::SeqCst) >= len / READ_CHUNK,
                        "a pause point per chunk"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
