//! Chunk-id hash throughput on this machine: XXH3-128 (today's chunk ids)
//! against BLAKE3 (a keyless cryptographic hash whose collisions cannot be
//! made on purpose), one thread, over chunk-sized buffers. The write path
//! hashes every byte once on the client and once on each storage node that
//! stores a replica; the read path once on the client. docs/BENCHMARKS.md
//! ("Chunk ids") has the results and what they mean for the write path.

use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Bytes per buffer (a chunk; the default is FastCDC's average).
    #[arg(long, default_value_t = 1 << 20)]
    chunk: usize,
    /// Total MiB hashed per function and round.
    #[arg(long, default_value_t = 2048)]
    mib: usize,
    /// Rounds; the best of each function is reported, and every round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn rate(mib: usize, f: impl Fn(&[u8]) -> u64, buf: &[u8]) -> f64 {
    let n = (mib << 20) / buf.len();
    let start = Instant::now();
    let mut acc = 0u64;
    for _ in 0..n {
        acc = acc.wrapping_add(f(std::hint::black_box(buf)));
    }
    std::hint::black_box(acc);
    (n * buf.len()) as f64 / (1u64 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let a = Args::parse();
    // Bytes that do not compress or repeat, like audio.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let buf: Vec<u8> = (0..a.chunk)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let xxh3 = |b: &[u8]| xxhash_rust::xxh3::xxh3_128(b) as u64;
    let blake3 = |b: &[u8]| {
        let h = blake3::hash(b);
        u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
    };
    let (mut best_x, mut best_b) = (0f64, 0f64);
    for round in 1..=a.rounds {
        let rx = rate(a.mib, xxh3, &buf);
        let rb = rate(a.mib, blake3, &buf);
        println!("round {round}: xxh3-128 {rx:.0} MiB/s, blake3 {rb:.0} MiB/s");
        best_x = best_x.max(rx);
        best_b = best_b.max(rb);
    }
    println!(
        "{{\"chunk_bytes\":{},\"xxh3_128_mib_s\":{best_x:.0},\"blake3_mib_s\":{best_b:.0}}}",
        a.chunk
    );
}
