//! The cluster token: created at the controller's first start, stored with mode 0600 in its state
//! directory, carried by every API call and agent connection, compared in constant time.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const TOKEN_BYTES: usize = 32;

/// Reads the token in `path`, creating it (readable by its owner only) when absent.
pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 32 {
                return Err(format!("{}: token is shorter than 32 characters", path.display()));
            }
            return Ok(token);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let raw: [u8; TOKEN_BYTES] = random_bytes()?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

/// `N` bytes from the kernel's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut raw = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(raw)
}

/// A new directory `prefix-<16 random hex digits>` under `parent`, this user's alone (0700).
/// The name cannot be guessed and the directory must not exist yet, so nobody else's directory
/// or link in a shared /tmp is ever taken for it.
pub fn private_temp_dir(parent: &Path, prefix: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let suffix: String = random_bytes::<8>()?.iter().map(|b| format!("{b:02x}")).collect();
    let dir = parent.join(format!("{prefix}-{suffix}"));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Reads an existing token file (agents and the CLI).
pub fn read_token(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 32 {
        return Err(format!("token file {}: the token is shorter than 32 characters", path.display()));
    }
    Ok(token)
}

/// Equality whose running time does not depend on where the inputs first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries `token`.
pub fn bearer_matches(header: Option<&[u8]>, token: &str) -> bool {
    match header.and_then(|h| h.strip_prefix(b"Bearer ")) {
        Some(given) => constant_time_eq(given, token.as_bytes()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_temporary_directory_is_new_unguessable_and_this_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir();
        let (a, b) =
            (private_temp_dir(&parent, "myriad-t").unwrap(), private_temp_dir(&parent, "myriad-t").unwrap());
        assert_ne!(a, b);
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir(&a).unwrap();
        std::fs::remove_dir(&b).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_is_created_once_private_and_then_reused() {
        let dir = std::env::temp_dir().join(format!("myriad-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let _ = std::fs::remove_file(&path);
        let first = load_or_create_token(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), first);
        assert!(bearer_matches(Some(format!("Bearer {first}").as_bytes()), &first));
        assert!(!bearer_matches(Some(b"Bearer nope"), &first));
        assert!(!bearer_matches(Some(first.as_bytes()), &first), "the scheme is required");
        assert!(!bearer_matches(None, &first));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
