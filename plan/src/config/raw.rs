//! The config as written: every key optional, every value tagged with the place it came from.
//!
//! `section!` declares each YAML section once; from that one list it derives the serde struct
//! (unknown keys are errors), the key names used for "did you mean", what each key expects (for
//! type errors), and the merge used by `--set`. Validation (`super::validate`) turns a
//! `RawConfig` into a `Config` with no `Option` left.

use serde::Deserialize;
use serde_saphyr::{MessageFormatter, Spanned};

use super::issue::{Place, did_you_mean};

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Leaf<T> {
    pub(crate) value: T,
    pub(crate) place: Place,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Leaf<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<T>::deserialize(deserializer)?;
        Ok(Leaf {
            value: spanned.value,
            place: Place::Text {
                line: spanned.referenced.line(),
                column: spanned.referenced.column(),
            },
        })
    }
}

/// What every declared section can do; implemented by `section!`.
pub(crate) trait Section: Default {
    /// This section's keys: its values, then its subsections.
    const KEYS: &'static [&'static str];
    /// The keys of the subsection at `path` (relative to this one), if `path` names a section.
    fn keys_at(path: &[&str]) -> Option<&'static [&'static str]>;
    /// What the value at `path` must be ("a whole number"), if `path` names a value.
    fn expects(path: &[&str]) -> Option<&'static str>;
    /// Every value's dotted path, prefixed by `prefix`.
    fn value_paths(prefix: &str, out: &mut Vec<String>);
    /// Takes every value `other` sets; keeps the rest.
    fn merge(&mut self, other: Self);
    /// Marks every value present as coming from `place`.
    fn set_place(&mut self, place: Place);
}

/// Human wording of a leaf's Rust type, for type errors.
fn expects(rust_type: &str) -> &'static str {
    match rust_type {
        "i64" => "a whole number",
        "f64" => "a number",
        "bool" => "true or false",
        "Counts" => "a list of whole numbers, e.g. [24, 24, 24, 23]",
        "Sources" => "a list of {path, weight} mappings, e.g. [{path: a/*.bin, weight: 0.7}]",
        _ => "a single value (not a list or a mapping)",
    }
}

macro_rules! section {
    (
        $(#[$meta:meta])*
        $name:ident { $( $leaf:ident : $ty:ident ),* $(,)? }
        $( sections { $( $sub:ident : $subty:ident ),* $(,)? } )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            $( pub(crate) $leaf: Option<Leaf<$ty>>, )*
            $( $( pub(crate) $sub: Option<$subty>, )* )?
        }

        impl Section for $name {
            const KEYS: &'static [&'static str] =
                &[$( stringify!($leaf), )* $( $( stringify!($sub), )* )?];

            fn keys_at(path: &[&str]) -> Option<&'static [&'static str]> {
                match path {
                    [] => Some(Self::KEYS),
                    $( $( [key, rest @ ..] if *key == stringify!($sub) =>
                        <$subty as Section>::keys_at(rest), )* )?
                    _ => None,
                }
            }

            fn expects(path: &[&str]) -> Option<&'static str> {
                match path {
                    $( [key] if *key == stringify!($leaf) => Some(expects(stringify!($ty))), )*
                    $( $( [key, rest @ ..] if *key == stringify!($sub) =>
                        <$subty as Section>::expects(rest), )* )?
                    _ => None,
                }
            }

            fn value_paths(prefix: &str, out: &mut Vec<String>) {
                $( out.push(format!("{prefix}{}", stringify!($leaf))); )*
                $( $( <$subty as Section>::value_paths(
                    &format!("{prefix}{}.", stringify!($sub)), out); )* )?
            }

            fn merge(&mut self, other: Self) {
                $( if other.$leaf.is_some() { self.$leaf = other.$leaf; } )*
                $( $( match (&mut self.$sub, other.$sub) {
                    (Some(mine), Some(theirs)) => mine.merge(theirs),
                    (mine, Some(theirs)) => *mine = Some(theirs),
                    (_, None) => {}
                } )* )?
            }

            fn set_place(&mut self, place: Place) {
                $( if let Some(leaf) = &mut self.$leaf { leaf.place = place; } )*
                $( $( if let Some(sub) = &mut self.$sub { sub.set_place(place); } )* )?
            }
        }
    };
}

section!(
    /// The whole document: its sections.
    RawConfig {}
    sections {
        model: RawModel,
        parallel: RawParallel,
        training: RawTraining,
        data: RawData,
        cluster: RawCluster,
        checkpoint: RawCheckpoint,
        restart: RawRestart,
        watchdog: RawWatchdog,
        eval: RawEval,
    }
);

/// A list of counts (`parallel.pipeline_layers`).
pub(crate) type Counts = Vec<i64>;

