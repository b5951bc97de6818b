//! Writing the trained model as a Hugging Face Qwen3-MoE checkpoint: `config.json`,
//! `model.safetensors` (bf16, published tensor names, `[out, in]` linear weights),
//! `tokenizer.json`, `tokenizer_config.json`, and `training.json` with the run's numbers.
//! Files are written into a temporary folder inside `OUT` and renamed into place.

use std::fs;
use std::path::Path;

use burn::module::Param;
use burn::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use serde_json::json;

use super::data::{Batch, TokenData, EOS};
use super::model::TinyMoe;
use super::state::{TrainState, ValPoint};
use super::train::{Eval, TrainOptions};
use super::TinyMoeConfig;
use crate::error::{Result, TinyMoeError};
use inference::layers::to_vec;

/// `training.json`: how the run went.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingReport {
    /// Optimizer steps.
    pub steps: usize,
    /// Training wall time over all sessions, seconds.
    pub wall_time_s: f64,
    /// Mean seconds per step.
    pub seconds_per_step: f64,
    /// Training tokens seen.
    pub tokens_seen: u64,
    /// Mean training cross-entropy of the last (up to 50) steps.
    pub final_train_loss: f64,
    /// `exp(final_train_loss)`.
    pub final_train_perplexity: f64,
    /// Validation cross-entropy at the end.
    pub final_val_loss: f64,
    /// `exp(final_val_loss)`.
    pub final_val_perplexity: f64,
    /// Perplexity on the same validation targets of a unigram model of the training
    /// split (add-one smoothing).
    pub unigram_val_perplexity: f64,
    /// Validation target tokens evaluated.
    pub val_tokens_evaluated: usize,
    /// Tokens in the training stream.
    pub train_stream_tokens: usize,
    /// Tokens in the validation stream.
    pub val_stream_tokens: usize,
    /// Per layer, each expert's share of the routed slots on the validation tokens.
    pub expert_usage: Vec<Vec<f64>>,
    /// The model shape.
    pub model: TinyMoeConfig,
    /// Trainable parameters.
    pub n_params: usize,
    /// Seed of initialisation, split and batches.
    pub seed: u64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a share of the peak.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm limit (0: none).
    pub grad_clip: f64,
    /// Weight of the load-balancing loss.
    pub aux_loss_coef: f64,
    /// Held-out share of the documents.
    pub val_fraction: f64,
    /// Corpus files.
    pub corpus: Vec<String>,
    /// Validation history.
    pub history: Vec<ValPoint>,
}

impl TrainingReport {
    /// Gathers the report of a finished run.
    pub fn new(
        opts: &TrainOptions,
        st: &TrainState,
        eval: &Eval,
        unigram_ppl: f64,
        data: &TokenData,
        val_batches: &[Batch],
    ) -> TrainingReport {
        let recent = &st.recent_losses;
        let train_loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        TrainingReport {
            steps: st.step,
            wall_time_s: st.elapsed_s,
            seconds_per_step: st.elapsed_s / st.step.max(1) as f64,
            tokens_seen: st.tokens_seen,
            final_train_loss: train_loss,
            final_train_perplexity: train_loss.exp(),
            final_val_loss: eval.loss,
            final_val_perplexity: eval.loss.exp(),
            unigram_val_perplexity: unigram_ppl,
            val_tokens_evaluated: val_batches.iter().map(|b| b.targets.len()).sum(),
            train_stream_tokens: data.train.len(),
            val_stream_tokens: data.valid.len(),
            expert_usage: eval.usage.clone(),
            model: opts.model.clone(),
            n_params: opts.model.n_params(),
            seed: opts.seed,
            batch_size: opts.batch_size,
            lr: opts.lr,
            min_lr_ratio: opts.min_lr_ratio,
            warmup_steps: opts.warmup_steps,
            weight_decay: opts.weight_decay,
            grad_clip: opts.grad_clip,
            aux_loss_coef: opts.aux_loss_coef,
            val_fraction: opts.val_fraction,
            corpus: opts
                .corpus
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            history: st.history.clone(),
        }
    }
}

/// The `config.json` of a Qwen3-MoE checkpoint of shape `c`.
pub fn hf_config(c: &TinyMoeConfig, eos: u32, aux_coef: f64) -> serde_json::Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.moe_intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.context,
        "initializer_range": 0.02,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.top_k,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": false,
        "router_aux_loss_coef": aux_coef,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": c.num_layers,
        "use_cache": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0"
    })
}

