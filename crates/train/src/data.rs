//! Token sources: a UTF-8 text file through a byte-level tokenizer, llm.c / nanoGPT `.bin` token
//! shards, and a seeded random Markov chain whose exact entropy rate is known, so a test can check
//! that the model really learns (the loss must approach that floor).
//!
//! Every source is a stream cut into batches of B×T inputs plus one target past the end, and has a
//! cursor that a checkpoint stores so a resumed run sees exactly the tokens it would have seen.

use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a source stands in its stream; stored in checkpoint manifests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataCursor {
    /// Index of the next window's first token in a file's token array.
    File { position: u64 },
    /// Generator state and the token the next window starts with.
    Markov { rng_state: u64, token: u32 },
}

pub trait TokenSource: Send {
    /// One line saying what this source is (for logs and the progress header).
    fn describe(&self) -> String;
    /// Largest token id the source can emit, plus one.
    fn vocab_bound(&self) -> usize;
    /// Fills `window` with `window.len()` consecutive tokens; the next call continues where this
    /// one ended minus one token (the last target is the next window's first input).
    fn next_window(&mut self, window: &mut [u32]);
    fn cursor(&self) -> DataCursor;
    fn restore(&mut self, cursor: &DataCursor) -> Result<()>;
    /// The source's entropy rate in nats per token, when known exactly.
    fn entropy_floor(&self) -> Option<f64> {
        None
    }
}

/// What the user asked to train on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// UTF-8 text, one token per byte; a `.bin` extension means an llm.c token shard instead.
    File(PathBuf),
    /// The built-in Markov chain over `vocab` states.
    Synthetic { vocab: usize, seed: u64 },
}

impl DataSpec {
    /// Opens the source; `window` is the batch's B×T+1 so short files are refused up front.
    pub fn open(&self, window: usize) -> Result<Box<dyn TokenSource>> {
        match self {
            DataSpec::File(path) if path.extension().is_some_and(|e| e == "bin") => {
                Ok(Box::new(FileTokens::open_shard(path, window)?))
            }
            DataSpec::File(path) => Ok(Box::new(FileTokens::open_text(path, window)?)),
            DataSpec::Synthetic { vocab, seed } => Ok(Box::new(MarkovChain::new(*vocab, *seed))),
        }
    }
}

/// A whole file's tokens in memory, read as sequential windows that wrap around.
pub struct FileTokens {
    path: PathBuf,
    kind: &'static str,
    tokens: Vec<u32>,
    vocab_bound: usize,
    position: usize,
    window: usize,
}

pub const SHARD_MAGIC: i32 = 20240520;
pub const SHARD_VERSION: i32 = 1;
const SHARD_HEADER_INTS: usize = 256;

impl FileTokens {
    fn read(path: &Path) -> Result<Vec<u8>> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::data(path, "does not exist"),
            _ => Error::io(path, e),
        })?;
        if bytes.is_empty() {
            return Err(Error::data(path, "is empty"));
        }
        Ok(bytes)
    }

    /// UTF-8 text; each byte is a token (vocabulary 256).
    pub fn open_text(path: &Path, window: usize) -> Result<Self> {
        let bytes = Self::read(path)?;
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(Error::data(
                path,
                format!("is not UTF-8 text (invalid byte at offset {})", e.valid_up_to()),
            ));
        }
        let tokens = bytes.iter().map(|&b| b as u32).collect();
        Self::new(path, "text (byte-level)", tokens, 256, window)
    }

    /// An llm.c / nanoGPT shard: 256 little-endian int32 header (magic, version, token count),
    /// then `count` uint16 tokens.
    pub fn open_shard(path: &Path, window: usize) -> Result<Self> {
        let bytes = Self::read(path)?;
        let header_bytes = SHARD_HEADER_INTS * 4;
        if bytes.len() < header_bytes {
            return Err(Error::data(
                path,
                format!("is {} bytes, shorter than the {header_bytes}-byte shard header", bytes.len()),
            ));
        }
        let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        if int(0) != SHARD_MAGIC {
            return Err(Error::data(
                path,
                format!("wrong magic number {} (a token shard starts with {SHARD_MAGIC})", int(0)),
            ));
        }
        if int(1) != SHARD_VERSION {
            return Err(Error::data(path, format!("unsupported shard version {} (expected 1)", int(1))));
        }
        let count = int(2);
        let body = &bytes[header_bytes..];
        if count < 0 || body.len() != count as usize * 2 {
            return Err(Error::data(
                path,
                format!("header says {count} tokens but the file holds {} bytes of tokens", body.len()),
            ));
        }
        let tokens: Vec<u32> =
            body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect();
        let bound = tokens.iter().max().map_or(0, |&m| m as usize + 1);
        Self::new(path, "token shard", tokens, bound, window)
    }

    fn new(
        path: &Path,
        kind: &'static str,
        tokens: Vec<u32>,
        vocab_bound: usize,
        window: usize,
    ) -> Result<Self> {
        if tokens.len() < window {
            return Err(Error::data(
                path,
                format!("has {} tokens but one batch needs {window} (batch × seq + 1)", tokens.len()),
            ));
        }
        Ok(FileTokens { path: path.to_path_buf(), kind, tokens, vocab_bound, position: 0, window })
    }
}

