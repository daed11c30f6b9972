//! Training data for one rank: llm.c token shards, byte-level text or synthetic tokens.
//!
//! [`Dataset::open`] reads and validates everything up front (token shards and text are loaded
//! fully into memory; synthetic data builds a small transition table), so that
//! [`Dataset::sample`] — called inside the training step — is a pure, allocation-free function
//! of (seed, global sample index) and the files. The [`Sampler`] maps (step, microbatch, row) on
//! a data-parallel rank to that global index. Resuming is continuing at the next step: there is
//! no other state.
//!
//! Shards and text files are cut into windows of `seq_len + 1` tokens starting every `seq_len`
//! tokens (as llm.c does), never across a file boundary. Sample `i` is window
//! `permute(i % W, W, hash(seed, i / W))` of the `W` windows: each epoch visits every window
//! exactly once in a seed-dependent order, with no shuffle buffer.
//!
//! Modules: `tokens` (the shard format, [`write_shard`]), `text`, `synthetic` (the Markov
//! chain and its entropy rate), `sampler` ([`Sampler`], the permutation and the splitmix64
//! hash). Turning the token slices into device buffers is left to the training loop.

mod sampler;
mod synthetic;
mod text;
mod tokens;

use std::fmt;
use std::path::{Path, PathBuf};

use tessera_plan::config::Data;
use tessera_plan::memory::Dtype;

pub use sampler::Sampler;
pub use synthetic::entropy_rate as synthetic_entropy_rate;
pub use text::TEXT_VOCAB;
pub use tokens::{SHARD_HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, write_shard};

use crate::error::{Error, Result};
/// The counter-based hash behind every draw of the data (splitmix64 over the words).
pub(crate) use sampler::hash as sampler_hash;
use sampler::{hash, permute};
use synthetic::Chain;

/// Hash tag of the per-epoch permutation keys.
const TAG_EPOCH: u64 = 0x4550_4F43_4853_4855;

/// The training data of one rank, loaded and validated.
pub struct Dataset {
    seq_len: usize,
    seed: u64,
    source: Source,
}

enum Source {
    Corpus(Corpus),
    Synthetic(Chain),
    Blend(Blend),
}

/// Datasets blended by weight, as Megatron blends them: every block of [`BLEND_BLOCK`] global
/// samples takes `counts[d]` samples from dataset `d` in the fixed order `pattern`, so the
/// dataset of sample `i` and its index there are pure functions of `i`, each dataset is read
/// through its own epochs in order, and the proportions are exact over every block.
struct Blend {
    parts: Vec<Dataset>,
    /// For each position of a block: (dataset, its how-many-th sample of the block).
    pattern: Vec<(u32, u32)>,
    /// Samples of each dataset per block.
    counts: Vec<u64>,
}

/// Global samples per blending block: weights are honoured to 1/4096 over every block.
const BLEND_BLOCK: u64 = 4096;

/// Hash tags of the blended datasets' seeds and of the held-out stream of synthetic data.
const TAG_BLEND: u64 = 0x424C_454E_4453_4545;
const TAG_HELD_OUT: u64 = 0x4845_4C44_4F55_5421;

impl Blend {
    /// Megatron's greedy order: position `o` of a block goes to the dataset furthest behind
    /// its share, `w_d (o + 1) - taken_d` (ties to the first).
    fn new(parts: Vec<Dataset>, weights: &[f64]) -> Blend {
        let total: f64 = weights.iter().sum();
        let shares: Vec<f64> = weights.iter().map(|w| w / total).collect();
        let mut counts = vec![0u64; parts.len()];
        let mut pattern = Vec::with_capacity(BLEND_BLOCK as usize);
        for o in 0..BLEND_BLOCK {
            let behind = |d: usize| shares[d] * (o + 1) as f64 - counts[d] as f64;
            let d = (0..parts.len())
                .max_by(|&a, &b| behind(a).total_cmp(&behind(b)).then(b.cmp(&a)))
                .expect("invariant: a blend has datasets");
            pattern.push((d as u32, counts[d] as u32));
            counts[d] += 1;
        }
        Blend {
            parts,
            pattern,
            counts,
        }
    }