/// Named tensors of `model` in the Hugging Face layout, f32 row-major with their shapes.
pub fn hf_tensors(model: &TinyMoe) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fn lin(name: String, p: &Param<Tensor<2>>) -> (String, Vec<usize>, Vec<f32>) {
        let t = p.val().transpose();
        let shape = t.dims().to_vec();
        (name, shape, to_vec(t))
    }
    fn vec1(name: String, p: &Param<Tensor<1>>) -> (String, Vec<usize>, Vec<f32>) {
        let t = p.val();
        (name, t.dims().to_vec(), to_vec(t))
    }
    let mut out = Vec::new();
    let emb = model.embed.val();
    out.push((
        "model.embed_tokens.weight".to_string(),
        emb.dims().to_vec(),
        to_vec(emb),
    ));
    for (l, b) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.push(vec1(format!("{p}.input_layernorm.weight"), &b.input_norm));
        out.push(vec1(
            format!("{p}.post_attention_layernorm.weight"),
            &b.post_norm,
        ));
        let a = format!("{p}.self_attn");
        out.push(lin(format!("{a}.q_proj.weight"), &b.q));
        out.push(lin(format!("{a}.k_proj.weight"), &b.k));
        out.push(lin(format!("{a}.v_proj.weight"), &b.v));
        out.push(lin(format!("{a}.o_proj.weight"), &b.o));
        out.push(vec1(format!("{a}.q_norm.weight"), &b.q_norm));
        out.push(vec1(format!("{a}.k_norm.weight"), &b.k_norm));
        out.push(lin(format!("{p}.mlp.gate.weight"), &b.router));
        for (e, x) in b.experts.iter().enumerate() {
            let m = format!("{p}.mlp.experts.{e}");
            out.push(lin(format!("{m}.gate_proj.weight"), &x.gate));
            out.push(lin(format!("{m}.up_proj.weight"), &x.up));
            out.push(lin(format!("{m}.down_proj.weight"), &x.down));
        }
    }
    out.push(vec1("model.norm.weight".to_string(), &model.norm));
    if let Some(head) = &model.lm_head {
        out.push(lin("lm_head.weight".to_string(), head));
    }
    out
}

/// `model.safetensors` bytes: every tensor in bf16.
pub fn safetensors_bytes(model: &TinyMoe) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = hf_tensors(model)
        .into_iter()
        .map(|(name, shape, v)| {
            let bytes = v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::BF16, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TinyMoeError::input(format!("safetensors view: {e:?}")))?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| TinyMoeError::input(format!("safetensors serialisation: {e:?}")))
}

/// Writes the Hugging Face checkpoint and `training.json` into `out`: every file goes to
/// `out/.export-tmp/` first and is then renamed into `out` (`training.json` last).
pub fn write_checkpoint(
    out: &Path,
    model: &TinyMoe,
    tokenizer_json: &str,
    eos: u32,
    report: &TrainingReport,
) -> Result<()> {
    let tmp = out.join(".export-tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TinyMoeError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TinyMoeError::io(&tmp, e))?;
    let c = &model.config;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json");
    let tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": null,
        "add_bos_token": false,
        "model_max_length": c.context,
        "clean_up_tokenization_spaces": false
    });
    let report_json = serde_json::to_string_pretty(report).expect("report serialises");
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "config.json",
            pretty(&hf_config(c, eos, report.aux_loss_coef)).into_bytes(),
        ),
        ("model.safetensors", safetensors_bytes(model)?),
        ("tokenizer.json", tokenizer_json.as_bytes().to_vec()),
        ("tokenizer_config.json", pretty(&tok_config).into_bytes()),
        ("training.json", report_json.into_bytes()),
    ];
    for (name, bytes) in &files {
        let p = tmp.join(name);
        fs::write(&p, bytes).map_err(|e| TinyMoeError::io(&p, e))?;
        fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| TinyMoeError::io(&p, e))?;
    }
    for (name, _) in &files {
        let dst = out.join(name);
        fs::rename(tmp.join(name), &dst).map_err(|e| TinyMoeError::io(&dst, e))?;
    }
    fs::remove_dir(&tmp).map_err(|e| TinyMoeError::io(&tmp, e))
}
