//! Zone-relative paths, the only kind of path that crosses the network.
//!
//! A path named by a peer (replication messages, pulled entries) or a client (NFS names) is
//! hostile until checked: it must be relative, made of non-empty components that are not `.`
//! or `..` and hold no NUL, and it must resolve beneath the zone's root without following a
//! symbolic link. [`ZonePath`] is the checked form (the wire types deserialize into it, so an
//! unchecked path never reaches the store), [`resolve_beneath`] turns one into an on-disk path
//! after checking every existing component with `lstat`, and [`open_beneath`] opens a file for
//! reading with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, which the kernel enforces
//! even against a directory swapped for a link while the request runs.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest zone path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest component accepted, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Why a path was refused.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// It starts with `/`.
    #[error("path {0:?} is absolute; zone paths are relative to the zone")]
    Absolute(String),
    /// A component is empty (`a//b`, a trailing `/`), or the whole path is.
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// A component is `.` or `..`.
    #[error("path {0:?} has a '.' or '..' component")]
    DotComponent(String),
    /// It holds a NUL byte.
    #[error("path {0:?} holds a NUL byte")]
    Nul(String),
    /// It is longer than [`MAX_PATH_LEN`], or a component than [`MAX_NAME_LEN`].
    #[error("path of {0} bytes, or one of its names, is too long")]
    TooLong(usize),
    /// A component on disk is a symbolic link (never followed in a zone).
    #[error("{0:?} is a symbolic link; zones do not follow links")]
    Symlink(String),
    /// A component on disk that should be a directory is something else.
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
}

/// Checks one name (an NFS file name, one component of a path).
///
/// # Errors
///
/// [`PathError`] when the name is empty, `.`, `..`, too long, or holds `/` or NUL.
///
/// # Examples
///
/// ```
/// use grapevine_fs::zpath::check_name;
/// assert!(check_name("report.txt").is_ok());
/// assert!(check_name("..").is_err());
/// assert!(check_name("a/b").is_err());
/// ```
pub fn check_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() || name.contains('/') {
        return Err(PathError::EmptyComponent(name.to_string()));
    }
    check_component(name, name)
}

fn check_component(component: &str, whole: &str) -> Result<(), PathError> {
    if component.is_empty() {
        return Err(PathError::EmptyComponent(whole.to_string()));
    }
    if component == "." || component == ".." {
        return Err(PathError::DotComponent(whole.to_string()));
    }
    if component.contains('\0') {
        return Err(PathError::Nul(whole.to_string()));
    }
    if component.len() > MAX_NAME_LEN {
        return Err(PathError::TooLong(whole.len()));
    }
    Ok(())
}

/// Checks a zone path; the empty path is the zone's root.
///
/// # Errors
///
/// [`PathError`] for absolute paths, empty, `.` or `..` components, NUL bytes and paths that
/// are too long.
pub fn check(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(path.len()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_string()));
    }
    path.split('/')
        .try_for_each(|component| check_component(component, path))
}

/// A checked zone-relative path (`dir/sub/file`; empty for the root).
///
/// # Examples
///
/// ```
/// use grapevine_fs::zpath::ZonePath;
/// assert_eq!(ZonePath::new("docs/a.txt").unwrap().as_str(), "docs/a.txt");
/// for hostile in ["/etc/shadow", "../../etc/hostname", "a/../../b", "a//b", "a\0b"] {
///     assert!(ZonePath::new(hostile).is_err(), "{hostile:?}");
/// }
/// ```
#[derive(Clone, Debug, Default, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ZonePath(String);

