//! The VDRIVER C ABI (docs/VDRIVER.md): loading a driver library and calling it.
//!
//! Loading runs foreign code, so the daemon only does it in child processes
//! ([`crate::inventory`] probes each driver with `gvd probe-driver`).
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

pub use gv_vdriver_abi::ABI_VERSION;
use gv_vdriver_abi::{AbiVersionFn, CallFn, GvVdev as RawVdev, ListFn, NameFn};

/// Most VDEVs one driver may expose.
const MAX_VDEVS: u32 = 65_536;

pub use grapevine_kos::nodes::Vdev;

/// Why a driver could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The file is not a loadable shared library.
    #[error("cannot load {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the dynamic loader said.
        reason: String,
    },
    /// A required symbol is missing.
    #[error("missing symbol {0}")]
    MissingSymbol(&'static str),
    /// The driver speaks another ABI version.
    #[error("ABI version {found}, this gvd speaks {ABI_VERSION}")]
    WrongAbi {
        /// What the driver reported.
        found: u32,
    },
    /// The driver returned an error code.
    #[error("{operation} failed with code {code}")]
    Failed {
        /// What was called.
        operation: &'static str,
        /// The code it returned.
        code: i32,
    },
    /// The driver returned something the ABI does not allow.
    #[error("invalid answer from {operation}: {reason}")]
    Invalid {
        /// What was called.
        operation: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// A loaded driver. The library stays loaded as long as this lives, which keeps every
/// function pointer taken from it valid.
#[derive(Debug)]
pub struct Driver {
    name: String,
    list: ListFn,
    call: CallFn,
    _library: libloading::Library,
}

impl Driver {
    /// Loads the library at `path` and checks its ABI version and symbols.
    ///
    /// # Errors
    ///
    /// [`DriverError`] when it is not a library, lacks a symbol or speaks another ABI.
    pub fn load(path: &Path) -> Result<Self, DriverError> {
        // SAFETY: loading runs the library's initialisers; this is why gvd only loads drivers
        // in child processes, where a misbehaving one can only take the child down.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| DriverError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // SAFETY: each symbol is looked up with the signature docs/VDRIVER.md gives it; the
        // pointers are copied out of the `Symbol`s and used only while `library` is held.
        let (abi, name, list, call) = unsafe {
            let abi: AbiVersionFn = *library
                .get::<AbiVersionFn>(b"gv_vdriver_abi_version\0")
                .map_err(|_| DriverError::MissingSymbol("gv_vdriver_abi_version"))?;
            let name: NameFn = *library
                .get::<NameFn>(b"gv_vdriver_name\0")
                .map_err(|_| DriverError::MissingSymbol("gv_vdriver_name"))?;
            let list: ListFn = *library
                .get::<ListFn>(b"gv_vdriver_list\0")
                .map_err(|_| DriverError::MissingSymbol("gv_vdriver_list"))?;
            let call: CallFn = *library
                .get::<CallFn>(b"gv_vdriver_call\0")
                .map_err(|_| DriverError::MissingSymbol("gv_vdriver_call"))?;
            (abi, name, list, call)
        };
        // SAFETY: a function of the documented signature, from the loaded library.
        let found = unsafe { abi() };
        if found != ABI_VERSION {
            return Err(DriverError::WrongAbi { found });
        }
        // SAFETY: as above; the returned string is checked for null before reading.
        let name = unsafe { text(name(), "gv_vdriver_name")? };
        Ok(Self {
            name,
            list,
            call,
            _library: library,
        })
    }

    /// The driver's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VDEVs the driver exposes now, sorted by name.
    ///
    /// # Errors
    ///
    /// [`DriverError::Failed`] or [`DriverError::Invalid`] when the driver misbehaves.
    pub fn vdevs(&self) -> Result<Vec<Vdev>, DriverError> {
        let operation = "gv_vdriver_list";
        // SAFETY: a null buffer with capacity 0 asks only for the count.
        let count = unsafe { (self.list)(std::ptr::null_mut(), 0) };
        let count = u32::try_from(count).map_err(|_| DriverError::Failed {
            operation,
            code: count,
        })?;
        if count > MAX_VDEVS {
            return Err(DriverError::Invalid {
                operation,
                reason: format!("{count} VDEVs, at most {MAX_VDEVS}"),
            });
        }
        let mut raw: Vec<RawVdev> = (0..count)
            .map(|_| RawVdev {
                name: std::ptr::null(),
                kind: std::ptr::null(),
                attributes: std::ptr::null(),
            })
            .collect();
        // SAFETY: `raw` holds `count` writable entries.
        let written = unsafe { (self.list)(raw.as_mut_ptr(), count) };
        let written = u32::try_from(written).map_err(|_| DriverError::Failed {
            operation,
            code: written,
        })?;
        let mut vdevs = Vec::new();
        for entry in raw.iter().take(written.min(count) as usize) {
            // SAFETY: the driver filled these entries with strings that stay valid until the
            // next listing; each pointer is checked for null first.
            let vdev = unsafe {
                Vdev {
                    name: text(entry.name, operation)?,
                    kind: text(entry.kind, operation)?,
                    attributes: text(entry.attributes, operation)?,
                }
            };
            if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&vdev.attributes)
                .is_err()
            {
                return Err(DriverError::Invalid {
                    operation,
                    reason: format!("attributes of {} are not a JSON object", vdev.name),
                });
            }
            vdevs.push(vdev);
        }
        vdevs.sort();
        Ok(vdevs)
    }

    /// Calls `function` on `vdev` with `args`; returns the answer.
    ///
    /// # Errors
    ///
    /// [`DriverError::Failed`] with the driver's code, or [`DriverError::Invalid`] for names
    /// with NUL bytes.
    pub fn call(&self, vdev: &str, function: &str, args: &[u8]) -> Result<Vec<u8>, DriverError> {
        let operation = "gv_vdriver_call";
        let invalid = |_| DriverError::Invalid {
            operation,
            reason: "a name contains a NUL byte".into(),
        };
        let (vdev, function) = (
            CString::new(vdev).map_err(invalid)?,
            CString::new(function).map_err(invalid)?,
        );
        let mut out = vec![0u8; 4096];
        for _ in 0..2 {
            let mut len = 0usize;
            // SAFETY: NUL-terminated strings, `args` and `out` valid for their lengths, `len`
            // writable.
            let code = unsafe {
                (self.call)(
                    vdev.as_ptr(),
                    function.as_ptr(),
                    args.as_ptr(),
                    args.len(),
                    out.as_mut_ptr(),
                    out.len(),
                    &mut len,
                )
            };
            match code {
                0 if len <= out.len() => {
                    out.truncate(len);
                    return Ok(out);
                }
                -2 if len <= 64 << 20 => out.resize(len, 0),
                code => return Err(DriverError::Failed { operation, code }),
            }
        }
        Err(DriverError::Invalid {
            operation,
            reason: "the answer kept growing".into(),
        })
    }
}

/// Copies a NUL-terminated UTF-8 string from a driver.
///
/// # Safety
///
/// `ptr` must be null or point to a NUL-terminated string.
unsafe fn text(ptr: *const c_char, operation: &'static str) -> Result<String, DriverError> {
    if ptr.is_null() {
        return Err(DriverError::Invalid {
            operation,
            reason: "null string".into(),
        });
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| DriverError::Invalid {
        operation,
        reason: "string is not UTF-8".into(),
    })
}
