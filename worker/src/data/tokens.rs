//! llm.c token shards: reading with full validation, and [`write_shard`].
//!
//! A shard is a 256 x int32 little-endian header — `header[0]` the magic 20240520,
//! `header[1]` the version 1, `header[2]` the token count — followed by exactly that many
//! uint16 little-endian tokens. This is the format llm.c's `dev/data` scripts write (GPT-2
//! tokenizer); the newer version 2 (uint32 tokens, Llama 3) is not supported.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::{check_is_file, too_short};
use crate::error::{Error, Result};

/// `header[0]` of every llm.c shard.
pub const SHARD_MAGIC: i32 = 20240520;
/// `header[1]`: uint16 tokens.
pub const SHARD_VERSION: i32 = 1;
/// Header bytes: 256 little-endian int32s.
pub const SHARD_HEADER_BYTES: u64 = 1024;

/// Bytes converted per read while loading a shard (keeps the peak at the token vector).
const READ_CHUNK_BYTES: usize = 1 << 16;

/// Writes `tokens` as an llm.c token shard (version 1: 1024-byte header with magic 20240520,
/// version 1 and the count, then uint16 little-endian tokens) to `path`, replacing it.
/// Used by tests and tools to make data [`super::Dataset`] reads with `data.kind: tokens`.
pub fn write_shard(path: impl AsRef<Path>, tokens: &[u16]) -> std::io::Result<()> {
    let count = i32::try_from(tokens.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} tokens do not fit an llm.c shard (at most 2^31 - 1)",
                tokens.len()
            ),
        )
    })?;
    let mut header = [0i32; 256];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = count;
    let mut out = BufWriter::new(File::create(path)?);
    for word in header {
        out.write_all(&word.to_le_bytes())?;
    }
    for token in tokens {
        out.write_all(&token.to_le_bytes())?;
    }
    out.flush()
}