impl ZonePath {
    /// Checks `path`.
    ///
    /// # Errors
    ///
    /// See [`check`].
    pub fn new(path: impl Into<String>) -> Result<Self, PathError> {
        let path = path.into();
        check(&path)?;
        Ok(Self(path))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for ZonePath {
    type Error = PathError;

    fn try_from(path: String) -> Result<Self, PathError> {
        Self::new(path)
    }
}

impl From<ZonePath> for String {
    fn from(path: ZonePath) -> Self {
        path.0
    }
}

impl AsRef<str> for ZonePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ZonePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The on-disk location of zone path `path` under `root`, after checking the path and every
/// component that exists on disk: none may be a symbolic link, and every one but the last must
/// be a directory. Components that do not exist yet are fine (a file about to be created).
///
/// # Errors
///
/// [`PathError`] when the path is malformed or resolution would leave the root.
pub fn resolve_beneath(root: &Path, path: &str) -> Result<PathBuf, PathError> {
    check(path)?;
    let mut disk = root.to_path_buf();
    if path.is_empty() {
        return Ok(disk);
    }
    let mut components = path.split('/').peekable();
    let mut walked = String::with_capacity(path.len());
    while let Some(component) = components.next() {
        disk.push(component);
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(component);
        match std::fs::symlink_metadata(&disk) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(PathError::Symlink(walked));
            }
            Ok(meta) if components.peek().is_some() && !meta.is_dir() => {
                return Err(PathError::NotADirectory(walked));
            }
            Ok(_) => {}
            // Nothing further down can exist either: the rest is created under a checked parent.
            Err(_) => {
                for rest in components {
                    disk.push(rest);
                }
                return Ok(disk);
            }
        }
    }
    Ok(disk)
}

/// Opens zone path `path` under `root` for reading; the kernel refuses any resolution that
/// leaves `root` or follows a symbolic link, so a component swapped for a link between a check
/// and the open cannot lead outside the zone.
///
/// # Errors
///
/// A malformed path (`InvalidInput`), a link on the way (`ELOOP`/`EXDEV`), or the open's own
/// error.
pub fn open_beneath(root: &Path, path: &str) -> std::io::Result<File> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::Mode;

    check(path).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let dir = File::open(root)?;
    let target = if path.is_empty() { "." } else { path };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(&dir, target, how) {
        Ok(fd) => Ok(File::from(fd)),
        // Kernels before 5.6 lack openat2: check every component, then refuse a final link.
        Err(nix::errno::Errno::ENOSYS) => {
            let disk = resolve_beneath(root, path)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(OFlag::O_NOFOLLOW.bits())
                .open(disk)
        }
        Err(errno) => Err(std::io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gvfs-zpath-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn hostile_paths_are_refused() {
        for (path, expected) in [
            ("/etc/shadow", "absolute"),
            ("../../../../etc/hostname", "'..'"),
            ("a/../../b", "'..'"),
            ("./a", "'..'"),
            ("a//b", "empty"),
            ("a/", "empty"),
            ("a\0b", "NUL"),
        ] {
            let error = ZonePath::new(path).unwrap_err().to_string();
            assert!(error.contains(expected), "{path:?}: {error}");
        }
        assert!(ZonePath::new("x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(ZonePath::new(["a"; MAX_PATH_LEN].join("/")).is_err());
        assert!(ZonePath::new("ok/also ok/ünïcode.txt").is_ok());
        assert_eq!(ZonePath::new("").unwrap().as_str(), "");
    }

    #[test]
    fn a_hostile_path_does_not_deserialize() {
        let bytes = postcard::to_stdvec(&"../../etc/shadow".to_string()).unwrap();
        assert!(postcard::from_bytes::<ZonePath>(&bytes).is_err());
        let bytes = postcard::to_stdvec(&"docs/a".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<ZonePath>(&bytes).unwrap().as_str(),
            "docs/a"
        );
    }

    #[test]
    fn links_inside_the_zone_are_never_followed() {
        let dir = scratch("links");
        let root = dir.join("zone");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(root.join("real/f"), b"inside").unwrap();
        std::fs::write(dir.join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(&dir, root.join("up")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), root.join("leak")).unwrap();

        assert_eq!(
            resolve_beneath(&root, "real/f").unwrap(),
            root.join("real/f")
        );
        assert_eq!(
            resolve_beneath(&root, "real/new/deeper").unwrap(),
            root.join("real/new/deeper")
        );
        assert!(matches!(
            resolve_beneath(&root, "up/secret"),
            Err(PathError::Symlink(p)) if p == "up"
        ));
        assert!(matches!(
            resolve_beneath(&root, "leak"),
            Err(PathError::Symlink(_))
        ));
        assert!(matches!(
            resolve_beneath(&root, "real/f/under-a-file"),
            Err(PathError::NotADirectory(_))
        ));

        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_beneath(&root, "real/f").unwrap(), &mut text)
            .unwrap();
        assert_eq!(text, "inside");
        assert!(open_beneath(&root, "leak").is_err());
        assert!(open_beneath(&root, "up/secret").is_err());
        assert!(open_beneath(&root, "../secret").is_err());
        assert!(open_beneath(&root, "/etc/hostname").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