impl TokenSource for FileTokens {
    fn describe(&self) -> String {
        format!("{} {} ({} tokens)", self.kind, self.path.display(), self.tokens.len())
    }
    fn vocab_bound(&self) -> usize {
        self.vocab_bound
    }
    fn next_window(&mut self, window: &mut [u32]) {
        let n = window.len();
        assert!(n <= self.tokens.len());
        if self.position + n > self.tokens.len() {
            self.position = 0;
        }
        window.copy_from_slice(&self.tokens[self.position..self.position + n]);
        self.position += n - 1;
    }
    fn cursor(&self) -> DataCursor {
        DataCursor::File { position: self.position as u64 }
    }
    fn restore(&mut self, cursor: &DataCursor) -> Result<()> {
        match *cursor {
            DataCursor::File { position } if (position as usize) < self.tokens.len() => {
                self.position = position as usize;
                Ok(())
            }
            _ => Err(Error::data(
                &self.path,
                format!("checkpoint cursor {cursor:?} does not fit this file (window {})", self.window),
            )),
        }
    }
}

/// A first-order Markov chain over `vocab` states. Each state moves to itself, to its successor
/// (so the chain is irreducible and aperiodic) and to a few random states, with Dirichlet(1)
/// weights. Its entropy rate Σ π_i H(P_i) is the lowest loss any model can reach on it.
pub struct MarkovChain {
    /// successors[i] = (next states, cumulative probabilities).
    successors: Vec<(Vec<u32>, Vec<f64>)>,
    entropy_rate: f64,
    rng: Rng,
    token: u32,
}

const MARKOV_BRANCHES: usize = 8;

impl MarkovChain {
    pub fn new(vocab: usize, seed: u64) -> Self {
        assert!(vocab >= 2, "a Markov chain needs at least two states");
        let mut rng = Rng::new(seed ^ 0x6d61_726b_6f76); // "markov": the table and the stream differ
        let branches = MARKOV_BRANCHES.min(vocab);
        let mut successors = Vec::with_capacity(vocab);
        let mut probs = Vec::with_capacity(vocab);
        for i in 0..vocab {
            let mut next = vec![i as u32, ((i + 1) % vocab) as u32];
            next.dedup();
            while next.len() < branches {
                let s = rng.below(vocab as u64) as u32;
                if !next.contains(&s) {
                    next.push(s);
                }
            }
            let weights: Vec<f64> = next.iter().map(|_| -(1.0 - rng.next_f64()).ln()).collect();
            let total: f64 = weights.iter().sum();
            let p: Vec<f64> = weights.iter().map(|w| w / total).collect();
            let mut cumulative = 0.0;
            let cdf = p
                .iter()
                .map(|x| {
                    cumulative += x;
                    cumulative
                })
                .collect();
            probs.push(p);
            successors.push((next, cdf));
        }
        let pi = stationary(&successors, &probs);
        let entropy_rate =
            pi.iter().zip(&probs).map(|(pi_i, p)| pi_i * p.iter().map(|&q| -q * q.ln()).sum::<f64>()).sum();
        let mut chain = MarkovChain { successors, entropy_rate, rng: Rng::new(seed), token: 0 };
        // Burn in so the stream starts near the stationary distribution the floor assumes.
        for _ in 0..10 * vocab {
            chain.token = chain.step();
        }
        chain
    }

    fn step(&mut self) -> u32 {
        let (next, cdf) = &self.successors[self.token as usize];
        let u = self.rng.next_f64();
        let k = cdf.iter().position(|&c| u < c).unwrap_or(next.len() - 1);
        next[k]
    }

    pub fn entropy_rate(&self) -> f64 {
        self.entropy_rate
    }
}

/// Stationary distribution by power iteration, to 1e-13 in L1 (the chain mixes in tens of steps).
fn stationary(successors: &[(Vec<u32>, Vec<f64>)], probs: &[Vec<f64>]) -> Vec<f64> {
    let n = successors.len();
    let mut pi = vec![1.0 / n as f64; n];
    let mut next = vec![0.0; n];
    for _ in 0..100_000 {
        next.fill(0.0);
        for (i, ((to, _), p)) in successors.iter().zip(probs).enumerate() {
            for (&j, &q) in to.iter().zip(p) {
                next[j as usize] += pi[i] * q;
            }
        }
        let diff: f64 = pi.iter().zip(&next).map(|(a, b)| (a - b).abs()).sum();
        std::mem::swap(&mut pi, &mut next);
        if diff < 1e-13 {
            break;
        }
    }
    pi
}

