package packinfer

/*
#include <stdlib.h>
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// HostBuffer is host memory outside Go's heap, for the CPU backend's tensors (C may not keep or
// be handed addresses of Go memory as plain integers). Free it when done; a cleanup frees a
// forgotten one as a safety net.
type HostBuffer struct {
	ptr unsafe.Pointer
	n   int
}

// NewHostBuffer allocates n zeroed bytes.
func NewHostBuffer(n int) (*HostBuffer, error) {
	if n <= 0 {
		return nil, invalidArgument("NewHostBuffer: n = %d bytes; it must be positive", n)
	}
	p := C.calloc(C.size_t(n), 1)
	if p == nil {
		return nil, &Error{Status: StatusOutOfMemory, Message: fmt.Sprintf("NewHostBuffer: calloc of %d bytes failed", n)}
	}
	b := &HostBuffer{ptr: p, n: n}
	runtime.SetFinalizer(b, (*HostBuffer).Free)
	return b, nil
}

// Ptr is the buffer's address for RunArgs and KVLayout (0 after Free).
func (b *HostBuffer) Ptr() uintptr { return uintptr(b.ptr) }

// Len is the buffer's size in bytes.
func (b *HostBuffer) Len() int { return b.n }

// Bytes views the buffer as bytes (valid until Free).
func (b *HostBuffer) Bytes() []byte { return unsafe.Slice((*byte)(b.ptr), b.n) }

// Float32s views the buffer as float32s (valid until Free).
func (b *HostBuffer) Float32s() []float32 { return unsafe.Slice((*float32)(b.ptr), b.n/4) }

// Uint16s views the buffer as 16-bit words, the bits of f16 or bf16 elements (valid until Free).
func (b *HostBuffer) Uint16s() []uint16 { return unsafe.Slice((*uint16)(b.ptr), b.n/2) }

// Free releases the memory; later calls do nothing.
func (b *HostBuffer) Free() {
	runtime.SetFinalizer(b, nil)
	if b.ptr != nil {
		C.free(b.ptr)
		b.ptr, b.n = nil, 0
	}
}
