//! Byte-level text: a UTF-8 file whose bytes are the tokens (vocabulary 256).

use std::path::Path;

use super::{check_is_file, too_short};
use crate::error::{Error, Result};

/// Tokens of byte-level text: one per byte value.
pub const TEXT_VOCAB: usize = 256;

/// Checks that byte-level text fits a model with `vocab` tokens; `pattern` is `data.path`.
pub(crate) fn check_vocab(pattern: &str, vocab: usize) -> Result<()> {
    if vocab < TEXT_VOCAB {
        return Err(Error::DataFormat {
            path: pattern.into(),
            offset: None,
            what: format!(
                "data.kind: text uses one token per byte ({TEXT_VOCAB} tokens), but model.vocab \
                 is {vocab}"
            ),
            help: format!("set model.vocab: {TEXT_VOCAB} or more"),
        });
    }
    Ok(())
}

/// Reads the text file at `path`: valid UTF-8 and at least `seq_len + 1` bytes.
pub(crate) fn read_text(path: &Path, seq_len: usize) -> Result<Vec<u8>> {
    check_is_file(path)?;
    let bytes = std::fs::read(path).map_err(|source| Error::DataIo {
        path: path.to_path_buf(),
        source,
    })?;
    if let Err(error) = std::str::from_utf8(&bytes) {
        let offset = error.valid_up_to();
        let what = match error.error_len() {
            Some(_) => format!("not UTF-8 text: invalid byte 0x{:02x}", bytes[offset]),
            None => "not UTF-8 text: the file ends inside a multi-byte character".to_string(),
        };
        return Err(Error::DataFormat {
            path: path.to_path_buf(),
            offset: Some(offset as u64),
            what,
            help: "data.kind: text reads UTF-8 files; convert it (e.g. `iconv -t UTF-8`), or use \
                   data.kind: tokens for llm.c .bin shards"
                .to_string(),
        });
    }
    if bytes.len() < seq_len + 1 {
        return Err(too_short(path, bytes.len() as u64, "bytes", seq_len));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::data::tests::Scratch;

    #[test]
    fn reads_utf8_bytes() {
        let scratch = Scratch::new("text");
        let path = scratch.path("t.txt");
        std::fs::write(&path, "héllo, wörld").expect("write");
        assert_eq!(
            read_text(&path, 4).expect("valid"),
            "héllo, wörld".as_bytes()
        );
    }

    #[test]
    fn rejects_invalid_utf8_with_its_offset() {
        let scratch = Scratch::new("utf8");
        let path = scratch.path("bad.txt");
        std::fs::write(&path, b"hello \xff world").expect("write");
        let error = read_text(&path, 4).expect_err("invalid");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains("at byte 6") && message.contains("0xff"),
            "{message}"
        );
        assert!(matches!(
            error,
            Error::DataFormat {
                offset: Some(6),
                ..
            }
        ));

        std::fs::write(&path, "hello wörld".as_bytes().split_at(8).0).expect("write");
        let message = read_text(&path, 4).expect_err("cut character").to_string();
        assert!(
            message.contains("at byte 7") && message.contains("multi-byte"),
            "{message}"
        );
    }

    #[test]
    fn rejects_short_text() {
        let scratch = Scratch::new("short-text");
        let path = scratch.path("s.txt");
        std::fs::write(&path, "abcd").expect("write");
        let message = read_text(&path, 4).expect_err("4 bytes < 5").to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains("4 bytes") && message.contains("model.seq_len"),
            "{message}"
        );
        std::fs::write(&path, "abcde").expect("write");
        assert!(read_text(&path, 4).is_ok());
    }

    #[test]
    fn rejects_small_vocab() {
        let message = check_vocab("corpus/*.txt", 100)
            .expect_err("too small")
            .to_string();
        assert!(message.contains("corpus/*.txt"), "{message}");
        assert!(message.contains("model.vocab: 256 or more"), "{message}");
        assert!(check_vocab("x", 256).is_ok());
    }

    #[test]
    fn rejects_a_directory() {
        let scratch = Scratch::new("text-dir");
        let message = read_text(scratch.dir(), 4)
            .expect_err("directory")
            .to_string();
        assert!(message.contains("directory"), "{message}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let scratch = Scratch::new("text-fuzz");
            let path = scratch.path("f.txt");
            std::fs::write(&path, &body).expect("write");
            match read_text(&path, 4) {
                Ok(bytes) => prop_assert_eq!(bytes, body),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
    }
}
