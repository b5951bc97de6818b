//! The checkpoint's `tokenizer.json`, through the tokenizers crate.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A loaded tokenizer and the file it came from.
pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::file(
                &path,
                "missing (needed to encode text prompts; pass token ids instead)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::file(&path, format!("bad tokenizer: {e}")))?;
        Ok(TextTokenizer { path, inner })
    }

    /// Encodes `text`; every id must be below `vocab_size` (else the tokenizer does not
    /// belong to this model).
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
        vocab_size: usize,
    ) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::file(&self.path, format!("cannot encode prompt: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab_size) {
            return Err(ModelError::file(
                &self.path,
                format!("tokenizer mismatch: produced token id {bad}, but the model's vocab_size is {vocab_size}"),
            ));
        }
        Ok(ids)
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::file(&self.path, format!("cannot decode: {e}")))
    }
}
