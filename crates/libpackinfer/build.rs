//! On Linux, gives `libpackinfer.so` the SONAME `libpackinfer.so.<ABI version>`.
//!
//! The SONAME carries the C ABI version (`PACKINFER_ABI_VERSION` in packinfer-capi), so a program
//! linked against one ABI never loads a library of another: the loader looks for
//! `libpackinfer.so.1`, and a new ABI is a new file name beside it.
//!
//! Programs linked against `target/<profile>/libpackinfer.so` (ctest, the Go package, which put
//! that directory in their RPATH) then need `libpackinfer.so.1` there at run time: a symlink to
//! the library cargo writes. Cargo has no output for that, so it is made beside the library
//! (three levels above OUT_DIR, `target/<profile>/build/libpackinfer-*/out`).

use std::path::{Path, PathBuf};

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let capi = dir.join("../packinfer-capi/src/lib.rs");
    println!("cargo:rerun-if-changed={}", capi.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let source = std::fs::read_to_string(&capi).expect("packinfer-capi/src/lib.rs");
    let abi: u32 = source
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const PACKINFER_ABI_VERSION: u32 = ")?.strip_suffix(';')?.parse().ok())
        .expect("packinfer-capi/src/lib.rs defines `pub const PACKINFER_ABI_VERSION: u32 = N;`");
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
