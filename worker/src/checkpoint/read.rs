//! Reading a checkpoint's tensor files: only the byte ranges a caller asks for, with positioned
//! reads (no rank reads a file whole unless it needs all of it), every byte checked against
//! the checksums its writer stored, and every byte counted.
//!
//! A file's header (the safetensors JSON) carries, for each tensor, the crc32c of every
//! [`CHUNK_BYTES`] chunk of its data (`__metadata__`: `crc32c.<tensor>` = the chunks' checksums
//! as 8 hex digits each), and the manifest carries the crc32c of each file's header, so the
//! manifest vouches for every byte. A range is read rounded out to whole chunks, which are
//! verified before any byte of them is used. Files of a format-2 manifest have no checksums
//! and are read unverified.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};

/// Bytes of tensor data per checksum. Small enough that a rank taking part of a tensor
/// (resharding) reads little it does not need, large enough that the checksums are 1/16,384 of
/// the data.
pub const CHUNK_BYTES: usize = 64 << 10;

/// The `__metadata__` key of a tensor's chunk checksums.
pub(super) const CRC_PREFIX: &str = "crc32c.";
/// The `__metadata__` key of the chunk size the checksums were taken over.
pub(super) const CHUNK_KEY: &str = "crc32c_chunk_bytes";

/// The largest header a safetensors reader accepts.
const MAX_HEADER: u64 = 100_000_000;

/// What a reader has read so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCount {
    /// Bytes of tensor data.
    pub data: u64,
    /// Bytes of file headers (and the manifest, when the caller adds it).
    pub headers: u64,
    /// Tensor files opened.
    pub files: u64,
}

/// One tensor of a file, as its header describes it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub len: usize,
    /// Where the data starts in the file.
    start: u64,
    /// The crc32c of each chunk (`None`: a format-2 file, unverified).
    crcs: Option<Vec<u32>>,
    chunk: usize,
}

struct TensorFile {
    name: String,
    file: File,
    tensors: HashMap<String, Stored>,
}

/// Bytes of one tensor read in runs of whole chunks; [`Runs::bytes`] takes ranges of them.
#[derive(Debug, Default)]
pub struct Runs {
    /// (first byte, bytes), sorted and disjoint.
    runs: Vec<(usize, Vec<u8>)>,
}

impl Runs {
    /// Bytes `range` of the tensor; they were read (a range passed to [`Reader::read_runs`]).
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        let at = self
            .runs
            .partition_point(|(start, _)| *start <= range.start);
        let (start, bytes) = &self.runs[at.checked_sub(1).expect("invariant: the range was read")];
        &bytes[range.start - start..range.end - start]
    }
}

/// Reads the tensor files of one checkpoint directory.
pub struct Reader {
    dir: PathBuf,
    /// The crc32c of each file's header, from the manifest (`None`: format 2).
    headers: Option<BTreeMap<String, u32>>,
    open: RefCell<HashMap<String, Rc<TensorFile>>>,
    count: Cell<IoCount>,
}

