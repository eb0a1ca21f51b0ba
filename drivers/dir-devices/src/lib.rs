//! `gv-dir-devices`: a VDRIVER (docs/VDRIVER.md) exposing every regular file of a directory
//! (`GV_DIRDEV_ROOT`, default `/var/lib/gvd/devices`) as a `block` VDEV named after the file.
//! Functions: `size` (decimal bytes) and `read` (arguments: offset and length as two
//! big-endian u64; answer: the bytes). The list is read again at every listing, so files that
//! appear or disappear change the inventory.
#![allow(unsafe_code)]

use std::ffi::{c_char, CString};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

use gv_vdriver_abi::{serve_list, GvVdev, ABI_VERSION};

/// The strings of the last listing, kept alive until the next one (as the ABI allows).
static LISTED: Mutex<Vec<(CString, CString)>> = Mutex::new(Vec::new());

fn root() -> PathBuf {
    std::env::var_os("GV_DIRDEV_ROOT")
        .map_or_else(|| PathBuf::from("/var/lib/gvd/devices"), PathBuf::from)
}

/// Regular files of the root with names that are valid device names, sorted.
fn devices() -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(root()) else {
        return Vec::new();
    };
    let mut found: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let name = entry.file_name().into_string().ok()?;
            (meta.is_file() && !name.contains('\0')).then_some((name, meta.len()))
        })
        .collect();
    found.sort();
    found
}

/// The ABI version this driver implements.
#[no_mangle]
pub extern "C" fn gv_vdriver_abi_version() -> u32 {
    ABI_VERSION
}

/// The driver's name.
#[no_mangle]
pub extern "C" fn gv_vdriver_name() -> *const c_char {
    c"dir-devices".as_ptr()
}

/// Lists the VDEVs: one per file.
///
/// # Safety
///
/// `out` must point to `cap` writable `GvVdev`s (or be null with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn gv_vdriver_list(out: *mut GvVdev, cap: u32) -> i32 {
    // SAFETY: the caller's contract, forwarded unchanged; the strings live in LISTED until the
    // next listing.
    unsafe {
        serve_list(out, cap, || {
            let mut listed = LISTED.lock().map_err(|_| -1)?;
            listed.clear();
            for (name, size) in devices() {
                let (Ok(name), Ok(attributes)) = (
                    CString::new(name),
                    CString::new(format!("{{\"size\":{size}}}")),
                ) else {
                    continue;
                };
                listed.push((name, attributes));
            }
            Ok(listed
                .iter()
                .map(|(name, attributes)| GvVdev::new(name, c"block", attributes))
                .collect())
        })
    }
}

/// Calls `size` or `read` on a device.
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
        gv_vdriver_abi::serve_call(
            vdev,
            function,
            args,
            args_len,
            out,
            out_cap,
            out_len,
            |vdev, function, args| {
                let vdev = String::from_utf8_lossy(vdev).into_owned();
                let Some((_, size)) = devices().into_iter().find(|(name, _)| *name == vdev) else {
                    return Err(-3);
                };
                match function {
                    b"size" => Ok(size.to_string().into_bytes()),
                    b"read" => {
                        let (Some(offset), Some(len)) = (
                            args.get(..8)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_be_bytes),
                            args.get(8..16)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_be_bytes),
                        ) else {
                            return Err(-5);
                        };
                        let mut buf =
                            vec![0u8; len.min(size.saturating_sub(offset)).min(1 << 20) as usize];
                        let read = std::fs::File::open(root().join(&vdev)).and_then(|mut f| {
                            f.seek(SeekFrom::Start(offset))?;
                            f.read_exact(&mut buf)
                        });
                        read.map(|()| buf).map_err(|_| -1)
                    }
                    _ => Err(-4),
                }
            },
        )
    }
}
