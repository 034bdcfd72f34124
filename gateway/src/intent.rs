//! Local intent classifier: multinomial naive Bayes over English words and Chinese character n-grams that picks a skill group from a visitor's first message.
//!
//! The model is trained once at start from an intents file (TOML, see [`IntentModel::from_toml_str`]),
//! then [`IntentModel::classify`] runs without I/O and without heap allocation.
//!
//! Intents file:
//!
//! ```toml
//! default_group = "support"   # used when no intent is confident enough
//! threshold = 0.5             # minimum posterior probability of the top intent (0..=1, default 0.5)
//!
//! [[intent]]
//! name = "refund"
//! group = "support"
//! examples = ["I want my money back", "我要退款"]
//! ```
//!
//! Tokens: English (and other space-separated scripts) become lowercase words with apostrophes
//! dropped, a light plural stem (`refunds` -> `refund`, `deliveries` -> `delivery`), a few stop
//! words removed, and digit runs folded into one `#num` token. Chinese has no spaces, so every run
//! of CJK ideographs yields its single characters (minus a few particles) and its adjacent pairs
//! (bigrams), which carry most of the meaning of two-character words like 退款 or 密码.
//! Full-width ASCII is folded to ASCII first, so `ｌｏｇｉｎ` reads as `login`.

use std::collections::HashMap;

use serde::Deserialize;

/// Largest intents file accepted, in bytes.
pub const INTENTS_FILE_BYTES_MAX: usize = 1024 * 1024;
/// Most intents in one file; also sizes the stack score array in `classify`.
pub const INTENTS_MAX: usize = 32;
/// Most examples for one intent.
pub const EXAMPLES_PER_INTENT_MAX: usize = 500;
/// Longest example, in bytes.
pub const EXAMPLE_BYTES_MAX: usize = 1024;
/// Longest intent or group name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Most distinct tokens the model learns; bounds the likelihood table to
/// `VOCABULARY_MAX * INTENTS_MAX` f32 values (4 MiB).
pub const VOCABULARY_MAX: usize = 32 * 1024;
/// `classify` reads at most this many bytes of the message (cut on a char boundary): the first
/// sentences say what the visitor wants, and the bound keeps classification cost fixed.
pub const CLASSIFY_INPUT_BYTES_MAX: usize = 4096;
/// Longer words are dropped: they are ids, URLs or noise, not vocabulary.
pub const WORD_BYTES_MAX: usize = 48;
/// Threshold used when the file does not set one.
pub const THRESHOLD_DEFAULT: f64 = 0.5;

/// Additive (Lidstone) smoothing: an unseen (token, intent) pair keeps a small non-zero
/// probability. Add-one drowns the evidence when intents have a few hundred tokens each and the
/// vocabulary is larger than that: a token seen once then weighs barely twice an unseen one.
/// 0.1 was chosen by leave-one-out on the demo training examples (0.05..0.2 scored the same).
const SMOOTHING_ALPHA: f64 = 0.1;
/// Token that stands for any run of digits (order numbers, amounts).
const NUMBER_TOKEN: &str = "#num";

const _: () = assert!(INTENTS_MAX <= u16::MAX as usize);
const _: () = assert!(VOCABULARY_MAX <= u32::MAX as usize);
const _: () = assert!(WORD_BYTES_MAX >= 4 && WORD_BYTES_MAX >= NUMBER_TOKEN.len());

/// Why an intents file was rejected. Messages name the intent (by index and name) and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntentError {
    #[error("intents file is {bytes} bytes, more than intents_file_bytes_max = {bytes_max}")]
    FileTooLarge { bytes: usize, bytes_max: usize },
    #[error("intents file: {reason}")]
    Parse { reason: String },
    #[error("intents file: threshold = {threshold} is not between 0 and 1")]
    BadThreshold { threshold: f64 },
    #[error("intents file: default_group {problem}")]
    BadDefaultGroup { problem: NameProblem },
    #[error("intents file has no [[intent]] entries")]
    NoIntents,
    #[error("intents file has {count} intents, more than intents_max = {count_max}")]
    TooManyIntents { count: usize, count_max: usize },
    #[error("intent #{index} ({name:?}): field `{field}` {problem}")]
    BadField {
        index: usize,
        name: String,
        field: &'static str,
        problem: NameProblem,
    },
    #[error("intent #{index} ({name:?}): the name is already used by intent #{first_index}")]
    DuplicateIntent {
        index: usize,
        name: String,
        first_index: usize,
    },
    #[error("intent {name:?}: field `examples` is empty")]
    NoExamples { name: String },
    #[error("intent {name:?}: {count} examples, more than examples_per_intent_max = {count_max}")]
    TooManyExamples {
        name: String,
        count: usize,
        count_max: usize,
    },
    #[error(
        "intent {name:?}: examples[{example}] is {bytes} bytes, more than example_bytes_max = {bytes_max}"
    )]
    ExampleTooLong {
        name: String,
        example: usize,
        bytes: usize,
        bytes_max: usize,
    },
    #[error("intent {name:?}: examples[{example}] has no words or characters to learn from")]
    ExampleWithoutTokens { name: String, example: usize },
    #[error("intents file has more than vocabulary_max = {count_max} distinct tokens")]
    VocabularyTooLarge { count_max: usize },
}

