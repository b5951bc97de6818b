//! Training data: documents from text and `.jsonl` files, a seeded validation split by
//! document, a byte-level BPE tokenizer trained on the training split, token streams
//! (documents joined by `<|endoftext|>`), batches and the unigram baseline.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

use crate::error::{Result, TinyMoeError};

/// The document separator and end-of-text token (id 0).
pub const EOS: &str = "<|endoftext|>";
/// Smallest vocabulary: 256 byte symbols and the special token.
pub const MIN_VOCAB: usize = 257;
/// Paragraphs longer than this many bytes are cut at line boundaries into several documents.
const MAX_DOC_BYTES: usize = 8192;
/// String fields of a `.jsonl` object taken as text, in this order.
const JSON_TEXT_FIELDS: &[&str] = &[
    "text",
    "content",
    "instruction",
    "question",
    "prompt",
    "input",
    "answer",
    "canonical_solution",
    "completion",
    "response",
    "output",
];

/// Reads the documents of one file: blank-line separated paragraphs of a text file,
/// or one document per line of a `.jsonl` file (its known text fields, joined by a newline;
/// every string field when none is known).
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| TinyMoeError::io(path, e))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if jsonl {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                TinyMoeError::file(path, format!("line {}: not a JSON object: {e}", i + 1))
            })?;
            let obj = v.as_object().ok_or_else(|| {
                TinyMoeError::file(path, format!("line {}: not a JSON object", i + 1))
            })?;
            let mut parts: Vec<&str> = JSON_TEXT_FIELDS
                .iter()
                .filter_map(|k| obj.get(*k).and_then(|v| v.as_str()))
                .collect();
            if parts.is_empty() {
                parts = obj.values().filter_map(|v| v.as_str()).collect();
            }
            let doc = parts.join("\n");
            if !doc.trim().is_empty() {
                docs.push(doc);
            }
        }
        return Ok(docs);
    }
    let mut docs = Vec::new();
    for para in text.split("\n\n") {
        let para = para.trim_matches('\n');
        if para.trim().is_empty() {
            continue;
        }
        if para.len() <= MAX_DOC_BYTES {
            docs.push(para.to_string());
            continue;
        }
        let mut cur = String::new();
        for line in para.lines() {
            if !cur.is_empty() && cur.len() + line.len() > MAX_DOC_BYTES {
                docs.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(line);
        }
        if !cur.trim().is_empty() {
            docs.push(cur);
        }
    }
    Ok(docs)
}

/// Documents of all files, split by document into training and validation sets.
pub struct Split {
    /// Training documents, in file order.
    pub train: Vec<String>,
    /// Held-out documents, in file order.
    pub valid: Vec<String>,
}

