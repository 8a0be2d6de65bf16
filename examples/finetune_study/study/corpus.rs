//! The study's data: template-generated dialogues between named speakers about meetings,
//! purchases and plans, each with a one-line reference summary.
//!
//! - Task A (pretraining) is language modelling on the same world: whole dialogues, and
//!   summary-style sentences about unrelated events after `<sum>`. The base model so knows both
//!   registers, but has never seen a summary follow the dialogue it sums up.
//! - Task B (fine-tuning) is summarisation: `<bos> dialogue <sum> summary <eos>`, with the loss
//!   on the summary only. Dialogues change their minds (a counter-offer, another day, a friend
//!   who comes along), so a summary has to track the final decision, not copy the first words.

use std::collections::HashMap;

const NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry", "iris", "jack", "kate",
    "leo", "mia", "noah", "olga", "paul",
];
const DAYS: &[&str] = &[
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const PLACES: &[&str] = &[
    "cafe", "library", "office", "park", "station", "gym", "museum", "market",
];
const ITEMS: &[&str] = &[
    "bike", "laptop", "phone", "lamp", "guitar", "camera", "desk", "sofa",
];
const PRICES: &[&str] = &["20", "30", "40", "50", "60", "70", "80", "90"];
const EVENTS: &[&str] = &["movie", "concert", "game", "party", "lecture", "picnic"];
const SMALL_TALK: &[&[&str]] = &[
    &["how", "are", "you", "?"],
    &["fine", ",", "thanks", "."],
    &["it", "is", "raining", "today", "."],
    &["i", "am", "so", "tired", "."],
    &["did", "you", "see", "the", "news", "?"],
    &["my", "train", "was", "late", "again", "."],
];
/// Words the templates use besides the lists above.
const WORDS: &[&str] = &[
    ":", ".", ",", "?", "!", "'s", "and", "will", "meet", "on", "at", "the", "buy", "for",
    "dollars", "go", "to", "cannot", "with", "can", "we", "is", "bad", "for", "me", "how", "about",
    "ok", "see", "you", "then", "let", "us", "i", "want", "sell", "my", "much", "too", "it",
    "deal", "no", "fine", "are", "coming", "yes", "bring", "sorry", "busy", "works", "instead",
    "make", "that", "place", "rather", "not", "a", "sure", "great", "who", "else", "sells", "met",
    "went", "bought", "from", "they", "last", "week", "also", "thanks", "today", "raining", "so",
    "tired", "did", "news", "train", "was", "late", "again", "at", "there",
];
const SPECIAL: &[&str] = &[PAD, BOS, EOS, SUM, TURN];

/// Padding; never a target.
pub const PAD: &str = "<pad>";
/// The start of every sequence.
pub const BOS: &str = "<bos>";
/// The end of every sequence.
pub const EOS: &str = "<eos>";
/// Introduces a summary.
pub const SUM: &str = "<sum>";
/// Separates dialogue turns.
pub const TURN: &str = "<turn>";

/// A deterministic generator (SplitMix64): the corpus depends on the seed alone.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// `k` distinct entries of `items`.
    pub fn distinct<'a>(&mut self, items: &[&'a str], k: usize) -> Vec<&'a str> {
        let mut chosen: Vec<&str> = Vec::with_capacity(k);
        while chosen.len() < k {
            let item = self.pick(items);
            if !chosen.contains(&item) {
                chosen.push(item);
            }
        }
        chosen
    }
}

/// The word-level vocabulary of the corpus.
#[derive(Debug)]
pub struct Vocab {
    words: Vec<&'static str>,
    ids: HashMap<&'static str, usize>,
}

impl Vocab {
    pub fn new() -> Self {
        let mut words: Vec<&'static str> = Vec::new();
        let lists: [&[&'static str]; 8] =
            [SPECIAL, NAMES, DAYS, PLACES, ITEMS, PRICES, EVENTS, WORDS];
        for word in lists.into_iter().flatten().copied() {
            if !words.contains(&word) {
                words.push(word);
            }
        }
        for word in SMALL_TALK.iter().copied().flatten().copied() {
            if !words.contains(&word) {
                words.push(word);
            }
        }
        let ids = words.iter().enumerate().map(|(id, w)| (*w, id)).collect();
        Self { words, ids }
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn id(&self, word: &str) -> usize {
        self.ids[word]
    }

    pub fn word(&self, id: usize) -> &'static str {
        self.words[id]
    }

    pub fn encode(&self, words: &[&str]) -> Vec<usize> {
        words.iter().map(|w| self.id(w)).collect()
    }
}

/// One dialogue and the summary of what it decides.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub dialogue: Vec<&'static str>,
    pub summary: Vec<&'static str>,
}

/// A sequence for the language model: tokens, and which positions are predicted (the loss
/// is taken at position `i` predicting token `i + 1` where `targets[i]` is true).
#[derive(Clone, Debug)]
pub struct Sequence {
    pub tokens: Vec<usize>,
    pub targets: Vec<bool>,
}

/// Task A: a dialogue on its own, or an unrelated summary-style sentence after `<sum>`.
pub fn pretraining_sequence(vocab: &Vocab, rng: &mut Rng) -> Sequence {
    let example = example(rng);
    let mut words = vec![BOS];
    if rng.chance(0.5) {
        words.extend(example.dialogue);
    } else {
        words.push(SUM);
        words.extend(example.summary);
    }
    words.push(EOS);
    let tokens = vocab.encode(&words);
    let targets = vec![true; tokens.len() - 1];
    Sequence { tokens, targets }
}

/// Task B: `<bos> dialogue <sum> summary <eos>`, predicting the summary and `<eos>` only.
pub fn summarisation_sequence(vocab: &Vocab, example: &Example) -> Sequence {
    let prompt = prompt(vocab, example);
    let mut tokens = prompt.clone();
    tokens.extend(vocab.encode(&example.summary));
    tokens.push(vocab.id(EOS));
    // Position i predicts token i + 1: the summary starts after the prompt's last token.
    let targets = (0..tokens.len() - 1)
        .map(|i| i + 1 >= prompt.len())
        .collect();
    Sequence { tokens, targets }
}

/// `<bos> dialogue <sum>`: what the model completes with a summary.
pub fn prompt(vocab: &Vocab, example: &Example) -> Vec<usize> {
    let mut tokens = vec![vocab.id(BOS)];
    tokens.extend(vocab.encode(&example.dialogue));
    tokens.push(vocab.id(SUM));
    tokens
}

/// A random dialogue of one of the three kinds, with its summary.
pub fn example(rng: &mut Rng) -> Example {
    let mut dialogue = Dialogue::default();
    let summary = match rng.below(3) {
        0 => meeting(rng, &mut dialogue),
        1 => purchase(rng, &mut dialogue),
        _ => plan(rng, &mut dialogue),
    };
    Example {
        dialogue: dialogue.words,
        summary,
    }
}

#[derive(Default)]
struct Dialogue {
    words: Vec<&'static str>,
}

impl Dialogue {
    fn say(&mut self, speaker: &'static str, words: &[&'static str]) {
        if !self.words.is_empty() {
            self.words.push(TURN);
        }
        self.words.push(speaker);
        self.words.push(":");
        self.words.extend_from_slice(words);
    }

