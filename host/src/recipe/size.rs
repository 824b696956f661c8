//! Sizes as recipes write them: `3GiB`, `124MiB`, `512M`, `4096`, and in SI units
//! (`3GB` is 3·10⁹ bytes), which most peers (debos, parted, cloud consoles) accept.
//! `M` and `G` alone are binary, as for sfdisk and mkosi.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = super::quantity::split(s)
            .ok_or_else(|| format!("invalid size `{s}`: expected a number and a unit such as 3GiB"))?;
        let factor: u64 = match unit {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "invalid size `{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB or TiB, \
                     or the SI kB, MB, GB or TB)"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(Size)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

const BINARY: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
const SI: [(u64, &str); 4] = [
    (1_000_000_000_000, "TB"),
    (1_000_000_000, "GB"),
    (1_000_000, "MB"),
    (1_000, "kB"),
];

impl Size {
    /// The size as the smallest number of a unit that divides it: so a size prints in
    /// the units it was written in (`8GB` is also 7812500KiB).
    fn exact(self) -> Option<(u64, &'static str)> {
        let largest = |units: &[(u64, &'static str)]| {
            units
                .iter()
                .find(|(factor, _)| self.0 >= *factor && self.0.is_multiple_of(*factor))
                .map(|(factor, unit)| (self.0 / factor, *unit))
        };
        match (largest(&BINARY), largest(&SI)) {
            (Some(binary), Some(si)) => Some(if si.0 < binary.0 { si } else { binary }),
            (binary, si) => binary.or(si),
        }
    }

    /// The size as written, and for a size in SI units what it is in binary ones too,
    /// which is what partitioning tools and `df -h` show: `3GB (2.79 GiB)`.
    pub fn explained(self) -> String {
        match self.exact() {
            Some((_, unit)) if SI.iter().any(|(_, u)| *u == unit) => {
                let (factor, binary) = BINARY
                    .iter()
                    .find(|(factor, _)| self.0 >= *factor)
                    .unwrap_or(&BINARY[3]);
                format!("{self} ({:.2} {binary})", self.0 as f64 / *factor as f64)
            }
            _ => self.to_string(),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.exact() {
            Some((n, unit)) => write!(f, "{n}{unit}"),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare number is bytes.
        super::quantity::text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("3GiB".parse::<Size>().unwrap(), Size(3 << 30));
        assert_eq!("124M".parse::<Size>().unwrap(), Size(124 << 20));
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!(Size(3 << 30).to_string(), "3GiB");
        assert_eq!(Size(1001).to_string(), "1001B");
        assert_eq!(Size(1000).to_string(), "1kB");
        assert!("3 gigs".parse::<Size>().unwrap_err().contains("unknown unit `gigs`"));
    }

    #[test]
    fn si_units_are_powers_of_ten_and_print_as_written() {
        assert_eq!("3GB".parse::<Size>().unwrap(), Size(3_000_000_000));
        assert_eq!("500MB".parse::<Size>().unwrap(), Size(500_000_000));
        assert_eq!("4kB".parse::<Size>().unwrap(), "4KB".parse::<Size>().unwrap());
        assert_eq!("3GB".parse::<Size>().unwrap().to_string(), "3GB");
        assert_eq!("1500MB".parse::<Size>().unwrap().to_string(), "1500MB");
        assert_eq!("2TB".parse::<Size>().unwrap().to_string(), "2TB");
        assert_eq!("8GB".parse::<Size>().unwrap().to_string(), "8GB");
        // Binary where both divide: 1024000 B is 1000KiB, not 1024kB.
        assert_eq!(Size(1_024_000).to_string(), "1000KiB");
        assert_eq!("3GB".parse::<Size>().unwrap().explained(), "3GB (2.79 GiB)");
        assert_eq!("100MB".parse::<Size>().unwrap().explained(), "100MB (95.37 MiB)");
        assert_eq!("3GiB".parse::<Size>().unwrap().explained(), "3GiB");
        assert!("3Gb".parse::<Size>().unwrap_err().contains("the SI kB, MB, GB or TB"));
    }
}
