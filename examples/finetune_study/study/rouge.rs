//! ROUGE-1: the F1 of unigram overlap between a generated summary and its reference.
//!
//! Words are compared as `rouge_score` does by default: lowercased, with every character that is
//! not a letter or digit removed and the words left empty dropped (so punctuation never counts,
//! and `'s` counts as `s`). Each word counts at most as often as it appears in the other text.

use std::collections::HashMap;

/// Precision, recall and F1 of one candidate against one reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rouge1 {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// ROUGE-1 of `candidate` against `reference`. Two empty texts score 0, as in `rouge_score`.
pub fn rouge1(candidate: &[&str], reference: &[&str]) -> Rouge1 {
    let candidate = counts(candidate);
    let reference = counts(reference);
    let overlap: usize = candidate
        .iter()
        .map(|(word, n)| (*n).min(reference.get(word).copied().unwrap_or(0)))
        .sum();
    let candidate_len: usize = candidate.values().sum();
    let reference_len: usize = reference.values().sum();
    let ratio = |num: usize, den: usize| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let precision = ratio(overlap, candidate_len);
    let recall = ratio(overlap, reference_len);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Rouge1 {
        precision,
        recall,
        f1,
    }
}

/// The mean precision, recall and F1 over (candidate, reference) pairs.
pub fn mean<'a>(pairs: impl IntoIterator<Item = (&'a [&'a str], &'a [&'a str])>) -> Rouge1 {
    let mut sum = Rouge1 {
        precision: 0.0,
        recall: 0.0,
        f1: 0.0,
    };
    let mut n = 0usize;
    for (candidate, reference) in pairs {
        let score = rouge1(candidate, reference);
        sum.precision += score.precision;
        sum.recall += score.recall;
        sum.f1 += score.f1;
        n += 1;
    }
    let n = n.max(1) as f64;
    Rouge1 {
        precision: sum.precision / n,
        recall: sum.recall / n,
        f1: sum.f1 / n,
    }
}

fn counts(words: &[&str]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in words {
        let word: String = word
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if !word.is_empty() {
            *counts.entry(word).or_insert(0) += 1;
        }
    }
    counts
}
