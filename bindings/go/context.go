package packinfer

/*
#include <stdlib.h>
#include "packinfer.h"
*/
import "C"

import (
	"runtime"
	"strconv"
	"unsafe"
)

// Backend selects where a context computes.
type Backend int

const (
	// BackendAuto is CUDA when a driver, NVRTC and a device are present, else the CPU.
	BackendAuto Backend = C.PACKINFER_BACKEND_AUTO
	BackendCPU  Backend = C.PACKINFER_BACKEND_CPU
	BackendCUDA Backend = C.PACKINFER_BACKEND_CUDA
)

func (b Backend) String() string {
	switch b {
	case BackendAuto:
		return "auto"
	case BackendCPU:
		return "cpu"
	case BackendCUDA:
		return "cuda"
	}
	return "Backend(" + strconv.Itoa(int(b)) + ")"
}

// ContextOptions choose a context's backend; the zero value is the library's default (AUTO,
// device 0, one CPU thread per core).
type ContextOptions struct {
	Backend        Backend
	DeviceOrdinal  uint32
	NumThreads     uint32 // CPU backend worker threads; 0 = one per core
	KernelCacheDir string // "" = $PACKINFER_CACHE_DIR, else ~/.cache/packinfer
}

// ContextInfo says what a context turned out to be.
type ContextInfo struct {
	Backend    Backend // CPU or CUDA, never AUTO
	NumWorkers uint32  // CPU threads, or the device's SM count
	DeviceName string
}

// Context is a backend on one device. Plans and launches made from it stay usable after Close.
type Context struct {
	h C.PackinferContext
}

// NewContext creates a context. On a machine where CUDA cannot work, BackendCUDA gives an error
// with StatusNoDevice and the reason.
func NewContext(opts ContextOptions) (*Context, error) {
	var o C.PackinferContextOptions
	if err := call(func() C.enum_PackinferStatus { return C.packinfer_context_options_default(&o) }); err != nil {
		return nil, err
	}
	o.backend = C.uint32_t(opts.Backend)
	o.device_ordinal = C.uint32_t(opts.DeviceOrdinal)
	o.num_threads = C.uint32_t(opts.NumThreads)
	if opts.KernelCacheDir != "" {
		dir := C.CString(opts.KernelCacheDir)
		defer C.free(unsafe.Pointer(dir))
		o.kernel_cache_dir = dir
	}
	c := &Context{}
	if err := call(func() C.enum_PackinferStatus { return C.packinfer_context_create(&o, &c.h) }); err != nil {
		return nil, err
	}
	runtime.SetFinalizer(c, (*Context).destroyUnclosed)
	return c, nil
}

// Info reports the backend and device.
func (c *Context) Info() (ContextInfo, error) {
	var i C.PackinferContextInfo
	i.struct_size = C.size_t(unsafe.Sizeof(i))
	err := call(func() C.enum_PackinferStatus { return C.packinfer_context_info(c.h, &i) })
	runtime.KeepAlive(c)
	if err != nil {
		return ContextInfo{}, err
	}
	return ContextInfo{Backend: Backend(i.backend), NumWorkers: uint32(i.num_workers), DeviceName: C.GoString(&i.device_name[0])}, nil
}

// Precompile compiles (or loads from the kernel cache) every kernel variant the context can
// need, so that no launch pays compile time later. A no-op on the CPU backend.
func (c *Context) Precompile() error {
	err := call(func() C.enum_PackinferStatus { return C.packinfer_context_precompile(c.h) })
	runtime.KeepAlive(c)
	return err
}

// Calibrate times a few work shapes on the context's GPU and fits the planner's cost model;
// plans made afterwards (and by later contexts sharing the kernel cache directory) use it. It
// takes about a second: run it once per device and install, not per request. StatusUnsupported
// on the CPU backend.
func (c *Context) Calibrate() error {
	err := call(func() C.enum_PackinferStatus { return C.packinfer_context_calibrate(c.h) })
	runtime.KeepAlive(c)
	return err
}

// Close destroys the context. A second Close, or any use after Close, returns an error with
// StatusInvalidHandle.
func (c *Context) Close() error {
	runtime.SetFinalizer(c, nil)
	return call(func() C.enum_PackinferStatus { return C.packinfer_context_destroy(c.h) })
}

func (c *Context) destroyUnclosed() { C.packinfer_context_destroy(c.h) }
