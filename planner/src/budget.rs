//! How many forecast experts a prefetcher reads: a fixed number per layer, or what the
//! planner judges worth a read.

/// How many of a forecaster's experts are read: the best `n` of every forecast layer at
/// every moment, or what the planner judges worth a read (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchBudget {
    Auto,
    PerLayer(usize),
}

impl std::str::FromStr for PrefetchBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PrefetchBudget::Auto),
            n => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .map(PrefetchBudget::PerLayer)
                .ok_or_else(|| format!("bad prefetch budget '{s}' (auto or a positive number)")),
        }
    }
}

impl std::fmt::Display for PrefetchBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefetchBudget::Auto => f.write_str("auto"),
            PrefetchBudget::PerLayer(n) => write!(f, "{n}"),
        }
    }
}
