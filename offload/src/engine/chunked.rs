//! Positioned reads of a byte range in chunks of [`READ_CHUNK`] bytes, several streams
//! at once, with direct I/O (aligned reads into an aligned window) or buffered reads
//! whose range is then dropped from the page cache; a pause point before each chunk
//! (where a prefetch waits for demand reads, or stops); and, given a [`ValueSink`], each
//! chunk's tensor values decoded to f32 by the stream that read it, beside the other
//! streams' reads.

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use inference::checkpoint::{decode_into, Dtype};

/// Bytes a prefetch reads between checks for demand reads in flight.
pub const READ_CHUNK: usize = 1 << 20;

/// Alignment of direct reads' offsets, lengths and buffers (a multiple of the logical
/// block size of common devices, 512 or 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

/// Called before each chunk of a read, from any of its streams: false stops the read.
pub(super) type BeforeChunk<'a> = dyn Fn() -> bool + Sync + 'a;

/// Where a tensor's values go as its chunks are read: its dtype, bytes per value, and
/// the values (one per `size` bytes of the tensor).
pub(super) struct ValueSink<'a> {
    dtype: Dtype,
    size: usize,
    out: &'a mut [MaybeUninit<f32>],
}

impl<'a> ValueSink<'a> {
    /// The first `n` values of `values`' spare capacity.
    pub(super) fn new(values: &'a mut Vec<f32>, n: usize, dtype: Dtype, size: usize) -> Self {
        ValueSink {
            dtype,
            size,
            out: &mut values.spare_capacity_mut()[..n],
        }
    }
}

/// One chunk of a read: its start in the window, its bytes, and the values its bytes
/// of the tensor decode to (with a sink).
type Chunk<'a, 'b> = (usize, &'a mut [u8], Option<&'b mut [MaybeUninit<f32>]>);

/// How a read goes: its chunks `streams` at a time, `before_chunk` called before each,
/// and its values decoded into `sink` as they arrive (with one).
pub(super) struct ChunkedRead<'a, 'v> {
    pub streams: usize,
    pub before_chunk: &'a BeforeChunk<'a>,
    pub sink: Option<ValueSink<'v>>,
}

/// Reads `len` bytes at `offset` of `f` into `buf` in [`READ_CHUNK`] chunks as `how`
/// says. With `direct` (`f` opened with `O_DIRECT`), the aligned range around them into
/// an aligned window of `buf`; else buffered, the range then dropped from the page
/// cache. Returns where the bytes start in `buf`.
pub(super) fn read_range(
    f: &File,
    direct: bool,
    offset: usize,
    len: usize,
    buf: &mut Vec<u8>,
    how: ChunkedRead<'_, '_>,
) -> io::Result<usize> {
    if !direct {
        buf.resize(len, 0);
        read_chunks(f, buf, offset, 0, len, how)?;
        drop_cached(f, offset as i64, len as i64);
        return Ok(0);
    }
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
        offset - start,
        offset + len - start,
        how,
    )?;
    Ok(pad + offset - start)
}

