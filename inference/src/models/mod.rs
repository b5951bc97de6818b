//! Architecture families, one file each, behind one [`MoeModel`].

pub mod deepseek;
pub mod gpt_oss;
pub mod llama_moe;

use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::layers::KvCache;
use crate::routing::RoutingObserver;

/// The `config.json` fields read before the architecture is known.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    /// Quantised checkpoints (FP8, MXFP4, GPTQ, ...) are refused by this field's name.
    #[serde(default)]
    quantization_config: Option<serde_json::Value>,
    /// The MLPs' activation: every architecture here but GPT-OSS (whose activation is
    /// its own) reads it, and runs SiLU only.
    #[serde(default)]
    hidden_act: Option<String>,
}

impl Probe {
    /// Fields every family reads the same way that the runtime cannot honour.
    fn refusal(&self, model_type: &str) -> Option<String> {
        if let Some(q) = &self.quantization_config {
            let method = q["quant_method"].as_str().unwrap_or("unknown");
            return Some(format!(
                "quantization_config (quant_method {method}) is not supported: moecast runs f32, f16 and bf16 checkpoints"
            ));
        }
        match self.hidden_act.as_deref() {
            // transformers' ACT2FN maps "swish" to SiLU too.
            Some(act) if act != "silu" && act != "swish" && model_type != "gpt_oss" => Some(
                format!("hidden_act '{act}' is not supported (the MLPs run silu)"),
            ),
            _ => None,
        }
    }
}

/// Architectures the runtime loads, as (`model_type`, `architectures[0]`).
pub const SUPPORTED: &[(&str, &str)] = &[
    ("mixtral", "MixtralForCausalLM"),
    ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("olmoe", "OlmoeForCausalLM"),
    ("deepseek_v2", "DeepseekV2ForCausalLM"),
    ("deepseek_v3", "DeepseekV3ForCausalLM"),
    ("gpt_oss", "GptOssForCausalLM"),
];

/// A loaded MoE language model of any supported architecture.
#[derive(Debug, Clone)]
pub enum MoeModel {
    /// Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.
    LlamaMoe(llama_moe::Model),
    /// DeepSeek-V2 and DeepSeek-V3.
    Deepseek(deepseek::Model),
    /// GPT-OSS.
    GptOss(gpt_oss::Model),
}

/// The weights the logit lens reads (see `offload::gate::NextTokenGate`).
pub struct LensParts<'a> {
    pub embed: &'a Tensor<2>,
    pub final_norm: &'a crate::layers::RmsNorm,
    pub lm_head: &'a crate::layers::Dense,
    /// Each MoE layer's router norm (the router reads its output), in layer order.
    pub router_norms: Vec<&'a crate::layers::RmsNorm>,
    /// The first MoE block (none in a model without one).
    pub first_moe: Option<&'a crate::moe::SparseMoe>,
}

impl<'a> LensParts<'a> {
    /// From a model's embedding, final norm and LM head, and per decoder layer its
    /// pre-MoE norm and MoE block (none for a dense layer).
    pub fn new(
        embed: &'a Tensor<2>,
        final_norm: &'a crate::layers::RmsNorm,
        lm_head: &'a crate::layers::Dense,
        layers: impl Iterator<
            Item = (
                &'a crate::layers::RmsNorm,
                Option<&'a crate::moe::SparseMoe>,
            ),
        >,
    ) -> Self {
        let moe: Vec<_> = layers
            .filter_map(|(norm, moe)| moe.map(|moe| (norm, moe)))
            .collect();
        LensParts {
            embed,
            final_norm,
            lm_head,
            router_norms: moe.iter().map(|&(n, _)| n).collect(),
            first_moe: moe.first().map(|&(_, moe)| moe),
        }
    }
}

/// Shape facts every caller needs (trace meta, cache sizing).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub model_type: String,
    pub n_layers: usize,
    pub moe_layers: Vec<usize>,
    pub n_experts: usize,
    pub top_k: usize,
    pub n_shared_experts: usize,
    pub vocab_size: usize,
    /// Residual width: the length of each MoE layer's router input.
    pub hidden_size: usize,
}

impl ModelShape {
    /// Model layer index -> MoE index (position in `moe_layers`).
    pub fn moe_index(&self) -> std::collections::HashMap<usize, usize> {
        self.moe_layers
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i))
            .collect()
    }
}

