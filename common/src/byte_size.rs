//! Human-friendly byte sizes: `20GiB`, `500MB`, `1.5TiB`, or plain bytes.
//!
//! Operators write sizes in the units their disks are sold in (`MB`, powers of 1000)
//! or the units tools report (`MiB`, powers of 1024); both are accepted, and a bare
//! number is bytes. The same parser serves the command line and the config file, so a
//! size means the same thing wherever it is written.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("b", 1),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (number, multiplier) = UNITS
            .iter()
            .find_map(|(unit, multiplier)| {
                lower
                    .strip_suffix(unit)
                    .map(|number| (number.trim(), *multiplier))
            })
            .unwrap_or((lower.as_str(), 1));
        let invalid = || format!("`{text}` is not a size (examples: 20GiB, 500MB, 1048576)");
        let bytes = if let Ok(whole) = number.parse::<u64>() {
            whole.checked_mul(multiplier).ok_or_else(invalid)?
        } else {
            let fraction: f64 = number.parse().map_err(|_| invalid())?;
            let bytes = fraction * multiplier as f64;
            if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
                return Err(invalid());
            }
            bytes as u64
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BINARY: &[(&str, u64)] = &[("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)];
        for (unit, multiplier) in BINARY {
            if self.0 >= *multiplier {
                return write!(f, "{:.1}{unit}", self.0 as f64 / *multiplier as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a string such as \"20GiB\"")
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                text.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    fn parse(text: &str) -> Result<u64, String> {
        text.parse::<ByteSize>().map(|size| size.0)
    }

    #[test]
    fn units() {
        assert_eq!(parse("20GiB"), Ok(20 << 30));
        assert_eq!(parse("500MB"), Ok(500_000_000));
        assert_eq!(parse("1048576"), Ok(1 << 20));
        assert_eq!(parse("4 MiB"), Ok(4 << 20));
        assert_eq!(parse("1.5KiB"), Ok(1536));
        assert_eq!(parse("2g"), Ok(2 << 30));
        assert_eq!(parse("10b"), Ok(10));
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "GiB",
            "-1",
            "1.5.5MB",
            "12XB",
            "99999999999999999999TiB",
            "NaN",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        let size: ByteSize = serde_json::from_str("\"1MiB\"").unwrap();
        assert_eq!(size.0, 1 << 20);
        let size: ByteSize = serde_json::from_str("42").unwrap();
        assert_eq!(size.0, 42);
        assert!(serde_json::from_str::<ByteSize>("-3").is_err());
    }
}
