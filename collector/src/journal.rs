//! The collection journal, `OUT.partial.jsonl`: interchange JSONL whose meta line also
//! holds the settings of the run that writes it, with each finished sequence appended
//! as it ends. A rerun of the same command resumes it: the sequences it holds are kept,
//! except the last, which an interruption may have cut short and which is collected
//! again (every sequence's sampler seed depends only on its place in the run, so the
//! result equals an uninterrupted run). A journal of other settings with sequences to
//! keep is refused; one with none to keep is started afresh.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use datasets::channel::{PRE_ATTENTION_LOGITS, ROUTER_INPUTS, ROUTER_LOGITS};
use datasets::{Channel, Phase, TraceMeta};
use inference::generate::Sampling;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{CollectConfig, CollectError};

/// The settings of a collection run that decide its sequences (the model's shape is in
/// the trace meta); a journal resumes only under equal settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunSettings {
    /// The model folder, canonicalised (the meta records only its name).
    model: String,
    device: String,
    prompts: usize,
    samples: usize,
    max_new_tokens: usize,
    temperature: f32,
    seed: Option<u64>,
    add_special_tokens: bool,
}

impl RunSettings {
    /// The settings of the run `cfg` describes.
    pub(crate) fn of(cfg: &CollectConfig) -> RunSettings {
        let (temperature, seed) = match cfg.sampling {
            Sampling::Greedy => (0.0, None),
            Sampling::Temperature { temperature, seed } => (temperature, Some(seed)),
        };
        let model = std::fs::canonicalize(&cfg.model_dir).unwrap_or_else(|_| cfg.model_dir.clone());
        RunSettings {
            model: model.display().to_string(),
            device: format!("{:?}", cfg.backend).to_lowercase(),
            prompts: cfg.prompts.len(),
            samples: cfg.samples.max(1),
            max_new_tokens: cfg.max_new_tokens,
            temperature,
            seed,
            add_special_tokens: cfg.add_special_tokens,
        }
    }

    /// Each setting that differs, as "FLAG: JOURNAL in the journal, RUN in this run".
    fn differences(&self, journal: &RunSettings) -> Vec<String> {
        let pair =
            |flag, value: &dyn Fn(&RunSettings) -> String| (flag, value(journal), value(self));
        let pairs = [
            pair("--model", &|s| s.model.clone()),
            pair("--device", &|s| s.device.clone()),
            pair("prompts", &|s| s.prompts.to_string()),
            pair("--samples", &|s| s.samples.to_string()),
            pair("--max-new-tokens", &|s| s.max_new_tokens.to_string()),
            pair("--temperature", &|s| s.temperature.to_string()),
            pair("--seed", &|s| {
                s.seed.map_or("none (greedy)".into(), |s| s.to_string())
            }),
            pair("--add-special-tokens", &|s| {
                s.add_special_tokens.to_string()
            }),
        ];
        pairs
            .into_iter()
            .filter(|(_, j, r)| j != r)
            .map(|(flag, j, r)| format!("{flag}: {j} in the journal, {r} in this run"))
            .collect()
    }
}

/// The journal's first line.
#[derive(Serialize, Deserialize)]
struct Head {
    meta: Value,
    #[serde(default)]
    collect: Option<RunSettings>,
}

/// The fields of a token line that resuming reads.
#[derive(Deserialize)]
struct RecordHead {
    seq: String,
    phase: Phase,
    token: Option<u32>,
}

/// One sequence found in a journal.
struct JournalSequence {
    name: String,
    /// Byte offset of its first line.
    start: u64,
    prompt: Vec<Option<u32>>,
    decode_tokens: usize,
}

/// What a journal of an interrupted run gave back.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Resumed {
    /// Finished sequences kept: the first ones of the run.
    pub sequences: usize,
    /// Their prompt tokens.
    pub prefill_tokens: usize,
    /// Their generated tokens.
    pub decode_tokens: usize,
}

/// Opens the journal at `path` for appending. Where none is, or one with no sequence to
/// keep, a new one is started; where one of the same meta and settings is, it is cut
/// after its last sequence but one and those sequences are kept. `expected(i)` gives run
/// `i`'s sequence name and prompt token ids, which each kept sequence must match.
pub(crate) fn open(
    path: &Path,
    meta: &TraceMeta,
    settings: &RunSettings,
    runs: usize,
    expected: impl Fn(usize) -> Result<(String, Vec<u32>), CollectError>,
) -> Result<(BufWriter<File>, Resumed), CollectError> {
    let io = |e: std::io::Error| CollectError::Trace(datasets::TraceError::io(path, e));
    let fail = |msg: String| {
        CollectError::Model(inference::ModelError::file(
            path,
            format!("{msg}; delete it to start afresh"),
        ))
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return start(path, meta, settings),
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line).map_err(io)? == 0 || !line.ends_with(b"\n") {
        return start(path, meta, settings);
    }
    let head: Head = serde_json::from_slice(&line)
        .map_err(|e| fail(format!("line 1: not a collection journal's meta line: {e}")))?;
    let found = scan(&mut reader, line.len() as u64, &fail)?;
    drop(reader);
    // The last sequence may have been cut short: it is collected again. With nothing
    // else to keep, the journal is started afresh whatever its settings.
    let (kept, cut_at) = match found.split_last() {
        Some((last, kept)) if !kept.is_empty() => (kept, last.start),
        _ => return start(path, meta, settings),
    };
    let journal_settings = head.collect.ok_or_else(|| {
        fail(
            "line 1: written by an older moecast, which did not record its settings \
             (`moecast trace convert` it to keep its sequences)"
                .into(),
        )
    })?;
    let run_meta = serde_json::to_value(meta).expect("trace meta serialises");
    let mut diffs = meta_differences(&head.meta, &run_meta);
    diffs.extend(settings.differences(&journal_settings));
    if !diffs.is_empty() {
        return Err(fail(format!(
            "left by an interrupted collection with other settings ({}); rerun with the journal's settings to resume it",
            diffs.join("; ")
        )));
    }
    if kept.len() >= runs {
        return Err(fail(format!(
            "it holds {} sequences, more than this run's {runs}",
            found.len()
        )));
    }
    let mut resumed = Resumed::default();
    for (i, s) in kept.iter().enumerate() {
        let (name, ids) = expected(i)?;
        if s.name != name {
            return Err(fail(format!(
                "its sequence {} is '{}' where this run's is '{name}' (another prompt file?)",
                i + 1,
                s.name
            )));
        }
        if s.prompt.iter().copied().ne(ids.iter().map(|&t| Some(t))) {
            return Err(fail(format!(
                "sequence '{name}' was collected from another prompt than this run's (the prompt file changed?)"
            )));
        }
        resumed.sequences += 1;
        resumed.prefill_tokens += s.prompt.len();
        resumed.decode_tokens += s.decode_tokens;
    }
    let mut file = OpenOptions::new().write(true).open(path).map_err(io)?;
    file.set_len(cut_at).map_err(io)?;
    file.seek(SeekFrom::End(0)).map_err(io)?;
    Ok((BufWriter::new(file), resumed))
}

