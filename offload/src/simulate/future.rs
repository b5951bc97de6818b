//! Belady's knowledge: when each expert is used next.

use datasets::TraceView;

/// For Belady: the access positions of every expert, and a cursor per expert.
pub(super) struct FutureUses {
    positions: Vec<Vec<u64>>,
    cursor: Vec<usize>,
}

impl FutureUses {
    pub(super) fn new(
        view: &TraceView<'_>,
        tokens: &[std::ops::Range<usize>],
        n_ids: usize,
    ) -> Self {
        let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
        let mut positions = vec![Vec::new(); n_ids];
        let mut n = 0u64;
        for r in tokens {
            for t in r.clone() {
                for l in 0..m {
                    if let Some(ids) = view.layer(t, l) {
                        for &x in ids {
                            positions[l * e + x as usize].push(n);
                            n += 1;
                        }
                    }
                }
            }
        }
        FutureUses {
            positions,
            cursor: vec![0; n_ids],
        }
    }

    /// Consumes the current use of `id`; returns its next use.
    pub(super) fn advance(&mut self, id: usize) -> u64 {
        self.cursor[id] += 1;
        self.next(id)
    }

    pub(super) fn next(&self, id: usize) -> u64 {
        self.positions[id]
            .get(self.cursor[id])
            .copied()
            .unwrap_or(u64::MAX)
    }
}
