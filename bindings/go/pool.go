package packinfer

/*
#include <stdint.h>
#include <stdlib.h>
#include "packinfer.h"

// Streams and tensor addresses travel as integers (device pointers or C memory, never Go memory).
static enum PackinferStatus pi_pool_append(PackinferPool pool, uint64_t seq, uint32_t n, int64_t* slots, uintptr_t stream) {
	return packinfer_pool_append(pool, seq, n, slots, (void*)stream);
}

static enum PackinferStatus pi_pool_fork(PackinferPool pool, uint64_t parent, uint32_t prefix_len, uintptr_t stream, uint64_t* child) {
	return packinfer_pool_fork(pool, parent, prefix_len, (void*)stream, child);
}

static enum PackinferStatus pi_pool_write_kv(PackinferPool pool, uint32_t layer, const uint64_t* seq_ids,
                                             const uint32_t* num_tokens, uint32_t n, uintptr_t k, uintptr_t v,
                                             uint32_t num_rows, uint32_t num_kv_heads, uint32_t head_dim,
                                             uint32_t dtype, int64_t stride_token, uintptr_t stream) {
	PackinferKvSource src = {sizeof(PackinferKvSource), (const void*)k, (const void*)v, num_rows, num_kv_heads,
	                         head_dim, dtype, stride_token};
	return packinfer_pool_write_kv(pool, layer, seq_ids, num_tokens, n, &src, (void*)stream);
}

static enum PackinferStatus pi_pool_relayout(PackinferPool pool, PackinferPlan plan, const uint64_t* seq_ids, uint32_t n,
                                             bool regroup, uintptr_t stream, PackinferRelayoutReport* report) {
	return packinfer_pool_relayout(pool, plan, seq_ids, n, regroup, (void*)stream, report);
}
*/
import "C"

import (
	"fmt"
	"math"
	"runtime"
	"unsafe"
)

// PoolOptions describe a KV pool: the model's attention shape (plans made from the pool use
// it), the page size and the capacity. Start from DefaultPoolOptions: the zero value is not the
// library's default (HeadroomPages 0 means no headroom).
type PoolOptions struct {
	NumLayers                       uint32
	NumQOHeads, NumKVHeads, HeadDim uint32
	DType                           DType
	Causal                          bool    // bottom-right aligned
	SMScale                         float32 // 0 = 1/sqrt(HeadDim)
	PageSize                        uint32  // tokens per page
	NumPages                        uint32  // capacity in pages; 0 = as many as fit in CapacityBytes
	CapacityBytes                   uint64  // used when NumPages is 0
	HeadroomPages                   uint32  // δ: empty pages kept after each member of a laid-out group
	// KVDType is the element type the pool stores K and V in: 0 or DType for Q's dtype;
	// FP8E4M3 for fp8 (one byte per element): WriteKV takes rows of DType and stores x / scale
	// as e4m3 (nearest even, saturated to ±448), on the CPU and CUDA backends alike.
	KVDType DType
	// KVHeadScales are an fp8 pool's scales, [layer][K, V][kv head] (NumLayers*2*NumKVHeads),
	// copied at creation; empty = all 1.
	KVHeadScales []float32
}

// DefaultPoolOptions are the library's defaults (page size 16, 2 headroom pages, BF16, causal);
// set the model's shape and the capacity.
func DefaultPoolOptions() PoolOptions {
	var o C.PackinferPoolOptions
	C.packinfer_pool_options_default(&o)
	return PoolOptions{DType: DType(o.dtype), Causal: bool(o.causal), SMScale: float32(o.sm_scale),
		PageSize: uint32(o.page_size), HeadroomPages: uint32(o.headroom_pages)}
}

// KVSource is one layer's new K and V as the engine holds them: [NumRows, NumKVHeads, HeadDim]
// each, token-major. The shape and dtype are stated so that a mismatch with the pool is an
// error, not a silent misread. Device pointers on CUDA, HostBuffer memory on the CPU backend.
type KVSource struct {
	K, V        uintptr
	NumRows     uint32 // must equal the sum of the token counts passed with it
	NumKVHeads  uint32
	HeadDim     uint32
	DType       DType
	StrideToken int64 // elements between consecutive rows; 0 = contiguous
}