impl Reader {
    /// A reader of the files in `dir`; `headers` are the manifest's header checksums.
    pub fn new(dir: &Path, headers: Option<BTreeMap<String, u32>>) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            headers,
            open: RefCell::new(HashMap::new()),
            count: Cell::new(IoCount::default()),
        }
    }

    /// What this reader has read.
    pub fn count(&self) -> IoCount {
        self.count.get()
    }

    fn add(&self, data: u64, headers: u64, files: u64) {
        let mut count = self.count.get();
        count.data += data;
        count.headers += headers;
        count.files += files;
        self.count.set(count);
    }

    /// A damage error about `file` (and what in it).
    pub(super) fn damaged(&self, what: String) -> Error {
        Error::CheckpointDamaged {
            path: self.dir.clone(),
            what,
            help: "the run resumes from the newest intact checkpoint; remove this one once you \
                   have looked at it"
                .into(),
        }
    }

    /// Reads `len` bytes of `file` at `offset`; a file shorter than its header says is damage.
    fn read_at(&self, file: &File, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        let path = self.dir.join(name);
        file.read_exact_at(&mut bytes, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.damaged(format!(
                    "{name} ends before byte {} that its header says it has",
                    offset + len as u64
                ))
            } else {
                Error::io(&path)(e)
            }
        })?;
        Ok(bytes)
    }

    /// The file `name`, opened and its header read and checked (once).
    fn file(&self, name: &str) -> Result<Rc<TensorFile>> {
        if let Some(open) = self.open.borrow().get(name) {
            return Ok(open.clone());
        }
        let path = self.dir.join(name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.damaged(format!("{name} is missing")));
            }
            Err(e) => return Err(Error::io(&path)(e)),
        };
        let size = file.metadata().map_err(Error::io(&path))?.len();
        let prefix = self.read_at(&file, name, 0, 8)?;
        let n = u64::from_le_bytes(prefix.clone().try_into().expect("invariant: 8 bytes"));
        if n > MAX_HEADER || 8 + n > size {
            return Err(self.damaged(format!(
                "{name} has a header length of {n} bytes in a file of {size}"
            )));
        }
        let header = self.read_at(&file, name, 8, n as usize)?;
        self.add(0, 8 + n, 1);
        if let Some(headers) = &self.headers {
            let Some(&expected) = headers.get(name) else {
                return Err(
                    self.damaged(format!("the manifest has no checksum for {name}'s header"))
                );
            };
            let crc = crc32c::crc32c_append(crc32c::crc32c(&prefix), &header);
            if crc != expected {
                return Err(self.damaged(format!(
                    "{name}'s header fails its crc32c check (the manifest says {expected:08x}, the file has {crc:08x})"
                )));
            }
        }
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| self.damaged(format!("{name}'s header is not safetensors: {e}")))?;
        let data_len = metadata.data_len() as u64;
        if 8 + n + data_len != size {
            return Err(self.damaged(format!(
                "{name} is {size} bytes, but its header describes {}",
                8 + n + data_len
            )));
        }
        let extra = metadata.metadata().clone().unwrap_or_default();
        let chunk = match extra.get(CHUNK_KEY) {
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|&c| c > 0)
                .ok_or_else(|| {
                    self.damaged(format!("{name} has a checksum chunk size of `{text}`"))
                })?,
            None if self.headers.is_some() => {
                return Err(self.damaged(format!("{name}'s header has no checksums")));
            }
            None => CHUNK_BYTES,
        };
        let mut tensors = HashMap::new();
        for (key, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let len = end - start;
            let crcs = match extra.get(&format!("{CRC_PREFIX}{key}")) {
                Some(hex) => Some(parse_crcs(hex, len.div_ceil(chunk)).ok_or_else(|| {
                    self.damaged(format!("{name}'s checksums of `{key}` are malformed"))
                })?),
                None if self.headers.is_some() => {
                    return Err(self.damaged(format!("{name} has no checksums for `{key}`")));
                }
                None => None,
            };
            tensors.insert(
                key,
                Stored {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    len,
                    start: 8 + n + start as u64,
                    crcs,
                    chunk,
                },
            );
        }
        let open = Rc::new(TensorFile {
            name: name.to_string(),
            file,
            tensors,
        });
        self.open
            .borrow_mut()
            .insert(name.to_string(), open.clone());
        Ok(open)
    }

    /// Tensor `key` of `file` as its header describes it.
    pub fn stored(&self, file: &str, key: &str) -> Result<Stored> {
        let open = self.file(file)?;
        open.tensors
            .get(key)
            .cloned()
            .ok_or_else(|| self.damaged(format!("{file} has no tensor `{key}`")))
    }

    /// All the bytes of tensor `key` of `file`, verified.
    pub fn read(&self, file: &str, key: &str) -> Result<Vec<u8>> {
        let len = self.stored(file, key)?.len;
        let mut runs = self.read_runs(file, key, std::iter::once(0..len))?;
        Ok(runs.runs.pop().map(|(_, bytes)| bytes).unwrap_or_default())
    }

    /// Bytes `ranges` of tensor `key` of `file`: every chunk that one of them overlaps is read
    /// once, in runs of adjacent chunks, and verified.
    pub fn read_runs(
        &self,
        file: &str,
        key: &str,
        ranges: impl IntoIterator<Item = Range<usize>>,
    ) -> Result<Runs> {
        let open = self.file(file)?;
        let stored = open
            .tensors
            .get(key)
            .ok_or_else(|| self.damaged(format!("{file} has no tensor `{key}`")))?;
        let chunk = stored.chunk;
        let mut chunks: Vec<usize> = Vec::new();
        for range in ranges {
            assert!(
                range.end <= stored.len,
                "invariant: ranges lie inside the tensor"
            );
            if range.is_empty() {
                continue;
            }
            chunks.extend(range.start / chunk..range.end.div_ceil(chunk));
        }
        chunks.sort_unstable();
        chunks.dedup();
        let mut runs = Vec::new();
        let mut at = 0;
        while at < chunks.len() {
            let first = chunks[at];
            let mut last = first;
            while at + 1 < chunks.len() && chunks[at + 1] == last + 1 {
                at += 1;
                last = chunks[at];
            }
            at += 1;
            let start = first * chunk;
            let end = ((last + 1) * chunk).min(stored.len);
            let bytes = self.read_at(
                &open.file,
                &open.name,
                stored.start + start as u64,
                end - start,
            )?;
            self.add((end - start) as u64, 0, 0);
            if let Some(crcs) = &stored.crcs {
                for (i, piece) in bytes.chunks(chunk).enumerate() {
                    let index = first + i;
                    let crc = crc32c::crc32c(piece);
                    if crc != crcs[index] {
                        let from = index * chunk;
                        return Err(self.damaged(format!(
                            "{} tensor `{key}`: bytes {from}..{} fail their crc32c check (stored {:08x}, read {crc:08x})",
                            open.name,
                            from + piece.len(),
                            crcs[index]
                        )));
                    }
                }
            }
            runs.push((start, bytes));
        }
        Ok(Runs { runs })
    }
}