/// Reads at least `need` bytes of `window` from file offset `at` in chunks of up to
/// [`READ_CHUNK`] bytes (each up to the window's end, so an aligned window keeps direct
/// reads aligned), `streams` chunks at a time (chunk `i` on stream `i % streams`, so
/// the front of the window comes first), calling `before_chunk` before each (false:
/// stop, with an error); interrupted reads are retried. With a `sink`, the stream that
/// reads a chunk decodes its bytes of the tensor (window bytes `first..need`, starting
/// at a value) into the sink's values, so the decode runs beside the other streams'
/// reads. The first error any stream meets is returned, and the other streams stop at
/// their next chunk.
fn read_chunks(
    f: &File,
    window: &mut [u8],
    at: usize,
    first: usize,
    need: usize,
    how: ChunkedRead<'_, '_>,
) -> io::Result<()> {
    let ChunkedRead {
        streams,
        before_chunk,
        sink,
    } = how;
    let (dtype, size) = sink.as_ref().map_or((Dtype::U8, 1), |s| (s.dtype, s.size));
    let mut values = sink.map(|s| s.out);
    let chunks: Vec<Chunk> = window
        .chunks_mut(READ_CHUNK)
        .enumerate()
        .map(|(i, c)| (i * READ_CHUNK, c))
        .take_while(|&(start, _)| start < need)
        .map(|(start, c)| {
            let bytes = (start + c.len()).min(need).saturating_sub(start.max(first));
            let piece = values.as_mut().map(|v| {
                let (piece, rest) = std::mem::take(v).split_at_mut(bytes / size);
                *v = rest;
                piece
            });
            (start, c, piece)
        })
        .collect();
    // Every value has its chunk (the pieces add up to the sink's values), or the
    // values could not all be written.
    if values.is_some_and(|v| !v.is_empty()) {
        return Err(io::Error::other("a tensor's values reach past its bytes"));
    }
    let streams = streams.clamp(1, chunks.len().max(1));
    let failed = AtomicBool::new(false);
    let mut lanes: Vec<Vec<Chunk>> = (0..streams).map(|_| Vec::new()).collect();
    for (i, c) in chunks.into_iter().enumerate() {
        lanes[i % streams].push(c);
    }
    let mut lanes = lanes.into_iter();
    let first_lane = lanes.next().unwrap_or_default();
    let span = Span {
        at,
        first,
        need,
        dtype,
    };
    let read = |lane| read_lane(f, lane, span, before_chunk, &failed);
    std::thread::scope(|s| {
        let others: Vec<_> = lanes.map(|lane| s.spawn(|| read(lane))).collect();
        let mut result = read(first_lane);
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

/// Where a read's chunks lie: the window's file offset, the tensor's bytes in the
/// window (`first..need`), and its dtype.
#[derive(Clone, Copy)]
struct Span {
    at: usize,
    first: usize,
    need: usize,
    dtype: Dtype,
}

/// Reads one stream's chunks of a read, in order, decoding each chunk's values once it
/// is read; stops early, with no error of its own, once another stream failed.
fn read_lane(
    f: &File,
    lane: Vec<Chunk>,
    span: Span,
    before_chunk: &BeforeChunk<'_>,
    failed: &AtomicBool,
) -> io::Result<()> {
    let fail = |e: io::Error| {
        failed.store(true, Ordering::Relaxed);
        Err(e)
    };
    for (start, chunk, values) in lane {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !before_chunk() {
            return fail(io::Error::other("read stopped"));
        }
        let want = (span.need - start).min(chunk.len());
        let mut done = 0;
        while done < want {
            match f.read_at(&mut chunk[done..], (span.at + start + done) as u64) {
                Ok(0) => return fail(io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => done += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return fail(e),
            }
        }
        if let Some(values) = values {
            let from = span.first.saturating_sub(start);
            if let Err(m) = decode_into(&chunk[from.min(want)..want], span.dtype, values) {
                return fail(io::Error::other(m));
            }
        }
    }
    Ok(())
}

/// Opens `p` for direct reads, or `None` where the file system refuses `O_DIRECT`.
#[cfg(target_os = "linux")]
pub(super) fn open_direct(p: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub(super) fn open_direct(_: &Path) -> Option<File> {
    None
}

/// Drops a file range (`len` 0: to the end) from the page cache so the next read of it
/// goes to the device.
#[cfg(target_os = "linux")]
pub(super) fn drop_cached(f: &File, offset: i64, len: i64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn drop_cached(_: &File, _: i64, _: i64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use inference::checkpoint::decode_f32;

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
            let how = ChunkedRead {
                streams,
                before_chunk: &two,
                sink: None,
            };
            let e = read_chunks(&f, &mut window, 0, 0, 6 * READ_CHUNK, how).unwrap_err();
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
        let how = |streams, sink| ChunkedRead {
            streams,
            before_chunk: &count,
            sink,
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
                read_range(&buffered, false, offset, len, &mut buf, how(streams, None)).unwrap();
                assert_eq!(
                    &buf[..len],
                    &bytes[offset..offset + len],
                    "buffered {offset}+{len}, {streams} streams"
                );
                if let Some(d) = &direct {
                    chunks.store(0, Ordering::SeqCst);
                    let at =
                        read_range(d, true, offset, len, &mut buf, how(streams, None)).unwrap();
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

    /// Values decoded chunk by chunk as the streams read them equal the values decoded
    /// after the whole read, direct or buffered, for tensors that start anywhere in the
    /// first aligned block and span chunks; bf16 and f32.
    #[test]
    fn values_decoded_per_chunk_match_decoding_after_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values.bin");
        let size = 3 * READ_CHUNK + 4096;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 31 + i / 977) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let buffered = File::open(&path).unwrap();
        let direct_file = open_direct(&path);
        let mut buf = Vec::new();
        let yes = || true;
        for (dtype, value) in [(Dtype::BF16, 2), (Dtype::F32, 4)] {
            for streams in [1, 3] {
                for (offset, len) in [(0, 40), (4, READ_CHUNK), (2048, 2 * READ_CHUNK + 100 * 4)] {
                    let want = decode_f32(&bytes[offset..offset + len], dtype).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let n = len / value;
                    for direct in [false, true] {
                        if direct && direct_file.is_none() {
                            continue;
                        }
                        let mut values = Vec::with_capacity(n);
                        let how = ChunkedRead {
                            streams,
                            before_chunk: &yes,
                            sink: Some(ValueSink::new(&mut values, n, dtype, value)),
                        };
                        let f = direct_file.as_ref().filter(|_| direct).unwrap_or(&buffered);
                        let at = read_range(f, direct, offset, len, &mut buf, how).unwrap();
                        assert_eq!(&buf[at..at + len], &bytes[offset..offset + len]);
                        // SAFETY: the read succeeded, so its chunks decoded all `n`.
                        unsafe { values.set_len(n) };
                        assert_eq!(
                            bits(&values),
                            bits(&want),
                            "direct {direct}, {dtype:?} {offset}+{len}, {streams} streams"
                        );
                    }
                }
            }
        }
    }
}
