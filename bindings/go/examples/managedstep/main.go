// Command managedstep is the managed level from Go: PackInfer owns the KV cache (a Pool), so the
// engine keeps sequence ids instead of page tables. A prompt is prefilled, two continuations
// fork from it (sharing its pages), then decode steps run: append, plan from the pool, relayout,
// and per layer write the new K/V and run attention over the pool.
//
//	go run ./examples/managedstep      (from bindings/go, after cargo build --release)
//
// CPU backend and f32 so it runs anywhere; on CUDA the addresses are device pointers and every
// call takes the layer's stream.
package main

import (
	"fmt"
	"log"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

const layers, qoHeads, kvHeads, headDim = 2, 8, 2, 64

func check(err error) {
	if err != nil {
		log.Fatal(err) // a *packinfer.Error: the status and the library's message
	}
}

func buffer(floats int, value float32) *packinfer.HostBuffer {
	b, err := packinfer.NewHostBuffer(4 * floats)
	check(err)
	for i := range b.Float32s() {
		b.Float32s()[i] = value
	}
	return b
}

func main() {
	ctx, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCPU})
	check(err)
	defer ctx.Close()
	opts := packinfer.DefaultPoolOptions() // page size 16, headroom 2 pages
	opts.NumLayers, opts.NumQOHeads, opts.NumKVHeads, opts.HeadDim, opts.DType = layers, qoHeads, kvHeads, headDim, packinfer.F32
	opts.NumPages = 64
	pool, err := ctx.NewPool(&opts)
	check(err)
	defer pool.Close()

	// One engine step: seqs[i] gets fresh[i] new tokens; per layer their K/V are stored, then
	// attention runs (an engine's Q/K/V come from the model; here, constants: O is all 1).
	step := func(seqs []uint64, fresh []uint32) float32 {
		rows := 0
		for i, s := range seqs {
			_, err := pool.Append(s, fresh[i], 0)
			check(err)
			rows += int(fresh[i])
		}
		plan, err := pool.NewPlan(ctx, seqs, fresh, nil)
		check(err)
		r, err := pool.Relayout(plan, seqs, true, 0)
		check(err)
		if r.PagesMoved > 0 { // plans made before a relayout that moved pages are stale
			plan.Close()
			plan, err = pool.NewPlan(ctx, seqs, fresh, nil)
			check(err)
		}
		defer plan.Close()
		launch, err := ctx.NewLaunch(plan, nil)
		check(err)
		defer launch.Close()
		k, v, q, o := buffer(rows*kvHeads*headDim, 0.5), buffer(rows*kvHeads*headDim, 1), buffer(rows*qoHeads*headDim, 0.1), buffer(rows*qoHeads*headDim, 0)
		defer func() { k.Free(); v.Free(); q.Free(); o.Free() }()
		for layer := uint32(0); layer < layers; layer++ {
			src := &packinfer.KVSource{K: k.Ptr(), V: v.Ptr(), NumRows: uint32(rows), NumKVHeads: kvHeads, HeadDim: headDim, DType: packinfer.F32}
			check(pool.WriteKV(layer, seqs, fresh, src, 0))
			kv, err := pool.KVLayout(layer)
			check(err)
			check(launch.Run(&packinfer.RunArgs{Q: q.Ptr(), KV: kv, O: o.Ptr()}))
		}
		return o.Float32s()[0]
	}

	prompt, err := pool.CreateSequence()
	check(err)
	step([]uint64{prompt}, []uint32{40}) // prefill
	a, err := pool.Fork(prompt, 40, 0)
	check(err)
	b, err := pool.Fork(prompt, 40, 0)
	check(err)
	check(pool.Release(prompt)) // a and b keep its pages
	var out float32
	for i := 0; i < 4; i++ {
		out = step([]uint64{a, b}, []uint32{1, 1}) // decode
	}
	s, err := pool.Stats()
	check(err)
	fmt.Printf("decode O[0] = %.3f; pool: %d of %d pages used, %d tokens in %d sequences (%d stored), %d copy-on-write copies\n",
		out, s.PagesUsed, s.NumPages, s.TokensLogical, s.NumSequences, s.TokensStored, s.CowPageCopies)
	fmt.Printf("last step reads %d KV bytes with the shared prompt read once (%d without)\n", s.StepReadBytesShared, s.StepReadBytesUnshared)
}