/// What is wrong with a name (intent name or group).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("is empty")]
    Empty,
    #[error("is {bytes} bytes, more than name_bytes_max = {bytes_max}")]
    TooLong { bytes: usize, bytes_max: usize },
    #[error("contains whitespace or a control character ({ch:?})")]
    BadCharacter { ch: char },
}

/// The result of classifying one message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Classification<'a> {
    /// The recognised intent, or `None` when the model fell back to the default group.
    pub intent: Option<&'a str>,
    /// The skill group to queue the conversation in.
    pub group: &'a str,
    /// Posterior probability of the top intent (0 when the message had no known token).
    /// Also reported on fallback, so operators can tune the threshold from logs.
    pub confidence: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IntentsFile {
    default_group: String,
    #[serde(default = "threshold_default")]
    threshold: f64,
    #[serde(default, rename = "intent")]
    intents: Vec<IntentEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IntentEntry {
    name: String,
    group: String,
    examples: Vec<String>,
}

fn threshold_default() -> f64 {
    THRESHOLD_DEFAULT
}

#[derive(Debug)]
struct Intent {
    name: Box<str>,
    group: Box<str>,
}

/// A trained multinomial naive Bayes model. Immutable after training; share it across shards by
/// reference (it is `Send + Sync`).
#[derive(Debug)]
pub struct IntentModel {
    default_group: Box<str>,
    threshold: f64,
    intents: Vec<Intent>,
    log_prior: Vec<f64>,
    vocabulary: HashMap<Box<str>, u32>,
    /// `log P(token | intent)`, row-major by token: `[token * intents.len() + intent]`.
    /// f32 halves the table; the rounding (1e-7 relative) is far below any score gap that matters.
    log_likelihood: Vec<f32>,
}

impl IntentModel {
    /// Parses, validates and trains from the text of an intents file.
    pub fn from_toml_str(text: &str) -> Result<Self, IntentError> {
        if text.len() > INTENTS_FILE_BYTES_MAX {
            return Err(IntentError::FileTooLarge {
                bytes: text.len(),
                bytes_max: INTENTS_FILE_BYTES_MAX,
            });
        }
        let file: IntentsFile = toml::from_str(text).map_err(|e| IntentError::Parse {
            reason: one_line_toml_error(text, &e),
        })?;
        validate(&file)?;
        train(file)
    }

    /// Picks the skill group for a visitor's message. Allocates nothing; deterministic.
    pub fn classify(&self, text: &str) -> Classification<'_> {
        let text = truncate_on_char_boundary(text, CLASSIFY_INPUT_BYTES_MAX);
        let intents_count = self.intents.len();
        let mut scores = [0.0f64; INTENTS_MAX];
        let scores = &mut scores[..intents_count];
        scores.copy_from_slice(&self.log_prior);
        let mut tokens_known: usize = 0;
        for_each_token(text, |token| {
            if let Some(&id) = self.vocabulary.get(token) {
                tokens_known += 1;
                let start = id as usize * intents_count;
                let row = &self.log_likelihood[start..start + intents_count];
                for (score, &ll) in scores.iter_mut().zip(row) {
                    *score += f64::from(ll);
                }
            }
        });
        if tokens_known == 0 {
            // The prior alone is no evidence: a one-intent model would otherwise be "certain".
            return self.fallback(0.0);
        }
        // First maximum wins, so ties resolve to the intent listed first in the file.
        let mut best = 0;
        for (i, &score) in scores.iter().enumerate() {
            if score > scores[best] {
                best = i;
            }
        }
        let best_score = scores[best];
        let normalizer: f64 = scores.iter().map(|&s| (s - best_score).exp()).sum();
        assert!(normalizer >= 1.0, "softmax normalizer includes exp(0)");
        let confidence = 1.0 / normalizer;
        if confidence < self.threshold {
            return self.fallback(confidence);
        }
        let intent = &self.intents[best];
        Classification {
            intent: Some(&intent.name),
            group: &intent.group,
            confidence,
        }
    }

    fn fallback(&self, confidence: f64) -> Classification<'_> {
        Classification {
            intent: None,
            group: &self.default_group,
            confidence,
        }
    }

    /// The group used when no intent is confident enough.
    pub fn default_group(&self) -> &str {
        &self.default_group
    }

    /// The same model with another confidence threshold (a tenant's override of the file's).
    /// Panics outside 0..=1: config validation checks the value first.
    pub fn with_threshold(mut self, threshold: f64) -> Self {
        assert!((0.0..=1.0).contains(&threshold), "threshold {threshold}");
        self.threshold = threshold;
        self
    }

    /// Minimum confidence for an intent to decide the group.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// `(intent name, group)` in file order.
    pub fn intents(&self) -> impl Iterator<Item = (&str, &str)> {
        self.intents.iter().map(|i| (&*i.name, &*i.group))
    }

    /// Every group the model can answer (the default group first, then intents' groups; may repeat),
    /// so the caller can check each one exists in its configuration.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.default_group).chain(self.intents.iter().map(|i| &*i.group))
    }

    /// Number of distinct tokens learned.
    pub fn vocabulary_len(&self) -> usize {
        self.vocabulary.len()
    }
}