/// The sequences of the token lines after the meta line (which ends at byte `offset`),
/// in order; a last line without its newline (cut by an interruption) is left out.
fn scan(
    reader: &mut impl BufRead,
    mut offset: u64,
    fail: &impl Fn(String) -> CollectError,
) -> Result<Vec<JournalSequence>, CollectError> {
    let mut found: Vec<JournalSequence> = Vec::new();
    let mut names = HashSet::new();
    let mut line = Vec::new();
    for lineno in 2.. {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| fail(format!("line {lineno}: {e}")))?;
        if n == 0 || !line.ends_with(b"\n") {
            break;
        }
        let start = offset;
        offset += n as u64;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let rec: RecordHead =
            serde_json::from_slice(&line).map_err(|e| fail(format!("line {lineno}: {e}")))?;
        if found.last().is_none_or(|s| s.name != rec.seq) {
            if !names.insert(rec.seq.clone()) {
                return Err(fail(format!(
                    "line {lineno}: sequence '{}' appears twice",
                    rec.seq
                )));
            }
            found.push(JournalSequence {
                name: rec.seq,
                start,
                prompt: Vec::new(),
                decode_tokens: 0,
            });
        }
        let s = found.last_mut().expect("pushed above");
        match rec.phase {
            Phase::Prefill => s.prompt.push(rec.token),
            Phase::Decode => s.decode_tokens += 1,
        }
    }
    Ok(found)
}

/// Starts a new journal: the meta line with the run's settings.
fn start(
    path: &Path,
    meta: &TraceMeta,
    settings: &RunSettings,
) -> Result<(BufWriter<File>, Resumed), CollectError> {
    let io = |e: std::io::Error| CollectError::Trace(datasets::TraceError::io(path, e));
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    let head = Head {
        meta: serde_json::to_value(meta).expect("trace meta serialises"),
        collect: Some(settings.clone()),
    };
    serde_json::to_writer(&mut w, &head).map_err(|e| io(e.into()))?;
    w.write_all(b"\n").map_err(io)?;
    w.flush().map_err(io)?;
    Ok((w, Resumed::default()))
}

/// Each top-level meta field that differs, as "FIELD: JOURNAL in the journal, RUN in
/// this run" (long values only as "FIELD differs"), channels one by one under their
/// `collect` flag. The tokenizer's path is left out: it only says how the model folder
/// was spelt, which the settings compare resolved. A journal's meta is read the way
/// trace files are (older spellings of channels included).
fn meta_differences(journal: &Value, run: &Value) -> Vec<String> {
    let journal = serde_json::from_value::<TraceMeta>(journal.clone())
        .ok()
        .and_then(|m| serde_json::to_value(m).ok())
        .unwrap_or_else(|| journal.clone());
    let (Some(j), Some(r)) = (journal.as_object(), run.as_object()) else {
        return vec!["the meta line is not an object".into()];
    };
    let mut keys: Vec<&String> = j.keys().chain(r.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| k.as_str() != "tokenizer" && k.as_str() != "channels")
        .filter_map(|k| {
            let a = j.get(k).unwrap_or(&Value::Null).to_string();
            let b = r.get(k).unwrap_or(&Value::Null).to_string();
            if a == b {
                None
            } else if a.len() + b.len() > 80 {
                Some(format!("{k} differs"))
            } else {
                Some(format!("{k}: {a} in the journal, {b} in this run"))
            }
        })
        .collect();
    let channels = |o: &serde_json::Map<String, Value>| -> Vec<Channel> {
        o.get("channels")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default()
    };
    let (jc, rc) = (channels(j), channels(r));
    let mut names: Vec<&str> = jc.iter().chain(&rc).map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    let shape = |cs: &[Channel], name: &str| {
        cs.iter()
            .find(|c| c.name == name)
            .map_or("absent".to_string(), |c| {
                format!("{} x {}", c.dtype.as_str(), c.width)
            })
    };
    for name in names {
        let (a, b) = (shape(&jc, name), shape(&rc, name));
        if a != b {
            let flag = match name {
                ROUTER_INPUTS => "--hidden-states",
                ROUTER_LOGITS => "--router-logits",
                PRE_ATTENTION_LOGITS => "--pre-attention-logits",
                _ => "channels",
            };
            diffs.push(format!(
                "{flag} (channel {name}): {a} in the journal, {b} in this run"
            ));
        }
    }
    diffs
}
