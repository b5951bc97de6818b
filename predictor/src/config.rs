//! The predictor's shape and the forecasting task it is trained for.

use burn::config::Config;
use burn::module::Module;
use datasets::examples::RoutingShape;
use serde::{Deserialize, Serialize};

/// What the predictor forecasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Every MoE layer of token `t`, from the ids of tokens `<= t` and the routing of
    /// tokens `< t`.
    NextToken,
    /// Layers `l+1 ..= l+D` of token `t`, additionally given its layers `0..=l`.
    Lookahead,
}

impl Task {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::NextToken => "next-token",
            Task::Lookahead => "lookahead",
        }
    }

    /// The queries this task asks, as (known layers of the current token, layers to
    /// predict after them) pairs.
    pub fn queries(self, n_moe: usize, horizon: usize) -> Vec<Query> {
        match self {
            Task::NextToken => vec![Query {
                known: 0,
                horizon: n_moe,
            }],
            Task::Lookahead => (1..n_moe)
                .map(|known| Query {
                    known,
                    horizon: horizon.min(n_moe - known),
                })
                .collect(),
        }
    }

    /// Whether this task's queries can read `features`: the next-token forecast knows
    /// none of the token's routed layers, so only lookahead reads router inputs.
    pub fn check_features(self, features: Features) -> Result<(), String> {
        if self == Task::NextToken && features != Features::Ids {
            return Err(format!(
                "--features {} is what a lookahead query reads about the token's routed layers, and --task next-token has none; use --task lookahead (it also answers the next-token forecast) or --features ids",
                features.as_str()
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "next-token" => Ok(Task::NextToken),
            "lookahead" => Ok(Task::Lookahead),
            other => Err(format!("unknown task '{other}' (next-token, lookahead)")),
        }
    }
}

/// What a lookahead query reads about the current token's layers already routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Features {
    /// Their expert ids.
    Ids,
    /// The last routed layer's router input (the hidden state its gate read).
    Hidden,
    /// Both.
    IdsHidden,
}

impl Features {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Features::Ids => "ids",
            Features::Hidden => "hidden",
            Features::IdsHidden => "ids+hidden",
        }
    }

    /// Whether the known layers' expert ids are read.
    pub fn ids(self) -> bool {
        self != Features::Hidden
    }

    /// Whether router inputs are read.
    pub fn hidden(self) -> bool {
        self != Features::Ids
    }
}

impl std::str::FromStr for Features {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ids" => Ok(Features::Ids),
            "hidden" => Ok(Features::Hidden),
            "ids+hidden" => Ok(Features::IdsHidden),
            other => Err(format!(
                "unknown features '{other}' (ids, hidden, ids+hidden)"
            )),
        }
    }
}

/// One forecast: the first `known` MoE layers of the current token are given, layers
/// `known .. known + horizon` are predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub known: usize,
    pub horizon: usize,
}

/// Shape of the predictor transformer and what it is built for.
#[derive(Config, Debug, PartialEq)]
pub struct PredictorConfig {
    /// Routing shape of the traces (MoE layers, experts, top-k).
    pub routing: RoutingShape,
    /// The task.
    pub task: Task,
    /// Layers predicted ahead for [`Task::Lookahead`].
    #[config(default = 3)]
    pub horizon: usize,
    /// Residual width.
    #[config(default = 128)]
    pub d_model: usize,
    /// Transformer blocks.
    #[config(default = 3)]
    pub n_layers: usize,
    /// Attention heads (divides `d_model`).
    #[config(default = 4)]
    pub n_heads: usize,
    /// Feed-forward width as a multiple of `d_model`.
    #[config(default = 4)]
    pub ffn_mult: usize,
    /// Tokens of context (the training window and the serving attention window).
    #[config(default = 128)]
    pub context: usize,
    /// Token-id embedding rows (ids are folded modulo this; one more row for unknown).
    #[config(default = 8192)]
    pub token_buckets: usize,
    /// Dropout probability during training (off by default: it costs a fifth of the
    /// step time on CPU, where Burn draws its masks with a serial generator).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// What lookahead queries read about the current token's routed layers.
    #[config(default = "Features::Ids")]
    pub features: Features,
    /// Width of the traces' router inputs (needed when `features` reads them).
    #[config(default = 0)]
    pub router_input_dim: usize,
    /// Hidden width of the router-input map (`router_input_dim -> hidden_width -> d`).
    #[config(default = 512)]
    pub hidden_width: usize,
    /// Probability that training hides a position's token id (the unknown embedding
    /// row takes its place). Above 0 the predictor also forecasts a token whose id is
    /// not sampled yet, which the runtime asks after the previous token's last layer.
    #[config(default = 0.0)]
    pub token_dropout: f64,
    /// Add the count prior (the token table's, and for lookahead queries the combined
    /// count forecast's, log-odds; see [`crate::prior`]) to the logits with a learned
    /// per-layer scale: the predictor starts as the token table and learns what context
    /// adds.
    #[config(default = true)]
    pub token_prior: bool,
}

