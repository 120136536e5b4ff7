//! Canonical paths for the crate's own route matcher.
//!
//! Servers disagree on what a path means: some decode `%61`, some fold case, some resolve `..`.
//! The matcher therefore looks up the *most general* reading of a path (decoded, slashes collapsed,
//! no trailing slash, ASCII lowercase), and refuses the readings that cannot be made safe: dot
//! segments, encoded slashes and backslashes, encoded `%`, control characters, invalid escapes or
//! UTF-8. So `/admin/`, `//admin`, `/ADMIN` and `/%61dmin` all get the scope of `/admin`, and
//! `/public/../admin` is a `400`.

use crate::reject::Rejection;
use std::borrow::Cow;

/// The canonical form of `path`, borrowed when it already is canonical (the common case).
pub(crate) fn canonical(path: &str) -> Result<Cow<'_, str>, Rejection> {
    if !path.starts_with('/') {
        return Err(Rejection::InvalidPath);
    }
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path)?;
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err(Rejection::InvalidPath);
        }
        out.push('/');
        out.extend(segment.chars().map(|c| c.to_ascii_lowercase()));
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn is_canonical(path: &str) -> bool {
    let b = path.as_bytes();
    let plain = b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"/-_~.!$&'()*+,;=:@".contains(&c));
    plain
        && !path.contains("//")
        && (b.len() == 1 || !path.ends_with('/'))
        && !path.split('/').any(|s| s == "." || s == "..")
}

fn decode(path: &str) -> Result<String, Rejection> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(Rejection::InvalidPath)?;
            let hex = std::str::from_utf8(hex).map_err(|_| Rejection::InvalidPath)?;
            let c = u8::from_str_radix(hex, 16).map_err(|_| Rejection::InvalidPath)?;
            // An encoded separator or `%` reads differently on every server: refuse it.
            if matches!(c, b'/' | b'\\' | b'%') {
                return Err(Rejection::InvalidPath);
            }
            i += 3;
            c
        } else {
            i += 1;
            b[i - 1]
        };
        if c == b'\\' || c.is_ascii_control() {
            return Err(Rejection::InvalidPath);
        }
        out.push(c);
    }
    String::from_utf8(out).map_err(|_| Rejection::InvalidPath)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_of_a_path_read_as_the_path() {
        for p in ["/admin", "/admin/", "//admin", "/ADMIN", "/%61dmin", "/%41DMIN//", "///admin///"] {
            assert_eq!(canonical(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(canonical("/").unwrap(), "/");
        assert_eq!(canonical("//").unwrap(), "/");
        assert!(matches!(canonical("/v1/items/42").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/public/../admin",
            "/public/./admin",
            "/public/%2e%2e/admin",
            "/public/.%2E/admin",
            "/a%2fb",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/a%zz",
            "/a%",
            "/a%2561",
            "/%ff",
            "*",
            "",
        ] {
            assert!(canonical(p).is_err(), "{p}");
        }
    }
}
