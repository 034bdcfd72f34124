//! Keyword auto-replies and canned replies from a tenant's config: pick the text of the system message to send for a visitor's message, or the reply an agent names; no I/O, no allocation per message.
//!
//! Auto-replies: rules are tried in config order and the first rule with a matching keyword
//! wins (so operators order them by priority). Matching is case-insensitive (Unicode lowercase)
//! and folds full-width ASCII (`ＨＥＬＰ` = `help`), as the intent classifier does. A keyword
//! that starts and ends with an ASCII letter or digit only matches whole words (`hi` does not
//! match `this`); other keywords, Chinese ones in particular, match anywhere, because Chinese is
//! written without spaces. At most `auto_replies_per_conversation_max` auto-replies are sent per
//! conversation: the caller counts what it sent and passes the count in.
//!
//! Canned replies: agents send them by name, either through the lookup or by sending the text
//! `/name` (see [`CannedReplies::expand`]).
//!
//! The gateway sends the returned text as a system message with its own seq.

use std::collections::HashMap;

use crate::tenant::{AutoReplyConfig, CannedReplyConfig};

/// Only this many bytes of a message are searched for keywords (cut on a char boundary): the
/// bound keeps the cost per message fixed; keywords that matter come early.
pub const AUTO_REPLY_INPUT_BYTES_MAX: usize = 4096;

#[derive(Debug)]
struct Keyword {
    /// The folded keyword's searcher, built once: a per-message `str::contains` would set up
    /// a new two-way searcher for every keyword of every message.
    finder: memchr::memmem::Finder<'static>,
    whole_word: bool,
}

#[derive(Debug)]
struct Rule {
    keywords: Vec<Keyword>,
    text: Box<str>,
}

/// A chosen auto-reply: the rule's index in the config (for logs and metrics) and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoReply<'a> {
    pub rule: usize,
    pub text: &'a str,
}

/// A tenant's keyword rules.
#[derive(Debug)]
pub struct AutoReplies {
    rules: Vec<Rule>,
    per_conversation_max: u32,
    /// Every keyword of every rule in one automaton: a message none of them occurs in (most
    /// messages) is done after one pass, instead of one search per keyword. `None` when there
    /// are no keywords (or the automaton could not be built: then every keyword is searched).
    any_keyword: Option<aho_corasick::AhoCorasick>,
}

impl AutoReplies {
    /// From validated config (see `tenant::validate_tenants`).
    pub fn new(configs: &[AutoReplyConfig], per_conversation_max: u32) -> Self {
        let mut scratch = String::new();
        let rules = configs
            .iter()
            .map(|c| Rule {
                keywords: c
                    .keywords
                    .iter()
                    .map(|k| {
                        fold_into(k.trim(), &mut scratch);
                        let whole_word = scratch.starts_with(|c: char| c.is_ascii_alphanumeric())
                            && scratch.ends_with(|c: char| c.is_ascii_alphanumeric());
                        Keyword {
                            finder: memchr::memmem::Finder::new(scratch.as_bytes()).into_owned(),
                            whole_word,
                        }
                    })
                    .filter(|k| !k.finder.needle().is_empty())
                    .collect(),
                text: c.text.as_str().into(),
            })
            .collect::<Vec<Rule>>();
        let needles: Vec<&[u8]> = rules
            .iter()
            .flat_map(|r| r.keywords.iter().map(|k| k.finder.needle()))
            .collect();
        let any_keyword = if needles.is_empty() {
            None
        } else {
            aho_corasick::AhoCorasick::new(&needles).ok()
        };
        Self {
            rules,
            per_conversation_max,
            any_keyword,
        }
    }

    /// The auto-reply for a visitor's `text`, if a rule matches and the conversation has had
    /// fewer than the limit (`sent_in_conversation` so far). `scratch` is reused between calls
    /// so matching allocates nothing once it has grown.
    pub fn find(
        &self,
        text: &str,
        sent_in_conversation: u32,
        scratch: &mut String,
    ) -> Option<AutoReply<'_>> {
        if sent_in_conversation >= self.per_conversation_max || self.rules.is_empty() {
            return None;
        }
        fold_into(
            truncate_on_char_boundary(text, AUTO_REPLY_INPUT_BYTES_MAX),
            scratch,
        );
        let haystack = scratch.as_str();
        // No keyword occurs anywhere: no rule can match (whole-word or not).
        if let Some(any) = &self.any_keyword
            && !any.is_match(haystack)
        {
            return None;
        }
        self.rules.iter().enumerate().find_map(|(rule, r)| {
            r.keywords
                .iter()
                .any(|k| contains(haystack, k))
                .then_some(AutoReply {
                    rule,
                    text: &r.text,
                })
        })
    }

    pub fn per_conversation_max(&self) -> u32 {
        self.per_conversation_max
    }
}

