//! Loading a checkpoint written with another layout (mesh, ZeRO stage, virtual stages): each
//! rank works out which elements of which shards in the files hold its own shard of every
//! parameter and optimizer state, reads only the chunks of the files that hold them (see
//! [`super::read`]), and assembles its shard. Nothing is consolidated: no rank reads the
//! parts of the model that other ranks hold.
//!
//! Both layouts index a global tensor the same way (row-major, the vocabulary's padding rows
//! last), and a row of a shard is always one run of a global row, so the match is made row
//! by row: a global row's pieces are where source shards hold it, and a target row takes the
//! columns it needs from the pieces that overlap them.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

use tessera_plan::Config;
use tessera_plan::model::{ModelShape, Placed, Role, Split};

use super::export::{self, Location, SourceShard, to_f32};
use super::read::Reader;
use super::{Loader, Manifest, damaged};
use crate::error::Result;
use crate::tensor::Backend;
use crate::units::Unit;

/// The states a rank holds for a parameter, by their prefix in the files.
const STATES: [&str; 4] = ["params", "master", "adam_m", "adam_v"];

/// Columns `[col, col + len)` of a global row that row `row` of source shard `shard` holds.
#[derive(Debug, Clone, Copy)]
struct Piece {
    col: usize,
    len: usize,
    shard: usize,
    row: usize,
}

/// Where a target row's elements come from: elements `source` of a source shard (local,
/// row-major) go to elements starting at `target` of the target's values.
#[derive(Debug, Clone)]
struct Copy {
    shard: usize,
    source: Range<usize>,
    target: usize,
}

/// Rows and columns of a shard's local shape (a vector is one column).
fn rows_cols(placed: &Placed) -> (usize, usize) {
    let cols = placed.local_shape.get(1).copied().unwrap_or(1);
    (placed.numel() as usize / cols.max(1), cols)
}

/// Every global row's pieces in the source shards of one tensor. A replicated tensor is
/// equal on every tensor rank: its pieces are the first rank's.
fn pieces(shards: &[SourceShard], shape: &ModelShape) -> HashMap<usize, Vec<Piece>> {
    let mut rows: HashMap<usize, Vec<Piece>> = HashMap::new();
    for (index, shard) in shards.iter().enumerate() {
        if shard.placed.spec.split == Split::Replicated && index > 0 {
            continue;
        }
        let global_cols = shape
            .global_shape(&shard.placed.spec)
            .get(1)
            .copied()
            .unwrap_or(1);
        let (count, cols) = rows_cols(&shard.placed);
        for row in 0..count {
            let at = shape.global_index(&shard.placed, shard.tp_rank, row * cols);
            rows.entry(at / global_cols).or_default().push(Piece {
                col: at % global_cols,
                len: cols,
                shard: index,
                row,
            });
        }
    }
    rows
}

/// The copies that fill local elements `need` of `placed` (tensor rank `tp_rank`, `shape`)
/// from the source shards whose rows are `rows`; elements no source holds (padding rows of the
/// vocabulary) are left out and stay 0. `real_rows` is the global row count without padding.
fn copies(
    placed: &Placed,
    shape: &ModelShape,
    tp_rank: usize,
    need: Range<usize>,
    rows: &HashMap<usize, Vec<Piece>>,
    source_cols: impl Fn(usize) -> usize,
    real_rows: usize,
) -> Vec<Copy> {
    let global_cols = shape
        .global_shape(&placed.spec)
        .get(1)
        .copied()
        .unwrap_or(1);
    let (_, cols) = rows_cols(placed);
    let mut out = Vec::new();
    if need.is_empty() {
        return out;
    }
    for row in need.start / cols..need.end.div_ceil(cols) {
        let (start, end) = (need.start.max(row * cols), need.end.min((row + 1) * cols));
        let at = shape.global_index(placed, tp_rank, row * cols);
        let (global_row, first_col) = (at / global_cols, at % global_cols + start - row * cols);
        let last_col = first_col + (end - start);
        if global_row >= real_rows {
            continue;
        }
        for piece in rows.get(&global_row).into_iter().flatten() {
            let (from, to) = (
                first_col.max(piece.col),
                last_col.min(piece.col + piece.len),
            );
            if from >= to {
                continue;
            }
            let source = piece.row * source_cols(piece.shard) + (from - piece.col);
            out.push(Copy {
                shard: piece.shard,
                source: source..source + (to - from),
                target: start - need.start + (from - first_col),
            });
        }
    }
    out
}

/// A read of one tensor of one file, and where its values go.
struct Request {
    /// Bytes of the tensor.
    bytes: Range<usize>,
    /// (value buffer, first element there).
    target: (usize, usize),
}

