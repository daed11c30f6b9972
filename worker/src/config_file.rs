//! Reading a config file, for `launch` and `tessera-worker` alike: a real config is a few
//! hundred bytes of UTF-8 YAML, so the read itself stops at [`MAX_CONFIG_BYTES`] (a device
//! such as /dev/zero, or a pipe, says nothing of its size beforehand).

use std::io::{ErrorKind, Read as _};
use std::path::Path;

/// Anything larger is the wrong file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The text of the config file at `path`, or what is wrong with it (a message for the user).
pub fn read(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let cannot = |e: std::io::Error| match e.kind() {
        ErrorKind::NotFound => format!(
            "config file {shown} does not exist; the shipped configs are in configs/ (e.g. \
             configs/tiny-cpu.yaml)"
        ),
        ErrorKind::PermissionDenied => {
            format!("config file {shown} cannot be read: permission denied")
        }
        _ => format!("config file {shown} cannot be read: {e}"),
    };
    if std::fs::metadata(path).map_err(cannot)?.is_dir() {
        return Err(format!(
            "{shown} is a directory, not a config file; pass a YAML file such as {}/175b.yaml",
            shown.to_string().trim_end_matches('/')
        ));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "config file {shown} holds more than {MAX_CONFIG_BYTES} bytes; a config is a few \
             hundred bytes of YAML: is this the right file?"
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "config file {shown} is not UTF-8 text (invalid byte at offset {}): a config is a \
             YAML text file",
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_end_is_read_only_up_to_the_limit() {
        let error = read(Path::new("/dev/zero")).unwrap_err();
        assert!(error.contains("holds more than 1048576 bytes"), "{error}");
    }

    #[test]
    fn missing_files_directories_and_binary_files_say_what_they_are() {
        assert!(
            read(Path::new("/no/such.yaml"))
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            read(Path::new("/tmp"))
                .unwrap_err()
                .contains("is a directory")
        );
        let binary = std::env::temp_dir().join(format!("tessera-binary-{}", std::process::id()));
        std::fs::write(&binary, [b'a', 0xff, 0xfe]).unwrap();
        let error = read(&binary).unwrap_err();
        let _ = std::fs::remove_file(&binary);
        assert!(
            error.contains("not UTF-8 text (invalid byte at offset 1)"),
            "{error}"
        );
    }
}