fn contains(haystack: &str, keyword: &Keyword) -> bool {
    let bytes = haystack.as_bytes();
    if !keyword.whole_word {
        return keyword.finder.find(bytes).is_some();
    }
    // Non-overlapping matches, left to right, as `str::match_indices` gives them.
    let len = keyword.finder.needle().len();
    keyword.finder.find_iter(bytes).any(|at| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + len).copied();
        !before.is_some_and(|b| b.is_ascii_alphanumeric())
            && !after.is_some_and(|b| b.is_ascii_alphanumeric())
    })
}

/// Lowercase with full-width ASCII folded to ASCII, into `out` (cleared first).
fn fold_into(text: &str, out: &mut String) {
    out.clear();
    if text.is_ascii() {
        // The common case, byte at a time: ASCII has no full-width forms to fold.
        out.push_str(text);
        out.make_ascii_lowercase();
        return;
    }
    for ch in text.chars() {
        let ch = match ch {
            // Full-width forms of ASCII '!'..'~'.
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(ch as u32 - 0xFEE0).unwrap_or(ch),
            '\u{3000}' => ' ',
            _ => ch,
        };
        if ch.is_ascii() {
            out.push(ch.to_ascii_lowercase());
        } else {
            out.extend(ch.to_lowercase());
        }
    }
}

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

/// A tenant's canned replies by name.
#[derive(Debug, Default)]
pub struct CannedReplies {
    by_name: HashMap<Box<str>, Box<str>>,
}

impl CannedReplies {
    /// From validated config (names unique).
    pub fn new(configs: &[CannedReplyConfig]) -> Self {
        Self {
            by_name: configs
                .iter()
                .map(|c| (c.name.as_str().into(), c.text.as_str().into()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(|t| &**t)
    }

    /// An agent's message `/name` (nothing else but surrounding whitespace) becomes the canned
    /// reply `name`; any other text, or an unknown name, is `None` and is sent as written.
    pub fn expand(&self, agent_text: &str) -> Option<&str> {
        let name = agent_text.trim().strip_prefix('/')?;
        self.get(name)
    }

    /// Names in no particular order (for an agent UI's list).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(|k| &**k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(keywords: &[&str], text: &str) -> AutoReplyConfig {
        AutoReplyConfig {
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
            text: text.into(),
        }
    }

    fn replies() -> AutoReplies {
        AutoReplies::new(
            &[
                rule(&["opening hours", "营业时间", "hi"], "hours"),
                rule(&["human", "人工"], "queue"),
                rule(&["c++", "退款"], "refund"),
            ],
            2,
        )
    }

    fn find<'a>(r: &'a AutoReplies, text: &str, sent: u32) -> Option<&'a str> {
        r.find(text, sent, &mut String::new()).map(|a| a.text)
    }

    #[test]
    fn matches_english_and_chinese_case_insensitively() {
        let r = replies();
        assert_eq!(find(&r, "What are your OPENING Hours?", 0), Some("hours"));
        assert_eq!(find(&r, "请问你们的营业时间是？", 0), Some("hours"));
        assert_eq!(find(&r, "我要转人工", 0), Some("queue"));
        assert_eq!(find(&r, "ＨＵＭＡＮ please", 0), Some("queue"));
        assert_eq!(find(&r, "Hi!", 0), Some("hours"));
        assert_eq!(find(&r, "hi", 0), Some("hours"));
        // Whole words only for ASCII keywords.
        assert_eq!(find(&r, "this is a question", 0), None);
        assert_eq!(find(&r, "humans", 0), None);
        assert_eq!(find(&r, "humanity", 0), None);
        // Non-word edges match anywhere.
        assert_eq!(find(&r, "I write C++code", 0), Some("refund"));
        assert_eq!(find(&r, "nothing relevant", 0), None);
        assert_eq!(find(&r, "", 0), None);
    }

    #[test]
    fn first_rule_wins_and_the_limit_holds() {
        let r = replies();
        // Both rule 0 and rule 1 match: the first in config order wins, wherever it appears.
        let got = r.find("human, what are your opening hours", 0, &mut String::new());
        assert_eq!(
            got,
            Some(AutoReply {
                rule: 0,
                text: "hours"
            })
        );
        assert_eq!(find(&r, "我要退款", 1), Some("refund"));
        assert_eq!(find(&r, "我要退款", 2), None, "limit per conversation");
        assert_eq!(
            AutoReplies::new(&[], 5).find("hi", 0, &mut String::new()),
            None
        );
    }