    /// The dataset of global sample `index` and the sample's index in it.
    fn locate(&self, index: u64) -> (usize, u64) {
        let (block, at) = (index / BLEND_BLOCK, index % BLEND_BLOCK);
        let (d, nth) = self.pattern[at as usize];
        let d = d as usize;
        (d, block * self.counts[d] + nth as u64)
    }
}

/// Token streams (one per file) cut into windows.
struct Corpus {
    kind: CorpusKind,
    streams: Vec<Stream>,
    /// `window_ends[s]`: windows in streams `0..=s` (cumulative, so a binary search finds the
    /// stream of a window).
    window_ends: Vec<u64>,
    /// Total windows `W`; at least 1.
    windows: u64,
    /// Total tokens over all streams.
    tokens: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CorpusKind {
    Shards,
    Text,
}

enum Stream {
    Shard(Vec<u16>),
    Text(Vec<u8>),
}

impl Stream {
    fn len(&self) -> usize {
        match self {
            Stream::Shard(tokens) => tokens.len(),
            Stream::Text(bytes) => bytes.len(),
        }
    }
}

impl Dataset {
    /// Opens the data of the config. `vocab` is model.vocab (real, unpadded), `seq_len`
    /// model.seq_len, `seed` training.seed. Validates everything that can be validated up front:
    /// files exist and are files, shard headers, lengths and tokens `< vocab`, text is UTF-8,
    /// and every file holds at least one window of `seq_len + 1` tokens.
    pub fn open(data: &Data, vocab: usize, seq_len: usize, seed: u64) -> Result<Dataset> {
        if seq_len == 0 || vocab == 0 || vocab > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!(
                    "data needs model.seq_len >= 1 and 1 <= model.vocab <= 2^31 - 1 (got seq_len {seq_len}, vocab {vocab})"
                ),
                help: "fix model.seq_len and model.vocab in the config".to_string(),
            });
        }
        let source = match data {
            Data::Synthetic => Source::Synthetic(Chain::new(vocab, seed)),
            Data::Tokens { path } => {
                let streams = resolve(path)?
                    .iter()
                    .map(|file| tokens::read_shard(file, vocab, seq_len).map(Stream::Shard))
                    .collect::<Result<Vec<_>>>()?;
                Source::Corpus(Corpus::new(CorpusKind::Shards, streams, seq_len))
            }
            Data::Blend { sources } => {
                let parts = sources
                    .iter()
                    .enumerate()
                    .map(|(d, (part, _))| {
                        Dataset::open(part, vocab, seq_len, hash(&[TAG_BLEND, seed, d as u64]))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let weights: Vec<f64> = sources.iter().map(|(_, w)| *w).collect();
                Source::Blend(Blend::new(parts, &weights))
            }
            Data::Text { path } => {
                text::check_vocab(path, vocab)?;
                let streams = resolve(path)?
                    .iter()
                    .map(|file| text::read_text(file, seq_len).map(Stream::Text))
                    .collect::<Result<Vec<_>>>()?;
                Source::Corpus(Corpus::new(CorpusKind::Text, streams, seq_len))
            }
        };
        Ok(Dataset {
            seq_len,
            seed,
            source,
        })
    }

    /// The held-out data of an `eval:` section: `path` (data of the same kind as `data`), or
    /// without one the data's own held-out split. Synthetic data holds out a stream of its
    /// chain that training never draws (another seed of the same transition table).
    pub fn held_out(
        data: &Data,
        path: Option<&str>,
        vocab: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Dataset> {
        let held_out = hash(&[TAG_HELD_OUT, seed]);
        let kind = match data {
            Data::Blend { sources } => sources.first().map(|(part, _)| part),
            other => Some(other),
        };
        match (kind, path) {
            (Some(Data::Synthetic), _) => {
                // The training chain's table, its samples drawn with another seed.
                let mut dataset = Dataset::open(data, vocab, seq_len, seed)?;
                dataset.seed = held_out;
                Ok(dataset)
            }
            (Some(Data::Text { .. }), Some(path)) => Dataset::open(
                &Data::Text {
                    path: path.to_string(),
                },
                vocab,
                seq_len,
                held_out,
            ),
            (_, Some(path)) => Dataset::open(
                &Data::Tokens {
                    path: path.to_string(),
                },
                vocab,
                seq_len,
                held_out,
            ),
            (_, None) => Err(Error::Unsupported {
                what: "eval.every is set, but the data has no held-out split".into(),
                help: "set eval.path to held-out shards (or text), e.g. the val_*.bin of \
                       `launch prepare-data --val-fraction 0.01`"
                    .into(),
            }),
        }
    }

    /// Fills one training sequence for global sample `index`: `inputs[i]` is the token at
    /// position `p + i` of the sample's window and `targets[i]` the one at `p + i + 1`; both
    /// slices are `seq_len` long. Never allocates: this runs inside the training step.
    pub fn sample(&self, index: u64, inputs: &mut [i32], targets: &mut [i32]) -> Result<()> {
        for (tensor, got) in [("inputs", inputs.len()), ("targets", targets.len())] {
            if got != self.seq_len {
                return Err(Error::Shape {
                    op: "data.sample",
                    tensor,
                    expected: self.seq_len,
                    got,
                    dtype: Dtype::I32,
                });
            }
        }
        match &self.source {
            Source::Synthetic(chain) => chain.fill(self.seed, index, inputs, targets),
            Source::Corpus(corpus) => corpus.fill(self.seq_len, self.seed, index, inputs, targets),
            Source::Blend(blend) => {
                let (part, index) = blend.locate(index);
                return blend.parts[part].sample(index, inputs, targets);
            }
        }
        Ok(())
    }

    /// Short human description for logs, e.g. "3 token shards, 1.2M tokens", "text, 84.0 KB",
    /// "synthetic Markov chain, vocab 256, 0.914 nats/token".
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Synthetic(chain) => format!(
                "synthetic Markov chain, vocab {}, {:.3} nats/token",
                chain.vocab(),
                chain.entropy_rate()
            ),
            Source::Corpus(corpus) => {
                let files = corpus.streams.len();
                let what = match (corpus.kind, files) {
                    (CorpusKind::Shards, 1) => "1 token shard".to_string(),
                    (CorpusKind::Shards, n) => format!("{n} token shards"),
                    (CorpusKind::Text, 1) => "text".to_string(),
                    (CorpusKind::Text, n) => format!("text, {n} files"),
                };
                let size = match corpus.kind {
                    CorpusKind::Shards => format!("{} tokens", si(corpus.tokens, "")),
                    CorpusKind::Text => si(corpus.tokens, "B"),
                };
                format!("{what}, {size}, {} windows", corpus.windows)
            }
            Source::Blend(blend) => {
                let parts: Vec<String> = blend
                    .parts
                    .iter()
                    .zip(&blend.counts)
                    .map(|(part, &count)| {
                        let share = count as f64 / BLEND_BLOCK as f64 * 100.0;
                        format!("{share:.1}% {}", part.describe())
                    })
                    .collect();
                format!("a blend of {}", parts.join("; "))
            }
        }
    }

    /// Windows per epoch (`W`) for shards and text; `None` for the infinite synthetic stream.
    pub fn windows(&self) -> Option<u64> {
        match &self.source {
            Source::Corpus(corpus) => Some(corpus.windows),
            Source::Synthetic(_) => None,
            Source::Blend(blend) => blend.parts.iter().map(Dataset::windows).sum(),
        }
    }

    /// The loss a perfect model reaches, in nats per token: the entropy rate of the synthetic
    /// chain (see [`synthetic_entropy_rate`]); `None` for real data.
    pub fn entropy_rate(&self) -> Option<f64> {
        match &self.source {
            Source::Synthetic(chain) => Some(chain.entropy_rate()),
            Source::Corpus(_) | Source::Blend(_) => None,
        }
    }
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("data", &self.describe())
            .field("seq_len", &self.seq_len)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Corpus {
    /// Needs at least one stream, each of at least `seq_len + 1` tokens (checked by the readers).
    fn new(kind: CorpusKind, streams: Vec<Stream>, seq_len: usize) -> Corpus {
        let mut window_ends = Vec::with_capacity(streams.len());
        let mut windows = 0u64;
        let mut tokens = 0u64;
        for stream in &streams {
            // Windows start at 0, seq_len, 2 seq_len, ... and need seq_len + 1 tokens.
            windows += ((stream.len() - 1) / seq_len) as u64;
            tokens += stream.len() as u64;
            window_ends.push(windows);
        }
        assert!(
            windows > 0,
            "invariant: resolve returns files and readers check their length"
        );
        Corpus {
            kind,
            streams,
            window_ends,
            windows,
            tokens,
        }
    }

    fn fill(&self, seq_len: usize, seed: u64, index: u64, inputs: &mut [i32], targets: &mut [i32]) {
        let epoch = index / self.windows;
        let window = permute(
            index % self.windows,
            self.windows,
            hash(&[TAG_EPOCH, seed, epoch]),
        );
        let stream = self.window_ends.partition_point(|&end| end <= window);
        let first = if stream == 0 {
            0
        } else {
            self.window_ends[stream - 1]
        };
        let start = (window - first) as usize * seq_len;
        match &self.streams[stream] {
            Stream::Shard(tokens) => {
                copy_window(&tokens[start..start + seq_len + 1], inputs, targets)
            }
            Stream::Text(bytes) => copy_window(&bytes[start..start + seq_len + 1], inputs, targets),
        }
    }
}

