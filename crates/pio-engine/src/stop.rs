//! Stop strings for streamed text.
//!
//! Generation decodes tokens into text a piece at a time. [`StopStrings::find`] says where the
//! earliest stop string starts in the text so far (the output is cut there), and
//! [`StopStrings::holdback`] says how many trailing bytes must not be streamed yet because they
//! could be the beginning of a stop string that the next tokens complete.
//!
//! All positions are byte offsets into the `&str` and always land on char boundaries, so slicing
//! with them never panics, whatever the UTF-8 content.

/// Finds stop strings in generated text as it streams, holding back text that might be the start
/// of a stop string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStrings {
    stops: Vec<String>,
}

impl StopStrings {
    /// Stop strings to look for; empty strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings { stops: stops.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    /// The stop strings kept (the non-empty ones, in the order given).
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether there is no stop string at all (then `find` is always `None` and `holdback` 0).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Given the full text generated so far, the byte index where the earliest occurrence of any
    /// stop string starts, or `None` if none occurs.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|stop| text.find(stop.as_str())).min()
    }

    /// How many bytes at the end of `text` must be held back from streaming because they are a
    /// proper prefix of some stop string (the longest such suffix over all stop strings).
    ///
    /// A stop string already complete in `text` is [`find`](Self::find)'s business, not this.
    /// The result is always a char boundary counted from the end: `text.len() - holdback` can be
    /// used to slice `text`.
    pub fn holdback(&self, text: &str) -> usize {
        self.stops.iter().map(|stop| longest_suffix_prefix(text, stop)).max().unwrap_or(0)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with. Only prefixes ending on a
/// char boundary of `stop` are tried: `text` is valid UTF-8, so it cannot end with half a char,
/// and a suffix equal to a whole-char prefix starts on a char boundary of `text`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let longest = stop.len().saturating_sub(1).min(text.len());
    (1..=longest)
        .rev()
        .find(|&len| stop.is_char_boundary(len) && text.as_bytes().ends_with(&stop.as_bytes()[..len]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let s = stops(&["", "END", ""]);
        assert_eq!(s.stops(), ["END".to_string()]);
        assert!(!s.is_empty());
        let none = stops(&[""]);
        assert!(none.is_empty());
        assert_eq!(none.find("anything"), None);
        assert_eq!(none.holdback("anything"), 0);
    }

    #[test]
    fn find_returns_earliest_of_several() {
        let s = stops(&["STOP", "END", "\n\n"]);
        let text = "hello world END foo STOP\n\n";
        assert_eq!(s.find(text), Some(12));
        assert_eq!(&text[..12], "hello world ");
        assert_eq!(s.find("no stop here"), None);
        assert_eq!(s.find(""), None);
        assert_eq!(s.find("STOP"), Some(0));
        assert_eq!(s.find("a\n\nEND"), Some(1));
        // Overlapping stops starting at the same place.
        let s = stops(&["abc", "ab"]);
        assert_eq!(s.find("xxabcd"), Some(2));
        // First occurrence of a repeated stop.
        assert_eq!(stops(&["ab"]).find("xabyab"), Some(1));
    }

    #[test]
    fn holdback_of_partial_prefix() {
        let s = stops(&["<|end|>"]);
        assert_eq!(s.holdback("abc <|e"), 3);
        assert_eq!(s.holdback("abc <"), 1);
        assert_eq!(s.holdback("abc <|end|"), 6);
        assert_eq!(s.holdback("abc"), 0);
        assert_eq!(s.holdback(""), 0);
        // A complete stop string is not a proper prefix.
        assert_eq!(s.holdback("abc <|end|>"), 0);
        // Text shorter than the stop string.
        assert_eq!(s.holdback("<|"), 2);

        // Self-overlapping stops: the longest matching prefix wins.
        assert_eq!(stops(&["aab"]).holdback("xaa"), 2);
        assert_eq!(stops(&["abab"]).holdback("xaba"), 3);
        // Longest over several stop strings.
        assert_eq!(stops(&["###", "xy"]).holdback("a ##"), 2);
        assert_eq!(stops(&["Observation:", "Obs"]).holdback("ok. Observ"), 6);
    }

    #[test]
    fn multi_byte_utf8_text() {
        let s = stops(&["日本語", "終わり"]);
        let text = "naïve café 終わり です";
        let at = s.find(text).unwrap_or(usize::MAX);
        assert_eq!(&text[..at], "naïve café ");
        assert_eq!(&text[at..], "終わり です");

        // "日本" (6 bytes) might become "日本語".
        let text = "こんにちは日本";
        let h = s.holdback(text);
        assert_eq!(h, "日本".len());
        assert_eq!(&text[..text.len() - h], "こんにちは");
        assert_eq!(s.holdback("日本語"), 0);
        assert_eq!(s.find("日本語"), Some(0));

        // A multi-byte char that merely shares leading bytes with the stop is not held back:
        // "日" is E6 97 A5, "旧" is E6 97 A7.
        assert_eq!(s.holdback("旧"), 0);
        // Mixed ASCII / multi-byte stop string.
        let s = stops(&["é!"]);
        assert_eq!(s.holdback("café"), "é".len());
        assert_eq!(s.find("café!"), Some(3));

        // Every holdback lands on a char boundary.
        let s = stops(&["ü€𝄞x"]);
        for text in ["aü", "aü€", "aü€𝄞", "€", "𝄞"] {
            let h = s.holdback(text);
            assert!(text.is_char_boundary(text.len() - h), "{text}: {h}");
        }
        assert_eq!(s.holdback("aü€𝄞"), "ü€𝄞".len());
    }
}