/// toml's own message spans several lines with a source excerpt; config errors are one line.
fn one_line_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            // Spans are byte offsets at token boundaries; `get` keeps a bad one from panicking.
            let before = text.get(..span.start).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameProblem::TooLong {
            bytes: name.len(),
            bytes_max: NAME_BYTES_MAX,
        });
    }
    if let Some(ch) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameProblem::BadCharacter { ch });
    }
    Ok(())
}

fn validate(file: &IntentsFile) -> Result<(), IntentError> {
    if !(0.0..=1.0).contains(&file.threshold) {
        return Err(IntentError::BadThreshold {
            threshold: file.threshold,
        });
    }
    check_name(&file.default_group).map_err(|problem| IntentError::BadDefaultGroup { problem })?;
    if file.intents.is_empty() {
        return Err(IntentError::NoIntents);
    }
    if file.intents.len() > INTENTS_MAX {
        return Err(IntentError::TooManyIntents {
            count: file.intents.len(),
            count_max: INTENTS_MAX,
        });
    }
    for (index, entry) in file.intents.iter().enumerate() {
        let bad_field = |field, problem| IntentError::BadField {
            index,
            name: entry.name.clone(),
            field,
            problem,
        };
        check_name(&entry.name).map_err(|p| bad_field("name", p))?;
        check_name(&entry.group).map_err(|p| bad_field("group", p))?;
        // Quadratic, but over at most INTENTS_MAX entries once at start.
        if let Some(first_index) = file.intents[..index]
            .iter()
            .position(|e| e.name == entry.name)
        {
            return Err(IntentError::DuplicateIntent {
                index,
                name: entry.name.clone(),
                first_index,
            });
        }
        if entry.examples.is_empty() {
            return Err(IntentError::NoExamples {
                name: entry.name.clone(),
            });
        }
        if entry.examples.len() > EXAMPLES_PER_INTENT_MAX {
            return Err(IntentError::TooManyExamples {
                name: entry.name.clone(),
                count: entry.examples.len(),
                count_max: EXAMPLES_PER_INTENT_MAX,
            });
        }
        for (example, text) in entry.examples.iter().enumerate() {
            if text.len() > EXAMPLE_BYTES_MAX {
                return Err(IntentError::ExampleTooLong {
                    name: entry.name.clone(),
                    example,
                    bytes: text.len(),
                    bytes_max: EXAMPLE_BYTES_MAX,
                });
            }
            let mut tokens = 0usize;
            for_each_token(text, |_| tokens += 1);
            if tokens == 0 {
                return Err(IntentError::ExampleWithoutTokens {
                    name: entry.name.clone(),
                    example,
                });
            }
        }
    }
    Ok(())
}

fn train(file: IntentsFile) -> Result<IntentModel, IntentError> {
    let intents_count = file.intents.len();
    let mut vocabulary: HashMap<Box<str>, u32> = HashMap::new();
    // counts[token * intents_count + intent], grown one row per new token.
    let mut counts: Vec<u32> = Vec::new();
    let mut tokens_per_intent = vec![0u64; intents_count];
    let mut examples_total: usize = 0;
    let mut vocabulary_overflow = false;
    for (intent, entry) in file.intents.iter().enumerate() {
        examples_total += entry.examples.len();
        for text in &entry.examples {
            for_each_token(text, |token| {
                let id = match vocabulary.get(token) {
                    Some(&id) => id,
                    None => {
                        if vocabulary.len() == VOCABULARY_MAX {
                            vocabulary_overflow = true;
                            return;
                        }
                        let id = vocabulary.len() as u32;
                        vocabulary.insert(token.into(), id);
                        counts.resize(counts.len() + intents_count, 0);
                        id
                    }
                };
                counts[id as usize * intents_count + intent] += 1;
                tokens_per_intent[intent] += 1;
            });
            if vocabulary_overflow {
                return Err(IntentError::VocabularyTooLarge {
                    count_max: VOCABULARY_MAX,
                });
            }
        }
    }
    assert_eq!(counts.len(), vocabulary.len() * intents_count);
    let vocabulary_len = vocabulary.len() as f64;
    let log_denominators: Vec<f64> = tokens_per_intent
        .iter()
        .map(|&n| (n as f64 + SMOOTHING_ALPHA * vocabulary_len).ln())
        .collect();
    let log_likelihood: Vec<f32> = counts
        .iter()
        .enumerate()
        .map(|(cell, &count)| {
            let intent = cell % intents_count;
            ((f64::from(count) + SMOOTHING_ALPHA).ln() - log_denominators[intent]) as f32
        })
        .collect();
    let log_prior = file
        .intents
        .iter()
        .map(|e| (e.examples.len() as f64 / examples_total as f64).ln())
        .collect();
    let intents = file
        .intents
        .into_iter()
        .map(|e| Intent {
            name: e.name.into(),
            group: e.group.into(),
        })
        .collect();
    Ok(IntentModel {
        default_group: file.default_group.into(),
        threshold: file.threshold,
        intents,
        log_prior,
        vocabulary,
        log_likelihood,
    })
}