    #[test]
    fn only_the_first_bytes_are_searched() {
        let r = replies();
        let late = format!("{}human", "x ".repeat(AUTO_REPLY_INPUT_BYTES_MAX));
        assert_eq!(find(&r, &late, 0), None);
        let early = format!("human {}", "字".repeat(AUTO_REPLY_INPUT_BYTES_MAX));
        assert_eq!(find(&r, &early, 0), Some("queue"));
    }

    #[test]
    fn canned_replies() {
        let c = CannedReplies::new(&[
            CannedReplyConfig {
                name: "greeting".into(),
                text: "Hello! 您好！".into(),
            },
            CannedReplyConfig {
                name: "bye".into(),
                text: "Bye".into(),
            },
        ]);
        assert_eq!(c.get("greeting"), Some("Hello! 您好！"));
        assert_eq!(c.get("nope"), None);
        assert_eq!(c.expand("  /bye "), Some("Bye"));
        assert_eq!(c.expand("/nope"), None);
        assert_eq!(c.expand("bye"), None);
        assert_eq!(c.expand("/bye and more"), None);
        let mut names: Vec<_> = c.names().collect();
        names.sort();
        assert_eq!(names, ["bye", "greeting"]);
    }

    #[test]
    fn demo_tenant_replies_work() {
        let demo = crate::tenant::demo_tenant_config();
        let r = AutoReplies::new(&demo.auto_reply, demo.auto_replies_per_conversation_max);
        assert!(find(&r, "what are your business hours?", 0).is_some());
        assert!(find(&r, "你们几点上班", 0).is_some());
        assert!(find(&r, "转人工", 0).is_some());
        let c = CannedReplies::new(&demo.canned_reply);
        assert!(c.expand("/greeting").is_some());
    }

    /// The precompiled searchers match exactly where `str::match_indices` (what the rules
    /// were first written with) does, whole-word rule included: random haystacks over a small
    /// alphabet, so matches overlap, touch word characters and repeat.
    #[test]
    fn searchers_agree_with_str_matching() {
        fn reference(haystack: &str, needle: &str, whole_word: bool) -> bool {
            if !whole_word {
                return haystack.contains(needle);
            }
            let bytes = haystack.as_bytes();
            haystack.match_indices(needle).any(|(at, m)| {
                let before = at.checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(at + m.len()).copied();
                !before.is_some_and(|b| b.is_ascii_alphanumeric())
                    && !after.is_some_and(|b| b.is_ascii_alphanumeric())
            })
        }
        let alphabet = ['a', 'b', ' ', '人', '工', '!'];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..2_000 {
            let needle: String = (0..1 + next(3)).map(|_| alphabet[next(6)]).collect();
            let haystack: String = (0..next(24)).map(|_| alphabet[next(6)]).collect();
            let whole_word = needle.starts_with(|c: char| c.is_ascii_alphanumeric())
                && needle.ends_with(|c: char| c.is_ascii_alphanumeric());
            let keyword = Keyword {
                finder: memchr::memmem::Finder::new(needle.as_bytes()).into_owned(),
                whole_word,
            };
            assert_eq!(
                contains(&haystack, &keyword),
                reference(&haystack, &needle, whole_word),
                "{needle:?} in {haystack:?}"
            );
        }
        // Whole rule sets, with the any-keyword prefilter in front: the same pick as trying
        // every keyword of every rule in order.
        for _ in 0..500 {
            let word = |next: &mut dyn FnMut(usize) -> usize| -> String {
                (0..1 + next(3)).map(|_| alphabet[next(6)]).collect()
            };
            let configs: Vec<AutoReplyConfig> = (0..1 + next(3))
                .map(|i| {
                    let keywords: Vec<String> = (0..1 + next(3)).map(|_| word(&mut next)).collect();
                    let keywords: Vec<&str> = keywords.iter().map(String::as_str).collect();
                    rule(&keywords, &format!("reply {i}"))
                })
                .collect();
            let r = AutoReplies::new(&configs, 10);
            let haystack: String = (0..next(24)).map(|_| alphabet[next(6)]).collect();
            let want = configs.iter().position(|c| {
                c.keywords.iter().any(|k| {
                    let k = k.trim();
                    let whole = k.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && k.ends_with(|c: char| c.is_ascii_alphanumeric());
                    !k.is_empty() && reference(&haystack, k, whole)
                })
            });
            let got = r.find(&haystack, 0, &mut String::new()).map(|a| a.rule);
            assert_eq!(got, want, "{configs:?} on {haystack:?}");
        }
    }
}