/// Restores this rank's state from the checkpoint in `path`, written with another layout.
pub(super) fn reshard<B: Backend>(
    path: &Path,
    manifest: &Manifest,
    reader: &Reader,
    config: &Config,
    backend: &mut B,
    units: &[Unit],
    loader: Loader,
) -> Result<()> {
    let written = export::written_config(manifest, config);
    let sources = export::shard_sources(&written);
    let source_shape = ModelShape::new(&written.model, written.parallel.tensor);
    let shape = ModelShape::new(&config.model, config.parallel.tensor);
    let tp_rank = loader.coord.tp_rank;

    // The values this rank needs: (unit, parameter, state, local elements), filled by reads.
    let mut wanted: Vec<(usize, usize, &str, Range<usize>)> = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::new();
    let mut requests: BTreeMap<(String, String), Vec<Request>> = BTreeMap::new();
    let mut row_cache: HashMap<String, HashMap<usize, Vec<Piece>>> = HashMap::new();
    for (u, unit) in units.iter().enumerate() {
        for (p, placed) in unit.layout.params.iter().enumerate() {
            let name = placed.spec.name;
            let global_name = unit.param_name(name);
            let shards = sources.get(&global_name).ok_or_else(|| {
                damaged(
                    path,
                    format!("its tensor map has no tensor `{global_name}`"),
                )
            })?;
            let offset = placed.offset as usize;
            let shard = unit
                .shard_of(name)
                .map(|r| r.start - offset..r.end - offset);
            let whole = 0..placed.numel() as usize;
            let rows = row_cache
                .entry(global_name.clone())
                .or_insert_with(|| pieces(shards, &source_shape));
            let real_rows = if matches!(placed.spec.role, Role::TokenEmbedding | Role::LmHead) {
                shape.vocab
            } else {
                usize::MAX
            };
            for state in STATES {
                let need = match state {
                    "params" if unit.params().is_some() => whole.clone(),
                    "master" if unit.master.is_none() => continue,
                    _ => match &shard {
                        Some(shard) => shard.clone(),
                        None => continue,
                    },
                };
                // An fp32 run without master weights wrote its parameters in fp32.
                let from = if state == "master" && !shards[0].states.contains_key("master") {
                    "params"
                } else {
                    state
                };
                let buffer = values.len();
                values.push(vec![0.0; need.len()]);
                wanted.push((u, p, state, need.clone()));
                let source_cols = |i: usize| rows_cols(&shards[i].placed).1;
                for copy in copies(placed, &shape, tp_rank, need, rows, source_cols, real_rows) {
                    let location = shards[copy.shard].states.get(from).ok_or_else(|| {
                        damaged(path, format!("it has no `{from}` of `{global_name}`"))
                    })?;
                    for stretch in locate(reader, location, copy.source, copy.target)? {
                        let size = dtype_size(reader.stored(&stretch.file, &stretch.key)?.dtype);
                        let (start, end) = (stretch.elements.start, stretch.elements.end);
                        let key = (stretch.file, stretch.key);
                        requests.entry(key).or_default().push(Request {
                            bytes: start * size..end * size,
                            target: (buffer, stretch.target),
                        });
                    }
                }
            }
        }
    }

    for ((file, key), requests) in &requests {
        let stored = reader.stored(file, key)?;
        let runs = reader.read_runs(file, key, requests.iter().map(|r| r.bytes.clone()))?;
        for request in requests {
            let decoded = to_f32(runs.bytes(request.bytes.clone()), stored.dtype)
                .ok_or_else(|| damaged(path, format!("{file}: `{key}` is not a float tensor")))?;
            let (buffer, at) = request.target;
            values[buffer][at..at + decoded.len()].copy_from_slice(&decoded);
        }
    }

    for ((u, p, state, need), values) in wanted.into_iter().zip(values) {
        let unit = &units[u];
        let placed = &unit.layout.params[p];
        let name = placed.spec.name;
        let flat = placed.offset as usize + need.start..placed.offset as usize + need.end;
        let target = match state {
            "params" => match unit.params() {
                Some(whole) => unit.view(whole, name),
                None => unit.params_at(&flat),
            },
            "master" => unit.state_view(unit.master.expect("invariant: checked above"), &flat),
            "adam_m" => unit.state_view(unit.adam_m, &flat),
            _ => unit.state_view(unit.adam_v, &flat),
        };
        backend.write(target, &values)?;
    }
    Ok(())
}

/// Elements `elements` of tensor `key` of `file` go to elements from `target` on.
struct Stretch {
    file: String,
    key: String,
    elements: Range<usize>,
    target: usize,
}

