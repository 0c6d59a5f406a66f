//! GPU memory: the bytes held in buffers are counted with a resettable peak, and an
//! allocation the device cannot make is an `Error::OutOfMemory` that leaves the device working.
//!
//! The counting tests run on a device of their own: the pool and its counters are per device,
//! and the tests of a binary run in parallel.

mod common;

use common::*;
use diffwgpu::{Backend, Error, Gpu};

/// A device of its own on the harness's adapter.
fn own_device(g: &Gpu) -> Gpu {
    Gpu::with_adapter(Some(&g.adapter_info().name)).unwrap()
}

/// `peak_bytes` is the high-water mark of `allocated_bytes`, which includes a readback's
/// staging buffer while the read runs; `reset_peak` starts it again from what is allocated.
fn peak_bytes_is_the_high_water_mark_until_reset(g: &Gpu) {
    let g = own_device(g);
    let big = g.zeros(&[100_000]).unwrap();
    let big_bytes = g.stats().allocated_bytes;
    assert!(
        big_bytes >= 400_000 && big_bytes * 4 < 400_000 * 5,
        "{big_bytes}"
    );
    drop(big);
    g.trim_pool();
    let stats = g.stats();
    assert_eq!(stats.allocated_bytes, 0);
    assert_eq!(
        stats.peak_bytes, big_bytes,
        "the peak fell with the allocation"
    );

    g.reset_peak();
    assert_eq!(g.stats().peak_bytes, 0, "reset_peak did not reset the peak");
    let small = g.zeros(&[1000]).unwrap();
    down(&g, &small);
    let stats = g.stats();
    assert_eq!(
        stats.allocated_bytes, 4000,
        "the staging buffer outlived the read"
    );
    assert_eq!(
        stats.peak_bytes,
        4000 + 4000,
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

tests! {
    cpu: [],
    gpu: [
        peak_bytes_is_the_high_water_mark_until_reset,
        a_tensor_beyond_the_largest_buffer_is_out_of_memory,
    ],
}
