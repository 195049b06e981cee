//! A tiny packet-header parser with a planted bug for the cargo_fuzzing example.

/// A parsed header: a 4-byte magic, a version and the payload that follows.
#[derive(Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub version: u8,
    pub payload: &'a [u8],
}

/// Parse `data` as `b"FUZZ"`, a version byte, a length byte and that many payload bytes.
pub fn parse(data: &[u8]) -> Option<Header<'_>> {
    if data.len() < 6 || &data[..4] != b"FUZZ" {
        return None;
    }
    let version = data[4];
    let len = data[5] as usize;
    // Planted bug: the length byte is trusted, so a short packet reads past its end (a
    // bounds-check panic in safe Rust).
    let payload = &data[6..6 + len];
    Some(Header { version, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_well_formed_header() {
        let h = parse(b"FUZZ\x01\x02ab").unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(h.payload, b"ab");
    }
}