impl MoeModel {
    /// Loads the checkpoint in `dir` onto `device`.
    pub fn load(ck: &Checkpoint, device: &Device) -> Result<MoeModel> {
        let probe: Probe = ck.config()?;
        let model_type = probe
            .model_type
            .clone()
            .or_else(|| {
                probe.architectures.first().and_then(|a| {
                    SUPPORTED
                        .iter()
                        .find(|(_, arch)| arch == a)
                        .map(|(mt, _)| mt.to_string())
                })
            })
            .ok_or_else(|| {
                ModelError::file(
                    &ck.config_path(),
                    "config has neither model_type nor a known architectures entry",
                )
            })?;
        if let Some(msg) = probe.refusal(&model_type) {
            return Err(ModelError::file(&ck.config_path(), msg));
        }
        match model_type.as_str() {
            "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" => Ok(MoeModel::LlamaMoe(
                llama_moe::Model::load(ck, ck.config()?, device)?,
            )),
            "deepseek_v2" | "deepseek_v3" => Ok(MoeModel::Deepseek(deepseek::Model::load(
                ck,
                ck.config()?,
                device,
            )?)),
            "gpt_oss" => Ok(MoeModel::GptOss(gpt_oss::Model::load(
                ck,
                ck.config()?,
                device,
            )?)),
            other => {
                let names: Vec<&str> = SUPPORTED.iter().map(|(_, a)| *a).collect();
                Err(ModelError::file(
                    &ck.config_path(),
                    format!(
                        "architecture '{other}' is not supported (supported: {})",
                        names.join(", ")
                    ),
                ))
            }
        }
    }

    /// The model's shape.
    pub fn shape(&self) -> ModelShape {
        match self {
            MoeModel::LlamaMoe(m) => ModelShape {
                model_type: m.config.model_type.clone(),
                n_layers: m.config.num_hidden_layers,
                moe_layers: m.stack.moe_layers(),
                n_experts: m.config.n_experts(),
                top_k: m.config.num_experts_per_tok,
                n_shared_experts: usize::from(m.config.shared_expert_size().is_some()),
                vocab_size: m.config.vocab_size,
                hidden_size: m.config.hidden_size,
            },
            MoeModel::Deepseek(m) => ModelShape {
                model_type: m.config.model_type.clone(),
                n_layers: m.config.num_hidden_layers,
                moe_layers: m.stack.moe_layers(),
                n_experts: m.config.n_routed_experts,
                top_k: m.config.num_experts_per_tok,
                n_shared_experts: m.config.shared_experts(m.variant),
                vocab_size: m.config.vocab_size,
                hidden_size: m.config.hidden_size,
            },
            MoeModel::GptOss(m) => ModelShape {
                model_type: m.config.model_type.clone(),
                n_layers: m.config.num_hidden_layers,
                moe_layers: m.stack.moe_layers(),
                n_experts: m.config.num_local_experts,
                top_k: m.config.num_experts_per_tok,
                n_shared_experts: 0,
                vocab_size: m.config.vocab_size,
                hidden_size: m.config.hidden_size,
            },
        }
    }

    /// Runs `tokens` after what `cache` holds; logits `[T, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        let vocab = self.shape().vocab_size;
        if tokens.is_empty() {
            return Err(ModelError::Input("empty input".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {t} is not below vocab_size = {vocab}"
            )));
        }
        observer.on_forward(cache.len(), tokens);
        let logits = match self {
            MoeModel::LlamaMoe(m) => m.forward(tokens, cache, observer),
            MoeModel::Deepseek(m) => m.forward(tokens, cache, observer),
            MoeModel::GptOss(m) => m.forward(tokens, cache, observer),
        };
        // The observer hears the forward end even when it failed.
        let done = observer.on_forward_done();
        let logits = logits?;
        done?;
        Ok(logits)
    }

    /// The sparse MoE blocks, in layer order (an offloading runtime drops their experts).
    pub fn sparse_layers_mut(&mut self) -> Vec<&mut crate::moe::SparseMoe> {
        match self {
            MoeModel::LlamaMoe(m) => m.stack.sparse_layers_mut(),
            MoeModel::Deepseek(m) => m.stack.sparse_layers_mut(),
            MoeModel::GptOss(m) => m.stack.sparse_layers_mut(),
        }
    }

    /// The embedding, final norm, LM head and router norms.
    pub fn lens_parts(&self) -> LensParts<'_> {
        match self {
            MoeModel::LlamaMoe(m) => m.stack.lens_parts(),
            MoeModel::Deepseek(m) => m.stack.lens_parts(),
            MoeModel::GptOss(m) => m.stack.lens_parts(),
        }
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.shape().n_layers)
    }
}