impl TokenSource for MarkovChain {
    fn describe(&self) -> String {
        format!(
            "synthetic Markov chain ({} states, entropy floor {:.4} nats/token)",
            self.successors.len(),
            self.entropy_rate
        )
    }
    fn vocab_bound(&self) -> usize {
        self.successors.len()
    }
    fn next_window(&mut self, window: &mut [u32]) {
        window[0] = self.token;
        for slot in window[1..].iter_mut() {
            self.token = self.step();
            *slot = self.token;
        }
    }
    fn cursor(&self) -> DataCursor {
        DataCursor::Markov { rng_state: self.rng.state(), token: self.token }
    }
    fn restore(&mut self, cursor: &DataCursor) -> Result<()> {
        match *cursor {
            DataCursor::Markov { rng_state, token } if (token as usize) < self.successors.len() => {
                self.rng = Rng::from_state(rng_state);
                self.token = token;
                Ok(())
            }
            _ => Err(Error::Config(format!(
                "checkpoint cursor {cursor:?} is not a cursor of this Markov chain"
            ))),
        }
    }
    fn entropy_floor(&self) -> Option<f64> {
        Some(self.entropy_rate)
    }
}

/// Writes tokens as an llm.c / nanoGPT shard (used by tests and tools that make data).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<()> {
    let mut bytes = Vec::with_capacity(SHARD_HEADER_INTS * 4 + tokens.len() * 2);
    let mut header = [0i32; SHARD_HEADER_INTS];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] =
        i32::try_from(tokens.len()).map_err(|_| Error::data(path, "too many tokens for one shard"))?;
    for h in header {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("myriad-data-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn markov_empirical_entropy_matches_the_computed_rate() {
        let mut chain = MarkovChain::new(64, 5);
        let floor = chain.entropy_rate();
        // Empirical cross-entropy of the stream under the true transition probabilities.
        let mut window = vec![0u32; 200_001];
        chain.next_window(&mut window);
        let mut nll = 0.0;
        for w in window.windows(2) {
            let (to, cdf) = &chain.successors[w[0] as usize];
            let k = to.iter().position(|&s| s == w[1]).expect("transition outside the table");
            let p = cdf[k] - if k == 0 { 0.0 } else { cdf[k - 1] };
            nll -= p.ln();
        }
        let empirical = nll / 200_000.0;
        assert!((empirical - floor).abs() < 0.02, "empirical {empirical} vs floor {floor}");
    }

    #[test]
    fn markov_cursor_restores_the_stream() {
        let mut a = MarkovChain::new(32, 9);
        let mut w = vec![0u32; 17];
        a.next_window(&mut w);
        let cursor = a.cursor();
        let mut b = MarkovChain::new(32, 9);
        b.restore(&cursor).unwrap();
        let (mut wa, mut wb) = (vec![0u32; 33], vec![0u32; 33]);
        a.next_window(&mut wa);
        b.next_window(&mut wb);
        assert_eq!(wa, wb);
        assert_eq!(wa[0], w[16], "windows overlap by one token");
    }

    #[test]
    fn shard_round_trip_and_bad_magic() {
        let dir = tmp("shard");
        let path = dir.join("ok.bin");
        let tokens: Vec<u16> = (0..1000).map(|i| (i * 7 % 50000) as u16).collect();
        write_shard(&path, &tokens).unwrap();
        let mut src = FileTokens::open_shard(&path, 65).unwrap();
        let mut w = vec![0u32; 65];
        src.next_window(&mut w);
        assert_eq!(w[..3], [0, 7, 14]);
        assert_eq!(src.vocab_bound(), *tokens.iter().max().unwrap() as usize + 1);

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        let bad = dir.join("bad.bin");
        std::fs::write(&bad, bytes).unwrap();
        let err = FileTokens::open_shard(&bad, 65).err().unwrap().to_string();
        assert!(err.contains("bad.bin") && err.contains("wrong magic"), "{err}");
    }

    #[test]
    fn missing_empty_and_short_files_are_refused_by_name() {
        let dir = tmp("text");
        let missing = dir.join("nope.txt");
        let err = DataSpec::File(missing).open(10).err().unwrap().to_string();
        assert!(err.contains("nope.txt") && err.contains("does not exist"), "{err}");
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let err = DataSpec::File(empty).open(10).err().unwrap().to_string();
        assert!(err.contains("empty.txt") && err.contains("is empty"), "{err}");
        let short = dir.join("short.txt");
        std::fs::write(&short, "hello").unwrap();
        let err = DataSpec::File(short).open(10).err().unwrap().to_string();
        assert!(err.contains("has 5 tokens but one batch needs 10"), "{err}");
        let latin1 = dir.join("latin1.txt");
        std::fs::write(&latin1, [b'a', 0xe9, b'b']).unwrap();
        let err = DataSpec::File(latin1).open(2).err().unwrap().to_string();
        assert!(err.contains("not UTF-8") && err.contains("offset 1"), "{err}");
    }
}