/// `inputs` = `window[..n]`, `targets` = `window[1..]`.
fn copy_window<T: Copy + Into<i32>>(window: &[T], inputs: &mut [i32], targets: &mut [i32]) {
    for (input, &token) in inputs.iter_mut().zip(window) {
        *input = token.into();
    }
    for (target, &token) in targets.iter_mut().zip(&window[1..]) {
        *target = token.into();
    }
}

/// The files of `data.path`: the file itself, or the matches of a glob pattern sorted by name.
fn resolve(pattern: &str) -> Result<Vec<PathBuf>> {
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![PathBuf::from(pattern)]);
    }
    let matches = glob::glob(pattern).map_err(|error| Error::DataNoFiles {
        pattern: pattern.to_string(),
        help: format!(
            "it is not a valid glob pattern ({error}); write e.g. `data/fineweb_train_*.bin`"
        ),
    })?;
    let mut files = Vec::new();
    for entry in matches {
        let file = entry.map_err(|error| Error::DataIo {
            path: error.path().to_path_buf(),
            source: error.into(),
        })?;
        files.push(file);
    }
    if files.is_empty() {
        let cwd = std::env::current_dir()
            .map(|dir| dir.display().to_string())
            .unwrap_or_else(|_| "the current directory".to_string());
        return Err(Error::DataNoFiles {
            pattern: pattern.to_string(),
            help: format!(
                "check the directory and the pattern; relative paths start at the worker's \
                 working directory ({cwd})"
            ),
        });
    }
    files.sort();
    Ok(files)
}