impl PredictorConfig {
    /// Checks the shape's invariants; the message names the offending option.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.routing;
        if r.n_moe == 0 || r.n_experts == 0 || r.top_k == 0 || r.top_k > r.n_experts {
            return Err(format!("unusable routing shape {r:?}"));
        }
        if self.task == Task::Lookahead && r.n_moe < 2 {
            return Err("lookahead needs at least 2 MoE layers".into());
        }
        if self.horizon == 0 {
            return Err("--horizon must be at least 1".into());
        }
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "--d-model ({}) must be a positive multiple of --heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if self.n_layers == 0 || self.ffn_mult == 0 || self.token_buckets == 0 {
            return Err(
                "--layers, the feed-forward multiple and token buckets must be positive".into(),
            );
        }
        if self.context < 2 {
            return Err("--context must be at least 2".into());
        }
        if self.features.hidden() && self.router_input_dim == 0 {
            return Err(format!(
                "--features {} needs traces with router inputs (collect --hidden-states)",
                self.features.as_str()
            ));
        }
        if self.features.hidden() && self.hidden_width == 0 {
            return Err("--hidden-width must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--dropout {} must be in [0, 1)", self.dropout));
        }
        if !(0.0..1.0).contains(&self.token_dropout) {
            return Err(format!(
                "--token-dropout {} must be in [0, 1)",
                self.token_dropout
            ));
        }
        Ok(())
    }

    /// Whether a trace whose router inputs have `dim` values (`None`: not recorded) can
    /// feed this predictor; the message says what is missing.
    pub fn check_router_input_dim(&self, dim: Option<u32>) -> Result<(), String> {
        if !self.features.hidden() || dim == Some(self.router_input_dim as u32) {
            return Ok(());
        }
        Err(format!(
            "the predictor reads router inputs of {} values (--features {}), this trace has {}",
            self.router_input_dim,
            self.features.as_str(),
            dim.map_or("none (collect with --hidden-states)".to_string(), |d| d
                .to_string())
        ))
    }

    /// Layers one lookahead forecast covers (0 for next-token predictors).
    pub fn lookahead_horizon(&self) -> usize {
        match self.task {
            Task::Lookahead => self.horizon.min(self.routing.n_moe - 1),
            Task::NextToken => 0,
        }
    }

    /// The queries of this predictor's task (what it is evaluated on).
    pub fn queries(&self) -> Vec<Query> {
        self.task.queries(self.routing.n_moe, self.horizon)
    }

    /// The queries it is trained on: a lookahead predictor also learns the next-token
    /// query (no layer known), which teaches its backbone the token-to-routing map and
    /// lets one checkpoint serve both forecasts.
    pub fn training_queries(&self) -> Vec<Query> {
        let mut q = self.queries();
        if self.task == Task::Lookahead {
            q.insert(
                0,
                Task::NextToken.queries(self.routing.n_moe, self.horizon)[0],
            );
        }
        q
    }
}

/// Parameter counts of a predictor of some configuration, measured by building it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub params: usize,
    /// Of which the token-id embedding.
    pub token_embedding: usize,
    /// Of which the output layer (`d x n_moe * n_experts` and its bias).
    pub output: usize,
}

impl Footprint {
    /// What `moecast predictor-size` prints for `config` with `vocab` token ids.
    pub fn describe(&self, config: &PredictorConfig, vocab: usize) -> String {
        let r = &config.routing;
        format!(
            "{} predictor for {} MoE layers x {} experts (top-{}), {} token ids, d_model {}, {} blocks:\n\
             \x20 {} parameters ({} in the token embedding, {} in the output layer): {:.1} MB of f32 weights\n\
             \x20 training holds about 4x that (weights, gradients, two AdamW moments): {:.0} MB\n\
             \x20 token table (prior and baseline, stored sparsely): 8 bytes per counted (id, layer, expert); \
             at most {:.1} MB per frequent id (layers x experts) and {:.0} MB per million training tokens \
             (layers x top-k per token, if every token were a new id)\n",
            config.task.as_str(),
            r.n_moe,
            r.n_experts,
            r.top_k,
            vocab,
            config.d_model,
            config.n_layers,
            self.params,
            self.token_embedding,
            self.output,
            self.params as f64 * 4.0 / 1e6,
            self.params as f64 * 16.0 / 1e6,
            (r.n_moe * r.n_experts * 8) as f64 / 1e6,
            (r.n_moe * r.top_k * 8) as f64
        )
    }

    /// Builds `config`'s predictor on the CPU and counts its parameters.
    pub fn of(config: &PredictorConfig) -> Result<Self, String> {
        config.validate()?;
        let model = crate::model::ExpertPredictor::to_load(config, &burn::tensor::Device::flex());
        Ok(Footprint {
            params: model.num_params(),
            token_embedding: model.token_embed.num_params(),
            output: model.output.num_params(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_token_training_refuses_router_inputs_but_older_cards_still_load() {
        let shape = RoutingShape {
            n_moe: 4,
            n_experts: 8,
            top_k: 2,
        };
        let card = PredictorConfig::new(shape, Task::NextToken)
            .with_features(Features::Hidden)
            .with_router_input_dim(16);
        assert_eq!(card.validate(), Ok(()), "a saved card of this kind loads");
        let e = Task::NextToken
            .check_features(Features::IdsHidden)
            .unwrap_err();
        assert!(
            e.contains("--features ids+hidden") && e.contains("--task lookahead"),
            "{e}"
        );
        assert_eq!(Task::NextToken.check_features(Features::Ids), Ok(()));
        assert_eq!(Task::Lookahead.check_features(Features::Hidden), Ok(()));
    }
}