section!(RawModel {
    arch: String,
    layers: i64,
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    vocab: i64,
    seq_len: i64,
    ffn_hidden: i64,
    norm_eps: f64,
    rope_theta: f64,
    tie_embeddings: bool,
});

section!(
    RawParallel {
        data: i64,
        tensor: i64,
        pipeline: i64,
        virtual_stages: i64,
        pipeline_layers: Counts,
        sequence_parallel: bool,
        zero: i64,
        recompute: String,
        schedule: String,
    }
    sections { offload: RawOffload }
);

section!(RawOffload { optimizer: bool });

section!(
    RawTraining {
        global_batch: i64,
        micro_batch: i64,
        precision: String,
        steps: i64,
        seed: i64,
    }
    sections { optimizer: RawOptimizer }
);

section!(RawOptimizer {
    lr: f64,
    min_lr: f64,
    warmup: i64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_clip: f64,
});

/// One dataset of a blend (`data.sources`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub(crate) path: String,
    pub(crate) weight: f64,
}

/// `data.sources`.
pub(crate) type Sources = Vec<RawSource>;

section!(RawData {
    kind: String,
    path: String,
    sources: Sources,
});

section!(RawEval {
    every: i64,
    batches: i64,
    path: String,
});

section!(
    RawCluster {
        nodes: i64,
        gpus_per_node: i64,
        gpu_memory: String,
        backend: String,
        device: String,
        hostfile: String,
        headroom: f64,
    }
    sections { tls: RawTls }
);

section!(RawTls {
    ca: String,
    cert: String,
    key: String,
});

section!(RawCheckpoint {
    dir: String,
    every: i64,
    keep: i64,
});

section!(RawRestart {
    max: i64,
    min_nodes: i64,
});

section!(RawWatchdog {
    heartbeat: f64,
    heartbeat_timeout: f64,
    collective_timeout: f64,
    rendezvous_timeout: f64,
});

/// A problem found while reading YAML text, before its source is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadError {
    /// Line and column in the text, when the parser knows them.
    pub(crate) at: Option<(u64, u64)>,
    pub(crate) key: String,
    pub(crate) message: String,
    pub(crate) help: Option<String>,
}

/// Limits that keep hostile or accidental input (a binary file, a generated megabyte of
/// nesting) from exhausting the stack or memory. A real config is three levels deep and a
/// few hundred events long.
fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 16;
    budget.max_events = 100_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // `yes`, `no`, `on`, `off` are strings here, never booleans in disguise.
    options.strict_booleans = true;
    options
}

/// Reads one YAML document into a `RawConfig`.
pub(crate) fn read(text: &str) -> Result<RawConfig, ReadError> {
    let mut error_path = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            error_path = Some(e.path().to_string());
            e.into_inner()
        })
    });
    result.map_err(|error| describe(text, error_path.as_deref().unwrap_or("."), &error))
}

/// Turns a parser error into a message that names the key and the fix.
fn describe(text: &str, path: &str, error: &serde_saphyr::Error) -> ReadError {
    let at = error
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| (l.line(), l.column()));
    let raw = serde_saphyr::DefaultMessageFormatter
        .format_message(error.without_snippet())
        .into_owned();
    let found = at.map(|(line, column)| value_text(text, line, column));
    let key = path
        .trim_end_matches(".value")
        .trim_start_matches('.')
        .to_string();
    let segments: Vec<&str> = key.split('.').filter(|s| !s.is_empty()).collect();
    let mut read_error = ReadError {
        at,
        key: key.clone(),
        message: raw.clone(),
        help: None,
    };

    if let Some(unknown) = raw
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let parent = &segments[..segments.len().saturating_sub(1)];
        read_error.message = format!("unknown key `{unknown}`");
        read_error.help = Some(unknown_key_help(parent, unknown));
    } else if let Some(expected) = RawConfig::expects(&segments) {
        let found = found.unwrap_or_default();
        read_error.message = format!("expects {expected}, got `{found}`");
        if raw.contains("boolean") {
            read_error.help = Some("write true or false".into());
        }
    } else if raw.contains("expected mapping") || raw.contains("expected struct") {
        let keys = RawConfig::keys_at(&segments).unwrap_or(RawConfig::KEYS);
        if segments.is_empty() {
            read_error.message = "a config must be a YAML mapping of sections".into();
        } else {
            read_error.message = format!(
                "is a section: it takes keys, not `{}`",
                found.unwrap_or_default()
            );
        }
        read_error.help = Some(format!("its keys are: {}", keys.join(", ")));
    } else if let Some(dup) = raw.strip_prefix("duplicate mapping key: ") {
        let dup = dup.split(',').next().unwrap_or(dup).trim();
        read_error.key = key.trim_end_matches('?').trim_end_matches('.').to_string();
        read_error.message = format!("key `{dup}` is given twice");
        read_error.help = Some("keep one of them".into());
    } else if raw.contains("multiple YAML documents") {
        read_error.key.clear();
        read_error.message = "the text holds more than one YAML document (a second `---`)".into();
        read_error.help = Some("a config is a single document; remove the extra `---`".into());
    } else if raw.to_ascii_lowercase().contains("budget") {
        read_error.key.clear();
        read_error.message = format!("the document is too large or too deeply nested ({raw})");
        read_error.help = Some(
            "a config is a handful of sections of `key: value` pairs; see configs/ for examples"
                .into(),
        );
    } else {
        read_error.key.clear();
        read_error.message = format!("is not valid YAML: {raw}");
        read_error.help = Some("check the indentation and quoting near this position".into());
    }
    read_error
}

