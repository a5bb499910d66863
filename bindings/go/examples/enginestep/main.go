// Command enginestep is one engine step with PackInfer from Go: plan a mixed batch (decodes
// sharing a system prompt, and a prefill chunk), run two layers on the CPU backend, print the
// planner's statistics.
//
//	go run ./examples/enginestep      (from bindings/go, after cargo build --release)
//
// With the CUDA backend the same calls take device pointers (uintptr) and a CUstream.
package main

import (
	"fmt"
	"log"
	"math"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

func toBF16(f float32) uint16 {
	u := math.Float32bits(f)
	return uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
}

func fromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

func main() {
	// Start-up: one context (the backend on one device). BackendAuto picks CUDA where it works.
	ctx, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCPU})
	if err != nil {
		log.Fatal(err)
	}
	defer ctx.Close()
	info, err := ctx.Info()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("packinfer %s on %s (%d workers)\n", packinfer.Version(), info.DeviceName, info.NumWorkers)

	// One step. The model: 8 query heads over 2 KV heads, head_dim 64, bf16. The engine's cache
	// has pages of 16 tokens stored NHD. Requests 0 and 1 share a 32-token system prompt (the
	// same pages 7 and 3 start both page lists), which the prefix group declares.
	//   request:            0 (decode)   1 (decode)    2 (decode)  3 (prefill chunk)
	//   queries this step:  1            1             1           48
	//   keys in the cache:  40           35            100         48
	const pageSize, numPages, qoHeads, kvHeads, headDim = 16, 64, 8, 2, 64
	batch := packinfer.Batch{
		NumQOHeads: qoHeads, NumKVHeads: kvHeads, HeadDim: headDim, DType: packinfer.BF16, Causal: true,
		QOIndptr:      []int32{0, 1, 2, 3, 51},
		KVIndptr:      []int32{0, 3, 6, 13, 16},
		KVPageIndices: []int32{7, 3, 12, 7, 3, 20, 1, 2, 4, 5, 6, 8, 9, 30, 31, 32},
		KVLastPageLen: []int32{8, 3, 4, 16},
		PageSize:      pageSize,
		NumPages:      numPages,
		PrefixGroups:  []packinfer.PrefixGroup{{PrefixLen: 32, Members: []int32{0, 1}}},
	}
	plan, err := ctx.NewPlan(&batch, nil) // the slices are copied here
	if err != nil {
		log.Fatal(err)
	}
	defer plan.Close()
	s, err := plan.Stats()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("plan: %d requests -> %d groups, %d work items, %d split requests (%d merge rows)\n",
		s.NumRequests, s.NumGroups, s.NumWorkItems, s.NumSplitRequests, s.NumMergeRows)
	fmt.Printf("      tile utilization %.1f%%, group cost max %.0f / mean %.0f, scratch %d bytes, planned in %.1f us\n",
		100*s.TileUtilization, s.MaxGroupCost, s.MeanGroupCost, s.ScratchBytes, s.PlanningTimeUs)

	launch, err := ctx.NewLaunch(plan, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer launch.Close()

	// Tensors for the CPU backend live outside Go's heap (on CUDA they are device pointers).
	totalQ := int(batch.QOIndptr[len(batch.QOIndptr)-1])
	qElems, kvElems := totalQ*qoHeads*headDim, numPages*pageSize*kvHeads*headDim
	alloc := func(n int) *packinfer.HostBuffer {
		b, err := packinfer.NewHostBuffer(n)
		if err != nil {
			log.Fatal(err)
		}
		return b
	}
	q, k, v, o, lse := alloc(2*qElems), alloc(2*kvElems), alloc(2*kvElems), alloc(2*qElems), alloc(4*totalQ*qoHeads)
	defer func() {
		for _, b := range []*packinfer.HostBuffer{q, k, v, o, lse} {
			b.Free()
		}
	}()

	for layer := 0; layer < 2; layer++ {
		for i, qs := 0, q.Uint16s(); i < qElems; i++ {
			qs[i] = toBF16(float32(math.Sin(0.37*float64(i) + float64(layer))))
		}
		for i, ks, vs := 0, k.Uint16s(), v.Uint16s(); i < kvElems; i++ {
			ks[i] = toBF16(float32(math.Cos(0.11*float64(i) - float64(layer))))
			vs[i] = toBF16(float32(math.Sin(0.05 * float64(i) * float64(layer+1))))
		}
		args := packinfer.RunArgs{
			Q:   q.Ptr(),
			KV:  packinfer.KVLayoutNHD(k.Ptr(), v.Ptr(), pageSize, kvHeads, headDim),
			O:   o.Ptr(),
			LSE: lse.Ptr(),
		}
		if err := launch.Run(&args); err != nil {
			log.Fatal(err) // e.g. "PACKINFER_STATUS_INVALID_ARGUMENT: packinfer_run: q is a null pointer ..."
		}
		os := o.Uint16s()
		fmt.Printf("layer %d done: O[token 0, head 0, dim 0..3] = %.4f %.4f %.4f %.4f, LSE[token 50, head 7] = %.4f\n",
			layer, fromBF16(os[0]), fromBF16(os[1]), fromBF16(os[2]), fromBF16(os[3]), lse.Float32s()[50*qoHeads+7])
	}
}