/// `count` checksums of 8 hex digits each.
fn parse_crcs(hex: &str, count: usize) -> Option<Vec<u32>> {
    if hex.len() != 8 * count || !hex.is_ascii() {
        return None;
    }
    (0..count)
        .map(|i| u32::from_str_radix(&hex[8 * i..8 * i + 8], 16).ok())
        .collect()
}

/// The checksums of `data` in chunks of [`CHUNK_BYTES`], as [`parse_crcs`] reads them.
pub(super) fn chunk_crcs(data: &[u8]) -> String {
    let mut hex = String::with_capacity(8 * data.len().div_ceil(CHUNK_BYTES));
    for piece in data.chunks(CHUNK_BYTES) {
        hex.push_str(&format!("{:08x}", crc32c::crc32c(piece)));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_round_trip_and_refuse_a_wrong_count() {
        let data: Vec<u8> = (0..3 * CHUNK_BYTES + 5).map(|i| (i % 251) as u8).collect();
        let hex = chunk_crcs(&data);
        let crcs = parse_crcs(&hex, 4).expect("four chunks");
        assert_eq!(crcs[3], crc32c::crc32c(&data[3 * CHUNK_BYTES..]));
        assert_eq!(parse_crcs(&hex, 3), None);
        assert_eq!(parse_crcs("zzzzzzzz", 1), None);
    }

    #[test]
    fn runs_hand_out_the_ranges_they_hold() {
        let runs = Runs {
            runs: vec![(0, vec![1, 2, 3, 4]), (10, vec![5, 6, 7])],
        };
        assert_eq!(runs.bytes(1..3), &[2, 3]);
        assert_eq!(runs.bytes(10..13), &[5, 6, 7]);
        assert_eq!(runs.bytes(11..12), &[6]);
    }
}
