//! Prompt files: `.txt` (one prompt per non-empty line) or `.jsonl` (one object per
//! line with `"text"` / `"prompt"` or `"token_ids"`, and an optional `"id"` / `"name"`).

use std::path::Path;

use crate::tokenizer::TextTokenizer;
use serde::Deserialize;

use crate::ModelError;

/// One prompt, as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text { name: String, text: String },
    Ids { name: String, ids: Vec<u32> },
}

impl Prompt {
    /// The sequence name the trace will use.
    pub fn name(&self) -> &str {
        match self {
            Prompt::Text { name, .. } | Prompt::Ids { name, .. } => name,
        }
    }

    /// The prompt's token ids (text is encoded with `tokenizer`, which text prompts need).
    pub fn token_ids(
        &self,
        tokenizer: Option<&TextTokenizer>,
        add_special_tokens: bool,
        vocab_size: usize,
    ) -> Result<Vec<u32>, ModelError> {
        match (self, tokenizer) {
            (Prompt::Ids { ids, .. }, _) => Ok(ids.clone()),
            (Prompt::Text { text, .. }, Some(t)) => t.encode(text, add_special_tokens, vocab_size),
            (Prompt::Text { name, .. }, None) => Err(ModelError::Input(format!(
                "prompt '{name}' is text but the model has no tokenizer.json"
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default, alias = "name")]
    id: Option<serde_json::Value>,
    #[serde(default, alias = "prompt")]
    text: Option<String>,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    domain: Option<String>,
}

/// Reads a prompt file; errors name the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>, ModelError> {
    let err = |msg: String| ModelError::file(path, msg);
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let default_name = format!("p{:03}", out.len());
        if !jsonl {
            out.push(Prompt::Text {
                name: default_name,
                text: line.to_string(),
            });
            continue;
        }
        let l: Line =
            serde_json::from_str(line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
        let name = match (l.id, l.domain) {
            (Some(serde_json::Value::String(s)), _) => s,
            (Some(v), _) => v.to_string(),
            (None, Some(d)) => format!("{default_name}-{d}"),
            (None, None) => default_name,
        };
        out.push(match (l.text, l.token_ids) {
            (Some(text), None) => Prompt::Text { name, text },
            (None, Some(ids)) if !ids.is_empty() => Prompt::Ids { name, ids },
            _ => {
                return Err(err(format!(
                    "line {}: give exactly one of \"text\" and a non-empty \"token_ids\"",
                    i + 1
                )))
            }
        });
    }
    if out.is_empty() {
        return Err(err("no prompts".into()));
    }
    Ok(out)
}

/// Parses `"1,2,3"` into one id prompt.
pub fn parse_token_ids(s: &str) -> Result<Prompt, String> {
    let ids = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{x}' is not a token id"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    Ok(Prompt::Ids {
        name: "ids".into(),
        ids,
    })
}
