//! Trace collection from MoE models. Filled by the collector issue.
