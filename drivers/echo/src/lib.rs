//! `gv-echo`: a VDRIVER (docs/VDRIVER.md) with two loopback devices. `echo0` answers `echo`
//! with its arguments and `reverse` with them reversed; `counter0` answers `next` with a
//! counter that increases on every call. `GV_ECHO_FAULT` makes it misbehave on purpose for
//! gvd's tests: `abi` reports another ABI version, `error` fails to list, `panic` panics while
//! listing, `abort` aborts the process. `echo0` also has functions that misbehave when called,
//! for the KOS tests, not listed in its attributes: `panic` (caught at the boundary: error
//! -1), `abort` (ends the process) and `sleep` (ASCII milliseconds, at most a minute).
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicU64, Ordering};

use gv_vdriver_abi::{serve_call, serve_list, GvVdev, ABI_VERSION};

const VDEVS: [(&CStr, &CStr, &CStr); 2] = [
    (c"echo0", c"echo", c"{\"functions\":[\"echo\",\"reverse\"]}"),
    (c"counter0", c"char", c"{\"functions\":[\"next\"]}"),
];

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn fault() -> String {
    std::env::var("GV_ECHO_FAULT").unwrap_or_default()
}

/// The ABI version this driver implements.
#[no_mangle]
pub extern "C" fn gv_vdriver_abi_version() -> u32 {
    if fault() == "abi" {
        ABI_VERSION + 98
    } else {
        ABI_VERSION
    }
}

/// The driver's name.
#[no_mangle]
pub extern "C" fn gv_vdriver_name() -> *const c_char {
    c"echo".as_ptr()
}

/// Lists the VDEVs.
///
/// # Safety
///
/// `out` must point to `cap` writable `GvVdev`s (or be null with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn gv_vdriver_list(out: *mut GvVdev, cap: u32) -> i32 {
    // SAFETY: the caller's contract, forwarded unchanged; the strings are static.
    unsafe {
        serve_list(out, cap, || {
            match fault().as_str() {
                "error" => return Err(-1),
                "panic" => panic!("gv-echo: asked to panic"),
                "abort" => std::process::abort(),
                _ => {}
            }
            Ok(VDEVS
                .iter()
                .map(|(name, kind, attributes)| GvVdev::new(name, kind, attributes))
                .collect())
        })
    }
}

/// Calls a function of a VDEV.
///
/// # Safety
///
/// Strings must be NUL-terminated, `args` readable for `args_len` bytes, `out` writable for
/// `out_cap` bytes and `out_len` writable.
#[no_mangle]
pub unsafe extern "C" fn gv_vdriver_call(
    vdev: *const c_char,
    function: *const c_char,
    args: *const u8,
    args_len: usize,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: the caller's contract, forwarded unchanged.
    unsafe {
        serve_call(
            vdev,
            function,
            args,
            args_len,
            out,
            out_cap,
            out_len,
            |vdev, function, args| {
                Ok(match (vdev, function) {
                    (b"echo0", b"echo") => args.to_vec(),
                    (b"echo0", b"reverse") => args.iter().rev().copied().collect(),
                    (b"echo0", b"panic") => panic!("gv-echo: asked to panic"),
                    (b"echo0", b"abort") => std::process::abort(),
                    (b"echo0", b"sleep") => {
                        let ms: u64 = std::str::from_utf8(args)
                            .ok()
                            .and_then(|t| t.trim().parse().ok())
                            .unwrap_or(0);
                        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
                        args.to_vec()
                    }
                    (b"counter0", b"next") => (COUNTER.fetch_add(1, Ordering::Relaxed) + 1)
                        .to_string()
                        .into_bytes(),
                    (b"echo0" | b"counter0", _) => return Err(-4),
                    _ => return Err(-3),
                })
            },
        )
    }
}
