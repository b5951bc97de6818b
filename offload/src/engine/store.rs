//! Expert weights on disk: each routed expert's three projections are read from the
//! checkpoint's safetensors file with positioned reads (never memory-mapped), on a pool
//! of background loader threads. Demand reads go ahead of queued prefetches (which go
//! earliest deadline first, as the simulator's link sends them), and a prefetch already
//! reading pauses between chunks of [`READ_CHUNK`] bytes while a demand
//! read is in flight, so a demand read shares the device with at most one chunk of
//! prefetch (the simulator's link model). Every load is a real read from the device, as
//! an expert that does not fit in memory would be: on Linux the files are read with
//! direct I/O (`O_DIRECT`: no page cache, no kernel copy; aligned reads into an aligned
//! buffer), and where the file system refuses it, with buffered reads whose range is
//! dropped from the page cache after each read (`posix_fadvise DONTNEED`). A checkpoint
//! on tmpfs is in memory either way.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::Device;

use inference::checkpoint::{decode_f32, Checkpoint, TensorRef};
use inference::error::{ModelError, Result};
use inference::layers::{Dense, GluActivation, SwiGlu};
use inference::moe::SparseMoe;

/// Bytes a prefetch reads between checks for demand reads in flight.
pub const READ_CHUNK: usize = 1 << 20;

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
        })
    }

    /// Bytes of expert `id` as stored.
    pub fn expert_bytes(&self, id: usize) -> u64 {
        self.bytes[id]
    }

    /// Reads expert `id` from disk into `buf` (reused) and builds its projections.
    pub fn read(&self, id: usize, buf: &mut Vec<u8>) -> Result<SwiGlu> {
        self.read_chunked(id, buf, &|| {})
    }

    /// [`ExpertStore::read`], calling `before_chunk` before each [`READ_CHUNK`] bytes
    /// (where a prefetch waits for demand reads in flight).
    fn read_chunked(
        &self,
        id: usize,
        buf: &mut Vec<u8>,
        before_chunk: &dyn Fn(),
    ) -> Result<SwiGlu> {
        let mut dense = Vec::with_capacity(3);
        for part in &self.experts[id] {
            let w = self.read_tensor(part.file, &part.weight, buf, before_chunk)?;
            let b = match &part.bias {
                Some(r) => Some(self.read_tensor(part.file, r, buf, before_chunk)?),
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
        before_chunk: &dyn Fn(),
    ) -> Result<Vec<f32>> {
        let path = &self.paths[file];
        let f = &self.files[file];
        let mut at = None;
        if let Some(d) = f
            .direct
            .as_ref()
            .filter(|_| f.direct_ok.load(Ordering::Relaxed))
        {
            match read_direct(d, r.offset, r.len, buf, before_chunk) {
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
            None => read_buffered(&f.buffered, r.offset, r.len, buf, before_chunk)
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

/// Reads `len` bytes at `offset` into `buf` in [`READ_CHUNK`] chunks, then drops the
/// range from the page cache.
fn read_buffered(
    f: &File,
    offset: usize,
    len: usize,
    buf: &mut Vec<u8>,
    before_chunk: &dyn Fn(),
) -> io::Result<()> {
    buf.resize(len, 0);
    read_chunks(f, buf, offset, len, before_chunk)?;
    drop_cached(f, offset as i64, len as i64);
    Ok(())
}

/// Reads `len` bytes at `offset` of a file opened with `O_DIRECT` into `buf`: the
/// aligned range around them, in [`READ_CHUNK`] chunks, into an aligned window of
/// `buf`. Returns where the bytes start in `buf`.
fn read_direct(
    f: &File,
    offset: usize,
    len: usize,
    buf: &mut Vec<u8>,
    before_chunk: &dyn Fn(),
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
        before_chunk,
    )?;
    Ok(pad + offset - start)
}

/// Reads at least `need` bytes of `window` from file offset `at` in chunks of up to
/// [`READ_CHUNK`] bytes (each up to the window's end, so an aligned window keeps direct
/// reads aligned), calling `before_chunk` before each; interrupted reads are retried.
fn read_chunks(
    f: &File,
    window: &mut [u8],
    at: usize,
    need: usize,
    before_chunk: &dyn Fn(),
) -> io::Result<()> {
    let mut done = 0;
    while done < need {
        before_chunk();
        let n = (window.len() - done).min(READ_CHUNK);
        match f.read_at(&mut window[done..done + n], (at + done) as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(got) => done += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
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

/// One finished load.
pub struct Loaded {
    pub id: usize,
    pub expert: Result<SwiGlu>,
    pub bytes: u64,
    /// From the read's start to its end (a prefetch's includes its pauses).
    pub read_time: Duration,
    /// Read as a demand read (never paused).
    pub demand: bool,
}

#[derive(Default)]
struct Queue {
    demand: VecDeque<usize>,
    /// Queued prefetches with their deadlines, in the order queued.
    prefetch: Vec<(u64, usize)>,
    closed: bool,
    /// Threads reading a prefetch now, and how many may.
    prefetching: usize,
    prefetch_threads: usize,
    /// Demand reads in flight (prefetches pause between chunks while there are any).
    demand_reading: usize,
    /// Reads running now, since when at least one has, and the finished reads and wall
    /// time with at least one running before that: the link's throughput.
    active: usize,
    busy_since: Option<Instant>,
    link: LinkUse,
}

/// The loader's use of the link so far: reads finished, and the wall time during which
/// at least one read ran (so `busy / reads` is the link's time per read, whatever
/// the reads' overlap).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkUse {
    pub reads: u64,
    pub busy: Duration,
    /// Reads running now (part of `busy` is theirs).
    pub active: usize,
}

/// Background threads that read experts from an [`ExpertStore`].
pub struct ExpertLoader {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    results: Receiver<Loaded>,
    threads: Vec<JoinHandle<()>>,
}

impl ExpertLoader {
    /// Starts `threads` loader threads over `store`. With `reserve_for_demand` (and two
    /// threads or more) one thread never reads a prefetch, so a demand read never waits
    /// for one to finish.
    pub fn start(
        store: Arc<ExpertStore>,
        threads: usize,
        reserve_for_demand: bool,
    ) -> ExpertLoader {
        let threads = threads.max(1);
        let queue = Arc::new((
            Mutex::new(Queue {
                prefetch_threads: if reserve_for_demand && threads > 1 {
                    threads - 1
                } else {
                    threads
                },
                ..Queue::default()
            }),
            Condvar::new(),
        ));
        let (tx, results) = channel();
        let threads = (0..threads)
            .map(|_| {
                let (queue, store, tx): (_, _, Sender<Loaded>) =
                    (queue.clone(), store.clone(), tx.clone());
                std::thread::spawn(move || worker(&queue, &store, &tx))
            })
            .collect();
        ExpertLoader {
            queue,
            results,
            threads,
        }
    }

    /// Queues a read of expert `id`: demand reads go before every queued prefetch, in
    /// the order queued; prefetches earliest `deadline` first (the order of the lookups
    /// that need them), queued order among equal deadlines.
    pub fn request(&self, id: usize, demand: bool, deadline: u64) {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        if demand {
            q.demand.push_back(id);
        } else {
            q.prefetch.push((deadline, id));
        }
        // A waiting thread may be the one kept for demand reads.
        cv.notify_all();
    }

    /// Moves a queued prefetch of `id` to the demand queue (no-op once its read started).
    pub fn promote(&self, id: usize) {
        let (lock, _) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        let before = q.prefetch.len();
        q.prefetch.retain(|&(_, x)| x != id);
        if q.prefetch.len() != before {
            q.demand.push_back(id);
            self.queue.1.notify_all();
        }
    }

    /// Removes a queued prefetch of `id` that has not started; whether it was queued.
    pub fn cancel(&self, id: usize) -> bool {
        let (lock, _) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        let before = q.prefetch.len();
        q.prefetch.retain(|&(_, x)| x != id);
        q.prefetch.len() != before
    }

    /// The next finished load, waiting for one.
    pub fn wait(&self) -> Option<Loaded> {
        self.results.recv().ok()
    }

    /// A finished load if one is ready.
    pub fn poll(&self) -> Option<Loaded> {
        self.results.try_recv().ok()
    }

    /// The link's use so far (reads finished, wall time with a read running).
    pub fn link_use(&self) -> LinkUse {
        let (lock, _) = &*self.queue;
        let q = lock.lock().expect("loader queue");
        let mut u = q.link;
        if let Some(t) = q.busy_since {
            u.busy += t.elapsed();
        }
        u.active = q.active;
        u
    }
}

impl Drop for ExpertLoader {
    fn drop(&mut self) {
        let (lock, cv) = &*self.queue;
        if let Ok(mut q) = lock.lock() {
            q.closed = true;
        }
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Queue {
    /// The queued prefetch with the earliest deadline (the first queued among equals).
    fn pop_prefetch(&mut self) -> Option<usize> {
        let (i, _) = self
            .prefetch
            .iter()
            .enumerate()
            .min_by_key(|&(i, &(deadline, _))| (deadline, i))?;
        Some(self.prefetch.remove(i).1)
    }

    fn read_started(&mut self) {
        if self.active == 0 {
            self.busy_since = Some(Instant::now());
        }
        self.active += 1;
    }

    fn read_done(&mut self) {
        self.active -= 1;
        self.link.reads += 1;
        if self.active == 0 {
            if let Some(t) = self.busy_since.take() {
                self.link.busy += t.elapsed();
            }
        }
    }
}

fn worker(queue: &(Mutex<Queue>, Condvar), store: &ExpertStore, tx: &Sender<Loaded>) {
    let mut buf = Vec::new();
    loop {
        let (id, demand) = {
            let (lock, cv) = queue;
            let mut q = lock.lock().expect("loader queue");
            loop {
                if q.closed {
                    return;
                }
                if let Some(id) = q.demand.pop_front() {
                    q.demand_reading += 1;
                    q.read_started();
                    break (id, true);
                }
                if q.prefetching < q.prefetch_threads {
                    if let Some(id) = q.pop_prefetch() {
                        q.prefetching += 1;
                        q.read_started();
                        break (id, false);
                    }
                }
                q = cv.wait(q).expect("loader queue");
            }
        };
        let t0 = Instant::now();
        let (lock, cv) = queue;
        let expert = if demand {
            store.read(id, &mut buf)
        } else {
            store.read_chunked(id, &mut buf, &|| {
                let mut q = lock.lock().expect("loader queue");
                while q.demand_reading > 0 && !q.closed {
                    q = cv.wait(q).expect("loader queue");
                }
            })
        };
        {
            let mut q = lock.lock().expect("loader queue");
            if demand {
                q.demand_reading -= 1;
            } else {
                q.prefetching -= 1;
            }
            q.read_done();
        }
        cv.notify_all();
        let loaded = Loaded {
            id,
            expert,
            bytes: store.expert_bytes(id),
            read_time: t0.elapsed(),
            demand,
        };
        if tx.send(loaded).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queued prefetches leave earliest deadline first, queued order among equals.
    #[test]
    fn prefetches_go_earliest_deadline_first() {
        let mut q = Queue::default();
        for (deadline, id) in [(5, 1), (2, 2), (2, 3), (9, 4), (0, 5)] {
            q.prefetch.push((deadline, id));
        }
        let order: Vec<usize> = std::iter::from_fn(|| q.pop_prefetch()).collect();
        assert_eq!(order, vec![5, 2, 3, 1, 4]);
    }

    /// A cancelled prefetch leaves the queue; one not queued (started, or never asked
    /// for) is not cancelled.
    #[test]
    fn cancelling_removes_only_a_queued_prefetch() {
        let loader = ExpertLoader {
            queue: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            results: channel().1,
            threads: Vec::new(),
        };
        loader.request(3, false, 1);
        loader.request(4, false, 2);
        loader.request(5, true, 0);
        assert!(loader.cancel(3));
        assert!(!loader.cancel(3), "already gone");
        assert!(!loader.cancel(5), "a demand read is never cancelled");
        let mut q = loader.queue.0.lock().unwrap();
        assert_eq!(q.pop_prefetch(), Some(4));
        assert_eq!(q.pop_prefetch(), None);
        assert_eq!(q.demand, VecDeque::from([5]));
    }

    /// The link counts as busy while any read runs, once however many overlap, and not
    /// while none does.
    #[test]
    fn the_link_is_busy_while_any_read_runs() {
        let ms = |n| std::thread::sleep(Duration::from_millis(n));
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.read_started();
        ms(10);
        q.read_started();
        ms(10);
        q.read_done();
        ms(10);
        q.read_done();
        ms(20);
        q.read_started();
        ms(5);
        q.read_done();
        let total = t0.elapsed();
        assert_eq!((q.link.reads, q.active), (3, 0));
        assert!(
            q.link.busy >= Duration::from_millis(35),
            "{:?}",
            q.link.busy
        );
        assert!(
            q.link.busy <= total - Duration::from_millis(20),
            "{:?} of {total:?}",
            q.link.busy
        );
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
        let chunks = std::cell::Cell::new(0);
        let count = || chunks.set(chunks.get() + 1);
        for (offset, len) in [
            (0, 10),
            (1, DIRECT_ALIGN),
            (4095, READ_CHUNK + 3),
            (READ_CHUNK - 17, 2 * READ_CHUNK),
            (size - 5000, 5000),
            (0, size),
        ] {
            read_buffered(&buffered, offset, len, &mut buf, &count).unwrap();
            assert_eq!(
                &buf[..len],
                &bytes[offset..offset + len],
                "buffered {offset}+{len}"
            );
            if let Some(d) = &direct {
                chunks.set(0);
                let at = read_direct(d, offset, len, &mut buf, &count).unwrap();
                assert_eq!(
                    &buf[at..at + len],
                    &bytes[offset..offset + len],
                    "direct {offset}+{len}"
                );
                assert!(chunks.get() >= len / READ_CHUNK, "a pause point per chunk");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
