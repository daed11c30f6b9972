//! Config problems and where the offending value came from, rendered the way a compiler would:
//! `file:line:col: key: what is wrong`, the source line with a caret, then how to fix it.

use std::fmt;

/// Where a value came from, as known while deserializing (before the source's name is attached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Line and column (1-based) in the YAML text being read.
    Text { line: u64, column: u64 },
    /// The `--set` argument with this index.
    Set { index: usize },
    /// Not given anywhere: the built-in default.
    Default,
}

/// Where a config value came from, resolved for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A position in a config file, with that line's text for the snippet.
    File {
        path: String,
        line: u64,
        column: u64,
        line_text: String,
    },
    /// A `--set key=value` command-line override.
    Set { arg: String },
    /// The key was not given; its default (in the named file's config) was used.
    Default { path: String },
    /// The document as a whole (a required key is missing, the file is empty).
    Document { path: String },
}

/// One problem with a config: what, where, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub origin: Origin,
    /// Dotted key path such as `parallel.data` (empty for the document as a whole).
    pub key: String,
    pub message: String,
    pub help: Option<String>,
}

impl Issue {
    /// All issues, separated by blank lines, with a count when there is more than one.
    pub fn render_all(issues: &[Issue]) -> String {
        let mut out = issues
            .iter()
            .map(Issue::to_string)
            .collect::<Vec<_>>()
            .join("\n\n");
        if issues.len() > 1 {
            out.push_str(&format!("\n\n{} problems in the config", issues.len()));
        }
        out
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.key)
        };
        match &self.origin {
            Origin::File {
                path,
                line,
                column,
                line_text,
            } => {
                write!(f, "{path}:{line}:{column}: {key}{}", self.message)?;
                let gutter = line.to_string().len();
                let (excerpt, caret) = excerpt(line_text, column.saturating_sub(1) as usize);
                let caret_pad: String = excerpt
                    .chars()
                    .take(caret)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                write!(
                    f,
                    "\n{:gutter$} |\n{line} | {excerpt}\n{:gutter$} | {caret_pad}^",
                    "", ""
                )?;
            }
            Origin::Set { arg } => write!(f, "--set {}: {key}{}", excerpt(arg, 0).0, self.message)?,
            Origin::Default { path } => write!(
                f,
                "{path}: {key}{} (not set in the file: default used)",
                self.message
            )?,
            Origin::Document { path } => write!(f, "{path}: {key}{}", self.message)?,
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Characters of a source line shown on each side of the column: a line of a config is a few
/// dozen characters, and one of 100 KB (a generated file, a binary) must not flood the terminal.
const EXCERPT_SIDE: usize = 60;

/// At most `2 * EXCERPT_SIDE` characters of `text` around character `column`, with `...` where
/// it was cut, and the column's position in the excerpt.
fn excerpt(text: &str, column: usize) -> (String, usize) {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 2 * EXCERPT_SIDE {
        return (text.to_string(), column);
    }
    let column = column.min(chars.len());
    let start = column.saturating_sub(EXCERPT_SIDE);
    let end = (start + 2 * EXCERPT_SIDE).min(chars.len());
    let mut out = String::new();
    let mut caret = column - start;
    if start > 0 {
        out.push_str("...");
        caret += 3;
    }
    out.extend(&chars[start..end]);
    if end < chars.len() {
        out.push_str("...");
    }
    (out, caret)
}

/// The candidate closest to `word`, if it is close enough to be what the user meant.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            let score =
                strsim::normalized_damerau_levenshtein(&word, &candidate.to_ascii_lowercase());
            (candidate, score)
        })
        .filter(|(_, score)| *score >= 0.5)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(candidate, _)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_issues_show_the_line_and_a_caret_under_the_column() {
        let issue = Issue {
            origin: Origin::File {
                path: "c.yaml".into(),
                line: 12,
                column: 9,
                line_text: "  data: 0".into(),
            },
            key: "parallel.data".into(),
            message: "must be at least 1, got 0".into(),
            help: Some("use 1 to turn data parallelism off".into()),
        };
        let text = issue.to_string();
        assert_eq!(
            text,
            "c.yaml:12:9: parallel.data: must be at least 1, got 0\n   |\n12 |   data: 0\n   |         ^\n  help: use 1 to turn data parallelism off"
        );
    }

    #[test]
    fn a_long_line_is_cut_around_the_column_with_the_caret_in_place() {
        let line_text = format!("model: {}bad{}", "x".repeat(50_000), "y".repeat(50_000));
        let column = 8 + 50_000;
        let issue = Issue {
            origin: Origin::File {
                path: "c.yaml".into(),
                line: 1,
                column: column as u64,
                line_text,
            },
            key: "model".into(),
            message: "must be a mapping".into(),
            help: None,
        };
        let text = issue.to_string();
        assert!(text.len() < 400, "{} bytes", text.len());
        let lines: Vec<&str> = text.lines().collect();
        let (shown, caret) = (lines[2], lines[3]);
        assert!(
            shown.starts_with("1 | ...x") && shown.ends_with("y..."),
            "{shown}"
        );
        let at = caret.find('^').unwrap();
        assert_eq!(&shown[at..at + 3], "bad", "{shown}\n{caret}");
        let set = Issue {
            origin: Origin::Set {
                arg: format!("data.path={}", "z".repeat(10_000)),
            },
            key: "data.path".into(),
            message: "is too long".into(),
            help: None,
        };
        assert!(set.to_string().len() < 200);
    }

    #[test]
    fn set_and_default_origins_say_so() {
        let set = Issue {
            origin: Origin::Set {
                arg: "parallel.data=0".into(),
            },
            key: "parallel.data".into(),
            message: "must be at least 1".into(),
            help: None,
        };
        assert_eq!(
            set.to_string(),
            "--set parallel.data=0: parallel.data: must be at least 1"
        );
        let default = Issue {
            origin: Origin::Default {
                path: "c.yaml".into(),
            },
            ..set.clone()
        };
        assert!(
            default
                .to_string()
                .starts_with("c.yaml: parallel.data: must be at least 1 (not set")
        );
        assert!(Issue::render_all(&[set, default]).ends_with("2 problems in the config"));
    }

    #[test]
    fn suggests_close_names_only() {
        let keys = ["data", "tensor", "pipeline", "virtual_stages"];
        assert_eq!(did_you_mean("tensr", keys), Some("tensor"));
        assert_eq!(did_you_mean("Pipline", keys), Some("pipeline"));
        assert_eq!(did_you_mean("virtual_stage", keys), Some("virtual_stages"));
        assert_eq!(did_you_mean("zzzzzz", keys), None);
    }
}
