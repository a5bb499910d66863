//! `libpackinfer.so` / `libpackinfer.a`: the C library engines link. The exported functions are
//! `packinfer-capi`'s; a cdylib or staticlib exports every `#[no_mangle] extern "C"` function of
//! the crates it links, so this crate only names the library and gives it its SONAME (build.rs).

pub use packinfer_capi::*;