// PoolStats are a pool's metrics.
type PoolStats struct {
	NumPages     uint32
	PagesUsed    uint32
	PagesFree    uint32
	NumSequences uint32
	// Sum of the sequences' lengths (a shared token counts once per sequence).
	TokensLogical uint64
	// Distinct tokens stored (a shared page's tokens count once).
	TokensStored uint64
	// Slots of used pages holding no token (partial pages, headroom): internal fragmentation.
	SlotsReservedUnused uint64
	// KV bytes (all layers, K and V) the last plan made from the pool reads with each shared
	// prefix read once per prefix group, and with every request reading all of its keys.
	StepReadBytesShared   uint64
	StepReadBytesUnshared uint64
	// Relayouts that moved pages, and the pages and bytes they moved in total.
	Relayouts          uint64
	RelayoutPagesMoved uint64
	RelayoutBytesMoved uint64
	// Pages copied on write (a fork's partly covered page, an append into a shared page).
	CowPageCopies uint64
}

// RelayoutReport is what one Relayout did.
type RelayoutReport struct {
	Groups        uint32
	GroupsInPlace uint32 // already contiguous, or not due for a rebuild
	GroupsRebuilt uint32
	GroupsNoRoom  uint32 // due, but no free run of pages was long enough; left as they were
	PagesMoved    uint64
	BytesMoved    uint64
}

// Pool is KV memory owned by the library, cut into pages that sequences share copy-on-write.
// Sequences are uint64 ids (never 0, never reused). Launches that read its KV must be finished
// before Close.
type Pool struct {
	h              C.PackinferPool
	capacityTokens uint64 // num_pages * page_size
}

// NewPool allocates a pool on this context's backend (StatusUnsupported where the backend has no
// pool yet).
func (c *Context) NewPool(opts *PoolOptions) (*Pool, error) {
	if opts == nil {
		return nil, invalidArgument("NewPool: opts is nil")
	}
	var o C.PackinferPoolOptions
	if err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_options_default(&o) }); err != nil {
		return nil, err
	}
	o.num_layers = C.uint32_t(opts.NumLayers)
	o.num_qo_heads = C.uint32_t(opts.NumQOHeads)
	o.num_kv_heads = C.uint32_t(opts.NumKVHeads)
	o.head_dim = C.uint32_t(opts.HeadDim)
	o.dtype = C.uint32_t(opts.DType)
	o.causal = C.bool(opts.Causal)
	o.sm_scale = C.float(opts.SMScale)
	o.page_size = C.uint32_t(opts.PageSize)
	o.num_pages = C.uint32_t(opts.NumPages)
	o.capacity_bytes = C.uint64_t(opts.CapacityBytes)
	o.headroom_pages = C.uint32_t(opts.HeadroomPages)
	o.kv_dtype = C.uint32_t(opts.KVDType)
	if n := len(opts.KVHeadScales); n > 0 {
		if want := int(opts.NumLayers) * 2 * int(opts.NumKVHeads); n != want {
			return nil, invalidArgument("NewPool: KVHeadScales has %d entries; NumLayers*2*NumKVHeads = %d", n, want)
		}
		// Copied into C memory: the options struct may not point into Go memory (cgo's rule).
		scales := C.malloc(C.size_t(4 * n))
		if scales == nil {
			return nil, &Error{Status: StatusOutOfMemory, Message: "NewPool: no host memory for KVHeadScales"}
		}
		defer C.free(scales)
		copy(unsafe.Slice((*float32)(scales), n), opts.KVHeadScales)
		o.kv_head_scales = (*C.float)(scales)
	}
	p := &Pool{}
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_create(c.h, &o, &p.h) })
	runtime.KeepAlive(c)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(p, (*Pool).destroyUnclosed)
	st, err := p.Stats()
	if err != nil {
		p.Close()
		return nil, err
	}
	p.capacityTokens = uint64(st.NumPages) * uint64(opts.PageSize)
	return p, nil
}

// KVLayout is layer `layer`'s K/V for RunArgs.KV (NHD pages, K and V separate).
func (p *Pool) KVLayout(layer uint32) (KVLayout, error) {
	var l C.PackinferKvLayout
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_kv_layout(p.h, C.uint32_t(layer), &l) })
	runtime.KeepAlive(p)
	if err != nil {
		return KVLayout{}, err
	}
	return layoutFromC(uintptr(l.k), uintptr(l.v), &l), nil
}

