//! The VDRIVER C ABI (docs/VDRIVER.md), owned in one place: the [`GvVdev`] layout, the
//! signatures of the four entry points ([`AbiVersionFn`], [`NameFn`], [`ListFn`], [`CallFn`]),
//! [`ABI_VERSION`], and for drivers written in Rust the boundary halves of the two entry points
//! that take buffers: [`serve_list`] and [`serve_call`] read the caller's arguments, catch
//! panics (code -1) and write the answer back (for a call, code -2 with the needed length when
//! the caller's buffer is too small). A driver only says which VDEVs it has and maps
//! `(vdev, function, args)` to an answer or an error code. gvd's loader uses the same types.
//!
//! ```
//! use std::ffi::c_char;
//! # unsafe extern "C" fn gv_vdriver_call(vdev: *const c_char, function: *const c_char, args: *const u8,
//! #     args_len: usize, out: *mut u8, out_cap: usize, out_len: *mut usize) -> i32 {
//! // SAFETY: the caller's contract is gv_vdriver_call's, forwarded unchanged.
//! unsafe {
//!     gv_vdriver_abi::serve_call(vdev, function, args, args_len, out, out_cap, out_len, |vdev, function, args| {
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

/// The ABI version this crate describes (`gv_vdriver_abi_version` returns it).
pub const ABI_VERSION: u32 = 1;

/// A VDEV as `gv_vdriver_list` writes it: three NUL-terminated strings that stay valid until
/// the driver's next listing.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GvVdev {
    /// The device's name, unique within the driver.
    pub name: *const c_char,
    /// Its kind (`block`, `char`, `echo`, ...).
    pub kind: *const c_char,
    /// Its attributes, a JSON object.
    pub attributes: *const c_char,
}

impl GvVdev {
    /// Points at three strings, which must outlive the listing (statics, or strings the driver
    /// keeps until its next listing).
    pub fn new(name: &CStr, kind: &CStr, attributes: &CStr) -> Self {
        Self {
            name: name.as_ptr(),
            kind: kind.as_ptr(),
            attributes: attributes.as_ptr(),
        }
    }
}

/// `uint32_t gv_vdriver_abi_version(void)`.
pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
/// `const char *gv_vdriver_name(void)`.
pub type NameFn = unsafe extern "C" fn() -> *const c_char;
/// `int32_t gv_vdriver_list(gv_vdev *out, uint32_t cap)`: the number of VDEVs (writing at most
/// `cap`), or a negative error code.
pub type ListFn = unsafe extern "C" fn(*mut GvVdev, u32) -> i32;
/// `int32_t gv_vdriver_call(vdev, function, args, args_len, out, out_cap, out_len)`.
pub type CallFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const u8,
    usize,
    *mut u8,
    usize,
    *mut usize,
) -> i32;

/// Runs `list` for one listing and writes at most `cap` of its VDEVs to `out`; returns how
/// many there are, `list`'s error code, or -1 when it panicked.
///
/// # Safety
///
/// As `gv_vdriver_list`: `out` writable for `cap` entries (or null with `cap` 0); the strings
/// the VDEVs point at must stay valid until the next listing.
pub unsafe fn serve_list(
    out: *mut GvVdev,
    cap: u32,
    list: impl FnOnce() -> Result<Vec<GvVdev>, i32>,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let vdevs = match list() {
            Ok(vdevs) => vdevs,
            Err(code) => return code,
        };
        for (i, vdev) in vdevs.iter().enumerate().take(cap as usize) {
            // SAFETY: the caller provides `cap` writable entries and i < cap.
            unsafe { out.add(i).write(*vdev) };
        }
        i32::try_from(vdevs.len()).unwrap_or(i32::MAX)
    }));
    result.unwrap_or(-1)
}

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
