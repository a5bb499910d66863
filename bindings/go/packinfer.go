// Package packinfer is the Go binding of PackInfer, packed and load-balanced attention for
// batches of LLM requests of very different lengths, over its C API (include/packinfer.h).
//
// A step of an engine:
//
//	ctx, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCPU})
//	defer ctx.Close()
//	plan, err := ctx.NewPlan(&batch, nil)          // once per step: the schedule
//	defer plan.Close()
//	launch, err := ctx.NewLaunch(plan, nil)        // once per step: bound to the device
//	defer launch.Close()
//	err = launch.Run(&packinfer.RunArgs{...})      // once per layer
//
// At the managed level the library owns the KV cache: ctx.NewPool allocates a Pool, the engine
// keeps sequence ids (CreateSequence, Fork, Append, Release), writes each layer's new K/V with
// WriteKV, plans a step with pool.NewPlan and runs each layer with pool.KVLayout(layer).
//
// Every handle must be closed explicitly: the memory behind it (GPU memory on CUDA) is invisible
// to Go's garbage collector. A cleanup destroys a handle that was never closed, but only as a
// safety net. Using a handle after Close returns an error with StatusInvalidHandle.
//
// Metadata goes in as flat Go slices and is copied during the call; the library keeps no pointer
// into Go memory. Tensors are addresses (uintptr): device pointers on the CUDA backend, host
// memory that Go's garbage collector does not own (see HostBuffer) on the CPU backend.
//
// Every method is safe to call from any goroutine. A failed call returns an *Error with the
// status and the library's message, which names the bad argument and value.
package packinfer

/*
#include <stdint.h>
#include <stdlib.h>
#include "packinfer.h"

*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
)

// Status is the result code of a library call (PackinferStatus).
type Status int

const (
	StatusOK              Status = C.PACKINFER_STATUS_OK
	StatusInvalidArgument Status = C.PACKINFER_STATUS_INVALID_ARGUMENT
	StatusInvalidHandle   Status = C.PACKINFER_STATUS_INVALID_HANDLE
	StatusUnsupported     Status = C.PACKINFER_STATUS_UNSUPPORTED
	StatusOutOfMemory     Status = C.PACKINFER_STATUS_OUT_OF_MEMORY
	StatusPoolExhausted   Status = C.PACKINFER_STATUS_POOL_EXHAUSTED
	StatusNoDevice        Status = C.PACKINFER_STATUS_NO_DEVICE
	StatusDeviceError     Status = C.PACKINFER_STATUS_DEVICE_ERROR
	StatusCompileError    Status = C.PACKINFER_STATUS_COMPILE_ERROR
	StatusInternal        Status = C.PACKINFER_STATUS_INTERNAL
)

// String is the library's name for the status, e.g. "PACKINFER_STATUS_NO_DEVICE".
func (s Status) String() string {
	if s < StatusOK || s > StatusInternal {
		return fmt.Sprintf("PACKINFER_STATUS(%d)", int(s))
	}
	return C.GoString(C.packinfer_status_string(C.uint32_t(s)))
}

// Error is a failed call: its status and the library's message ("packinfer_plan_create:
// kv_last_page_len[1] = 99 is not valid ...").
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string { return e.Status.String() + ": " + e.Message }

// StatusOf returns the status of an error from this package (wrapped or not), StatusOK for nil,
// and StatusInternal for any other error.
func StatusOf(err error) Status {
	if err == nil {
		return StatusOK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return StatusInternal
}

// lastError turns a status into an error. It must run on the OS thread that made the failed
// call (the message is thread-local there): callers hold runtime.LockOSThread around both.
func lastError(s C.enum_PackinferStatus) error {
	if s == C.PACKINFER_STATUS_OK {
		return nil
	}
	return &Error{Status: Status(s), Message: C.GoString(C.packinfer_last_error())}
}

// call runs one C call and reads its error message on the same OS thread.
func call(f func() C.enum_PackinferStatus) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return lastError(f())
}

func invalidArgument(format string, args ...any) error {
	return &Error{Status: StatusInvalidArgument, Message: fmt.Sprintf(format, args...)}
}

// Version is the library's version, e.g. "0.1.0".
func Version() string { return C.GoString(C.packinfer_version()) }

// ABIVersion is the C ABI version of the library linked at run time.
func ABIVersion() uint32 { return uint32(C.packinfer_abi_version()) }

// HeaderABIVersion is the C ABI version this package was compiled against; it equals
// ABIVersion() when the right library is loaded.
const HeaderABIVersion = C.PACKINFER_ABI_VERSION
