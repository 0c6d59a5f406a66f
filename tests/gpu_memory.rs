//! GPU memory: an allocation the device cannot make is an `Error::OutOfMemory` that leaves the
//! device working.

mod common;

use common::*;
use diffwgpu::{Backend, Error, Gpu};

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
    gpu: [a_tensor_beyond_the_largest_buffer_is_out_of_memory],
}
