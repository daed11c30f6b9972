//! Reading a config file (or the built-in default) into a validated `Config`.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use tessera_plan::Config;

use crate::exit::Failure;

/// The demo job `launch` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/tiny-cpu.yaml");
pub const DEFAULT_CONFIG_NAME: &str = "configs/tiny-cpu.yaml (built in)";

/// A real config is a few hundred bytes; anything this large is the wrong file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Where a config came from and what it says.
pub struct Loaded {
    /// The name used in messages and reports.
    pub name: String,
    pub config: Config,
    /// The YAML as read and the `--set` overrides: workers rebuild the same config from them.
    pub text: String,
    pub sets: Vec<String>,
}

/// Reads and validates `path` (or the built-in default) with `sets` applied.
pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Loaded, Failure> {
    let (name, text) = match path {
        None => (DEFAULT_CONFIG_NAME.to_string(), DEFAULT_CONFIG.to_string()),
        Some(path) => (path.display().to_string(), read(path)?),
    };
    let config =
        Config::from_yaml(&name, &text, sets).map_err(|e| Failure::usage(e.to_string()))?;
    Ok(Loaded {
        name,
        config,
        text,
        sets: sets.to_vec(),
    })
}

fn read(path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    let metadata = fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Failure::usage(format!(
            "config file {shown} does not exist; the shipped configs are in configs/ (e.g. configs/tiny-cpu.yaml)"
        )),
        ErrorKind::PermissionDenied => Failure::usage(format!("config file {shown} cannot be read: permission denied")),
        _ => Failure::usage(format!("config file {shown} cannot be read: {e}")),
    })?;
    if metadata.is_dir() {
        return Err(Failure::usage(format!(
            "{shown} is a directory, not a config file; pass a YAML file such as {}/175b.yaml",
            shown.to_string().trim_end_matches('/')
        )));
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(Failure::usage(format!(
            "config file {shown} is {} bytes; a config is a few hundred bytes of YAML (limit {MAX_CONFIG_BYTES}): is this the right file?",
            metadata.len()
        )));
    }
    let bytes = fs::read(path)
        .map_err(|e| Failure::usage(format!("config file {shown} cannot be read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        Failure::usage(format!(
            "config file {shown} is not UTF-8 text (invalid byte at offset {}): a config is a YAML text file",
            e.utf8_error().valid_up_to()
        ))
    })
}
