//! Writing one rank's tensor file: a safetensors file whose header carries the crc32c of every
//! chunk of every tensor (see [`super::read`]), written straight from the bytes it is given
//! (the rank's host staging buffer) and fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

use super::read::{CHUNK_BYTES, CHUNK_KEY, CRC_PREFIX, chunk_crcs};
use crate::error::{Error, Result};

/// One tensor of a file to write: its bytes are `data[offset..offset + bytes]` of the buffer
/// [`write_file`] is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub bytes: usize,
}

/// Writes `entries` (their bytes in `data`) as the safetensors file `path`, fsynced; returns
/// the crc32c of its header (the 8-byte length and the JSON), which the manifest keeps.
pub fn write_file(path: &Path, entries: &[Entry], data: &[u8]) -> Result<u32> {
    // Like safetensors' own writer: by falling alignment, then name, so every tensor is aligned.
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut extra = HashMap::new();
    extra.insert(CHUNK_KEY.to_string(), CHUNK_BYTES.to_string());
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for entry in &order {
        let bytes = &data[entry.offset..entry.offset + entry.bytes];
        extra.insert(format!("{CRC_PREFIX}{}", entry.name), chunk_crcs(bytes));
        infos.push((
            entry.name.clone(),
            TensorInfo {
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                data_offsets: (offset, offset + entry.bytes),
            },
        ));
        offset += entry.bytes;
    }
    let bug = |e: &dyn std::fmt::Display| Error::Checkpoint {
        path: path.to_path_buf(),
        what: format!("cannot encode the tensors: {e}"),
        help: "this is a bug in tessera; please report it".into(),
    };
    let metadata = Metadata::new(Some(extra), infos).map_err(|e| bug(&e))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| bug(&e))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let prefix = (header.len() as u64).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&prefix), &header);

    let mut file = File::create(path).map_err(Error::io(path))?;
    file.write_all(&prefix).map_err(Error::io(path))?;
    file.write_all(&header).map_err(Error::io(path))?;
    for entry in order {
        file.write_all(&data[entry.offset..entry.offset + entry.bytes])
            .map_err(Error::io(path))?;
    }
    file.sync_all().map_err(Error::io(path))?;
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::read::Reader;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-write-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A file of a 3-chunk f32 tensor and a small bf16 one.
    fn written(dir: &Path) -> (Vec<u8>, u32) {
        let big = 3 * CHUNK_BYTES / 4 + 7;
        let mut data: Vec<u8> = (0..big as u32).flat_map(|v| v.to_le_bytes()).collect();
        data.extend([1u8, 2, 3, 4]);
        let entries = [
            Entry {
                name: "big".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![big],
                offset: 0,
                bytes: 4 * big,
            },
            Entry {
                name: "small".into(),
                dtype: safetensors::Dtype::BF16,
                shape: vec![2],
                offset: 4 * big,
                bytes: 4,
            },
        ];
        let crc = write_file(&dir.join("rank-00000.safetensors"), &entries, &data).unwrap();
        (data, crc)
    }

    #[test]
    fn a_written_file_is_safetensors_and_reads_back_verified() {
        let dir = scratch("round-trip");
        let (data, crc) = written(&dir);
        let bytes = std::fs::read(dir.join("rank-00000.safetensors")).unwrap();
        let parsed = safetensors::SafeTensors::deserialize(&bytes).expect("plain safetensors");
        assert_eq!(parsed.tensor("small").unwrap().data(), &[1, 2, 3, 4]);

        let headers = BTreeMap::from([("rank-00000.safetensors".to_string(), crc)]);
        let reader = Reader::new(&dir, Some(headers));
        let big = reader.read("rank-00000.safetensors", "big").unwrap();
        assert_eq!(big, data[..data.len() - 4]);
        // A range in the middle chunk reads that chunk only.
        let before = reader.count();
        let runs = reader
            .read_runs(
                "rank-00000.safetensors",
                "big",
                std::iter::once(CHUNK_BYTES + 8..CHUNK_BYTES + 16),
            )
            .unwrap();
        assert_eq!(
            runs.bytes(CHUNK_BYTES + 8..CHUNK_BYTES + 16),
            &data[CHUNK_BYTES + 8..CHUNK_BYTES + 16]
        );
        assert_eq!(reader.count().data - before.data, CHUNK_BYTES as u64);
        assert_eq!(reader.count().files, 1, "the header is read once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_changed_byte_or_header_is_damage_naming_file_tensor_and_bytes() {
        let dir = scratch("damage");
        let (_, crc) = written(&dir);
        let path = dir.join("rank-00000.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // Flip one byte in the second chunk of `big` (the f32 tensor comes first).
        bytes[8 + n + CHUNK_BYTES + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let headers = BTreeMap::from([("rank-00000.safetensors".to_string(), crc)]);
        let reader = Reader::new(&dir, Some(headers.clone()));
        // The first chunk alone is intact.
        assert!(
            reader
                .read_runs("rank-00000.safetensors", "big", std::iter::once(0..16))
                .is_ok()
        );
        let err = reader
            .read("rank-00000.safetensors", "big")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is damaged")
                && err.contains("rank-00000.safetensors tensor `big`")
                && err.contains(&format!("bytes {CHUNK_BYTES}..{}", 2 * CHUNK_BYTES)),
            "{err}"
        );

        // A header whose checksum is not the manifest's.
        bytes[8 + 2] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Reader::new(&dir, Some(headers))
            .read("rank-00000.safetensors", "small")
            .unwrap_err()
            .to_string();
        assert!(err.contains("header fails its crc32c check"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_truncated_or_missing_file_is_damage() {
        let dir = scratch("truncated");
        let (_, crc) = written(&dir);
        let path = dir.join("rank-00000.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let headers = BTreeMap::from([("rank-00000.safetensors".to_string(), crc)]);
        let err = Reader::new(&dir, Some(headers.clone()))
            .read("rank-00000.safetensors", "small")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is damaged") && err.contains("header describes"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = Reader::new(&dir, Some(headers))
            .read("rank-00000.safetensors", "small")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank-00000.safetensors is missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
