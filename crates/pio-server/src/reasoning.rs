//! A thinking model's reasoning split from its answer (vLLM's `--reasoning-parser`).
//!
//! Qwen3 and GLM-4.5 to 4.7 think inside `<think>` ... `</think>` before answering. Some
//! templates open the block in the prompt (Qwen3-Thinking-2507, GLM-4.7: the answer starts
//! inside it), others let the model write `<think>` itself (Qwen3's hybrid models), and with
//! `enable_thinking: false` the template writes an empty block so the answer has none.
//! [`ReasoningStream`] takes the answer as it is generated and gives the reasoning and the
//! content apart; only what could be the start of a tag is held back.

use std::fmt;
use std::str::FromStr;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// How a model marks its reasoning (one way for every family we run; vLLM's names accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    Think,
}

impl ReasoningParser {
    pub const NAMES: [&'static str; 4] = ["qwen3", "deepseek_r1", "glm45", "glm47"];
}

impl FromStr for ReasoningParser {
    type Err = String;

    fn from_str(s: &str) -> Result<ReasoningParser, String> {
        if ReasoningParser::NAMES.contains(&s) {
            Ok(ReasoningParser::Think)
        } else {
            Err(format!("unknown reasoning parser {s:?} (known: {})", ReasoningParser::NAMES.join(", ")))
        }
    }
}

impl fmt::Display for ReasoningParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("qwen3")
    }
}

/// Whether a prompt leaves the answer inside an open `<think>` block (its last tag opens one).
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: the answer may open with `<think>`.
    Start,
    Reasoning,
    Content,
}

/// Splits an answer into reasoning and content as it arrives.
#[derive(Debug)]
pub struct ReasoningStream {
    state: State,
    held: String,
    /// Content starts after the `</think>` and the blank line after it.
    trim_content: bool,
}

impl ReasoningStream {
    /// `inside`: the prompt left the answer inside an open `<think>` block.
    pub fn new(inside: bool) -> ReasoningStream {
        ReasoningStream {
            state: if inside { State::Reasoning } else { State::Start },
            held: String::new(),
            trim_content: false,
        }
    }

    /// The parts `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        // Maybe the tag, not complete yet (or only whitespace so far).
                        break;
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => {
                    if let Some(at) = self.held.find(CLOSE) {
                        let r: String = self.held[..at].to_string();
                        self.held.drain(..at + CLOSE.len());
                        push(&mut out, Part::Reasoning(r));
                        self.state = State::Content;
                        self.trim_content = true;
                    } else {
                        let keep = (1..CLOSE.len()).rev().find(|&n| self.held.ends_with(&CLOSE[..n])).unwrap_or(0);
                        let cut = self.held.len() - keep;
                        let r: String = self.held.drain(..cut).collect();
                        push(&mut out, Part::Reasoning(r));
                        break;
                    }
                }
                State::Content => {
                    if self.trim_content {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            self.held.clear();
                            break;
                        }
                        self.held = t.to_string();
                        self.trim_content = false;
                    }
                    let c = std::mem::take(&mut self.held);
                    push(&mut out, Part::Content(c));
                    break;
                }
            }
        }
        out
    }

    /// What is held at the end: reasoning cut short stays reasoning, anything else content.
    pub fn finish(&mut self) -> Vec<Part> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => push(&mut out, Part::Reasoning(held)),
            _ if self.trim_content => {}
            _ => push(&mut out, Part::Content(held)),
        }
        out
    }

    /// A whole answer: its reasoning (`None` when it has none) and its content.
    pub fn split(inside: bool, text: &str) -> (Option<String>, String) {
        let mut s = ReasoningStream::new(inside);
        let mut parts = s.push(text);
        parts.extend(s.finish());
        let (mut reasoning, mut content, mut any) = (String::new(), String::new(), false);
        for p in parts {
            match p {
                Part::Reasoning(r) => {
                    any = true;
                    reasoning.push_str(&r);
                }
                Part::Content(c) => content.push_str(&c),
            }
        }
        (any.then(|| reasoning.trim().to_string()), content)
    }
}

fn push(out: &mut Vec<Part>, p: Part) {
    let empty = match &p {
        Part::Reasoning(s) | Part::Content(s) => s.is_empty(),
    };
    if !empty {
        out.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole answer, and streamed a character at a time, give the same parts.
    fn both(inside: bool, text: &str) -> (Option<String>, String) {
        let whole = ReasoningStream::split(inside, text);
        let mut s = ReasoningStream::new(inside);
        let (mut r, mut c) = (String::new(), String::new());
        let mut parts = Vec::new();
        for ch in text.chars() {
            parts.extend(s.push(&ch.to_string()));
        }
        parts.extend(s.finish());
        for p in parts {
            match p {
                Part::Reasoning(x) => r.push_str(&x),
                Part::Content(x) => c.push_str(&x),
            }
        }
        assert_eq!(c, whole.1, "{text:?}");
        assert_eq!(whole.0.as_deref().map(str::trim), whole.0.as_deref());
        assert_eq!(r.trim(), whole.0.clone().unwrap_or_default(), "{text:?}");
        whole
    }

    #[test]
    fn splits_reasoning_from_the_answer() {
        // The model opens the block itself (Qwen3's hybrid models).
        let (r, c) = both(false, "<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.");
        assert_eq!((r.as_deref(), c.as_str()), (Some("Let me add 2 and 2."), "It is 4."));
        // The prompt opened it (thinking templates).
        let (r, c) = both(true, "Hmm, 2 + 2 < 5.\n</think>\n\nIt is 4.");
        assert_eq!((r.as_deref(), c.as_str()), (Some("Hmm, 2 + 2 < 5."), "It is 4."));
        // No thinking (enable_thinking false): all content, even a `<` at the start.
        let (r, c) = both(false, "<b>4</b>");
        assert_eq!((r, c.as_str()), (None, "<b>4</b>"));
        let (r, c) = both(false, "It is 4.");
        assert_eq!((r, c.as_str()), (None, "It is 4."));
        // Cut short while thinking: reasoning only.
        let (r, c) = both(true, "Still thinking about </thi");
        assert_eq!((r.as_deref(), c.as_str()), (Some("Still thinking about </thi"), ""));
        // A tool call after the thinking stays in the content.
        let (_, c) = both(false, "<think>x</think>\n<tool_call>{}</tool_call>");
        assert_eq!(c, "<tool_call>{}</tool_call>");
    }

    #[test]
    fn prompts_that_open_the_block() {
        assert!(prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n"));
        assert_eq!("glm45".parse(), Ok(ReasoningParser::Think));
        assert!("foo".parse::<ReasoningParser>().unwrap_err().contains("known: qwen3"));
    }
}