/// The help line for an unknown key: the nearest valid key here, or the same key elsewhere.
fn unknown_key_help(parent: &[&str], unknown: &str) -> String {
    let keys = RawConfig::keys_at(parent).unwrap_or(RawConfig::KEYS);
    let here = |key: &str| {
        if parent.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", parent.join("."))
        }
    };
    let listing = if parent.is_empty() {
        format!("the sections are: {}", keys.join(", "))
    } else {
        format!("keys of `{}`: {}", parent.join("."), keys.join(", "))
    };
    if let Some(near) = did_you_mean(unknown, keys.iter().copied()) {
        return format!("did you mean `{}`? ({listing})", here(near));
    }
    let mut all = Vec::new();
    RawConfig::value_paths("", &mut all);
    if let Some(elsewhere) = all
        .iter()
        .find(|path| path.rsplit('.').next() == Some(unknown))
    {
        return format!("`{unknown}` belongs under `{elsewhere}` ({listing})");
    }
    listing
}

/// The value text at a position, for "got `...`" (the rest of the line, comment removed).
fn value_text(text: &str, line: u64, column: u64) -> String {
    let Some(line_text) = text.lines().nth(line.saturating_sub(1) as usize) else {
        return String::new();
    };
    let rest: String = line_text
        .chars()
        .skip(column.saturating_sub(1) as usize)
        .collect();
    let rest = match rest.find(" #") {
        Some(comment) => &rest[..comment],
        None => &rest,
    };
    let mut shown: String = rest.trim().chars().take(40).collect();
    if rest.trim().chars().count() > 40 {
        shown.push('…');
    }
    shown
}

