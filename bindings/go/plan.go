package packinfer

/*
#include <stdlib.h>
#include <string.h>
#include "packinfer.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// DType is the element type of Q, K, V and O (accumulation is always fp32).
type DType int

const (
	F16  DType = C.PACKINFER_DTYPE_F16
	BF16 DType = C.PACKINFER_DTYPE_BF16
	F32  DType = C.PACKINFER_DTYPE_F32 // CPU backend only
	// FP8E4M3 is fp8 e4m3 for K and V only (Batch.KVDType, PoolOptions.KVDType), read with each
	// run's scales (RunArgs.KScale etc.). The CPU backend runs it; CUDA refuses it for now.
	FP8E4M3 DType = C.PACKINFER_DTYPE_FP8_E4M3
)

// PlanFlags are bits of PlanOptions.Flags.
type PlanFlags uint32

const (
	// Deterministic: fixed split boundaries, so a request's output does not depend on the batch.
	Deterministic   PlanFlags = C.PACKINFER_PLAN_FLAGS_DETERMINISTIC
	NoPacking       PlanFlags = C.PACKINFER_PLAN_FLAGS_NO_PACKING        // ablation: one request per tile
	NoBalancing     PlanFlags = C.PACKINFER_PLAN_FLAGS_NO_BALANCING      // ablation: one group per request
	NoPrefixSharing PlanFlags = C.PACKINFER_PLAN_FLAGS_NO_PREFIX_SHARING // ablation: read prefixes per member
	NoSplitKV       PlanFlags = C.PACKINFER_PLAN_FLAGS_NO_SPLIT_KV       // ablation: never split a request's keys
	// SlidingWindow: each query sees only the PlanOptions.WindowLeft keys before its position
	// (and, causal, its own). Fixed at plan time.
	SlidingWindow PlanFlags = C.PACKINFER_PLAN_FLAGS_SLIDING_WINDOW
)

// PlanOptions tune the planner; nil or the zero value is the default (every technique on,
// automatic capacity).
type PlanOptions struct {
	Flags     PlanFlags
	SplitKeys uint32  // deterministic split granularity in keys; 0 = 2048
	Capacity  float64 // capacity in cost units (longer pieces are split); 0 = automatic
	// WindowLeft is the sliding window (FlashInfer's window_left), read with the SlidingWindow
	// flag: a query at position p = kv_len - q_len + i sees keys from p - WindowLeft on.
	WindowLeft uint32
}

// PrefixGroup says that requests Members share their first PrefixLen keys (same content).
type PrefixGroup struct {
	PrefixLen uint32
	Members   []int32
}

// Batch describes one engine step: the attention shape and CSR page tables (FlashInfer's
// convention). The batch size is len(KVLastPageLen). Everything is copied by NewPlan.
type Batch struct {
	NumQOHeads, NumKVHeads, HeadDim uint32
	DType                           DType
	Causal                          bool    // bottom-right aligned
	SMScale                         float32 // 0 = 1/sqrt(HeadDim)

	QOIndptr      []int32 // [batch+1]: request i's queries are tokens QOIndptr[i] .. QOIndptr[i+1]
	KVIndptr      []int32 // [batch+1]: request i's pages are KVPageIndices[KVIndptr[i] .. KVIndptr[i+1]]
	KVPageIndices []int32 // [KVIndptr[batch]]
	KVLastPageLen []int32 // [batch]: tokens in each request's last page
	PageSize      uint32  // tokens per page; 1 is fine
	NumPages      uint32  // pages in the cache; every page index must be below it
	PrefixGroups  []PrefixGroup

	// CustomMask and MaskIndptr are custom masks (tree speculative decoding), FlashInfer's
	// bit-packed layout: request i's QLen x KVLen bits, row-major (query a, key b is bit
	// a*KVLen + b) and little-endian within each byte, are CustomMask[MaskIndptr[i] :
	// MaskIndptr[i+1]]. A set bit shows the key. With a mask Causal is not applied (the mask
	// replaces it, as in FlashInfer); a sliding window and the soft-cap still are. A query that
	// sees no key gets O = 0 and LSE = -inf. MaskIndptr empty = no mask. The CUDA backend
	// refuses a masked batch (StatusUnsupported) until its kernels apply masks.
	CustomMask []byte
	MaskIndptr []int32 // [batch+1] byte offsets into CustomMask, or empty

	// KVDType is K's and V's element type: 0 (the zero value) or DType for Q's dtype; FP8E4M3
	// for an fp8 cache, read with each run's scales. Fixed at plan time.
	KVDType DType
}

// PlanStats is what the planner did.
type PlanStats struct {
	NumRequests      uint32
	NumGroups        uint32
	NumWorkItems     uint32
	NumSplitRequests uint32
	NumMergeRows     uint32
	NumPartialSlots  uint32
	TileUtilization  float64 // real (row, visible key) pairs / pairs computed, in (0, 1]
	MaxGroupCost     float64
	MeanGroupCost    float64
	Capacity         float64
	PlanningTimeUs   float64
	ScratchBytes     uint64 // fp32 scratch the split partials need
}

// Plan is the host-side schedule of one step.
type Plan struct {
	h C.PackinferPlan
}

// checkLengths checks what only the binding can see: that the slices are as long as the batch
// says. The library checks everything else.
func (b *Batch) checkLengths() error {
	n := len(b.KVLastPageLen)
	if len(b.QOIndptr) != n+1 {
		return invalidArgument("Batch.QOIndptr has %d entries; it needs %d = batch size + 1 (the batch size is len(KVLastPageLen))", len(b.QOIndptr), n+1)
	}
	if len(b.KVIndptr) != n+1 {
		return invalidArgument("Batch.KVIndptr has %d entries; it needs %d = batch size + 1 (the batch size is len(KVLastPageLen))", len(b.KVIndptr), n+1)
	}
	if nnz := b.KVIndptr[n]; nnz >= 0 && len(b.KVPageIndices) < int(nnz) {
		return invalidArgument("Batch.KVPageIndices has %d entries but KVIndptr[%d] = %d", len(b.KVPageIndices), n, nnz)
	}
	if len(b.MaskIndptr) > 0 {
		if len(b.MaskIndptr) != n+1 {
			return invalidArgument("Batch.MaskIndptr has %d entries; it needs %d = batch size + 1 (or none, for no custom mask)", len(b.MaskIndptr), n+1)
		}
		if bytes := b.MaskIndptr[n]; bytes >= 0 && len(b.CustomMask) < int(bytes) {
			return invalidArgument("Batch.CustomMask has %d bytes but MaskIndptr[%d] = %d", len(b.CustomMask), n, bytes)
		}
	}
	return nil
}

// cBatch is a batch description and all its arrays in one C allocation, so that C never sees Go
// memory (cgo's rule) and one free releases it.
type cBatch struct {
	mem  unsafe.Pointer
	desc *C.PackinferBatchDesc
}

func newCBatch(b *Batch) (cBatch, error) {
	descSize := unsafe.Sizeof(C.PackinferBatchDesc{})
	groupSize := unsafe.Sizeof(C.PackinferPrefixGroup{})
	ints := len(b.QOIndptr) + len(b.KVIndptr) + len(b.KVPageIndices) + len(b.KVLastPageLen) + len(b.MaskIndptr)
	for _, g := range b.PrefixGroups {
		ints += len(g.Members)
	}
	// The mask's bytes come last, after every int32.
	size := descSize + groupSize*uintptr(len(b.PrefixGroups)) + 4*uintptr(ints) + uintptr(len(b.CustomMask))
	mem := C.calloc(1, C.size_t(size))
	if mem == nil {
		return cBatch{}, &Error{Status: StatusOutOfMemory, Message: fmt.Sprintf("NewPlan: no host memory for the %d-byte batch description", size)}
	}
	next := unsafe.Add(mem, descSize+groupSize*uintptr(len(b.PrefixGroups)))
	// copyInts copies s into the next free int32s and returns their C address (NULL when empty).
	copyInts := func(s []int32) *C.int32_t {
		if len(s) == 0 {
			return nil
		}
		p := (*C.int32_t)(next)
		copy(unsafe.Slice((*int32)(next), len(s)), s)
		next = unsafe.Add(next, 4*len(s))
		return p
	}
	d := (*C.PackinferBatchDesc)(mem)
	d.struct_size = C.size_t(descSize)
	d.batch_size = C.uint32_t(len(b.KVLastPageLen))
	d.qo_indptr = copyInts(b.QOIndptr)
	d.kv_indptr = copyInts(b.KVIndptr)
	d.kv_page_indices = copyInts(b.KVPageIndices)
	d.kv_last_page_len = copyInts(b.KVLastPageLen)
	d.page_size = C.uint32_t(b.PageSize)
	d.num_pages = C.uint32_t(b.NumPages)
	d.num_qo_heads = C.uint32_t(b.NumQOHeads)
	d.num_kv_heads = C.uint32_t(b.NumKVHeads)
	d.head_dim = C.uint32_t(b.HeadDim)
	d.dtype = C.uint32_t(b.DType)
	d.kv_dtype = C.uint32_t(b.KVDType)
	d.causal = C.bool(b.Causal)
	d.sm_scale = C.float(b.SMScale)
	if len(b.PrefixGroups) > 0 {
		groups := unsafe.Slice((*C.PackinferPrefixGroup)(unsafe.Add(mem, descSize)), len(b.PrefixGroups))
		for i, g := range b.PrefixGroups {
			groups[i].prefix_len = C.uint32_t(g.PrefixLen)
			groups[i].num_members = C.uint32_t(len(g.Members))
			groups[i].members = copyInts(g.Members)
		}
		d.num_prefix_groups = C.uint32_t(len(groups))
		d.prefix_groups = &groups[0]
	}
	if len(b.MaskIndptr) > 0 {
		d.mask_indptr = copyInts(b.MaskIndptr)
		if len(b.CustomMask) > 0 {
			d.custom_mask = (*C.uint8_t)(next)
			copy(unsafe.Slice((*byte)(next), len(b.CustomMask)), b.CustomMask)
		}
	}
	return cBatch{mem: mem, desc: d}, nil
}

func (b cBatch) free() { C.free(b.mem) }

// planOptionsToC is opts over the library's defaults (nil = the defaults).
func planOptionsToC(opts *PlanOptions) (C.PackinferPlanOptions, error) {
	var o C.PackinferPlanOptions
	if err := call(func() C.enum_PackinferStatus { return C.packinfer_plan_options_default(&o) }); err != nil {
		return o, err
	}
	if opts != nil {
		o.flags = C.uint32_t(opts.Flags)
		o.split_keys = C.uint32_t(opts.SplitKeys)
		o.capacity = C.double(opts.Capacity)
		o.window_left = C.uint32_t(opts.WindowLeft)
	}
	return o, nil
}

// NewPlan plans one step for this context's device. opts may be nil for the defaults.
func (c *Context) NewPlan(batch *Batch, opts *PlanOptions) (*Plan, error) {
	if batch == nil {
		return nil, invalidArgument("NewPlan: batch is nil")
	}
	if err := batch.checkLengths(); err != nil {
		return nil, err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return nil, err
	}
	cb, err := newCBatch(batch)
	if err != nil {
		return nil, err
	}
	defer cb.free()
	p := &Plan{}
	err = call(func() C.enum_PackinferStatus { return C.packinfer_plan_create(c.h, cb.desc, &o, &p.h) })
	runtime.KeepAlive(c)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(p, (*Plan).destroyUnclosed)
	return p, nil
}

// Replan plans another step into p, as NewPlan would, reusing the plan's memory in the library
// (packinfer_plan_update): once p has held a step as large, planning allocates nothing there.
// Launches made or updated from p keep their step until Launch.Update. A goroutine may replan
// the next step while another runs the current one (see docs/design.md, "Threads"). After an
// error p holds no work or its previous step: replan it before launching from it.
func (c *Context) Replan(p *Plan, batch *Batch, opts *PlanOptions) error {
	if p == nil || batch == nil {
		return invalidArgument("Replan: plan or batch is nil")
	}
	if err := batch.checkLengths(); err != nil {
		return err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return err
	}
	cb, err := newCBatch(batch)
	if err != nil {
		return err
	}
	defer cb.free()
	err = call(func() C.enum_PackinferStatus { return C.packinfer_plan_update(c.h, p.h, cb.desc, &o) })
	runtime.KeepAlive(c)
	runtime.KeepAlive(p)
	return err
}

// Stats reports what the planner did.
func (p *Plan) Stats() (PlanStats, error) {
	var s C.PackinferPlanStats
	s.struct_size = C.size_t(unsafe.Sizeof(s))
	err := call(func() C.enum_PackinferStatus { return C.packinfer_plan_stats(p.h, &s) })
	runtime.KeepAlive(p)
	if err != nil {
		return PlanStats{}, err
	}
	return PlanStats{
		NumRequests:      uint32(s.num_requests),
		NumGroups:        uint32(s.num_groups),
		NumWorkItems:     uint32(s.num_work_items),
		NumSplitRequests: uint32(s.num_split_requests),
		NumMergeRows:     uint32(s.num_merge_rows),
		NumPartialSlots:  uint32(s.num_partial_slots),
		TileUtilization:  float64(s.tile_utilization),
		MaxGroupCost:     float64(s.max_group_cost),
		MeanGroupCost:    float64(s.mean_group_cost),
		Capacity:         float64(s.capacity),
		PlanningTimeUs:   float64(s.planning_time_us),
		ScratchBytes:     uint64(s.scratch_bytes),
	}, nil
}

// Close destroys the plan; launches made from it stay usable. A second Close, or any use after
// Close, returns an error with StatusInvalidHandle.
func (p *Plan) Close() error {
	runtime.SetFinalizer(p, nil)
	return call(func() C.enum_PackinferStatus { return C.packinfer_plan_destroy(p.h) })
}

func (p *Plan) destroyUnclosed() { C.packinfer_plan_destroy(p.h) }