    /// Sometimes a line of small talk, which the summary ignores.
    fn chat(&mut self, rng: &mut Rng, speakers: &[&'static str]) {
        if rng.chance(0.3) {
            let line = SMALL_TALK[rng.below(SMALL_TALK.len())];
            self.say(rng.pick(speakers), line);
        }
    }
}

fn meeting(rng: &mut Rng, d: &mut Dialogue) -> Vec<&'static str> {
    let people = rng.distinct(NAMES, 2);
    let (a, b) = (people[0], people[1]);
    let days = rng.distinct(DAYS, 2);
    let places = rng.distinct(PLACES, 2);
    let (mut day, mut place) = (days[0], places[0]);
    d.chat(rng, &people);
    d.say(
        a,
        &["can", "we", "meet", "on", day, "at", "the", place, "?"],
    );
    match rng.below(3) {
        0 => d.say(b, &["sure", ",", "see", "you", "then", "."]),
        1 => {
            d.say(
                b,
                &[
                    day, "is", "bad", "for", "me", ".", "how", "about", days[1], "?",
                ],
            );
            day = days[1];
            d.chat(rng, &people);
            d.say(a, &["ok", ",", day, "works", "."]);
        }
        _ => {
            d.say(
                b,
                &[
                    "not", "the", place, ".", "let", "us", "make", "it", "the", places[1],
                    "instead", ".",
                ],
            );
            place = places[1];
            d.say(a, &["fine", ",", "see", "you", "there", "."]);
        }
    }
    vec![
        a, "and", b, "will", "meet", "on", day, "at", "the", place, ".",
    ]
}

fn purchase(rng: &mut Rng, d: &mut Dialogue) -> Vec<&'static str> {
    let people = rng.distinct(NAMES, 2);
    let (seller, buyer) = (people[0], people[1]);
    let item = rng.pick(ITEMS);
    let offer = 2 + rng.below(PRICES.len() - 2);
    let counter = rng.below(offer);
    d.say(seller, &["i", "want", "to", "sell", "my", item, "."]);
    d.chat(rng, &people);
    d.say(buyer, &["how", "much", "?"]);
    d.say(seller, &[PRICES[offer], "dollars", "."]);
    let price = if rng.chance(0.5) {
        d.say(buyer, &["too", "much", ".", PRICES[counter], "?"]);
        d.say(seller, &["ok", ",", PRICES[counter], "it", "is", "."]);
        PRICES[counter]
    } else {
        d.say(buyer, &["deal", "!"]);
        PRICES[offer]
    };
    vec![
        buyer, "will", "buy", seller, "'s", item, "for", price, "dollars", ".",
    ]
}

fn plan(rng: &mut Rng, d: &mut Dialogue) -> Vec<&'static str> {
    let people = rng.distinct(NAMES, 3);
    let (a, b, c) = (people[0], people[1], people[2]);
    let event = rng.pick(EVENTS);
    let day = rng.pick(DAYS);
    d.say(
        a,
        &["are", "you", "coming", "to", "the", event, "on", day, "?"],
    );
    d.chat(rng, &people[..2]);
    match rng.below(3) {
        0 => {
            d.say(b, &["yes", ",", "see", "you", "there", "."]);
            vec![
                a, "and", b, "will", "go", "to", "the", event, "on", day, ".",
            ]
        }
        1 => {
            d.say(b, &["yes", ".", "i", "will", "bring", c, "."]);
            vec![
                a, ",", b, "and", c, "will", "go", "to", "the", event, "on", day, ".",
            ]
        }
        _ => {
            d.say(b, &["sorry", ",", "i", "am", "busy", "on", day, "."]);
            vec![b, "cannot", "go", "to", "the", event, "with", a, "."]
        }
    }
}
