//! Routing traces of Mixture-of-Experts models: which experts the router picked, per
//! token and MoE layer. Holds the data model ([`RoutingTrace`], [`TraceMeta`]), the two
//! storage forms (Parquet for interchange, a memory-mapped binary file for speed), the
//! interchange JSONL, importers for the formats real engines emit, and trace statistics.

pub mod binary;
mod builder;
pub mod channel;
pub mod dataset;
pub mod error;
pub mod examples;
pub mod import;
pub mod jsonl;
mod meta;
pub mod parquet;
pub mod plot;
mod record;
pub mod stats;
pub mod store;
pub mod synth;
pub mod trace;

pub use binary::MappedTrace;
pub use channel::{Channel, ChannelDtype, ChannelSlice, ChannelValues};
pub use dataset::{DatasetWriter, TraceDataset};
pub use error::{Result, TraceError};
pub use store::{load_trace, open_trace, save_trace, OpenedTrace, TraceFormat};
pub use trace::{
    Phase, RoutingTrace, TokenRecord, TraceBuilder, TraceMeta, TraceView, NOT_COMPUTED,
    UNKNOWN_TOKEN,
};