/// Builds the YAML for one `--set key.path=value`, after checking that the key exists.
pub(crate) fn override_document(arg: &str) -> Result<String, ReadError> {
    let problem = |key: &str, message: String, help: Option<String>| ReadError {
        at: None,
        key: key.to_string(),
        message,
        help,
    };
    let Some((key, value)) = arg.split_once('=') else {
        return Err(problem(
            "",
            "expected `key.path=value`".into(),
            Some("for example --set parallel.data=2 --set training.steps=50".into()),
        ));
    };
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(problem(
            key,
            "is not a key path".into(),
            Some("a key path is section names and a key joined by dots, e.g. parallel.data".into()),
        ));
    }
    // The longest leading part of the path that names a section; the next segment must be one
    // of its keys.
    let known = (0..segments.len())
        .rev()
        .find(|&n| RawConfig::keys_at(&segments[..n]).is_some())
        .unwrap_or(0);
    let next = segments[known];
    let keys = RawConfig::keys_at(&segments[..known]).unwrap_or(RawConfig::KEYS);
    if !keys.contains(&next) {
        return Err(problem(
            key,
            format!("unknown key `{next}`"),
            Some(unknown_key_help(&segments[..known], next)),
        ));
    }
    if known + 1 < segments.len() && RawConfig::keys_at(&segments[..=known]).is_none() {
        let value = segments[..=known].join(".");
        return Err(problem(
            key,
            format!("`{value}` is a value, not a section"),
            Some(format!("set it directly: --set {value}=...")),
        ));
    }
    if let Some(keys) = RawConfig::keys_at(&segments) {
        return Err(problem(
            key,
            "is a section; set one of its keys".into(),
            Some(format!(
                "for example --set {key}.{}=..., keys: {}",
                keys[0],
                keys.join(", ")
            )),
        ));
    }
    if value.contains('\n') || value.contains('\r') {
        return Err(problem(
            key,
            "the value spans several lines".into(),
            Some("a --set value is one line".into()),
        ));
    }
    if value.trim().is_empty() {
        return Err(problem(
            key,
            "has no value after `=`".into(),
            Some(format!("for example --set {key}=2")),
        ));
    }
    // YAML reads a leading `*` as an alias, `&` as an anchor, `!` as a tag; `|` and `>` open a
    // block, and `%`, `@` and a backquote are reserved. In a one-line override none of them is
    // meant that way (`data.path=*.bin` is a glob), so say how to write the value as text.
    let value = value.trim();
    if let Some(first) = value.chars().next()
        && let Some(means) = match first {
            '*' => Some("an alias"),
            '&' => Some("an anchor"),
            '!' => Some("a tag"),
            '|' | '>' => Some("the start of a block of lines"),
            '%' | '@' | '`' => Some("a reserved character"),
            _ => None,
        }
    {
        return Err(problem(
            key,
            format!("the value `{value}` starts with `{first}`, which YAML reads as {means}"),
            Some(format!(
                "quote the value inside the shell's quotes: --set '{key}=\"{}\"'",
                value.replace('\\', "\\\\").replace('"', "\\\"")
            )),
        ));
    }
    let mut document = String::new();
    for (depth, segment) in segments.iter().enumerate() {
        document.push_str(&"  ".repeat(depth));
        document.push_str(segment);
        document.push(':');
        if depth + 1 < segments.len() {
            document.push('\n');
        }
    }
    document.push(' ');
    document.push_str(value);
    document.push('\n');
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_with_their_positions() {
        let raw = read("parallel:\n  data: 4\n  offload: {optimizer: true}\n").unwrap();
        let parallel = raw.parallel.unwrap();
        let data = parallel.data.unwrap();
        assert_eq!(data.value, 4);
        assert_eq!(data.place, Place::Text { line: 2, column: 9 });
        assert!(parallel.offload.unwrap().optimizer.unwrap().value);
    }

    #[test]
    fn null_and_empty_values_mean_unset() {
        let raw = read("parallel:\n  data: ~\n  tensor:\n").unwrap();
        let parallel = raw.parallel.unwrap();
        assert!(parallel.data.is_none() && parallel.tensor.is_none());
    }

    #[test]
    fn yes_and_no_are_not_booleans() {
        let error = read("parallel:\n  sequence_parallel: yes\n").unwrap_err();
        assert_eq!(error.key, "parallel.sequence_parallel");
        assert_eq!(error.message, "expects true or false, got `yes`");
        // A string key keeps `no` as the text it is.
        let raw = read("checkpoint:\n  dir: no\n").unwrap();
        assert_eq!(raw.checkpoint.unwrap().dir.unwrap().value, "no");
    }

    #[test]
    fn key_lists_and_paths_come_from_the_declarations() {
        assert_eq!(
            RawConfig::keys_at(&["parallel", "offload"]),
            Some(&["optimizer"][..])
        );
        assert_eq!(RawConfig::keys_at(&["parallel", "data"]), None);
        assert_eq!(
            RawConfig::expects(&["training", "optimizer", "lr"]),
            Some("a number")
        );
        let mut paths = Vec::new();
        RawConfig::value_paths("", &mut paths);
        assert!(paths.contains(&"training.optimizer.weight_decay".to_string()));
        assert!(paths.contains(&"cluster.gpu_memory".to_string()));
    }

    #[test]
    fn merge_takes_what_the_override_sets() {
        let mut base = read("parallel:\n  data: 4\n  tensor: 2\n").unwrap();
        let mut over = read(&override_document("parallel.data=8").unwrap()).unwrap();
        over.set_place(Place::Set { index: 0 });
        base.merge(over);
        let parallel = base.parallel.unwrap();
        assert_eq!(parallel.data.as_ref().unwrap().value, 8);
        assert_eq!(parallel.data.unwrap().place, Place::Set { index: 0 });
        assert_eq!(parallel.tensor.unwrap().value, 2);
    }

    #[test]
    fn override_documents_nest_the_key() {
        assert_eq!(
            override_document("training.optimizer.lr=1e-4").unwrap(),
            "training:\n  optimizer:\n    lr: 1e-4\n"
        );
    }

    #[test]
    fn bad_override_keys_are_named() {
        let error = override_document("parallel.tensr=2").unwrap_err();
        assert_eq!(error.message, "unknown key `tensr`");
        assert!(
            error
                .help
                .unwrap()
                .contains("did you mean `parallel.tensor`")
        );
        let error = override_document("paralel.data=2").unwrap_err();
        assert_eq!(error.message, "unknown key `paralel`");
        assert!(error.help.unwrap().contains("did you mean `parallel`"));
        let error = override_document("parallel=2").unwrap_err();
        assert!(error.message.contains("is a section"));
        assert!(
            override_document("parallel.data")
                .unwrap_err()
                .message
                .contains("key.path=value")
        );
        assert!(
            override_document("parallel.data=")
                .unwrap_err()
                .message
                .contains("no value")
        );
        assert!(
            override_document("a..b=1")
                .unwrap_err()
                .message
                .contains("not a key path")
        );
        let error = override_document("parallel.data.x=1").unwrap_err();
        assert_eq!(error.message, "`parallel.data` is a value, not a section");
    }
}
