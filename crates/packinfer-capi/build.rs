//! Generates `include/packinfer.h` from this crate's `extern "C"` surface with cbindgen. The header
//! is committed; it is rewritten only when its content changes, and CI fails when a build leaves
//! it different from the committed one.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = match cbindgen::Builder::new().with_crate(&dir).with_config(config).generate() {
        Ok(b) => b,
        Err(e) => panic!("cbindgen could not generate include/packinfer.h: {e}"),
    };
    let mut text = Vec::new();
    bindings.write(&mut text);
    let include = dir.join("../../include");
    let path = include.join("packinfer.h");
    if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
        std::fs::create_dir_all(&include).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
}