/// The longest prefix of `text` of at most `bytes_max` bytes that ends on a char boundary.
fn truncate_on_char_boundary(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Han ideographs (URO, extensions A-F, compatibility). Kana and Hangul are left to the word
/// path: they are outside the demo languages and rare in the groups this serves.
fn is_cjk(ch: char) -> bool {
    matches!(ch,
        '\u{4E00}'..='\u{9FFF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2EBEF}')
}

/// Particles and pronouns that appear in nearly every Chinese message; as unigrams they only add
/// noise. They still take part in bigrams.
fn is_cjk_stop_char(ch: char) -> bool {
    matches!(
        ch,
        '的' | '了'
            | '吗'
            | '呢'
            | '吧'
            | '啊'
            | '呀'
            | '我'
            | '你'
            | '您'
            | '是'
            | '请'
            | '一'
            | '个'
    )
}

fn is_english_stop_word(word: &str) -> bool {
    matches!(
        word,
        "a" | "am"
            | "an"
            | "and"
            | "are"
            | "be"
            | "been"
            | "but"
            | "do"
            | "for"
            | "hello"
            | "hey"
            | "hi"
            | "i"
            | "im"
            | "is"
            | "it"
            | "its"
            | "me"
            | "my"
            | "of"
            | "on"
            | "or"
            | "please"
            | "so"
            | "that"
            | "the"
            | "this"
            | "to"
            | "was"
            | "we"
            | "with"
            | "you"
            | "your"
    )
}

/// Folds full-width ASCII (U+FF01..U+FF5E), common in Chinese input methods, to ASCII.
fn fold_full_width(ch: char) -> char {
    match ch {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(ch as u32 - 0xFEE0).unwrap_or(ch),
        _ => ch,
    }
}

/// A word being assembled on the stack, so tokenizing allocates nothing.
struct WordBuf {
    bytes: [u8; WORD_BYTES_MAX],
    len: usize,
    overflow: bool,
    digits_only: bool,
}

impl WordBuf {
    fn new() -> Self {
        Self {
            bytes: [0; WORD_BYTES_MAX],
            len: 0,
            overflow: false,
            digits_only: true,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0 && !self.overflow
    }

    fn push(&mut self, ch: char) {
        self.digits_only &= ch.is_ascii_digit();
        let width = ch.len_utf8();
        if self.len + width > WORD_BYTES_MAX {
            self.overflow = true;
            return;
        }
        ch.encode_utf8(&mut self.bytes[self.len..]);
        self.len += width;
    }

    fn flush(&mut self, emit: &mut impl FnMut(&str)) {
        let (len, overflow, digits_only) = (self.len, self.overflow, self.digits_only);
        self.len = 0;
        self.overflow = false;
        self.digits_only = true;
        if len == 0 {
            return;
        }
        if digits_only {
            emit(NUMBER_TOKEN);
            return;
        }
        if overflow {
            return;
        }
        // Only whole chars were pushed, so this cannot fail.
        let Ok(word) = std::str::from_utf8(&self.bytes[..len]) else {
            unreachable!("WordBuf holds whole UTF-8 chars")
        };
        if is_english_stop_word(word) {
            return;
        }
        emit(stem(word));
    }
}

/// Light English suffix stemming: plurals, "-ing", "-ed" and a final "e", so that "crashes",
/// "crashing" and "crashed" meet at "crash" and "charge"/"charged" at "charg". Stems need not be
/// words, only the same for training and classification, which both go through here. Every rule
/// only cuts a suffix, so the stem is a slice of the word and nothing is allocated.
fn stem(word: &str) -> &str {
    if !word.is_ascii() || word.len() <= 3 {
        return word;
    }
    if let Some(stem) = word.strip_suffix("ies").filter(|s| s.len() >= 2) {
        // "deliveries" -> "deliver", which is also where "delivery" ends up.
        return stem;
    }
    let mut w = word;
    if let Some(stem) = w.strip_suffix("es").filter(|s| ends_with_sibilant(s)) {
        w = stem; // "crashes", "boxes", "addresses"
    } else if w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us") && !w.ends_with("is") {
        w = &w[..w.len() - 1];
    }
    if let Some(stem) = w.strip_suffix("ing").filter(|s| s.len() >= 3) {
        w = undouble(stem); // "shipping" -> "ship", "loading" -> "load"
    } else if let Some(stem) = w.strip_suffix("ed").filter(|s| s.len() >= 4) {
        w = undouble(stem); // "shipped" -> "ship", "locked" -> "lock"
    }
    let bytes = w.as_bytes();
    if bytes.len() > 4 && w.ends_with('e') {
        w = &w[..w.len() - 1]; // "charge" -> "charg", meeting "charged"
    } else if bytes.len() > 3 && w.ends_with('y') && !is_vowel(bytes[bytes.len() - 2]) {
        w = &w[..w.len() - 1]; // "delivery" -> "deliver"
    }
    w
}

fn is_vowel(byte: u8) -> bool {
    matches!(byte, b'a' | b'e' | b'i' | b'o' | b'u')
}

fn ends_with_sibilant(stem: &str) -> bool {
    stem.len() >= 3
        && ["s", "x", "z", "ch", "sh"]
            .iter()
            .any(|s| stem.ends_with(s))
}

/// "shipp" -> "ship"; "l", "s" and "z" stay doubled as Porter does ("called", "missed").
fn undouble(stem: &str) -> &str {
    let bytes = stem.as_bytes();
    let n = bytes.len();
    if n >= 3
        && bytes[n - 1] == bytes[n - 2]
        && !is_vowel(bytes[n - 1])
        && !matches!(bytes[n - 1], b'l' | b's' | b'z')
    {
        return &stem[..n - 1];
    }
    stem
}

/// Calls `emit` with every token of `text`, in order. Allocates nothing.
fn for_each_token(text: &str, mut emit: impl FnMut(&str)) {
    let mut word = WordBuf::new();
    let mut previous_cjk: Option<char> = None;
    for ch in text.chars() {
        let ch = fold_full_width(ch);
        if is_cjk(ch) {
            word.flush(&mut emit);
            let mut buf = [0u8; 8];
            if !is_cjk_stop_char(ch) {
                emit(ch.encode_utf8(&mut buf));
            }
            if let Some(previous) = previous_cjk {
                let first = previous.encode_utf8(&mut buf).len();
                let second = ch.encode_utf8(&mut buf[first..]).len();
                let Ok(bigram) = std::str::from_utf8(&buf[..first + second]) else {
                    unreachable!("two whole chars are valid UTF-8")
                };
                emit(bigram);
            }
            previous_cjk = Some(ch);
        } else if ch.is_alphanumeric() {
            previous_cjk = None;
            for lower in ch.to_lowercase() {
                word.push(lower);
            }
        } else if matches!(ch, '\'' | '\u{2019}') && !word.is_empty() {
            // Inside a word ("don't", "order's"): dropped, so "don't" and "dont" agree.
        } else {
            previous_cjk = None;
            word.flush(&mut emit);
        }
    }
    word.flush(&mut emit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for_each_token(text, |t| out.push(t.to_owned()));
        out
    }

    #[test]
    fn tokenizes_english_words() {
        assert_eq!(
            tokens("Where are my ORDERS? I can't find the tracking-number!"),
            ["wher", "order", "cant", "find", "track", "number"]
        );
        assert_eq!(tokens("deliveries delivery delivered"), ["deliver"; 3]);
        assert_eq!(tokens("crash crashes crashing crashed"), ["crash"; 4]);
        assert_eq!(tokens("ship shipping shipped ships"), ["ship"; 4]);
        assert_eq!(tokens("charge charges charged charging"), ["charg"; 4]);
        assert_eq!(tokens("address addresses"), ["address"; 2]);
        assert_eq!(
            tokens("status class thing need buy"),
            ["status", "class", "thing", "need", "buy"]
        );
        assert_eq!(tokens("order #12345 and 99"), ["order", "#num", "#num"]);
    }

    #[test]
    fn tokenizes_chinese_as_unigrams_and_bigrams() {
        // 我 is a stop character: no unigram, but it still forms the bigram 我要.
        assert_eq!(
            tokens("我要退款"),
            ["要", "我要", "退", "要退", "款", "退款"]
        );
        // Punctuation and Latin text break the CJK run: no bigram across them.
        assert_eq!(
            tokens("退款，密码"),
            ["退", "款", "退款", "密", "码", "密码"]
        );
        assert_eq!(tokens("订单ok吗"), ["订", "单", "订单", "ok"]);
    }

    #[test]
    fn tokenizes_mixed_and_full_width() {
        assert_eq!(
            tokens("我的App登录不了 login failed"),
            [
                "我的", "app", "登", "录", "登录", "不", "录不", "不了", "login", "fail"
            ]
        );
        assert_eq!(tokens("ＬＯＧＩＮ"), ["login"]);
    }

    #[test]
    fn drops_overlong_words_and_bounds_input() {
        let long = "x".repeat(WORD_BYTES_MAX + 1);
        assert!(tokens(&long).is_empty());
        assert_eq!(tokens(&format!("{long} refund")), ["refund"]);
        // A digit run of any length is still a number.
        assert_eq!(tokens(&"7".repeat(500)), ["#num"]);
        let text = "é".repeat(CLASSIFY_INPUT_BYTES_MAX);
        let cut = truncate_on_char_boundary(&text, CLASSIFY_INPUT_BYTES_MAX - 1);
        assert_eq!(cut.len(), CLASSIFY_INPUT_BYTES_MAX - 2);
        assert!(text.is_char_boundary(cut.len()));
    }

    const SMALL: &str = r#"
        default_group = "support"
        threshold = 0.6

        [[intent]]
        name = "refund"
        group = "support"
        examples = ["I want a refund", "refund my money please", "money back", "我要退款", "退款怎么申请"]

        [[intent]]
        name = "pricing"
        group = "sales"
        examples = ["how much does the pro plan cost", "price of the plan", "价格是多少", "套餐多少钱"]
    "#;

    #[test]
    fn classifies_english_only() {
        let model = IntentModel::from_toml_str(SMALL).unwrap();
        let c = model.classify("Can I get a refund of my money?");
        assert_eq!(c.intent, Some("refund"));
        assert_eq!(c.group, "support");
        assert!(c.confidence >= 0.6 && c.confidence <= 1.0, "{c:?}");
        let c = model.classify("What is the price of the pro plan?");
        assert_eq!((c.intent, c.group), (Some("pricing"), "sales"));
    }

    #[test]
    fn classifies_chinese_only() {
        let model = IntentModel::from_toml_str(SMALL).unwrap();
        let c = model.classify("我想申请退款");
        assert_eq!((c.intent, c.group), (Some("refund"), "support"));
        let c = model.classify("这个套餐的价格多少？");
        assert_eq!((c.intent, c.group), (Some("pricing"), "sales"));
    }

    #[test]
    fn classifies_mixed_language() {
        let model = IntentModel::from_toml_str(SMALL).unwrap();
        let c = model.classify("pro plan 多少钱?");
        assert_eq!((c.intent, c.group), (Some("pricing"), "sales"));
        let c = model.classify("refund 退款 please");
        assert_eq!((c.intent, c.group), (Some("refund"), "support"));
    }

    #[test]
    fn falls_back_below_threshold() {
        let symmetric = |threshold: &str| {
            IntentModel::from_toml_str(&format!(
                "default_group = \"support\"\nthreshold = {threshold}\n\
                 [[intent]]\nname = \"a\"\ngroup = \"sales\"\nexamples = [\"alpha shared\"]\n\
                 [[intent]]\nname = \"b\"\ngroup = \"sales\"\nexamples = [\"beta shared\"]\n"
            ))
            .unwrap()
        };
        // "shared" is equal evidence for both intents: confidence exactly one half.
        let strict = symmetric("0.6");
        let c = strict.classify("shared");
        assert_eq!((c.intent, c.group), (None, "support"));
        assert!((c.confidence - 0.5).abs() < 1e-9, "{c:?}");
        // The same text passes a lower threshold; the tie goes to the intent listed first.
        let lenient = symmetric("0.5");
        let c = lenient.classify("shared");
        assert_eq!((c.intent, c.group), (Some("a"), "sales"));
        // Clear evidence passes the strict threshold.
        let c = strict.classify("beta");
        assert_eq!(c.intent, Some("b"));
        assert!(c.confidence > 0.6, "{c:?}");
    }

    #[test]
    fn empty_and_garbage_input_fall_back() {
        let model = IntentModel::from_toml_str(SMALL).unwrap();
        for text in [
            "",
            "   ",
            "?!?!...",
            "zxqv wqpl",
            "🙂🙂",
            "\u{0}\u{1}\u{7f}",
            "the a an",
        ] {
            let c = model.classify(text);
            assert_eq!(c.intent, None, "{text:?}");
            assert_eq!(c.group, "support", "{text:?}");
            assert_eq!(c.confidence, 0.0, "{text:?}");
        }
    }

    #[test]
    fn classification_is_deterministic_and_bounded() {
        let a = IntentModel::from_toml_str(SMALL).unwrap();
        let b = IntentModel::from_toml_str(SMALL).unwrap();
        let text = "refund 退款 price 价格 money ".repeat(1000);
        let ca = a.classify(&text);
        assert_eq!(ca, b.classify(&text));
        // Only the first CLASSIFY_INPUT_BYTES_MAX bytes count.
        let cut = truncate_on_char_boundary(&text, CLASSIFY_INPUT_BYTES_MAX);
        assert_eq!(ca, a.classify(cut));
        assert!(ca.confidence.is_finite());
    }

    #[test]
    fn a_single_intent_model_needs_evidence() {
        let model = IntentModel::from_toml_str(
            "default_group = \"support\"\n[[intent]]\nname = \"x\"\ngroup = \"sales\"\nexamples = [\"buy\"]\n",
        )
        .unwrap();
        assert_eq!(model.threshold(), THRESHOLD_DEFAULT);
        let c = model.classify("buy");
        assert_eq!((c.intent, c.group, c.confidence), (Some("x"), "sales", 1.0));
        assert_eq!(model.classify("hello").intent, None);
    }

    fn err(text: &str) -> IntentError {
        IntentModel::from_toml_str(text).unwrap_err()
    }

    #[test]
    fn rejects_invalid_files_naming_the_field() {
        let head = "default_group = \"support\"\n";
        let intent = |name: &str, group: &str, examples: &str| {
            format!("[[intent]]\nname = \"{name}\"\ngroup = \"{group}\"\nexamples = {examples}\n")
        };
        assert_eq!(err(head), IntentError::NoIntents);
        assert!(matches!(
            err("threshold = 0.5\n"),
            IntentError::Parse { .. }
        ));
        let unknown = err(&format!("{head}colour = 1\n"));
        assert!(unknown.to_string().contains("colour"), "{unknown}");
        assert!(
            unknown.to_string().contains("line 2, column 1"),
            "{unknown}"
        );
        assert!(!unknown.to_string().contains('\n'), "{unknown}");
        let unknown =
            err(&format!("{head}{}", intent("a", "b", "[\"x\"]")).replace("examples", "exemples"));
        assert!(unknown.to_string().contains("exemples"), "{unknown}");
        assert_eq!(
            err(&format!(
                "{head}threshold = 1.5\n{}",
                intent("a", "b", "[\"x\"]")
            )),
            IntentError::BadThreshold { threshold: 1.5 }
        );
        assert!(matches!(
            err(&format!(
                "{head}threshold = nan\n{}",
                intent("a", "b", "[\"x\"]")
            )),
            IntentError::BadThreshold { .. }
        ));
        assert_eq!(
            err(&format!(
                "default_group = \"\"\n{}",
                intent("a", "b", "[\"x\"]")
            )),
            IntentError::BadDefaultGroup {
                problem: NameProblem::Empty
            }
        );
        let e = err(&format!(
            "{head}{}{}",
            intent("ok", "sales", "[\"x\"]"),
            intent("bad name", "b", "[\"x\"]")
        ));
        assert_eq!(
            e,
            IntentError::BadField {
                index: 1,
                name: "bad name".into(),
                field: "name",
                problem: NameProblem::BadCharacter { ch: ' ' }
            }
        );
        assert!(
            e.to_string()
                .contains("intent #1 (\"bad name\"): field `name`"),
            "{e}"
        );
        let long = "g".repeat(NAME_BYTES_MAX + 1);
        assert!(matches!(
            err(&format!("{head}{}", intent("a", &long, "[\"x\"]"))),
            IntentError::BadField {
                field: "group",
                problem: NameProblem::TooLong { .. },
                ..
            }
        ));
        assert_eq!(
            err(&format!(
                "{head}{}{}",
                intent("a", "b", "[\"x\"]"),
                intent("a", "c", "[\"y\"]")
            )),
            IntentError::DuplicateIntent {
                index: 1,
                name: "a".into(),
                first_index: 0
            }
        );
        assert_eq!(
            err(&format!("{head}{}", intent("a", "b", "[]"))),
            IntentError::NoExamples { name: "a".into() }
        );
        assert_eq!(
            err(&format!("{head}{}", intent("a", "b", "[\"fine\", \"?!\"]"))),
            IntentError::ExampleWithoutTokens {
                name: "a".into(),
                example: 1
            }
        );
        let long_example = format!("[\"{}\"]", "word ".repeat(EXAMPLE_BYTES_MAX / 5 + 1));
        assert!(matches!(
            err(&format!("{head}{}", intent("a", "b", &long_example))),
            IntentError::ExampleTooLong { example: 0, .. }
        ));
        let many = format!("[{}]", vec!["\"x\""; EXAMPLES_PER_INTENT_MAX + 1].join(","));
        assert!(matches!(
            err(&format!("{head}{}", intent("a", "b", &many))),
            IntentError::TooManyExamples { .. }
        ));
        let mut too_many = head.to_owned();
        for i in 0..=INTENTS_MAX {
            too_many += &intent(&format!("i{i}"), "b", "[\"x\"]");
        }
        assert!(
            matches!(err(&too_many), IntentError::TooManyIntents { count, .. } if count == INTENTS_MAX + 1)
        );
        let huge = " ".repeat(INTENTS_FILE_BYTES_MAX + 1);
        assert!(matches!(err(&huge), IntentError::FileTooLarge { .. }));
    }

    #[test]
    fn rejects_oversized_vocabulary() {
        // Distinct words are distinct tokens: pack VOCABULARY_MAX + 1 of them into examples that
        // each stay under EXAMPLE_BYTES_MAX.
        let mut examples = Vec::new();
        let mut next_word = 0usize;
        while next_word <= VOCABULARY_MAX {
            let mut s = String::new();
            while s.len() + 8 <= EXAMPLE_BYTES_MAX && next_word <= VOCABULARY_MAX {
                s += &format!(" w{next_word}");
                next_word += 1;
            }
            examples.push(format!("\"{s}\""));
        }
        assert!(examples.len() <= EXAMPLES_PER_INTENT_MAX);
        let text = format!(
            "default_group = \"s\"\n[[intent]]\nname = \"a\"\ngroup = \"b\"\nexamples = [{}]\n",
            examples.join(",")
        );
        assert!(text.len() <= INTENTS_FILE_BYTES_MAX);
        assert_eq!(
            err(&text),
            IntentError::VocabularyTooLarge {
                count_max: VOCABULARY_MAX
            }
        );
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HeldOut {
        case: Vec<HeldOutCase>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HeldOutCase {
        text: String,
        intent: String,
    }

    /// Accuracy floors for the demo model on its held-out set (intent and group). The measured
    /// figures are printed; the floors leave room for edits to the example lists.
    const DEMO_INTENT_ACCURACY_MIN: f64 = 0.8;
    const DEMO_GROUP_ACCURACY_MIN: f64 = 0.85;

    #[test]
    fn demo_model_accuracy_on_held_out_set() {
        let model = IntentModel::from_toml_str(include_str!("../intents/demo.toml")).unwrap();
        let held_out: HeldOut =
            toml::from_str(include_str!("../intents/demo-heldout.toml")).unwrap();
        let group_of = |intent: &str| {
            model
                .intents()
                .find(|(name, _)| *name == intent)
                .map(|(_, group)| group)
                .unwrap_or_else(|| panic!("held-out intent {intent:?} is not in demo.toml"))
        };
        let (mut intent_hits, mut group_hits) = (0usize, 0usize);
        let mut per_language = [(0usize, 0usize); 2]; // (hits, total): [english, chinese]
        for case in &held_out.case {
            let expected_group = group_of(&case.intent);
            let c = model.classify(&case.text);
            let hit = c.intent == Some(case.intent.as_str());
            intent_hits += usize::from(hit);
            group_hits += usize::from(c.group == expected_group);
            let language = usize::from(case.text.chars().any(is_cjk));
            per_language[language].0 += usize::from(hit);
            per_language[language].1 += 1;
            if !hit {
                println!(
                    "miss: {:?} expected {} got {:?} ({:.2})",
                    case.text, case.intent, c.intent, c.confidence
                );
            }
        }
        let total = held_out.case.len();
        assert!(
            total >= 40,
            "held-out set too small to mean anything: {total}"
        );
        let intent_accuracy = intent_hits as f64 / total as f64;
        let group_accuracy = group_hits as f64 / total as f64;
        println!(
            "demo intents: {} intents, vocabulary {} tokens; held-out {total} cases: intent accuracy {intent_accuracy:.3} ({intent_hits}/{total}), group accuracy {group_accuracy:.3}; english {}/{}, chinese {}/{}",
            model.intents().count(),
            model.vocabulary_len(),
            per_language[0].0,
            per_language[0].1,
            per_language[1].0,
            per_language[1].1,
        );
        assert!(
            intent_accuracy >= DEMO_INTENT_ACCURACY_MIN,
            "intent accuracy {intent_accuracy:.3} < {DEMO_INTENT_ACCURACY_MIN}"
        );
        assert!(
            group_accuracy >= DEMO_GROUP_ACCURACY_MIN,
            "group accuracy {group_accuracy:.3} < {DEMO_GROUP_ACCURACY_MIN}"
        );
        // The held-out set must not leak training examples.
        let training: Vec<&str> = include_str!("../intents/demo.toml").lines().collect();
        for case in &held_out.case {
            let quoted = format!("\"{}\"", case.text);
            assert!(
                !training.iter().any(|line| line.contains(&quoted)),
                "held-out case {:?} is also a training example",
                case.text
            );
        }
    }

    #[test]
    fn demo_model_groups_are_demo_groups() {
        let model = IntentModel::from_toml_str(include_str!("../intents/demo.toml")).unwrap();
        assert!(model.intents().count() >= 6);
        for group in model.groups() {
            assert!(matches!(group, "sales" | "support"), "{group}");
        }
    }
}
