//! Generates `include/packinfer.h` from the `extern "C"` surface in `src/ffi` with cbindgen.
//! The header is committed; it is rewritten only when its content changes, and CI fails when a
//! build leaves it different from the committed one.
//!
//! On Linux it also gives `libpackinfer.so` the SONAME `libpackinfer.so.<ABI version>` (see
//! `soname`).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        soname(&dir);
    }
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = match cbindgen::Builder::new().with_crate(&dir).with_config(config).generate() {
        Ok(b) => b,
        Err(e) => panic!("cbindgen could not generate include/packinfer.h: {e}"),
    };
    let mut text = Vec::new();
    bindings.write(&mut text);
    let path = dir.join("include/packinfer.h");
    if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
        std::fs::create_dir_all(dir.join("include")).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
}

/// The cdylib's SONAME carries the C ABI version (`PACKINFER_ABI_VERSION` in src/ffi/mod.rs), so a
/// program linked against one ABI never loads a library of another: the loader looks for
/// `libpackinfer.so.1`, and a new ABI is a new file name beside it.
///
/// Programs linked against `target/<profile>/libpackinfer.so` (ctest, the Go package, which put
/// that directory in their RPATH) then need `libpackinfer.so.1` there at run time: a symlink to
/// the library cargo writes. Cargo has no output for that, so it is made beside the library
/// (three levels above OUT_DIR, `target/<profile>/build/packinfer-*/out`).
fn soname(dir: &Path) {
    let ffi = std::fs::read_to_string(dir.join("src/ffi/mod.rs")).expect("src/ffi/mod.rs");
    let abi: u32 = ffi
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const PACKINFER_ABI_VERSION: u32 = ")?.strip_suffix(';')?.parse().ok())
        .expect("src/ffi/mod.rs defines `pub const PACKINFER_ABI_VERSION: u32 = N;`");
    let name = format!("libpackinfer.so.{abi}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{name}");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let link = profile_dir.join(&name);
        if std::fs::read_link(&link).ok().as_deref() != Some(Path::new("libpackinfer.so")) {
            let _ = std::fs::remove_file(&link);
            if let Err(e) = std::os::unix::fs::symlink("libpackinfer.so", &link) {
                println!("cargo:warning=could not create {}: {e}", link.display());
            }
        }
    }
}
