//! The loader: background threads that read experts from an [`ExpertStore`]. Demand
//! reads go ahead of queued prefetches (which go earliest deadline first, as the
//! simulator's link sends them); a prefetch already reading pauses between chunks of
//! [`READ_CHUNK`] bytes while a demand read is in flight, so a demand read shares the
//! device with at most one chunk per prefetch thread (the simulator's link model), and a
//! prefetch told to stop (its layer routed without it) stops at its next chunk, as the
//! simulator's link does. A prefetch a lookup waits for ([`ExpertLoader::promote`])
//! reads on as a demand read.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use inference::error::Result;
use inference::layers::SwiGlu;

use super::store::{ExpertStore, READ_CHUNK};

/// One finished load.
pub struct Loaded {
    pub id: usize,
    pub expert: Result<SwiGlu>,
    pub bytes: u64,
    /// From the read's start to its end (a prefetch's includes its pauses).
    pub read_time: Duration,
    /// Read as a demand read (never paused).
    pub demand: bool,
    /// Stopped between chunks ([`ExpertLoader::stop`]): `expert` is an error and `bytes`
    /// the whole chunks read (about what was read).
    pub stopped: bool,
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
    /// Demand reads in flight, hurried prefetches among them (prefetches pause between
    /// chunks while there are any).
    demand_reading: usize,
    /// Prefetches being read that a lookup now waits for (serials): they read on as
    /// demand reads do.
    hurried: HashSet<u64>,
    /// Prefetches being read (serial, id), the serial of the next, and those to stop
    /// at their next chunk.
    reading: Vec<(u64, usize)>,
    serial: u64,
    stop: HashSet<u64>,
    /// Reads running now, since when at least one has, and the finished reads and wall
    /// time with at least one running before that: the link's throughput.
    active: usize,
    busy_since: Option<Instant>,
    link: LinkUse,
}

/// The loader's use of the link so far: reads finished (a stopped one counts its share
/// read), and the wall time during which at least one read ran (so `busy / reads` is
/// the link's time per read, whatever the reads' overlap).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkUse {
    pub reads: f64,
    pub busy: Duration,
    /// Reads running now (part of `busy` is theirs).
    pub active: usize,
}

