//! Reading a config file (or the built-in default) into a validated `Config`.

use std::path::Path;

use tessera_plan::Config;

use crate::exit::Failure;

/// The demo job `launch` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/tiny-cpu.yaml");
pub const DEFAULT_CONFIG_NAME: &str = "configs/tiny-cpu.yaml (built in)";

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
    tessera_worker::config_file::read(path).map_err(Failure::Usage)
}