/// The stretches of files that hold elements `source` of a shard stored at `location` (a ZeRO
/// flat buffer is cut into one tensor per file).
fn locate(
    reader: &Reader,
    location: &Location,
    source: Range<usize>,
    target: usize,
) -> Result<Vec<Stretch>> {
    Ok(match location {
        Location::Whole { file, key } => vec![Stretch {
            file: file.clone(),
            key: key.clone(),
            elements: source,
            target,
        }],
        Location::Flat {
            files, key, offset, ..
        } => {
            let mut out = Vec::new();
            let (mut start, end) = (
                *offset as usize + source.start,
                *offset as usize + source.end,
            );
            let mut target = target;
            while start < end {
                // Every data-parallel rank's shard of the flat buffer is the same size.
                let per_file = reader
                    .stored(&files[0], key)?
                    .shape
                    .iter()
                    .product::<usize>();
                let index = start / per_file;
                let file = files
                    .get(index)
                    .ok_or_else(|| damaged_flat(reader, &files[0], key, start))?;
                let within = start % per_file;
                let len = (per_file - within).min(end - start);
                out.push(Stretch {
                    file: file.clone(),
                    key: key.clone(),
                    elements: within..within + len,
                    target,
                });
                start += len;
                target += len;
            }
            out
        }
    })
}

fn damaged_flat(reader: &Reader, file: &str, key: &str, element: usize) -> crate::Error {
    reader.damaged(format!(
        "`{key}` in {file} and the files after it hold fewer than {} elements",
        element + 1
    ))
}

fn dtype_size(dtype: safetensors::Dtype) -> usize {
    dtype.bitsize() / 8
}

#[cfg(test)]
mod tests {
    use tessera_plan::model::Unit as UnitKind;

    use super::*;

    fn shape(tp: usize) -> ModelShape {
        let config = Config::from_yaml(
            "tiny-cpu.yaml",
            include_str!("../../../configs/tiny-cpu.yaml"),
            &[],
        )
        .expect("the tiny config is valid");
        ModelShape::new(&config.model, tp)
    }

    /// For every parameter of `kind`: the copies that fill elements `need(numel)` of tensor
    /// rank `rank` of `to` ranks from the shards of `from` ranks take each element from the
    /// source element at the same global index, and fill every needed element once.
    fn copies_match_global_indices(
        kind: UnitKind,
        from: usize,
        to: usize,
        rank: usize,
        need: impl Fn(usize) -> Range<usize>,
    ) {
        let (source_shape, target_shape) = (shape(from), shape(to));
        let source_layout = source_shape.layout(kind);
        for placed in &target_shape.layout(kind).params {
            let shards: Vec<SourceShard> = (0..from)
                .map(|tp_rank| SourceShard {
                    pipeline_stage: 0,
                    tp_rank,
                    placed: source_layout
                        .get(placed.spec.name)
                        .expect("same parameters")
                        .clone(),
                    states: BTreeMap::new(),
                })
                .collect();
            let rows = pieces(&shards, &source_shape);
            let cols = |i: usize| rows_cols(&shards[i].placed).1;
            let need = need(placed.numel() as usize);
            let mut filled = vec![0u32; need.len()];
            for copy in copies(
                placed,
                &target_shape,
                rank,
                need.clone(),
                &rows,
                cols,
                usize::MAX,
            ) {
                let shard = &shards[copy.shard];
                for (k, element) in copy.source.clone().enumerate() {
                    let local = need.start + copy.target + k;
                    assert_eq!(
                        source_shape.global_index(&shard.placed, shard.tp_rank, element),
                        target_shape.global_index(placed, rank, local),
                        "{} element {local}",
                        placed.spec.name
                    );
                    filled[copy.target + k] += 1;
                }
            }
            assert!(
                filled.iter().all(|&n| n == 1),
                "{}: every needed element once",
                placed.spec.name
            );
        }
    }

    #[test]
    fn a_whole_target_takes_each_element_from_the_source_shard_that_holds_it() {
        for kind in [
            UnitKind::Embedding,
            UnitKind::Layer,
            UnitKind::Head { tied_copy: true },
        ] {
            copies_match_global_indices(kind, 2, 1, 0, |n| 0..n);
            copies_match_global_indices(kind, 1, 2, 1, |n| 0..n);
            copies_match_global_indices(kind, 2, 2, 0, |n| 0..n);
        }
    }

    #[test]
    fn part_of_a_shard_takes_only_the_elements_it_needs() {
        // A ZeRO shard's range cuts rows in the middle.
        copies_match_global_indices(UnitKind::Layer, 2, 1, 0, |n| n / 3 + 5..n / 2 + 7);
        copies_match_global_indices(UnitKind::Layer, 1, 2, 1, |n| n / 4 + 1..n - 3);
    }
}
