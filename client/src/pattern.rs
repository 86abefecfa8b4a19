//! Reproducible bytes for self-tests and fault tests: a different stream
//! for every seed, so a file holding another file's content shows.

/// Appends xorshift bytes from `seed` to `out` until it is `len` long.
pub fn fill(out: &mut Vec<u8>, seed: u64, len: usize) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_give_different_reproducible_streams() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        super::fill(&mut a, 1, 100);
        super::fill(&mut b, 1, 100);
        super::fill(&mut c, 2, 100);
        assert_eq!(a.len(), 100);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