// KVHeadScales are the addresses of layer `layer`'s per-head K and V scales in an fp8 pool, for
// RunArgs.KHeadScales and VHeadScales (0, 0 for a pool of Q's dtype); valid while the pool is
// open. An fp8 pool read without them is read with scale 1.
func (p *Pool) KVHeadScales(layer uint32) (k, v uintptr, err error) {
	var kp, vp *C.float
	err = call(func() C.enum_PackinferStatus { return C.packinfer_pool_kv_scales(p.h, C.uint32_t(layer), &kp, &vp) })
	runtime.KeepAlive(p)
	return uintptr(unsafe.Pointer(kp)), uintptr(unsafe.Pointer(vp)), err
}

// CreateSequence creates an empty sequence.
func (p *Pool) CreateSequence() (uint64, error) {
	var id C.uint64_t
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_sequence_create(p.h, &id) })
	runtime.KeepAlive(p)
	return uint64(id), err
}

// SequenceLength is the number of tokens stored for seq.
func (p *Pool) SequenceLength(seq uint64) (uint32, error) {
	var n C.uint32_t
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_sequence_length(p.h, C.uint64_t(seq), &n) })
	runtime.KeepAlive(p)
	return uint32(n), err
}

// Append reserves n more tokens at the end of seq and returns their slots (page*page_size +
// token in page; valid until a relayout moves pages). When the pages do not fit it returns
// StatusPoolExhausted and the pool is unchanged. A copy-on-write copy runs on stream.
func (p *Pool) Append(seq uint64, n uint32, stream uintptr) ([]int64, error) {
	if uint64(n) > p.capacityTokens {
		// More tokens than the whole pool holds never fit: the library refuses them (with its
		// message) without the binding allocating n slots first.
		err := call(func() C.enum_PackinferStatus {
			return C.pi_pool_append(p.h, C.uint64_t(seq), C.uint32_t(n), nil, C.uintptr_t(stream))
		})
		runtime.KeepAlive(p)
		if err == nil {
			err = &Error{Status: StatusInternal, Message: fmt.Sprintf("Append: the library accepted n = %d tokens, more than the pool's %d", n, p.capacityTokens)}
		}
		return nil, err
	}
	slots := make([]int64, n)
	var out *C.int64_t
	if n > 0 {
		out = (*C.int64_t)(unsafe.Pointer(&slots[0]))
	}
	err := call(func() C.enum_PackinferStatus {
		return C.pi_pool_append(p.h, C.uint64_t(seq), C.uint32_t(n), out, C.uintptr_t(stream))
	})
	runtime.KeepAlive(p)
	if err != nil {
		return nil, err
	}
	return slots, nil
}

// Fork creates a sequence sharing the first prefixLen tokens of parent (full pages shared, a
// partly covered page copied on stream) and returns its id.
func (p *Pool) Fork(parent uint64, prefixLen uint32, stream uintptr) (uint64, error) {
	var child C.uint64_t
	err := call(func() C.enum_PackinferStatus {
		return C.pi_pool_fork(p.h, C.uint64_t(parent), C.uint32_t(prefixLen), C.uintptr_t(stream), &child)
	})
	runtime.KeepAlive(p)
	return uint64(child), err
}

// Truncate shortens seq to length tokens, returning pages nobody else uses.
func (p *Pool) Truncate(seq uint64, length uint32) error {
	err := call(func() C.enum_PackinferStatus {
		return C.packinfer_pool_truncate(p.h, C.uint64_t(seq), C.uint32_t(length))
	})
	runtime.KeepAlive(p)
	return err
}

// Release ends seq: the id becomes invalid, its pages return when their last user goes.
func (p *Pool) Release(seq uint64) error {
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_release(p.h, C.uint64_t(seq)) })
	runtime.KeepAlive(p)
	return err
}

