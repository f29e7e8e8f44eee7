//! IPv4 CIDR blocks as the stack file writes them (`"10.42.0.0/16"`): parsing, containment
//! and overlap. Only what validation needs; no I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: address (host bits zero) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    pub(crate) addr: Ipv4Addr,
    pub(crate) prefix: u8,
}

impl Cidr {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    fn first(self) -> u32 {
        u32::from(self.addr)
    }

    fn last(self) -> u32 {
        self.first() | !self.mask()
    }

    /// True when every address of `other` is inside `self`.
    pub(crate) fn contains(self, other: Cidr) -> bool {
        other.prefix >= self.prefix && (other.first() & self.mask()) == self.first()
    }

    pub(crate) fn overlaps(self, other: Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR block like \"10.42.0.0/16\""))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: prefix must be a number from 0 to 32"))?;
        let cidr = Cidr { addr, prefix };
        if u32::from(addr) & !cidr.mask() != 0 {
            let net = Ipv4Addr::from(u32::from(addr) & cidr.mask());
            return Err(format!(
                "{s:?} has host bits set (did you mean \"{net}/{prefix}\"?)"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_checks_host_bits() {
        assert_eq!(c("10.42.0.0/16").to_string(), "10.42.0.0/16");
        let err = "10.42.1.0/16".parse::<Cidr>().unwrap_err();
        assert!(err.contains("10.42.0.0/16"), "{err}");
        assert!("10.42.0.0".parse::<Cidr>().is_err());
        assert!("10.42.0.0/33".parse::<Cidr>().is_err());
        assert!("10.420.0.0/16".parse::<Cidr>().is_err());
    }

    #[test]
    fn containment_and_overlap() {
        assert!(c("10.42.0.0/16").contains(c("10.42.16.0/20")));
        assert!(!c("10.42.0.0/16").contains(c("10.43.0.0/24")));
        assert!(!c("10.42.0.0/24").contains(c("10.42.0.0/16")));
        assert!(c("10.42.0.0/20").overlaps(c("10.42.15.0/24")));
        assert!(!c("10.42.0.0/24").overlaps(c("10.42.1.0/24")));
        assert!(c("0.0.0.0/0").contains(c("127.0.0.1/32")));
    }
}