/// Background threads that read experts from an [`ExpertStore`].
pub struct ExpertLoader {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    results: Receiver<Loaded>,
    threads: Vec<JoinHandle<()>>,
    /// Threads that may read a prefetch at once (fixed at the start).
    prefetch_threads: usize,
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
        let prefetch_threads = prefetch_threads(threads, reserve_for_demand);
        let queue = Arc::new((
            Mutex::new(Queue {
                prefetch_threads,
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
            prefetch_threads,
        }
    }

    /// Threads that may read a prefetch at once.
    pub fn prefetch_threads(&self) -> usize {
        self.prefetch_threads
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

    /// A lookup waits for `id`: a queued prefetch of it moves to the demand queue, and
    /// one being read reads on as a demand read (it no longer pauses for demand reads,
    /// and the other prefetches pause for it).
    pub fn promote(&self, id: usize) {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        q.promote(id);
        cv.notify_all();
    }

    /// Stops a prefetch of `id` that is being read at its next chunk (it arrives
    /// [`Loaded::stopped`], unless it finishes first); whether one was being read.
    pub fn stop(&self, id: usize) -> bool {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        let serials = q.reading_serials(id);
        q.stop.extend(&serials);
        // A prefetch paused for demand reads wakes to stop.
        cv.notify_all();
        !serials.is_empty()
    }

    /// Removes a queued prefetch of `id` that has not started; whether it was queued.
    pub fn cancel(&self, id: usize) -> bool {
        let (lock, _) = &*self.queue;
        let mut q = lock.lock().expect("loader queue");
        let before = q.prefetch.len();
        q.prefetch.retain(|&(_, x)| x != id);
        q.prefetch.len() != before
    }

    /// The experts whose reads are queued and not started (demand reads and
    /// prefetches).
    pub fn queued(&self) -> HashSet<usize> {
        let (lock, _) = &*self.queue;
        let q = lock.lock().expect("loader queue");
        q.demand
            .iter()
            .copied()
            .chain(q.prefetch.iter().map(|&(_, id)| id))
            .collect()
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
    /// [`ExpertLoader::promote`].
    fn promote(&mut self, id: usize) {
        let before = self.prefetch.len();
        self.prefetch.retain(|&(_, x)| x != id);
        if self.prefetch.len() != before {
            self.demand.push_back(id);
        }
        for serial in self.reading_serials(id) {
            if self.hurried.insert(serial) {
                self.demand_reading += 1;
            }
        }
    }

    /// The serials of the prefetches of `id` being read.
    fn reading_serials(&self, id: usize) -> Vec<u64> {
        self.reading
            .iter()
            .filter(|&&(_, x)| x == id)
            .map(|&(s, _)| s)
            .collect()
    }

    /// Whether the prefetch `serial` reads its next chunk now (no demand read in flight,
    /// or it is hurried).
    fn prefetch_may_read(&self, serial: u64) -> bool {
        self.closed || self.demand_reading == 0 || self.hurried.contains(&serial)
    }

    /// The next read a free thread starts, marked started: a demand read first, else
    /// the earliest-deadline prefetch while fewer than `prefetch_threads` read one.
    /// `(id, demand, serial)`; `None`: nothing this thread may read now.
    fn take(&mut self) -> Option<(usize, bool, u64)> {
        if let Some(id) = self.demand.pop_front() {
            self.demand_reading += 1;
            self.read_started();
            return Some((id, true, 0));
        }
        if self.prefetching >= self.prefetch_threads {
            return None;
        }
        let id = self.pop_prefetch()?;
        self.prefetching += 1;
        self.read_started();
        let serial = self.serial;
        self.serial += 1;
        self.reading.push((serial, id));
        Some((id, false, serial))
    }

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

    /// A read ended, `share` of it read.
    fn read_done(&mut self, share: f64) {
        self.active -= 1;
        self.link.reads += share;
        if self.active == 0 {
            if let Some(t) = self.busy_since.take() {
                self.link.busy += t.elapsed();
            }
        }
    }
}

/// Threads of `threads` that may read a prefetch: all, or with `reserve_for_demand` (and
/// two threads or more) all but one, which then never waits behind a prefetch.
fn prefetch_threads(threads: usize, reserve_for_demand: bool) -> usize {
    let threads = threads.max(1);
    if reserve_for_demand && threads > 1 {
        threads - 1
    } else {
        threads
    }
}

fn worker(queue: &(Mutex<Queue>, Condvar), store: &ExpertStore, tx: &Sender<Loaded>) {
    let mut buf = Vec::new();
    loop {
        let (id, demand, serial) = {
            let (lock, cv) = queue;
            let mut q = lock.lock().expect("loader queue");
            loop {
                if q.closed {
                    return;
                }
                if let Some(read) = q.take() {
                    break read;
                }
                q = cv.wait(q).expect("loader queue");
            }
        };
        let t0 = Instant::now();
        let (lock, cv) = queue;
        // Atomics: `before_chunk` must be `Sync` (a demand read's streams share it); a
        // prefetch reads on one stream.
        let chunks = AtomicUsize::new(0);
        let stopped = AtomicBool::new(false);
        let expert = if demand {
            store.read(id, &mut buf)
        } else {
            store.read_chunked(id, &mut buf, 1, &|| {
                let mut q = lock.lock().expect("loader queue");
                loop {
                    if q.stop.remove(&serial) {
                        stopped.store(true, Ordering::Relaxed);
                        return false;
                    }
                    if q.prefetch_may_read(serial) {
                        chunks.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    q = cv.wait(q).expect("loader queue");
                }
            })
        };
        let total = store.expert_bytes(id);
        let stopped = stopped.load(Ordering::Relaxed);
        let bytes = if stopped {
            (chunks.load(Ordering::Relaxed) * READ_CHUNK).min(total as usize) as u64
        } else {
            total
        };
        {
            let mut q = lock.lock().expect("loader queue");
            if demand {
                q.demand_reading -= 1;
            } else {
                q.prefetching -= 1;
                q.reading.retain(|&(s, _)| s != serial);
                q.stop.remove(&serial);
                if q.hurried.remove(&serial) {
                    q.demand_reading -= 1;
                }
            }
            q.read_done(bytes as f64 / total.max(1) as f64);
        }
        cv.notify_all();
        let loaded = Loaded {
            id,
            expert,
            bytes,
            read_time: t0.elapsed(),
            demand,
            stopped,
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

    /// With a thread kept for demand reads, the default three threads read two
    /// prefetches at once; a demand read still starts while they do.
    #[test]
    fn two_prefetches_read_side_by_side_and_a_demand_read_still_starts() {
        assert_eq!(prefetch_threads(3, true), 2);
        assert_eq!(prefetch_threads(3, false), 3);
        assert_eq!(prefetch_threads(1, true), 1, "one thread reads everything");
        assert_eq!(prefetch_threads(0, false), 1);
        let mut q = Queue {
            prefetch_threads: prefetch_threads(3, true),
            ..Queue::default()
        };
        for (deadline, id) in [(3, 10), (1, 11), (2, 12)] {
            q.prefetch.push((deadline, id));
        }
        assert_eq!(q.take(), Some((11, false, 0)));
        assert_eq!(q.take(), Some((12, false, 1)));
        assert_eq!(q.take(), None, "both prefetch threads are reading");
        q.demand.push_back(20);
        assert_eq!(q.take(), Some((20, true, 0)));
        assert_eq!((q.prefetching, q.demand_reading, q.active), (2, 1, 3));
        assert_eq!(q.reading, vec![(0, 11), (1, 12)]);
    }

    /// A lookup waiting for a prefetch being read hurries it: it reads on while a demand
    /// read runs, and the other prefetch pauses for it; a queued one becomes a demand
    /// read.
    #[test]
    fn a_prefetch_a_lookup_waits_for_reads_as_a_demand_read() {
        let mut q = Queue {
            prefetch_threads: 2,
            ..Queue::default()
        };
        for (deadline, id) in [(1, 10), (2, 11), (3, 12)] {
            q.prefetch.push((deadline, id));
        }
        assert_eq!(q.take(), Some((10, false, 0)));
        assert_eq!(q.take(), Some((11, false, 1)));
        assert!(q.prefetch_may_read(0) && q.prefetch_may_read(1));
        q.demand.push_back(20);
        assert_eq!(q.take(), Some((20, true, 0)));
        assert!(!q.prefetch_may_read(0) && !q.prefetch_may_read(1));
        q.promote(10);
        assert!(q.prefetch_may_read(0), "the lookup waits for it");
        assert!(!q.prefetch_may_read(1));
        assert_eq!(q.demand_reading, 2);
        q.promote(10);
        assert_eq!(q.demand_reading, 2, "hurried once");
        q.promote(12);
        assert_eq!(q.demand, VecDeque::from([12]));
        assert!(q.prefetch.is_empty());
    }

    /// A loader without threads: its queue only.
    fn idle_loader() -> ExpertLoader {
        ExpertLoader {
            queue: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            results: channel().1,
            threads: Vec::new(),
            prefetch_threads: 1,
        }
    }

    /// A cancelled prefetch leaves the queue; one not queued (started, or never asked
    /// for) is not cancelled.
    #[test]
    fn cancelling_removes_only_a_queued_prefetch() {
        let loader = idle_loader();
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

    /// Only a prefetch being read can be stopped (at its next chunk).
    #[test]
    fn only_a_started_prefetch_can_be_stopped() {
        let loader = idle_loader();
        loader.queue.0.lock().unwrap().reading.push((7, 3));
        loader.request(4, false, 1);
        assert!(loader.stop(3));
        assert!(!loader.stop(4), "queued, not started: cancel it instead");
        assert_eq!(loader.queue.0.lock().unwrap().stop, HashSet::from([7u64]));
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
        q.read_done(1.0);
        ms(10);
        q.read_done(1.0);
        ms(20);
        q.read_started();
        ms(5);
        q.read_done(0.5);
        let total = t0.elapsed();
        assert_eq!((q.link.reads, q.active), (2.5, 0));
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
}