// WriteKV stores layer `layer`'s K/V of the step's new tokens: the rows of src go, in order, to
// the last numTokens[i] tokens of seqIDs[i] (reserved by Append). Runs on stream.
func (p *Pool) WriteKV(layer uint32, seqIDs []uint64, numTokens []uint32, src *KVSource, stream uintptr) error {
	if src == nil {
		return invalidArgument("WriteKV: src is nil")
	}
	n, err := pairedLength("WriteKV", seqIDs, "numTokens", len(numTokens))
	if err != nil {
		return err
	}
	err = call(func() C.enum_PackinferStatus {
		return C.pi_pool_write_kv(p.h, C.uint32_t(layer), u64Ptr(seqIDs), u32Ptr(numTokens), n, C.uintptr_t(src.K),
			C.uintptr_t(src.V), C.uint32_t(src.NumRows), C.uint32_t(src.NumKVHeads), C.uint32_t(src.HeadDim),
			C.uint32_t(src.DType), C.int64_t(src.StrideToken), C.uintptr_t(stream))
	})
	runtime.KeepAlive(p)
	return err
}

// RegisterPageHashes registers the engine's chained content hashes of the first len(hashes) full
// pages of seq, so that later sequences with the same prefix can share them.
func (p *Pool) RegisterPageHashes(seq uint64, hashes []uint64) error {
	n, err := count("RegisterPageHashes", "hashes", len(hashes))
	if err != nil {
		return err
	}
	err = call(func() C.enum_PackinferStatus {
		return C.packinfer_pool_register_page_hashes(p.h, C.uint64_t(seq), u64Ptr(hashes), n)
	})
	runtime.KeepAlive(p)
	return err
}

// MatchPrefix, for an empty seq, shares the registered pages matching the leading hashes (one
// per full page of the engine's prompt) and returns how many tokens they hold.
func (p *Pool) MatchPrefix(seq uint64, hashes []uint64) (uint32, error) {
	n, err := count("MatchPrefix", "hashes", len(hashes))
	if err != nil {
		return 0, err
	}
	var matched C.uint32_t
	err = call(func() C.enum_PackinferStatus {
		return C.packinfer_pool_match_prefix(p.h, C.uint64_t(seq), u64Ptr(hashes), n, &matched)
	})
	runtime.KeepAlive(p)
	return uint32(matched), err
}

// NewPlan plans a step from the pool on ctx's device: request i is seqIDs[i] with its last
// numNewTokens[i] tokens (already appended) as queries. The plan is a snapshot: make it after the
// step's appends and after any relayout. opts may be nil for the defaults.
func (p *Pool) NewPlan(ctx *Context, seqIDs []uint64, numNewTokens []uint32, opts *PlanOptions) (*Plan, error) {
	if ctx == nil {
		return nil, invalidArgument("Pool.NewPlan: ctx is nil")
	}
	n, err := pairedLength("Pool.NewPlan", seqIDs, "numNewTokens", len(numNewTokens))
	if err != nil {
		return nil, err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return nil, err
	}
	plan := &Plan{}
	err = call(func() C.enum_PackinferStatus {
		return C.packinfer_pool_plan_create(ctx.h, p.h, u64Ptr(seqIDs), u32Ptr(numNewTokens), n, &o, &plan.h)
	})
	runtime.KeepAlive(ctx)
	runtime.KeepAlive(p)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(plan, (*Plan).destroyUnclosed)
	return plan, nil
}

// Replan plans a step from the pool into plan, as NewPlan would, reusing the plan's memory in
// the library (packinfer_pool_plan_update): once plan has held a step as large, planning
// allocates nothing there. Context.Replan's rules on launches, goroutines and errors apply.
func (p *Pool) Replan(ctx *Context, plan *Plan, seqIDs []uint64, numNewTokens []uint32, opts *PlanOptions) error {
	if ctx == nil || plan == nil {
		return invalidArgument("Pool.Replan: ctx or plan is nil")
	}
	n, err := pairedLength("Pool.Replan", seqIDs, "numNewTokens", len(numNewTokens))
	if err != nil {
		return err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return err
	}
	err = call(func() C.enum_PackinferStatus {
		return C.packinfer_pool_plan_update(ctx.h, p.h, plan.h, u64Ptr(seqIDs), u32Ptr(numNewTokens), n, &o)
	})
	runtime.KeepAlive(ctx)
	runtime.KeepAlive(p)
	runtime.KeepAlive(plan)
	return err
}

