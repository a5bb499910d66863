//! The CUDA backend. The CUDA libraries are loaded at run time (cudarc's dynamic loading), so
//! the library builds and loads on machines without them; `open` says `NoDevice` there.

use crate::error::{Error, Result};

/// Checks that the driver and NVRTC can be loaded before any cudarc call that would panic
/// without them, then opens `ordinal`.
pub fn probe(ordinal: u32) -> Result<()> {
    // SAFETY: only tries to dlopen the libraries; no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDevice("the CUDA driver library (libcuda.so.1) could not be loaded on this machine".into()));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NoDevice("the NVRTC library (libnvrtc.so) could not be loaded on this machine".into()));
    }
    cudarc::driver::result::init().map_err(|e| Error::NoDevice(format!("cuInit failed: {e:?}")))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| Error::NoDevice(format!("cuDeviceGetCount failed: {e:?}")))?;
    if ordinal as i32 >= count {
        return Err(Error::NoDevice(format!("device_ordinal = {ordinal} but this machine has {count} CUDA device(s)")));
    }
    Ok(())
}

/// Opens the CUDA backend on `choice.device_ordinal`.
pub fn open(choice: &super::BackendChoice) -> Result<std::sync::Arc<dyn super::Backend>> {
    probe(choice.device_ordinal)?;
    Err(Error::Unsupported("the CUDA kernels are not part of this build yet; use the CPU backend".into()))
}
