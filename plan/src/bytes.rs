//! Byte sizes as people write them (`80GiB`, `40GB`, `512 MiB`, `85899345920`) and as the
//! dry-run prints them.

use crate::error::{Error, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Units, matched case-insensitively. Binary units (`GiB`, Kubernetes' `Gi`) are powers of 1024,
/// decimal ones (`GB`, `G`) powers of 1000, the way GPU vendors and Kubernetes use them.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("ki", KIB),
    ("kib", KIB),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("mi", MIB),
    ("mib", MIB),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("gi", GIB),
    ("gib", GIB),
    ("t", 1_000_000_000_000),
    ("tb", 1_000_000_000_000),
    ("ti", TIB),
    ("tib", TIB),
];

/// Parses a byte size: a whole or decimal number, optional spaces, an optional unit.
/// The result must be a whole number of bytes that fits in 64 bits.
pub fn parse_size(input: &str) -> Result<u64> {
    let invalid = |reason| Error::InvalidSize {
        input: input.to_string(),
        reason,
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: String = number.chars().filter(|c| *c != '_').collect();
    if number.is_empty() {
        return Err(invalid("it does not start with a number"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let Some(&(_, scale)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(invalid(
            "the unit is not one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
        ));
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(scale)
            .ok_or_else(|| invalid("it is larger than 16 EiB"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| invalid("the number is malformed"))?;
    let bytes = value * scale as f64;
    if bytes >= u64::MAX as f64 {
        return Err(invalid("it is larger than 16 EiB"));
    }
    if bytes.fract() != 0.0 {
        return Err(invalid("it is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Formats bytes with the largest binary unit that keeps the number at or above 1, two decimals
/// (`80.00 GiB`, `512.00 MiB`, `17 B`).
pub fn format_size(bytes: u64) -> String {
    let unit = Unit::for_bytes(bytes);
    if unit == Unit::B {
        return format!("{bytes} B");
    }
    format!("{} {}", unit.format(bytes), unit.name())
}

/// One unit for a whole table, so its columns line up and compare at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    B,
    KiB,
    MiB,
    GiB,
    TiB,
}

impl Unit {
    /// The largest unit in which `bytes` is at least 1.
    pub fn for_bytes(bytes: u64) -> Unit {
        match bytes {
            b if b >= TIB => Unit::TiB,
            b if b >= GIB => Unit::GiB,
            b if b >= MIB => Unit::MiB,
            b if b >= KIB => Unit::KiB,
            _ => Unit::B,
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Unit::B => 1,
            Unit::KiB => KIB,
            Unit::MiB => MIB,
            Unit::GiB => GIB,
            Unit::TiB => TIB,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::B => "B",
            Unit::KiB => "KiB",
            Unit::MiB => "MiB",
            Unit::GiB => "GiB",
            Unit::TiB => "TiB",
        }
    }

    /// `bytes` in this unit with two decimals, without the unit's name.
    pub fn format(self, bytes: u64) -> String {
        format!("{:.2}", bytes as f64 / self.bytes() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_plain_sizes() {
        assert_eq!(parse_size("80GiB").unwrap(), 80 * GIB);
        assert_eq!(parse_size("80 GiB").unwrap(), 80 * GIB);
        assert_eq!(parse_size("80gib").unwrap(), 80 * GIB);
        assert_eq!(parse_size("80Gi").unwrap(), 80 * GIB);
        assert_eq!(parse_size("40GB").unwrap(), 40_000_000_000);
        assert_eq!(parse_size("40G").unwrap(), 40_000_000_000);
        assert_eq!(parse_size("1.5TiB").unwrap(), 3 * TIB / 2);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_size("85899345920").unwrap(), 85_899_345_920);
        assert_eq!(parse_size("1_024").unwrap(), 1024);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn rejects_malformed_sizes_with_a_reason() {
        for (input, reason) in [
            ("GiB", "does not start with a number"),
            ("80 parsecs", "unit is not one of"),
            ("1.2.3GB", "malformed"),
            ("0.1B", "not a whole number of bytes"),
            ("99999999999TiB", "larger than 16 EiB"),
            ("-5GiB", "does not start with a number"),
            ("", "does not start with a number"),
        ] {
            let message = parse_size(input).unwrap_err().to_string();
            assert!(message.contains(reason), "{input}: {message}");
            assert!(
                message.contains("80GiB"),
                "{input}: the fix is shown: {message}"
            );
        }
    }

    #[test]
    fn formats_with_the_largest_fitting_unit() {
        assert_eq!(format_size(17), "17 B");
        assert_eq!(format_size(80 * GIB), "80.00 GiB");
        assert_eq!(format_size(1536 * KIB), "1.50 MiB");
        assert_eq!(Unit::for_bytes(3 * TIB), Unit::TiB);
        assert_eq!(Unit::GiB.format(GIB / 4), "0.25");
    }
}