/// Reads every file and holds out a seeded `valid_fraction` of the documents (at least
/// one; at least one stays for training).
pub fn load_split(files: &[PathBuf], valid_fraction: f64, seed: u64) -> Result<Split> {
    if files.is_empty() {
        return Err(TinyMoeError::input("no corpus files given".into()));
    }
    if !(0.0..1.0).contains(&valid_fraction) {
        return Err(TinyMoeError::input(format!(
            "validation fraction {valid_fraction} must be in [0, 1)"
        )));
    }
    let mut docs = Vec::new();
    for f in files {
        let d = read_documents(f)?;
        if d.is_empty() {
            return Err(TinyMoeError::file(f, "holds no text"));
        }
        docs.extend(d);
    }
    if docs.len() < 2 {
        return Err(TinyMoeError::input(
            "the corpus needs at least two documents (paragraphs or JSON lines)".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e1f_5b11_7000_0001);
    let mut order: Vec<usize> = (0..docs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let n_valid = ((docs.len() as f64 * valid_fraction).round() as usize).clamp(1, docs.len() - 1);
    let valid_set: HashSet<usize> = order[..n_valid].iter().copied().collect();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if valid_set.contains(&i) {
            valid.push(d);
        } else {
            train.push(d);
        }
    }
    Ok(Split { train, valid })
}

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `docs`: id 0 is
/// [`EOS`], then the 256 byte symbols, then merges. Any text round-trips.
pub fn train_tokenizer(docs: &[String], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < MIN_VOCAB {
        return Err(TinyMoeError::input(format!(
            "vocab size {vocab_size} is below {MIN_VOCAB}"
        )));
    }
    let err = |e: tokenizers::Error| TinyMoeError::input(format!("tokenizer training: {e}"));
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOS.to_string(), true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(err)?;
    tok.train(&mut trainer, docs.iter()).map_err(err)?;
    Ok(Tokenizer::from(tok))
}

/// The id of [`EOS`] in `tok`.
pub fn eos_id(tok: &Tokenizer) -> Result<u32> {
    tok.token_to_id(EOS)
        .ok_or_else(|| TinyMoeError::input(format!("tokenizer has no {EOS} token")))
}

/// Encodes `docs` and joins them, each followed by `eos`.
pub fn encode_stream(tok: &Tokenizer, docs: &[String], eos: u32) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for chunk in docs.chunks(256) {
        let encs = tok
            .encode_batch(chunk.to_vec(), false)
            .map_err(|e| TinyMoeError::input(format!("tokenizing the corpus: {e}")))?;
        for e in encs {
            out.extend_from_slice(e.get_ids());
            out.push(eos);
        }
    }
    Ok(out)
}

/// Token streams of both splits and how batches are drawn from them.
pub struct TokenData {
    /// The training stream.
    pub train: Vec<u32>,
    /// The validation stream.
    pub valid: Vec<u32>,
    /// Sequence length of a training window (inputs; targets are shifted by one).
    pub seq: usize,
    /// Seed of the batch offsets.
    pub seed: u64,
}

/// One batch: `inputs` and `targets`, both `batch * seq` ids, row-major.
pub struct Batch {
    /// Input ids.
    pub inputs: Vec<u32>,
    /// Next-token targets.
    pub targets: Vec<u32>,
    /// Sequences in the batch.
    pub batch: usize,
}

impl TokenData {
    /// Checks both streams hold at least one window of `seq + 1` tokens.
    pub fn new(train: Vec<u32>, valid: Vec<u32>, seq: usize, seed: u64) -> Result<TokenData> {
        for (name, s) in [("training", &train), ("validation", &valid)] {
            if s.len() < seq + 1 {
                return Err(TinyMoeError::input(format!(
                    "the {name} split has {} tokens, fewer than one window of {} \
                     (add text, lower --context or raise --val-fraction)",
                    s.len(),
                    seq + 1
                )));
            }
        }
        Ok(TokenData {
            train,
            valid,
            seq,
            seed,
        })
    }

    /// The training batch of `step`: `batch` windows at uniformly drawn offsets, from a
    /// generator seeded by (seed, step), so a resumed run sees the same batches.
    pub fn train_batch(&self, step: usize, batch: usize) -> Batch {
        let mix = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(step as u64)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let mut rng = StdRng::seed_from_u64(mix);
        let max_start = self.train.len() - self.seq - 1;
        let starts: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..=max_start))
            .collect();
        window_batch(&self.train, &starts, self.seq)
    }

    /// Validation batches: consecutive non-overlapping windows of the validation stream,
    /// at most `max_tokens` target tokens (at least one window).
    pub fn valid_batches(&self, batch: usize, max_tokens: usize) -> Vec<Batch> {
        let n_windows = ((self.valid.len() - 1) / self.seq)
            .min(max_tokens / self.seq)
            .max(1);
        let starts: Vec<usize> = (0..n_windows).map(|i| i * self.seq).collect();
        starts
            .chunks(batch.max(1))
            .map(|s| window_batch(&self.valid, s, self.seq))
            .collect()
    }

    /// Perplexity of a unigram model of the training stream (add-one smoothing over
    /// `vocab` ids) on the targets of `batches`.
    pub fn unigram_perplexity(&self, vocab: usize, batches: &[Batch]) -> f64 {
        let mut counts = vec![0u64; vocab];
        for &t in &self.train {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        let total = self.train.len() as f64 + vocab as f64;
        let (mut nll, mut n) = (0.0, 0usize);
        for b in batches {
            for &t in &b.targets {
                let c = counts.get(t as usize).copied().unwrap_or(0);
                nll -= ((c as f64 + 1.0) / total).ln();
                n += 1;
            }
        }
        (nll / n.max(1) as f64).exp()
    }
}

fn window_batch(stream: &[u32], starts: &[usize], seq: usize) -> Batch {
    let mut inputs = Vec::with_capacity(starts.len() * seq);
    let mut targets = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        inputs.extend_from_slice(&stream[s..s + seq]);
        targets.extend_from_slice(&stream[s + 1..s + seq + 1]);
    }
    Batch {
        inputs,
        targets,
        batch: starts.len(),
    }
}