// Relayout keeps each execution group of plan (made from seqIDs) contiguous in the pool; the
// copies run on stream. When pages moved, plans made before are stale: plan again.
func (p *Pool) Relayout(plan *Plan, seqIDs []uint64, regroup bool, stream uintptr) (RelayoutReport, error) {
	if plan == nil {
		return RelayoutReport{}, invalidArgument("Relayout: plan is nil")
	}
	n, err := count("Relayout", "seqIDs", len(seqIDs))
	if err != nil {
		return RelayoutReport{}, err
	}
	var r C.PackinferRelayoutReport
	r.struct_size = C.size_t(unsafe.Sizeof(r))
	err = call(func() C.enum_PackinferStatus {
		return C.pi_pool_relayout(p.h, plan.h, u64Ptr(seqIDs), n, C.bool(regroup), C.uintptr_t(stream), &r)
	})
	runtime.KeepAlive(p)
	runtime.KeepAlive(plan)
	if err != nil {
		return RelayoutReport{}, err
	}
	return RelayoutReport{Groups: uint32(r.groups), GroupsInPlace: uint32(r.groups_in_place), GroupsRebuilt: uint32(r.groups_rebuilt),
		GroupsNoRoom: uint32(r.groups_no_room), PagesMoved: uint64(r.pages_moved), BytesMoved: uint64(r.bytes_moved)}, nil
}

// Stats reads the pool's metrics.
func (p *Pool) Stats() (PoolStats, error) {
	var s C.PackinferPoolStats
	s.struct_size = C.size_t(unsafe.Sizeof(s))
	err := call(func() C.enum_PackinferStatus { return C.packinfer_pool_stats(p.h, &s) })
	runtime.KeepAlive(p)
	if err != nil {
		return PoolStats{}, err
	}
	return PoolStats{
		NumPages: uint32(s.num_pages), PagesUsed: uint32(s.pages_used), PagesFree: uint32(s.pages_free),
		NumSequences: uint32(s.num_sequences), TokensLogical: uint64(s.tokens_logical), TokensStored: uint64(s.tokens_stored),
		SlotsReservedUnused: uint64(s.slots_reserved_unused), StepReadBytesShared: uint64(s.step_read_bytes_shared),
		StepReadBytesUnshared: uint64(s.step_read_bytes_unshared), Relayouts: uint64(s.relayouts),
		RelayoutPagesMoved: uint64(s.relayout_pages_moved), RelayoutBytesMoved: uint64(s.relayout_bytes_moved),
		CowPageCopies: uint64(s.cow_page_copies),
	}, nil
}

// Close destroys the pool and frees its KV memory. A second Close, or any use after Close,
// returns an error with StatusInvalidHandle.
func (p *Pool) Close() error {
	runtime.SetFinalizer(p, nil)
	return call(func() C.enum_PackinferStatus { return C.packinfer_pool_destroy(p.h) })
}

func (p *Pool) destroyUnclosed() { C.packinfer_pool_destroy(p.h) }

// The id and count slices are passed to C directly for the call (they hold no Go pointers, and
// C keeps none); an empty slice is NULL.
func u64Ptr(s []uint64) *C.uint64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint64_t)(unsafe.Pointer(&s[0]))
}

func u32Ptr(s []uint32) *C.uint32_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint32_t)(unsafe.Pointer(&s[0]))
}

// count is a slice's length as the C API's uint32 count.
func count(fn, name string, n int) (C.uint32_t, error) {
	if n > math.MaxUint32 {
		return 0, invalidArgument("%s: %s has %d entries, more than the C API's uint32 count", fn, name, n)
	}
	return C.uint32_t(n), nil
}

// pairedLength checks what only the binding can see: that two slices that pair up one to one
// have the same length.
func pairedLength(fn string, seqIDs []uint64, other string, otherLen int) (C.uint32_t, error) {
	if len(seqIDs) != otherLen {
		return 0, invalidArgument("%s: %s has %d entries but seqIDs has %d; they pair up one to one", fn, other, otherLen, len(seqIDs))
	}
	return count(fn, "seqIDs", len(seqIDs))
}