/// Reads and validates the shard at `path`: every token `< vocab`, at least `seq_len + 1` of
/// them. Errors name the file, the byte offset where there is one, and the fix.
pub(crate) fn read_shard(path: &Path, vocab: usize, seq_len: usize) -> Result<Vec<u16>> {
    let io_error = |source| Error::DataIo {
        path: path.to_path_buf(),
        source,
    };
    let format_error = |offset: Option<u64>, what: String, help: &str| Error::DataFormat {
        path: path.to_path_buf(),
        offset,
        what,
        help: help.to_string(),
    };
    let length = check_is_file(path)?;
    if length < SHARD_HEADER_BYTES {
        return Err(format_error(
            Some(length),
            format!(
                "the file has {length} bytes, too short for the {SHARD_HEADER_BYTES}-byte llm.c \
                 shard header"
            ),
            "this is not an llm.c token shard, or it was cut off while copying; regenerate it \
             (for plain text use data.kind: text)",
        ));
    }
    let mut file = File::open(path).map_err(io_error)?;
    let mut header = [0u8; SHARD_HEADER_BYTES as usize];
    file.read_exact(&mut header).map_err(io_error)?;
    let word = |i: usize| {
        i32::from_le_bytes([
            header[4 * i],
            header[4 * i + 1],
            header[4 * i + 2],
            header[4 * i + 3],
        ])
    };

    let magic = word(0);
    if magic != SHARD_MAGIC {
        return Err(format_error(
            Some(0),
            format!("wrong magic number {magic} (an llm.c token shard starts with {SHARD_MAGIC})"),
            "data.kind: tokens reads llm.c .bin shards (written by llm.c's dev/data scripts or \
             tessera's write_shard); for a plain text file use data.kind: text",
        ));
    }
    let version = word(1);
    if version != SHARD_VERSION {
        return Err(format_error(
            Some(4),
            format!(
                "unsupported shard version {version} (only version {SHARD_VERSION}, uint16 tokens, is read)"
            ),
            "re-tokenize the data into version 1 shards with the GPT-2 tokenizer (llm.c's \
             dev/data scripts)",
        ));
    }
    let count = word(2);
    let Ok(count) = u64::try_from(count) else {
        return Err(format_error(
            Some(8),
            format!("the header's token count is negative ({count})"),
            "the header is corrupt; regenerate the shard",
        ));
    };
    let expected = SHARD_HEADER_BYTES + 2 * count;
    if length < expected {
        return Err(format_error(
            Some(length),
            format!(
                "truncated: the header promises {count} tokens ({expected} bytes) but the file \
                 ends after {length} bytes"
            ),
            "the shard was cut off (interrupted download or copy?); copy or regenerate it",
        ));
    }
    if length > expected {
        return Err(format_error(
            Some(expected),
            format!(
                "{} bytes follow the {count} tokens the header promises (the file has {length} \
                 bytes, expected {expected})",
                length - expected
            ),
            "the token count in the header (byte 8) disagrees with the file size; regenerate \
             the shard",
        ));
    }
    if count < seq_len as u64 + 1 {
        return Err(too_short(path, count, "tokens", seq_len));
    }

    let count = usize::try_from(count).expect("invariant: a shard read into memory fits usize");
    let mut tokens = Vec::with_capacity(count);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    while tokens.len() < count {
        let bytes = (2 * (count - tokens.len())).min(READ_CHUNK_BYTES);
        file.read_exact(&mut chunk[..bytes]).map_err(io_error)?;
        for pair in chunk[..bytes].chunks_exact(2) {
            let token = u16::from_le_bytes([pair[0], pair[1]]);
            if usize::from(token) >= vocab {
                let offset = SHARD_HEADER_BYTES + 2 * tokens.len() as u64;
                return Err(format_error(
                    Some(offset),
                    format!("token {token} is outside the vocabulary (model.vocab is {vocab})"),
                    "set model.vocab to the vocabulary of the tokenizer that made the shard \
                     (GPT-2: 50257), or re-tokenize the data",
                ));
            }
            tokens.push(token);
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::data::tests::Scratch;

    #[test]
    fn round_trips_a_generated_shard() {
        let scratch = Scratch::new("roundtrip");
        let path = scratch.path("a.bin");
        let tokens: Vec<u16> = (0..5000u32).map(|i| (i * 7919 % 50257) as u16).collect();
        write_shard(&path, &tokens).expect("write");
        let length = std::fs::metadata(&path).expect("metadata").len();
        assert_eq!(length, 1024 + 2 * 5000);
        assert_eq!(read_shard(&path, 50257, 64).expect("read"), tokens);
    }

    /// A shard of `count` tokens with one header word or the tail changed.
    fn raw_shard(count: usize, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut header = [0i32; 256];
        header[0] = SHARD_MAGIC;
        header[1] = SHARD_VERSION;
        header[2] = count as i32;
        for word in header {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        for i in 0..count {
            bytes.extend_from_slice(&((i % 100) as u16).to_le_bytes());
        }
        edit(&mut bytes);
        bytes
    }

    fn error_for(scratch: &Scratch, name: &str, bytes: &[u8]) -> (String, Error) {
        let path = scratch.path(name);
        std::fs::write(&path, bytes).expect("write");
        let error = read_shard(&path, 256, 8).expect_err("must be rejected");
        let message = error.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "no path in: {message}"
        );
        assert!(message.contains("help:"), "no help in: {message}");
        (message, error)
    }

    fn offset_of(error: &Error) -> Option<u64> {
        match error {
            Error::DataFormat { offset, .. } => *offset,
            other => panic!("expected DataFormat, got {other:?}"),
        }
    }

    #[test]
    fn rejects_wrong_magic() {
        let scratch = Scratch::new("magic");
        let bytes = raw_shard(20, |b| b[0] ^= 0xFF);
        let (message, error) = error_for(&scratch, "m.bin", &bytes);
        assert!(
            message.contains("magic") && message.contains("at byte 0"),
            "{message}"
        );
        assert_eq!(offset_of(&error), Some(0));
    }

    #[test]
    fn rejects_wrong_version() {
        let scratch = Scratch::new("version");
        let bytes = raw_shard(20, |b| b[4] = 2);
        let (message, error) = error_for(&scratch, "v.bin", &bytes);
        assert!(
            message.contains("version 2") && message.contains("at byte 4"),
            "{message}"
        );
        assert_eq!(offset_of(&error), Some(4));
    }

    #[test]
    fn rejects_truncated_and_trailing_bytes() {
        let scratch = Scratch::new("truncated");
        let bytes = raw_shard(20, |b| b.truncate(1024 + 30));
        let (message, error) = error_for(&scratch, "t.bin", &bytes);
        assert!(
            message.contains("truncated") && message.contains("at byte 1054"),
            "{message}"
        );
        assert_eq!(offset_of(&error), Some(1054));

        let bytes = raw_shard(20, |b| b.push(0));
        let (message, error) = error_for(&scratch, "trailing.bin", &bytes);
        assert!(
            message.contains("1 bytes follow") && message.contains("at byte 1064"),
            "{message}"
        );
        assert_eq!(offset_of(&error), Some(1064));

        let (message, error) = error_for(&scratch, "header.bin", &[1, 2, 3]);
        assert!(
            message.contains("too short") && message.contains("at byte 3"),
            "{message}"
        );
        assert_eq!(offset_of(&error), Some(3));
    }

    #[test]
    fn rejects_negative_count() {
        let scratch = Scratch::new("negative");
        let bytes = raw_shard(0, |b| b[11] = 0x80);
        let (message, error) = error_for(&scratch, "n.bin", &bytes);
        assert!(message.contains("negative"), "{message}");
        assert_eq!(offset_of(&error), Some(8));
    }

    #[test]
    fn rejects_token_outside_vocab_with_its_offset() {
        let scratch = Scratch::new("vocab");
        // Token 13 is 300 (>= vocab 256): byte 1024 + 2 * 13 = 1050.
        let bytes = raw_shard(20, |b| b[1050..1052].copy_from_slice(&300u16.to_le_bytes()));
        let (message, error) = error_for(&scratch, "big.bin", &bytes);
        assert!(
            message.contains("token 300") && message.contains("at byte 1050"),
            "{message}"
        );
        assert!(message.contains("model.vocab"), "{message}");
        assert_eq!(offset_of(&error), Some(1050));
    }

    #[test]
    fn rejects_a_shard_shorter_than_a_window() {
        let scratch = Scratch::new("short");
        // seq_len 8 needs 9 tokens.
        let (message, _) = error_for(&scratch, "s.bin", &raw_shard(8, |_| ()));
        assert!(
            message.contains("8 tokens") && message.contains("model.seq_len"),
            "{message}"
        );
        let path = scratch.path("ok.bin");
        std::fs::write(&path, raw_shard(9, |_| ())).expect("write");
        assert_eq!(
            read_shard(&path, 256, 8)
                .expect("9 tokens are enough")
                .len(),
            9
        );
    }

    #[test]
    fn rejects_a_directory_and_a_missing_file() {
        let scratch = Scratch::new("dir");
        let error = read_shard(scratch.dir(), 256, 8).expect_err("a directory");
        let message = error.to_string();
        assert!(message.contains("directory"), "{message}");
        assert!(
            message.contains(&scratch.dir().display().to_string()),
            "{message}"
        );

        let missing = scratch.path("missing.bin");
        let error = read_shard(&missing, 256, 8).expect_err("missing");
        assert!(matches!(error, Error::DataIo { .. }), "{error:?}");
        assert!(error.to_string().contains(&missing.display().to_string()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes, raw or behind a valid-looking header, never panic.
        #[test]
        fn random_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            with_header in any::<bool>(),
            count in 0i32..600,
        ) {
            let scratch = Scratch::new("fuzz");
            let path = scratch.path("f.bin");
            let bytes = if with_header {
                let mut bytes = raw_shard(0, |b| b[8..12].copy_from_slice(&count.to_le_bytes()));
                bytes.extend_from_slice(&body);
                bytes
            } else {
                body
            };
            std::fs::write(&path, &bytes).expect("write");
            match read_shard(&path, 256, 4) {
                Ok(tokens) => prop_assert!(tokens.iter().all(|&t| t < 256)),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
    }
}
