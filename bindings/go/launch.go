package packinfer

/*
#include <stdint.h>
#include "packinfer.h"

// Tensor addresses travel as integers (they are device pointers or C memory, never Go memory).
static enum PackinferStatus pi_launch_create(PackinferContext ctx, PackinferPlan plan, uintptr_t scratch,
                                        size_t scratch_bytes, uintptr_t stream, PackinferLaunch* out) {
	PackinferLaunchOptions o = {sizeof(PackinferLaunchOptions), (void*)scratch, scratch_bytes};
	return packinfer_launch_create(ctx, plan, &o, (void*)stream, out);
}

static enum PackinferStatus pi_launch_create_with_capacity(PackinferContext ctx, PackinferPlan plan, uintptr_t scratch,
                                        size_t scratch_bytes, const PackinferLaunchCapacity* capacity, uintptr_t stream,
                                        PackinferLaunch* out) {
	PackinferLaunchOptions o = {sizeof(PackinferLaunchOptions), (void*)scratch, scratch_bytes};
	return packinfer_launch_create_with_capacity(ctx, plan, &o, capacity, (void*)stream, out);
}

static enum PackinferStatus pi_launch_update(PackinferLaunch launch, PackinferPlan plan, uintptr_t stream) {
	return packinfer_launch_update(launch, plan, (void*)stream);
}

static enum PackinferStatus pi_run(PackinferLaunch launch, uintptr_t q, int64_t q_stride_token, int64_t q_stride_head,
                              uintptr_t k, uintptr_t v, int64_t stride_page, int64_t stride_token,
                              int64_t stride_head, int64_t stride_dim, uintptr_t o, int64_t o_stride_token,
                              int64_t o_stride_head, uintptr_t lse, uintptr_t stream, float logits_soft_cap,
                              uintptr_t k_head_scales, uintptr_t v_head_scales, float k_scale, float v_scale) {
	PackinferRunArgs a = {
		sizeof(PackinferRunArgs), (const void*)q, q_stride_token, q_stride_head,
		{(const void*)k, (const void*)v, stride_page, stride_token, stride_head, stride_dim},
		(void*)o, o_stride_token, o_stride_head, (float*)lse, (void*)stream, logits_soft_cap,
		(const float*)k_head_scales, (const float*)v_head_scales, k_scale, v_scale,
	};
	return packinfer_run(launch, &a);
}
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// LaunchOptions bind a plan to a device; nil or the zero value: the default stream, and scratch
// allocated once by the launch.
type LaunchOptions struct {
	Stream       uintptr // CUstream of the context's device; 0 = the default stream
	Scratch      uintptr // caller-owned scratch of at least PlanStats.ScratchBytes; 0 = allocate
	ScratchBytes uintptr
}

// KVLayout says where K and V live: element (page p, token t, kv head h, dim d) of K is at
// K + (p*StridePage + t*StrideToken + h*StrideHead + d*StrideDim) elements.
type KVLayout struct {
	K, V                                           uintptr
	StridePage, StrideToken, StrideHead, StrideDim int64
}

// KVLayoutNHD is a paged cache stored [num_pages, page_size, num_kv_heads, head_dim] for K and V.
func KVLayoutNHD(k, v uintptr, pageSize, numKVHeads, headDim uint32) KVLayout {
	var l C.PackinferKvLayout
	C.packinfer_kv_layout_nhd(nil, nil, C.uint32_t(pageSize), C.uint32_t(numKVHeads), C.uint32_t(headDim), &l)
	return layoutFromC(k, v, &l)
}

// KVLayoutHND is a paged cache stored [num_pages, num_kv_heads, page_size, head_dim].
func KVLayoutHND(k, v uintptr, pageSize, numKVHeads, headDim uint32) KVLayout {
	var l C.PackinferKvLayout
	C.packinfer_kv_layout_hnd(nil, nil, C.uint32_t(pageSize), C.uint32_t(numKVHeads), C.uint32_t(headDim), &l)
	return layoutFromC(k, v, &l)
}

func layoutFromC(k, v uintptr, l *C.PackinferKvLayout) KVLayout {
	return KVLayout{K: k, V: v, StridePage: int64(l.stride_page), StrideToken: int64(l.stride_token),
		StrideHead: int64(l.stride_head), StrideDim: int64(l.stride_dim)}
}

// RunArgs are one layer's tensors: ragged token-major [total_q, num_qo_heads, head_dim] Q and O
// (strides in elements, 0 = contiguous), the KV cache, and an optional float32 LSE
// [total_q, num_qo_heads] (0 = not written). On CUDA they are device pointers and Stream is
// the layer's CUstream; on the CPU they are host memory Go does not own (HostBuffer).
type RunArgs struct {
	Q                         uintptr
	QStrideToken, QStrideHead int64
	KV                        KVLayout
	O                         uintptr
	OStrideToken, OStrideHead int64
	LSE                       uintptr
	Stream                    uintptr
	// LogitsSoftCap (Gemma 2): scores s become cap*tanh(s/cap); 0 = none. Per run: the plan
	// fixes nothing about it.
	LogitsSoftCap float32
	// An fp8 cache's scales (Batch.KVDType = FP8E4M3), per run: element x of KV head h of K is
	// e4m3(x) * KScale * KHeadScales[h]. KScale, VScale: per tensor, 0 = 1. KHeadScales,
	// VHeadScales: 0, or the address of NumKVHeads float32 (device memory on CUDA, C memory
	// such as a HostBuffer on the CPU), read by each run.
	KScale, VScale           float32
	KHeadScales, VHeadScales uintptr
}

// Launch is a plan bound to a context, ready to run every layer of the step.
type Launch struct {
	h C.PackinferLaunch
}

// NewLaunch binds a plan to this context. opts may be nil.
func (c *Context) NewLaunch(plan *Plan, opts *LaunchOptions) (*Launch, error) {
	if plan == nil {
		return nil, invalidArgument("NewLaunch: plan is nil")
	}
	var o LaunchOptions
	if opts != nil {
		o = *opts
	}
	l := &Launch{}
	err := call(func() C.enum_PackinferStatus {
		return C.pi_launch_create(c.h, plan.h, C.uintptr_t(o.Scratch), C.size_t(o.ScratchBytes), C.uintptr_t(o.Stream), &l.h)
	})
	runtime.KeepAlive(c)
	runtime.KeepAlive(plan)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(l, (*Launch).destroyUnclosed)
	return l, nil
}

// LaunchCapacity sizes a launch's device buffers (NewLaunchWithCapacity), so that Update can
// upload later plans that fit into the same launch, and a CUDA graph captured around Run replays
// them. A zero field means the first plan's own count.
type LaunchCapacity struct {
	MaxWorkItems    uint32
	MaxRowSegments  uint32
	MaxKVChunks     uint32
	MaxRequests     uint32
	MaxPages        uint32 // entries of KVPageIndices
	MaxMergeRows    uint32
	MaxMergeSlots   uint32
	MaxGroups       uint32
	MaxPartialSlots uint32
	// Bytes of custom mask, and query tokens of a step that carries one (0: the first plan's).
	MaxCustomMaskBytes   uint32
	MaxMaskedQueryTokens uint32
}

// NewLaunchWithCapacity is NewLaunch with buffers sized for capacity (device memory on CUDA, host
// memory on the CPU), so that Update can re-target the launch (and a CUDA graph captured around
// its Runs) at later plans. opts may be nil; capacity may not (its zero value means the plan's
// own counts).
func (c *Context) NewLaunchWithCapacity(plan *Plan, capacity *LaunchCapacity, opts *LaunchOptions) (*Launch, error) {
	if plan == nil {
		return nil, invalidArgument("NewLaunchWithCapacity: plan is nil")
	}
	if capacity == nil {
		return nil, invalidArgument("NewLaunchWithCapacity: capacity is nil")
	}
	var o LaunchOptions
	if opts != nil {
		o = *opts
	}
	cc := C.PackinferLaunchCapacity{
		struct_size:             C.size_t(unsafe.Sizeof(C.PackinferLaunchCapacity{})),
		max_work_items:          C.uint32_t(capacity.MaxWorkItems),
		max_row_segments:        C.uint32_t(capacity.MaxRowSegments),
		max_kv_chunks:           C.uint32_t(capacity.MaxKVChunks),
		max_requests:            C.uint32_t(capacity.MaxRequests),
		max_pages:               C.uint32_t(capacity.MaxPages),
		max_merge_rows:          C.uint32_t(capacity.MaxMergeRows),
		max_merge_slots:         C.uint32_t(capacity.MaxMergeSlots),
		max_groups:              C.uint32_t(capacity.MaxGroups),
		max_partial_slots:       C.uint32_t(capacity.MaxPartialSlots),
		max_custom_mask_bytes:   C.uint32_t(capacity.MaxCustomMaskBytes),
		max_masked_query_tokens: C.uint32_t(capacity.MaxMaskedQueryTokens),
	}
	l := &Launch{}
	err := call(func() C.enum_PackinferStatus {
		return C.pi_launch_create_with_capacity(c.h, plan.h, C.uintptr_t(o.Scratch), C.size_t(o.ScratchBytes), &cc,
			C.uintptr_t(o.Stream), &l.h)
	})
	runtime.KeepAlive(c)
	runtime.KeepAlive(plan)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(l, (*Launch).destroyUnclosed)
	return l, nil
}

// Update uploads plan (same shape and page size as the launch's, within its capacity) into the
// launch's buffers on stream (a CUstream; 0 = the default stream; ignored on the CPU) and
// re-records its completion event; later Runs, and CUDA graphs that captured them, compute the
// new plan. Queue it on the stream that runs the launch.
func (l *Launch) Update(plan *Plan, stream uintptr) error {
	if plan == nil {
		return invalidArgument("Update: plan is nil")
	}
	err := call(func() C.enum_PackinferStatus { return C.pi_launch_update(l.h, plan.h, C.uintptr_t(stream)) })
	runtime.KeepAlive(l)
	runtime.KeepAlive(plan)
	return err
}

// Suits says whether Update(plan) would take plan and run it on the kernel a launch created for
// it this way would choose (on CUDA a launch keeps its first plan's kernel): an engine whose
// steps differ in kind keeps a launch per kind and updates one that suits.
func (l *Launch) Suits(plan *Plan) (bool, error) {
	if plan == nil {
		return false, invalidArgument("Suits: plan is nil")
	}
	var s C.bool
	err := call(func() C.enum_PackinferStatus { return C.packinfer_launch_suits(l.h, plan.h, &s) })
	runtime.KeepAlive(l)
	runtime.KeepAlive(plan)
	return bool(s), err
}

// Run computes attention for one layer. On CUDA it enqueues on a.Stream and neither allocates
// nor waits; on the CPU it computes before returning.
func (l *Launch) Run(a *RunArgs) error {
	if a == nil {
		return invalidArgument("Run: args is nil")
	}
	runtime.LockOSThread()
	s := C.pi_run(l.h, C.uintptr_t(a.Q), C.int64_t(a.QStrideToken), C.int64_t(a.QStrideHead),
		C.uintptr_t(a.KV.K), C.uintptr_t(a.KV.V), C.int64_t(a.KV.StridePage), C.int64_t(a.KV.StrideToken),
		C.int64_t(a.KV.StrideHead), C.int64_t(a.KV.StrideDim), C.uintptr_t(a.O), C.int64_t(a.OStrideToken),
		C.int64_t(a.OStrideHead), C.uintptr_t(a.LSE), C.uintptr_t(a.Stream), C.float(a.LogitsSoftCap),
		C.uintptr_t(a.KHeadScales), C.uintptr_t(a.VHeadScales), C.float(a.KScale), C.float(a.VScale))
	err := lastError(s)
	runtime.UnlockOSThread()
	runtime.KeepAlive(l)
	return err
}

// Ready says whether the launch's upload has completed (never blocks).
func (l *Launch) Ready() (bool, error) {
	var done C.bool
	err := call(func() C.enum_PackinferStatus { return C.packinfer_launch_query(l.h, &done) })
	runtime.KeepAlive(l)
	return bool(done), err
}

// Wait blocks until the launch's upload has completed.
func (l *Launch) Wait() error {
	err := call(func() C.enum_PackinferStatus { return C.packinfer_launch_wait(l.h) })
	runtime.KeepAlive(l)
	return err
}

// Close destroys the launch. On CUDA, close it only once the stream has passed the last Run
// that used it. A second Close, or any use after Close, returns an error with
// StatusInvalidHandle.
func (l *Launch) Close() error {
	runtime.SetFinalizer(l, nil)
	return call(func() C.enum_PackinferStatus { return C.packinfer_launch_destroy(l.h) })
}

func (l *Launch) destroyUnclosed() { C.packinfer_launch_destroy(l.h) }
