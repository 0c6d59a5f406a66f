//! GPU memory: buffers are pooled in size classes, free ones are capped, the bytes held are
//! counted with a resettable peak, and an allocation the device cannot make is an
//! `Error::OutOfMemory` that leaves the device working.
//!
//! The tests that count bytes run on a device of their own: the pool and its counters are per
//! device, and the tests of a binary run in parallel. They count from what a fresh device
//! holds already (the uniform arena of its command recorder).

mod common;

use common::*;
use diffwgpu::{Backend, Error, Gpu};

/// A device of its own on the harness's adapter.
fn own_device(g: &Gpu) -> Gpu {
    Gpu::with_adapter(Some(&g.adapter_info().name)).unwrap()
}

/// Tensors of 1,000 and 1,010 f32 (4,000 and 4,040 bytes) share the 4 KiB class: the second
/// takes the buffer the first freed, and nothing new is allocated.
fn a_freed_buffer_serves_a_similar_size_in_its_class(g: &Gpu) {
    let g = own_device(g);
    let base = g.stats().allocated_bytes;
    let first = g.zeros(&[1000]).unwrap();
    let allocated = g.stats().allocated_bytes;
    assert_eq!(
        allocated,
        base + 4096,
        "1,000 f32 take one buffer of the 4 KiB class"
    );
    drop(first);
    assert_eq!(g.stats().pooled_free_bytes, 4096);
    let second = g.zeros(&[1010]).unwrap();
    let stats = g.stats();
    assert_eq!(
        stats.allocated_bytes, allocated,
        "the 1,010-element tensor did not reuse the free buffer of its class"
    );
    assert_eq!(stats.pooled_free_bytes, 0);
    assert_eq!(down(&g, &second), vec![0.0; 1010]);
}

/// Free buffers never hold more than the cap: a buffer that comes back to a full pool evicts
/// the largest free buffers (here itself) rather than the oldest, and lowering the cap
/// evicts at once.
fn a_full_pool_evicts_its_largest_free_buffers(g: &Gpu) {
    const KIB: u64 = 1 << 10;
    let g = own_device(g);
    let base = g.stats().allocated_bytes;
    g.set_pool_cap(40 * KIB);
    assert_eq!(g.stats().pool_cap_bytes, 40 * KIB);
    let small: Vec<_> = (0..3).map(|_| g.zeros(&[1024]).unwrap()).collect();
    let large = g.zeros(&[8192]).unwrap();
    assert_eq!(g.stats().allocated_bytes, base + 44 * KIB);
    drop(small);
    assert_eq!(g.stats().pooled_free_bytes, 12 * KIB);
    drop(large);
    let stats = g.stats();
    assert_eq!(
        stats.pooled_free_bytes,
        12 * KIB,
        "44 KiB of free buffers over a 40 KiB cap must lose the 32 KiB one, not small ones"
    );
    assert_eq!(
        stats.allocated_bytes,
        base + 12 * KIB,
        "an evicted buffer is still counted"
    );
    g.set_pool_cap(8 * KIB);
    let stats = g.stats();
    assert_eq!(
        (stats.pooled_free_bytes, stats.allocated_bytes),
        (8 * KIB, base + 8 * KIB)
    );
    g.trim_pool();
    let stats = g.stats();
    assert_eq!((stats.pooled_free_bytes, stats.allocated_bytes), (0, base));
}

/// `peak_bytes` is the high-water mark of `allocated_bytes`, which includes a readback's
/// staging buffer while the read runs; `reset_peak` starts it again from what is allocated.
fn peak_bytes_is_the_high_water_mark_until_reset(g: &Gpu) {
    let g = own_device(g);
    let base = g.stats().allocated_bytes;
    let big = g.zeros(&[100_000]).unwrap();
    let big_bytes = g.stats().allocated_bytes - base;
    assert!(
        big_bytes >= 400_000 && big_bytes * 4 < 400_000 * 5,
        "{big_bytes}"
    );
    drop(big);
    g.trim_pool();
    let stats = g.stats();
    assert_eq!(stats.allocated_bytes, base);
    assert_eq!(
        stats.peak_bytes,
        base + big_bytes,
        "the peak fell with the allocation"
    );

    g.reset_peak();
    assert_eq!(
        g.stats().peak_bytes,
        base,
        "reset_peak did not reset the peak"
    );
    let small = g.zeros(&[1000]).unwrap();
    down(&g, &small);
    let stats = g.stats();
    assert_eq!(
        stats.allocated_bytes,
        base + 4096,
        "the staging buffer outlived the read"
    );
    assert_eq!(
        stats.peak_bytes,
        base + 4096 + 4000,
        "the peak is the tensor's buffer and the read's 4,000-byte staging buffer"
    );
    assert!(stats.peak_bytes >= stats.allocated_bytes);
}

/// A tensor one element larger than the largest storage buffer the adapter binds is an
/// `OutOfMemory` error naming the bytes and the limit, for an op's output and for an upload,
/// and the device works afterwards.
fn a_tensor_beyond_the_largest_buffer_is_out_of_memory(g: &Gpu) {
    let limits = g.limits();
    let limit = limits
        .max_buffer_size
        .min(limits.max_storage_buffer_binding_size);
    let n = (limit / 4 + 1) as usize;
    let bytes = n as u64 * 4;
    let check = |what: &str, err: Error| {
        let msg = err.to_string();
        match err {
            Error::OutOfMemory {
                bytes: b,
                limit: Some(l),
                ..
            } => assert_eq!((b, l), (bytes, limit), "{what}: {msg}"),
            other => panic!("{what}: not an OutOfMemory error: {other}"),
        }
        for part in [bytes.to_string(), limit.to_string(), "batch".to_string()] {
            assert!(msg.contains(&part), "{what}: {part:?} missing from: {msg}");
        }
    };
    check("zeros", g.zeros(&[n]).unwrap_err());
    // The upload needs the data on the host: only where that is a modest amount.
    if limit <= 1 << 30 {
        check("upload", g.upload(&[n], &vec![0.0; n]).unwrap_err());
    }
    let x = up(g, &[3], &[1.0, 2.0, 3.0]);
    assert_eq!(down(g, &g.add(&x, &x).unwrap()), vec![2.0, 4.0, 6.0]);
}

/// A tensor in a reused buffer whose tail still holds an earlier tensor's values: ops and
/// reads see only the tensor's own elements.
fn a_reused_buffer_with_a_stale_tail_shows_only_its_elements(g: &Gpu) {
    let g = own_device(g);
    let stale = g.scale(&up(&g, &[1024], &[7.0; 1024]), 1.0).unwrap();
    drop(stale);
    let values = seeded(1001, 3);
    let x = up(&g, &[1001], &values);
    let allocated = g.stats().allocated_bytes;
    let y = g.scale(&x, 1.0).unwrap();
    assert_eq!(
        g.stats().allocated_bytes,
        allocated,
        "y did not reuse the stale buffer"
    );
    assert_eq!(down(&g, &y), values);
    let sum: f32 = values.iter().sum();
    let got = down(&g, &g.sum(&y).unwrap())[0];
    assert!((got - sum).abs() < 1e-3, "sum {got}, want {sum}");
}

tests! {
    cpu: [],
    gpu: [
        a_freed_buffer_serves_a_similar_size_in_its_class,
        a_full_pool_evicts_its_largest_free_buffers,
        peak_bytes_is_the_high_water_mark_until_reset,
        a_tensor_beyond_the_largest_buffer_is_out_of_memory,
        a_reused_buffer_with_a_stale_tail_shows_only_its_elements,
    ],
}
