//! Canonical paths for the crate's own route matcher.
//!
//! Servers disagree on what a path means: some decode `%61`, some fold case, some resolve `..`.
//! The matcher therefore looks up the *most general* reading of a path (decoded, slashes collapsed,
//! no trailing slash, ASCII lowercase), and refuses the readings that cannot be made safe: dot
//! segments, encoded slashes and backslashes, encoded `%`, control characters, invalid escapes or
//! UTF-8, and `;` path parameters (many servers strip `;x` from a segment, so `/a;x/..;/admin` is
//! `/admin` to them). So `/admin/`, `//admin`, `/ADMIN` and `/%61dmin` all get the scope of `/admin`,
//! and `/public/../admin` and `/items/..;/admin` are a `400`. With matrix parameters allowed, `;…` is
//! stripped from each segment before anything else, as such servers do.

use crate::reject::Rejection;
use std::borrow::Cow;

/// Refuses the paths that cannot be read safely, without allocating. Run on every request, also
/// when the framework already matched a route: the inner service may read the path differently.
pub(crate) fn check(path: &str, matrix: bool) -> Result<(), Rejection> {
    if !path.starts_with('/') {
        return Err(Rejection::InvalidPath);
    }
    // The common case in one pass: without `%`, `\`, `;`, control bytes or `/.`, a path has no
    // escapes, no backslashes, no parameters and no dot segments (a dot segment begins with `/.`).
    // The common case without a branch per byte, so both folds vectorise.
    let b = path.as_bytes();
    let unusual = b.iter().fold(false, |u, &c| u | (c == b'%') | (c == b'\\') | (c == b';') | c.is_ascii_control());
    let dot_after_slash = b.iter().zip(&b[1..]).fold(false, |d, (&p, &c)| d | ((p == b'/') & (c == b'.')));
    let plain = !unusual && !dot_after_slash;
    if plain {
        return Ok(());
    }
    for segment in path.split('/') {
        let segment = match segment.split_once(';') {
            Some((before, _)) if matrix => before,
            Some(_) => return Err(Rejection::InvalidPath),
            None => segment,
        };
        let (mut decoded_len, mut all_dots) = (0, true);
        let b = segment.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = if b[i] == b'%' {
                let c = b.get(i + 1..i + 3).and_then(hex_byte).ok_or(Rejection::InvalidPath)?;
                // An encoded separator, `%` or `;` reads differently on every server.
                if matches!(c, b'/' | b'\\' | b'%' | b';') {
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
            decoded_len += 1;
            all_dots &= c == b'.';
        }
        if all_dots && (decoded_len == 1 || decoded_len == 2) {
            return Err(Rejection::InvalidPath);
        }
    }
    Ok(())
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

/// The canonical form of a path that passed [`check`], borrowed when it already is canonical
/// (the common case).
pub(crate) fn canonical(path: &str, matrix: bool) -> Result<Cow<'_, str>, Rejection> {
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    // Parameters go before decoding: `%3b` is refused by `check`, never a separator.
    let path: Cow<'_, str> = if matrix && path.contains(';') {
        Cow::Owned(
            path.split('/').map(|s| s.split_once(';').map_or(s, |(before, _)| before)).collect::<Vec<_>>().join("/"),
        )
    } else {
        Cow::Borrowed(path)
    };
    let decoded = decode(&path)?;
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
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
    let plain = b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"/-_~.!$&'()*+,=:@".contains(&c));
    plain && !path.contains("//") && (b.len() == 1 || !path.ends_with('/'))
}

/// Decodes a path that passed [`check`]; only invalid UTF-8 can still fail.
fn decode(path: &str) -> Result<String, Rejection> {
    percent_encoding::percent_decode_str(path).decode_utf8().map(Cow::into_owned).map_err(|_| Rejection::InvalidPath)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(path: &str) -> Result<Cow<'_, str>, Rejection> {
        check(path, false)?;
        canonical(path, false)
    }

    #[test]
    fn path_parameters_are_refused_or_stripped() {
        for p in ["/admin;x", "/items/..;/admin", "/a;b/c", "/a/%3b", "/a/..%3b/b", "/;"] {
            assert!(canon(p).is_err(), "{p}");
        }
        let matrix = |p: &str| check(p, true).and_then(|()| canonical(p, true).map(Cow::into_owned));
        assert_eq!(matrix("/Admin;v=1/stats;x").unwrap(), "/admin/stats");
        for p in ["/items/..;/admin", "/items/.;x/admin", "/a/%3b"] {
            assert!(matrix(p).is_err(), "{p}: a dot segment once its parameters are gone");
        }
    }

    #[test]
    fn variants_of_a_path_read_as_the_path() {
        for p in ["/admin", "/admin/", "//admin", "/ADMIN", "/%61dmin", "/%41DMIN//", "///admin///"] {
            assert_eq!(canon(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(canon("/").unwrap(), "/");
        assert_eq!(canon("//").unwrap(), "/");
        assert!(matches!(canon("/v1/items/42").unwrap(), Cow::Borrowed(_)));
        // Names that merely start with a dot are fine; only `.` and `..` segments are refused.
        for p in ["/.well-known/jwks.json", "/a/.hidden", "/a/..b", "/a/b.", "/a.b/c"] {
            assert!(check(p, false).is_ok(), "{p}");
        }
        for p in ["/a/.", "/a/..", "/./a", "/../a", "/a/./b"] {
            assert!(check(p, false).is_err(), "{p}");
        }
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
            assert!(canon(p).is_err(), "{p}");
        }
    }
}
