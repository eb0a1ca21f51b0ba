//! The boundary half of `gv_vdriver_call` (docs/VDRIVER.md) for drivers written in Rust: it
//! reads the caller's strings and arguments, catches panics (code -1), and copies the answer
//! into the caller's buffer (code -2 with the needed length when it is too small). A driver
//! only maps `(vdev, function, args)` to an answer or an error code.
//!
//! ```
//! use std::ffi::c_char;
//! # unsafe extern "C" fn gv_vdriver_call(vdev: *const c_char, function: *const c_char, args: *const u8,
//! #     args_len: usize, out: *mut u8, out_cap: usize, out_len: *mut usize) -> i32 {
//! // SAFETY: the caller's contract is gv_vdriver_call's, forwarded unchanged.
//! unsafe {
//!     gv_vdriver_kit::serve_call(vdev, function, args, args_len, out, out_cap, out_len, |vdev, function, args| {
//!         match (vdev, function) {
//!             (b"echo0", b"echo") => Ok(args.to_vec()),
//!             (b"echo0", _) => Err(-4),
//!             _ => Err(-3),
//!         }
//!     })
//! }
//! # }
//! ```
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `handle` for one call and writes its answer back.
///
/// # Safety
///
/// As `gv_vdriver_call`: `vdev` and `function` NUL-terminated, `args` readable for `args_len`
/// bytes, `out` writable for `out_cap` bytes and `out_len` writable.
#[allow(clippy::too_many_arguments)]
pub unsafe fn serve_call(
    vdev: *const c_char,
    function: *const c_char,
    args: *const u8,
    args_len: usize,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
    handle: impl FnOnce(&[u8], &[u8], &[u8]) -> Result<Vec<u8>, i32>,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller guarantees valid strings and buffers (see above).
        let (vdev, function, args) = unsafe {
            (
                CStr::from_ptr(vdev).to_bytes(),
                CStr::from_ptr(function).to_bytes(),
                std::slice::from_raw_parts(args, args_len),
            )
        };
        let answer = match handle(vdev, function, args) {
            Ok(answer) => answer,
            Err(code) => return code,
        };
        // SAFETY: out_len is writable; out is writable for out_cap bytes.
        unsafe {
            *out_len = answer.len();
            if answer.len() > out_cap {
                return -2;
            }
            std::ptr::copy_nonoverlapping(answer.as_ptr(), out, answer.len());
        }
        0
    }));
    result.unwrap_or(-1)
}
