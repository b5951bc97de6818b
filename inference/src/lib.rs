//! MoE runtime and expert cache. Filled by the runtime and cache issues.