/// Checks that `path` exists and is a file (not a directory); returns its length in bytes.
fn check_is_file(path: &Path) -> Result<u64> {
    let metadata = std::fs::metadata(path).map_err(|source| Error::DataIo {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.is_dir() {
        return Err(Error::DataFormat {
            path: path.to_path_buf(),
            offset: None,
            what: "is a directory, not a data file".to_string(),
            help: "point data.path at a file, or at a glob of files such as `dir/*.bin`"
                .to_string(),
        });
    }
    Ok(metadata.len())
}

/// The error for a file with `count` `unit` (tokens or bytes), fewer than one window.
fn too_short(path: &Path, count: u64, unit: &str, seq_len: usize) -> Error {
    Error::DataFormat {
        path: path.to_path_buf(),
        offset: None,
        what: format!(
            "has {count} {unit}, fewer than one training window of model.seq_len + 1 = {}",
            seq_len + 1
        ),
        help: "lower model.seq_len, or use a larger file (or leave this one out of data.path)"
            .to_string(),
    }
}

/// `1234567` → "1.2M" (decimal prefixes), with `unit` appended ("1.2MB").
fn si(value: u64, unit: &str) -> String {
    const PREFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")];
    let unit_gap = if unit.is_empty() { "" } else { " " };
    for (scale, prefix) in PREFIXES {
        if value as f64 >= scale {
            return format!("{:.1}{unit_gap}{prefix}{unit}", value as f64 / scale);
        }
    }
    format!("{value}{unit_gap}{unit}")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        pub(crate) fn new(name: &str) -> Scratch {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "tessera-data-{}-{name}-{unique}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch { dir }
        }

        pub(crate) fn dir(&self) -> &Path {
            &self.dir
        }

        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        fn pattern(&self, glob: &str) -> String {
            self.dir.join(glob).display().to_string()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn sample(dataset: &Dataset, index: u64) -> (Vec<i32>, Vec<i32>) {
        let mut inputs = vec![0; dataset.seq_len];
        let mut targets = vec![0; dataset.seq_len];
        dataset
            .sample(index, &mut inputs, &mut targets)
            .expect("sample");
        (inputs, targets)
    }

    /// Two shards whose tokens are their positions (offset by 1000 in the second), so a window
    /// names itself.
    fn two_shards(scratch: &Scratch) -> String {
        let first: Vec<u16> = (0..41).collect(); // (41 - 1) / 8 = 5 windows
        let second: Vec<u16> = (1000..1030).collect(); // (30 - 1) / 8 = 3 windows
        write_shard(scratch.path("b_second.bin"), &second).expect("write");
        write_shard(scratch.path("a_first.bin"), &first).expect("write");
        scratch.pattern("*.bin")
    }

    #[test]
    fn shards_round_trip_through_windows() {
        let scratch = Scratch::new("windows");
        let data = Data::Tokens {
            path: two_shards(&scratch),
        };
        let dataset = Dataset::open(&data, 2048, 8, 7).expect("open");
        assert_eq!(dataset.windows(), Some(8));
        assert_eq!(dataset.describe(), "2 token shards, 71 tokens, 8 windows");
        let mut starts = HashSet::new();
        for index in 0..8 {
            let (inputs, targets) = sample(&dataset, index);
            let base = inputs[0];
            assert!(
                base % 8 == 0 || (base >= 1000 && (base - 1000) % 8 == 0),
                "{inputs:?}"
            );
            assert_eq!(inputs, (base..base + 8).collect::<Vec<_>>());
            assert_eq!(targets, (base + 1..base + 9).collect::<Vec<_>>());
            starts.insert(base);
        }
        let expected: HashSet<i32> = [0, 8, 16, 24, 32, 1000, 1008, 1016].into();
        assert_eq!(starts, expected);
    }

    #[test]
    fn epochs_cover_every_window_exactly_once() {
        let scratch = Scratch::new("epochs");
        let data = Data::Tokens {
            path: two_shards(&scratch),
        };
        let dataset = Dataset::open(&data, 2048, 8, 3).expect("open");
        let mut orders = Vec::new();
        for epoch in 0..4u64 {
            let order: Vec<i32> = (epoch * 8..(epoch + 1) * 8)
                .map(|i| sample(&dataset, i).0[0])
                .collect();
            let unique: HashSet<i32> = order.iter().copied().collect();
            assert_eq!(unique.len(), 8, "epoch {epoch} repeats a window: {order:?}");
            orders.push(order);
        }
        assert!(
            orders.windows(2).any(|pair| pair[0] != pair[1]),
            "every epoch in the same order"
        );
    }

    #[test]
    fn the_permutation_covers_a_prime_window_count() {
        let scratch = Scratch::new("prime");
        // 1 + 4 * 997 tokens at seq_len 4: 997 windows.
        let tokens: Vec<u16> = (0..(1 + 4 * 997)).map(|i| (i % 251) as u16).collect();
        write_shard(scratch.path("p.bin"), &tokens).expect("write");
        let data = Data::Tokens {
            path: scratch.path("p.bin").display().to_string(),
        };
        let dataset = Dataset::open(&data, 256, 4, 11).expect("open");
        assert_eq!(dataset.windows(), Some(997));
        let Source::Corpus(corpus) = &dataset.source else {
            panic!("not a corpus")
        };
        let key = hash(&[TAG_EPOCH, 11, 5]);
        let seen: HashSet<u64> = (0..997).map(|p| permute(p, 997, key)).collect();
        assert_eq!(seen.len(), 997);
        assert_eq!(corpus.windows, 997);
    }

    #[test]
    fn samples_are_deterministic_and_depend_on_the_seed() {
        let scratch = Scratch::new("determinism");
        let tokens: Vec<u16> = (0..4001).map(|i| (i * 31 % 256) as u16).collect();
        write_shard(scratch.path("d.bin"), &tokens).expect("write");
        let path = scratch.path("d.bin").display().to_string();
        for data in [Data::Tokens { path }, Data::Synthetic] {
            let first = Dataset::open(&data, 256, 16, 42).expect("open");
            let again = Dataset::open(&data, 256, 16, 42).expect("open");
            let other = Dataset::open(&data, 256, 16, 43).expect("open");
            for index in [0u64, 1, 17, 250, 1_000_003] {
                assert_eq!(sample(&first, index), sample(&again, index));
            }
            let differs = (0..50).any(|i| sample(&first, i) != sample(&other, i));
            assert!(differs, "seed does not change {}", first.describe());
            assert_ne!(sample(&first, 0), sample(&first, 1));
        }
    }

    #[test]
    fn synthetic_is_learnable_and_in_vocab() {
        let dataset = Dataset::open(&Data::Synthetic, 256, 32, 1).expect("open");
        assert_eq!(dataset.windows(), None);
        let rate = dataset.entropy_rate().expect("synthetic has a rate");
        assert!(rate < 0.25 * (256f64).ln(), "{rate}");
        assert_eq!(
            dataset.describe(),
            format!("synthetic Markov chain, vocab 256, {rate:.3} nats/token")
        );
        for index in 0..100 {
            let (inputs, targets) = sample(&dataset, index);
            assert!(
                inputs
                    .iter()
                    .chain(&targets)
                    .all(|&t| (0..256).contains(&t))
            );
            assert_eq!(inputs[1..], targets[..31]);
        }
    }

    #[test]
    fn text_is_read_as_bytes() {
        let scratch = Scratch::new("text-dataset");
        std::fs::write(scratch.path("t.txt"), "abcdefghijklmnopq").expect("write");
        let data = Data::Text {
            path: scratch.path("t.txt").display().to_string(),
        };
        let dataset = Dataset::open(&data, 256, 4, 0).expect("open");
        assert_eq!(dataset.windows(), Some(4));
        assert_eq!(dataset.describe(), "text, 17 B, 4 windows");
        let (inputs, targets) = sample(&dataset, 0);
        assert_eq!(targets[..3], inputs[1..]);
        assert!(
            inputs
                .iter()
                .all(|t| (b'a' as i32..=b'q' as i32).contains(t))
        );

        let error = Dataset::open(&data, 100, 4, 0).expect_err("vocab 100");
        assert!(error.to_string().contains("model.vocab: 256 or more"));
    }

    #[test]
    fn wrong_slice_lengths_are_an_error() {
        let dataset = Dataset::open(&Data::Synthetic, 256, 8, 1).expect("open");
        let mut short = [0i32; 7];
        let mut right = [0i32; 8];
        assert!(dataset.sample(0, &mut short, &mut right).is_err());
        assert!(dataset.sample(0, &mut right, &mut short).is_err());
    }

    #[test]
    fn a_glob_matching_nothing_names_the_pattern() {
        let scratch = Scratch::new("noglob");
        let pattern = scratch.pattern("*.bin");
        let error = Dataset::open(
            &Data::Tokens {
                path: pattern.clone(),
            },
            256,
            8,
            0,
        )
        .expect_err("no match");
        assert!(matches!(error, Error::DataNoFiles { .. }));
        let message = error.to_string();
        assert!(
            message.contains(&pattern) && message.contains("help:"),
            "{message}"
        );

        let error = Dataset::open(
            &Data::Tokens {
                path: "[".to_string(),
            },
            256,
            8,
            0,
        )
        .expect_err("bad pattern");
        assert!(error.to_string().contains("not a valid glob"), "{error}");
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let scratch = Scratch::new("missing");
        let path = scratch.path("nope.bin").display().to_string();
        let error =
            Dataset::open(&Data::Tokens { path: path.clone() }, 256, 8, 0).expect_err("missing");
        assert!(matches!(error, Error::DataIo { .. }));
        let message = error.to_string();
        assert!(
            message.contains(&path) && message.contains("data.path"),
            "{message}"
        );
        let error =
            Dataset::open(&Data::Text { path: path.clone() }, 256, 8, 0).expect_err("missing");
        assert!(error.to_string().contains(&path));
    }

    #[test]
    fn a_directory_is_rejected() {
        let scratch = Scratch::new("directory");
        let path = scratch.dir().display().to_string();
        for data in [
            Data::Tokens { path: path.clone() },
            Data::Text { path: path.clone() },
        ] {
            let message = Dataset::open(&data, 256, 8, 0)
                .expect_err("directory")
                .to_string();
            assert!(
                message.contains(&path) && message.contains("directory"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_bad_shard_among_good_ones_is_named() {
        let scratch = Scratch::new("bad-among-good");
        write_shard(scratch.path("a.bin"), &[1; 20]).expect("write");
        write_shard(scratch.path("b.bin"), &[1, 2, 300, 4, 5, 6, 7, 8, 9, 10]).expect("write");
        let data = Data::Tokens {
            path: scratch.pattern("*.bin"),
        };
        let message = Dataset::open(&data, 256, 4, 0)
            .expect_err("token 300")
            .to_string();
        let bad = scratch.path("b.bin").display().to_string();
        assert!(
            message.contains(&bad) && message.contains("at byte 1028"),
            "{message}"
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(Dataset::open(&Data::Synthetic, 0, 8, 0).is_err());
        assert!(Dataset::open(&Data::Synthetic, 256, 0, 0).is_err());
    }

    #[test]
    fn si_formats() {
        assert_eq!(si(999, ""), "999");
        assert_eq!(si(1_234_567, ""), "1.2M");
        assert_eq!(si(84_000, "B"), "84.0 KB");
    }

    /// Two token datasets whose tokens say which one they come from (0.. and 1000..).
    fn two_datasets(scratch: &Scratch) -> (String, String) {
        let a: Vec<u16> = (0..401).collect(); // 50 windows of 8
        let b: Vec<u16> = (1000..1161).collect(); // 20 windows
        write_shard(scratch.path("a.bin"), &a).expect("write");
        write_shard(scratch.path("b.bin"), &b).expect("write");
        (
            scratch.path("a.bin").display().to_string(),
            scratch.path("b.bin").display().to_string(),
        )
    }

    fn blend(scratch: &Scratch, weights: [f64; 2]) -> Dataset {
        let (a, b) = two_datasets(scratch);
        let sources = vec![
            (Data::Tokens { path: a }, weights[0]),
            (Data::Tokens { path: b }, weights[1]),
        ];
        Dataset::open(&Data::Blend { sources }, 2048, 8, 5).expect("open")
    }

    #[test]
    fn a_blend_draws_each_dataset_in_its_share_and_reads_each_through_its_epochs() {
        let scratch = Scratch::new("blend");
        let dataset = blend(&scratch, [0.7, 0.3]);
        assert!(
            dataset
                .describe()
                .starts_with("a blend of 70.0% 1 token shard"),
            "{}",
            dataset.describe()
        );
        let from_b = |range: std::ops::Range<u64>| {
            range.filter(|&i| sample(&dataset, i).0[0] >= 1000).count() as u64
        };
        // Exact over a block, within one sample over any prefix of it.
        assert_eq!(from_b(0..BLEND_BLOCK), 1229); // round(0.3 x 4096) with the greedy order
        for n in [1, 10, 100, 1000] {
            let got = from_b(0..n) as f64;
            assert!((got - 0.3 * n as f64).abs() <= 1.0, "{n}: {got}");
        }
        // Dataset b's samples are its own indices 0, 1, 2, ...: its first 20 are one epoch.
        let mut windows = HashSet::new();
        for i in 0..BLEND_BLOCK {
            let (inputs, _) = sample(&dataset, i);
            if inputs[0] >= 1000 {
                windows.insert(inputs[0]);
                if windows.len() == 20 {
                    break;
                }
            }
        }
        assert_eq!(
            windows.len(),
            20,
            "the first 20 samples of b cover its 20 windows"
        );
        // A pure function of (seed, index).
        let again = blend(&Scratch::new("blend-again"), [7.0, 3.0]);
        for i in [0, 1, 77, 4095, 4096, 123_456] {
            assert_eq!(
                sample(&dataset, i),
                sample(&again, i),
                "weights are relative"
            );
        }
    }

    #[test]
    fn synthetic_data_holds_out_a_stream_training_never_draws() {
        let train = Dataset::open(&Data::Synthetic, 256, 16, 9).expect("open");
        let held = Dataset::held_out(&Data::Synthetic, None, 256, 16, 9).expect("held out");
        assert_ne!(sample(&train, 0), sample(&held, 0));
        // The same chain: the held-out data has the training data's statistics.
        assert_eq!(train.entropy_rate(), held.entropy_rate());
        let again = Dataset::held_out(&Data::Synthetic, None, 256, 16, 9).expect("held out");
        assert_eq!(sample(&held, 3), sample(&again, 3));
        let message = Dataset::held_out(
            &Data::Tokens {
                path: "x.bin".into(),
            },
            None,
            256,
            16,
            9,
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.contains("no held-out split") && message.contains("eval.path"),
            "{message}"
        );
    }

    proptest::proptest! {
        #[test]
        fn a_blend_block_gives_every_dataset_its_share(weights in proptest::collection::vec(0.01f64..100.0, 1..6)) {
            let parts = weights
                .iter()
                .map(|_| Dataset::open(&Data::Synthetic, 16, 4, 1).expect("open"))
                .collect();
            let blend = Blend::new(parts, &weights);
            let total: f64 = weights.iter().sum();
            proptest::prop_assert_eq!(blend.counts.iter().sum::<u64>(), BLEND_BLOCK);
            let mut seen = vec![Vec::new(); weights.len()];
            for i in 0..2 * BLEND_BLOCK {
                let (d, j) = blend.locate(i);
                seen[d].push(j);
            }
            for (d, (count, w)) in blend.counts.iter().zip(&weights).enumerate() {
                let share = w / total * BLEND_BLOCK as f64;
                proptest::prop_assert!((*count as f64 - share).abs() <= 1.0, "{} vs {}", count, share);
                // Each dataset's own indices run 0, 1, 2, ... over two blocks.
                let expected: Vec<u64> = (0..2 * count).collect();
                proptest::prop_assert_eq!(&seen[d], &expected);
            }
        }
    }
}
