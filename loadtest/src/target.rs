//! Where a run may point: `http://IP:PORT/path` on a loopback address only, so a load test
//! can never be aimed at a machine it was not meant for.

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("target `{0}` must start with http:// (https and other schemes are not supported)")]
    Scheme(String),
    #[error("target `{0}` needs a numeric IP:PORT (no name resolution, to keep runs on loopback)")]
    Address(String),
    #[error(
        "target {0} is not a loopback address: the load tester only targets 127.0.0.0/8 or ::1"
    )]
    NotLoopback(SocketAddr),
}

/// A parsed, checked target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The `Host` header value.
    pub host: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| TargetError::Scheme(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .map_err(|_| TargetError::Address(url.to_string()))?;
        check_loopback(addr)?;
        Ok(Target {
            addr,
            path: path.to_string(),
            host: authority.to_string(),
        })
    }
}

/// Refuse anything that is not loopback.
pub fn check_loopback(addr: SocketAddr) -> Result<(), TargetError> {
    let ok = match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    if ok {
        Ok(())
    } else {
        Err(TargetError::NotLoopback(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        let t = Target::parse("http://127.0.0.1:8080/v1/x?y=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/v1/x?y=1");
        assert_eq!(Target::parse("http://127.0.0.9:80").unwrap().path, "/");
        assert!(Target::parse("http://[::1]:80/").is_ok());
        assert!(matches!(
            Target::parse("http://10.0.0.1:80/"),
            Err(TargetError::NotLoopback(_))
        ));
        assert!(matches!(
            Target::parse("http://[::ffff:8.8.8.8]:80/"),
            Err(TargetError::NotLoopback(_))
        ));
        assert!(matches!(
            Target::parse("http://localhost:80/"),
            Err(TargetError::Address(_))
        ));
        assert!(matches!(
            Target::parse("https://127.0.0.1:80/"),
            Err(TargetError::Scheme(_))
        ));
    }
}
