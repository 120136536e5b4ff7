//! What the README shows a user to copy is what the crate accepts.

use keygate::store::KeyFile;
use keygate::KeyDigest;

/// The fenced block of `lang` under the heading `heading`.
fn block(heading: &str, lang: &str) -> String {
    let readme = include_str!("../README.md");
    let section = readme.split(&format!("\n## {heading}\n")).nth(1).expect("the section exists");
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).expect("the section has the block") + fence.len();
    section[start..].split("\n```").next().unwrap().to_owned()
}

#[test]
fn the_key_file_example_loads_and_its_digest_is_the_keys() {
    let file = KeyFile::parse(&block("Key file", "toml")).unwrap();
    assert_eq!(file.keys.len(), 1);
    assert_eq!(file.keys[0].0, KeyDigest::of("dev-key-1"), "the digest shown is of the key named");
    assert_eq!(file.keys[0].1.facts.id, "key_ci");
}
