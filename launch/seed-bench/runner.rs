// Runs a seed op script (kvfabric-bench seed-ops --write) through the seed crate's Rust
// PagedKvCache and prints its rate, as `kvfabric-bench seed-ops --run` does for kvfabric's.
#[path = "seed_types.rs"]
#[allow(dead_code)]
mod types;
#[path = "seed_cache.rs"]
#[allow(dead_code)]
mod cache;

use cache::PagedKvCache;
use types::SeqId;
use std::time::Instant;

fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap())
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: seed-ops-rust SCRIPT");
    let bytes = std::fs::read(&path).expect("cannot read the script");
    assert!(bytes.len() >= 40 && &bytes[0..8] == b"KVFOPS01", "not a seed op script");
    let words = &bytes[8..];
    let (num_blocks, block_size, setup, timed) = (word(words, 0), word(words, 1), word(words, 2), word(words, 3));
    let ops = &words[32..];
    assert_eq!(ops.len() as u64, (setup + timed) * 24, "truncated script");
    let mut cache = PagedKvCache::new(num_blocks as usize, block_size as usize, 8, 128);
    let mut mismatches = 0u64;
    let mut run = |i: usize, cache: &mut PagedKvCache| {
        let (kind, a, b) = (word(ops, 3 * i), word(ops, 3 * i + 1), word(ops, 3 * i + 2));
        let done = match kind {
            0 => cache.allocate(SeqId(a), b as usize),
            1 => cache.append(SeqId(a), b as usize),
            2 => cache.fork(SeqId(a), SeqId(b)),
            3 => cache.free(SeqId(a)),
            4 => cache.evict().map(|victim| {
                if victim.0 != a {
                    mismatches += 1;
                }
            }),
            _ => panic!("unknown op {}", kind),
        };
        done.expect("an operation of the script failed");
    };
    for i in 0..setup as usize {
        run(i, &mut cache);
    }
    let start = Instant::now();
    for i in setup as usize..(setup + timed) as usize {
        run(i, &mut cache);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "seed Rust PagedKvCache: {} live sequences, {} operations in {:.3} s: {:.2} M ops/s ({} evictions chose another victim)",
        setup, timed, seconds, timed as f64 / seconds / 1e6, mismatches
    );
}
