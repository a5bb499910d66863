package packinfer_test

// Tests of the managed KV pool (Pool) on the CPU backend: the whole flow (sequences, a fork with
// a shared prefix, appends, K/V written per layer, plans made from the pool, relayout) compared
// against a float64 attention over the K/V the test wrote; POOL_EXHAUSTED; bad sequence ids; use
// after Close. bf16 here (the C test covers f32, the C++ one f16).

import (
	"fmt"
	"math"
	"math/rand"
	"testing"
	"unsafe"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

const (
	poolLayers   = 2
	poolQOHeads  = 4
	poolKVHeads  = 2
	poolHeadDim  = 32
	poolPageSize = 4
	poolNumPages = 40
	poolRow      = poolKVHeads * poolHeadDim
	poolDType    = packinfer.BF16
)

func poolOptions(t *testing.T) *packinfer.PoolOptions {
	o := packinfer.DefaultPoolOptions()
	if o.PageSize != 16 || o.HeadroomPages != 2 || !o.Causal || o.DType != packinfer.BF16 {
		t.Errorf("DefaultPoolOptions() = %+v, want the C API's defaults (page size 16, headroom 2, causal, bf16)", o)
	}
	o.NumLayers, o.NumQOHeads, o.NumKVHeads, o.HeadDim, o.DType = poolLayers, poolQOHeads, poolKVHeads, poolHeadDim, poolDType
	o.PageSize, o.NumPages, o.HeadroomPages = poolPageSize, poolNumPages, 1
	return &o
}

// seq is a sequence of the pool and the test's own copy of its K/V (per layer, token order, the
// values bf16 stores): what the reference attends over.
type seq struct {
	id   uint64
	k, v [poolLayers][]float32
}

func (s *seq) len() int { return len(s.k[0]) / poolRow }

// unsafeUint16s views n uint16s of C memory at addr (the pool's host memory on the CPU backend).
// The address is reinterpreted through memory rather than converted, which is what go vet's
// unsafeptr check asks for: addr is not Go memory, so the GC's rules do not apply to it.
func unsafeUint16s(addr uintptr, n int) []uint16 {
	return unsafe.Slice(*(**uint16)(unsafe.Pointer(&addr)), n)
}

// withPrefix is sequence id holding the first n tokens of parent (a fork, a prefix match).
func withPrefix(id uint64, parent *seq, n int) *seq {
	s := &seq{id: id}
	for l := 0; l < poolLayers; l++ {
		s.k[l] = append([]float32(nil), parent.k[l][:n*poolRow]...)
		s.v[l] = append([]float32(nil), parent.v[l][:n*poolRow]...)
	}
	return s
}

func newSeq(t *testing.T, pool *packinfer.Pool) *seq {
	t.Helper()
	return &seq{id: must(pool.CreateSequence())(t)}
}

// appendTokens appends n tokens and checks the slots and the length.
func appendTokens(t *testing.T, pool *packinfer.Pool, s *seq, n int) []int64 {
	t.Helper()
	slots := must(pool.Append(s.id, uint32(n), 0))(t)
	if len(slots) != n {
		t.Fatalf("Append(%d) returned %d slots", n, len(slots))
	}
	for i, slot := range slots {
		if slot < 0 || slot >= poolNumPages*poolPageSize {
			t.Errorf("slot %d = %d is outside the pool", i, slot)
		}
		if i > 0 && (s.len()+i)%poolPageSize != 0 && slot != slots[i-1]+1 {
			t.Errorf("slot %d = %d does not follow %d in the same page", i, slot, slots[i-1])
		}
	}
	for l := 0; l < poolLayers; l++ {
		for i := 0; i < n*poolRow; i++ {
			s.k[l] = append(s.k[l], float32(math.NaN()))
			s.v[l] = append(s.v[l], float32(math.NaN()))
		}
	}
	if got := must(pool.SequenceLength(s.id))(t); int(got) != s.len() {
		t.Errorf("sequence %d has %d tokens, want %d", s.id, got, s.len())
	}
	return slots
}

// writeKV writes random K/V of every layer for the last counts[i] tokens of seqs[i], one WriteKV
// per layer as an engine does.
func writeKV(t *testing.T, pool *packinfer.Pool, rng *rand.Rand, seqs []*seq, counts []uint32) {
	t.Helper()
	writeKVScaled(t, pool, rng, seqs, counts, nil)
}

// writeKVScaled is writeKV into a pool whose K/V are fp8 with `scales` ([layer][K, V][kv head];
// nil: a pool of Q's dtype): the test records what the pool documents it stores, e4m3(x /
// scale), read back times the scale.
func writeKVScaled(t *testing.T, pool *packinfer.Pool, rng *rand.Rand, seqs []*seq, counts []uint32, scales []float32) {
	t.Helper()
	stored := func(l, kv, e int, x float32) float32 {
		if scales == nil {
			return x
		}
		scale := scales[(l*2+kv)*poolKVHeads+e/poolHeadDim]
		return fromFP8(toFP8(x/scale)) * scale
	}
	ids := make([]uint64, len(seqs))
	rows := 0
	for i, s := range seqs {
		ids[i] = s.id
		rows += int(counts[i])
	}
	for l := 0; l < poolLayers; l++ {
		k, v := newTensor(t, poolDType, rows*poolRow), newTensor(t, poolDType, rows*poolRow)
		at := 0
		for i, s := range seqs {
			for tok := s.len() - int(counts[i]); tok < s.len(); tok++ {
				for e := 0; e < poolRow; e, at = e+1, at+1 {
					s.k[l][tok*poolRow+e] = stored(l, 0, e, k.set(at, rng.Float32()*2-1))
					s.v[l][tok*poolRow+e] = stored(l, 1, e, v.set(at, rng.Float32()*2-1))
				}
			}
		}
		src := &packinfer.KVSource{K: k.buf.Ptr(), V: v.buf.Ptr(), NumRows: uint32(rows), NumKVHeads: poolKVHeads, HeadDim: poolHeadDim, DType: poolDType}
		if err := pool.WriteKV(uint32(l), ids, counts, src, 0); err != nil {
			t.Fatal(err)
		}
	}
}

// step plans from the pool, optionally relays out (and plans again), runs every layer with the
// pool's layout and compares with attention over the K/V the test wrote.
func step(t *testing.T, ctx *packinfer.Context, pool *packinfer.Pool, rng *rand.Rand, seqs []*seq, qLens []uint32, relayout bool) packinfer.RelayoutReport {
	t.Helper()
	ids := make([]uint64, len(seqs))
	totalQ := 0
	for i, s := range seqs {
		ids[i] = s.id
		totalQ += int(qLens[i])
	}
	plan := must(pool.NewPlan(ctx, ids, qLens, nil))(t)
	if st := must(plan.Stats())(t); st.NumRequests != uint32(len(seqs)) {
		t.Errorf("plan of %d requests, want %d", st.NumRequests, len(seqs))
	}
	var report packinfer.RelayoutReport
	if relayout {
		before := must(pool.Stats())(t)
		report = must(pool.Relayout(plan, ids, true, 0))(t)
		if report.Groups != report.GroupsInPlace+report.GroupsRebuilt+report.GroupsNoRoom {
			t.Errorf("relayout report %+v", report)
		}
		if after := must(pool.Stats())(t); after.RelayoutPagesMoved != before.RelayoutPagesMoved+report.PagesMoved {
			t.Errorf("stats count %d pages moved, want %d + %d", after.RelayoutPagesMoved, before.RelayoutPagesMoved, report.PagesMoved)
		}
		if err := pool.Replan(ctx, plan, ids, qLens, nil); err != nil { // the old step is stale if pages moved
			t.Fatal(err)
		}
	}
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	nOut := totalQ * poolQOHeads * poolHeadDim
	scale := 1 / math.Sqrt(poolHeadDim)
	for l := 0; l < poolLayers; l++ {
		q, o := newTensor(t, poolDType, nOut), newTensor(t, poolDType, nOut)
		lse := newTensor(t, packinfer.F32, totalQ*poolQOHeads)
		for i := 0; i < nOut; i++ {
			q.set(i, rng.Float32()*4-2)
			o.set(i, float32(math.NaN()))
		}
		kv := must(pool.KVLayout(uint32(l)))(t)
		ks, vs, err := pool.KVHeadScales(uint32(l)) // 0, 0 for a pool of Q's dtype
		if err != nil {
			t.Fatal(err)
		}
		if err := launch.Run(&packinfer.RunArgs{Q: q.buf.Ptr(), KV: kv, O: o.buf.Ptr(), LSE: lse.buf.Ptr(), KHeadScales: ks, VHeadScales: vs}); err != nil {
			t.Fatal(err)
		}
		bad, tok := 0, 0
		for r, s := range seqs {
			for i := 0; i < int(qLens[r]); i, tok = i+1, tok+1 {
				visible := s.len() - int(qLens[r]) + i + 1 // causal, bottom-right aligned
				for h := 0; h < poolQOHeads; h++ {
					kvh := h / (poolQOHeads / poolKVHeads)
					p := make([]float64, visible)
					m, z := math.Inf(-1), 0.0
					for j := range p {
						dot := 0.0
						for e := 0; e < poolHeadDim; e++ {
							dot += float64(q.get((tok*poolQOHeads+h)*poolHeadDim+e)) * float64(s.k[l][j*poolRow+kvh*poolHeadDim+e])
						}
						p[j] = dot * scale
						m = math.Max(m, p[j])
					}
					for _, x := range p {
						z += math.Exp(x - m)
					}
					for e := 0; e < poolHeadDim; e++ {
						want := 0.0
						for j, x := range p {
							want += math.Exp(x-m) / z * float64(s.v[l][j*poolRow+kvh*poolHeadDim+e])
						}
						if got := float64(o.get((tok*poolQOHeads+h)*poolHeadDim + e)); !(math.Abs(got-want) <= 1.6e-2*(1+math.Abs(want))) && bad < 5 {
							bad++
							t.Errorf("layer %d, request %d (sequence %d), query %d, head %d, dim %d: O = %v, reference %v", l, r, s.id, i, h, e, got, want)
						}
					}
					wantLSE := m + math.Log(z)
					if got := float64(lse.get(tok*poolQOHeads + h)); !(math.Abs(got-wantLSE) <= 1e-4*(1+math.Abs(wantLSE))) && bad < 5 {
						bad++
						t.Errorf("layer %d, request %d: LSE = %v, reference %v", l, r, got, wantLSE)
					}
				}
			}
		}
	}
	return report
}

// A pool that stores K/V as fp8 e4m3 with per-layer, per-head scales, written from bf16 rows and
// read through Pool.KVHeadScales, through a fork and a relayout; its stats count one byte per
// element.
func TestPoolFP8(t *testing.T) {
	rng := rand.New(rand.NewSource(9))
	ctx := cpuContext(t)
	defer ctx.Close()
	opts := poolOptions(t)
	opts.KVDType = packinfer.FP8E4M3
	scales := []float32{0.01, 0.02, 0.004, 0.008, 0.03, 0.005, 0.015, 0.002}
	opts.KVHeadScales = scales
	pool := must(ctx.NewPool(opts))(t)
	defer pool.Close()
	a, b := newSeq(t, pool), newSeq(t, pool)
	appendTokens(t, pool, a, 6)
	appendTokens(t, pool, b, 5)
	appendTokens(t, pool, a, 7)
	writeKVScaled(t, pool, rng, []*seq{a, b}, []uint32{13, 5}, scales)
	step(t, ctx, pool, rng, []*seq{a, b}, []uint32{13, 5}, false)
	if st := must(pool.Stats())(t); st.StepReadBytesUnshared != 18*poolLayers*2*poolRow {
		t.Errorf("StepReadBytesUnshared = %d, want %d (one byte per element)", st.StepReadBytesUnshared, 18*poolLayers*2*poolRow)
	}
	c := withPrefix(must(pool.Fork(a.id, 8, 0))(t), a, 8)
	appendTokens(t, pool, a, 1)
	appendTokens(t, pool, c, 2)
	writeKVScaled(t, pool, rng, []*seq{a, c}, []uint32{1, 2}, scales)
	step(t, ctx, pool, rng, []*seq{a, b, c}, []uint32{1, 1, 2}, true)
	// The binding checks the scales' count; a pool of Q's dtype has none.
	opts.KVHeadScales = scales[:7]
	_, err := ctx.NewPool(opts)
	wantError(t, err, packinfer.StatusInvalidArgument, "KVHeadScales has 7 entries")
	plain := must(ctx.NewPool(poolOptions(t)))(t)
	defer plain.Close()
	if k, v, err := plain.KVHeadScales(0); k != 0 || v != 0 || err != nil {
		t.Errorf("KVHeadScales of a bf16 pool = %x, %x, %v", k, v, err)
	}
}

func TestPoolManagedFlow(t *testing.T) {
	rng := rand.New(rand.NewSource(11))
	ctx := cpuContext(t)
	defer ctx.Close()
	pool := must(ctx.NewPool(poolOptions(t)))(t)
	defer pool.Close()
	l1 := must(pool.KVLayout(1))(t)
	if l1.StrideToken != poolRow || l1.StridePage != poolPageSize*poolRow || l1.StrideDim != 1 {
		t.Errorf("pool layout %+v", l1)
	}

	// Step 1: two prompts, appended in turns so that A's pages are scattered.
	a, b := newSeq(t, pool), newSeq(t, pool)
	appendTokens(t, pool, a, 4)
	firstSlotB := appendTokens(t, pool, b, 4)[0]
	appendTokens(t, pool, a, 9)
	appendTokens(t, pool, b, 3)
	writeKV(t, pool, rng, []*seq{a, b}, []uint32{13, 7})
	// B's first token is where Append said (layer 1's V, bf16 bits).
	stored := unsafeUint16s(l1.V+uintptr(firstSlotB*l1.StrideToken*2), poolRow)
	for e := 0; e < poolRow; e++ {
		if fromBF16(stored[e]) != b.v[1][e] {
			t.Fatalf("layer 1 V of B's first token, element %d: pool holds %v, wrote %v", e, fromBF16(stored[e]), b.v[1][e])
		}
	}
	step(t, ctx, pool, rng, []*seq{a, b}, []uint32{13, 7}, false)
	st := must(pool.Stats())(t)
	if st.NumSequences != 2 || st.TokensLogical != 20 || st.PagesUsed+st.PagesFree != poolNumPages {
		t.Errorf("stats after step 1: %+v", st)
	}

	// Step 2: C shares A's first two pages; D's fork copies A's partly covered third page.
	c := withPrefix(must(pool.Fork(a.id, 8, 0))(t), a, 8)
	d := withPrefix(must(pool.Fork(a.id, 10, 0))(t), a, 10)
	if st := must(pool.Stats())(t); st.TokensLogical != 38 || st.TokensStored != 22 || st.CowPageCopies != 1 {
		t.Errorf("stats after the forks: %+v", st)
	}
	appendTokens(t, pool, a, 1)
	appendTokens(t, pool, b, 1)
	appendTokens(t, pool, c, 3)
	appendTokens(t, pool, d, 2)
	writeKV(t, pool, rng, []*seq{a, b, c, d}, []uint32{1, 1, 3, 2})
	r := step(t, ctx, pool, rng, []*seq{a, b, c, d}, []uint32{1, 1, 3, 2}, true)
	if r.GroupsRebuilt < 1 || r.PagesMoved < 1 {
		t.Errorf("A's pages are scattered; a regroup relayout must move them: %+v", r)
	}

	// Content hashes: E finds A's first two pages.
	hashes := []uint64{0x1111, 0x2222, 0x3333}
	if err := pool.RegisterPageHashes(a.id, hashes[:2]); err != nil {
		t.Fatal(err)
	}
	eID := must(pool.CreateSequence())(t)
	if n := must(pool.MatchPrefix(eID, hashes))(t); n != 8 {
		t.Fatalf("MatchPrefix matched %d tokens, want 8", n)
	}
	e := withPrefix(eID, a, 8)

	// Step 3: B is done; D goes back a token and takes another path; E continues A's prefix.
	if err := pool.Release(b.id); err != nil {
		t.Fatal(err)
	}
	if err := pool.Truncate(d.id, 9); err != nil {
		t.Fatal(err)
	}
	d = withPrefix(d.id, d, 9)
	appendTokens(t, pool, a, 1)
	appendTokens(t, pool, d, 1)
	appendTokens(t, pool, e, 2)
	writeKV(t, pool, rng, []*seq{a, d, e}, []uint32{1, 1, 2})
	step(t, ctx, pool, rng, []*seq{a, d, e, c}, []uint32{1, 1, 2, 1}, true)
	st = must(pool.Stats())(t)
	if st.NumSequences != 4 || st.TokensLogical != uint64(a.len()+c.len()+d.len()+e.len()) || st.TokensStored >= st.TokensLogical {
		t.Errorf("stats after step 3: %+v", st)
	}
}

func TestPoolExhaustedLeavesThePoolUnchangedAndUsable(t *testing.T) {
	rng := rand.New(rand.NewSource(12))
	ctx := cpuContext(t)
	defer ctx.Close()
	pool := must(ctx.NewPool(poolOptions(t)))(t)
	defer pool.Close()
	a := newSeq(t, pool)
	appendTokens(t, pool, a, 10)
	writeKV(t, pool, rng, []*seq{a}, []uint32{10})
	before := must(pool.Stats())(t)
	_, err := pool.Append(a.id, poolNumPages*poolPageSize, 0)
	wantError(t, err, packinfer.StatusPoolExhausted, "nothing was changed")
	if after := must(pool.Stats())(t); after != before {
		t.Errorf("POOL_EXHAUSTED changed the stats:\n before %+v\n after  %+v", before, after)
	}
	// Far more than the pool holds: refused the same way, without allocating 2^30 slots first.
	_, err = pool.Append(a.id, 1<<30, 0)
	wantError(t, err, packinfer.StatusPoolExhausted, "appending n = 1073741824 tokens")
	if after := must(pool.Stats())(t); after != before {
		t.Errorf("POOL_EXHAUSTED changed the stats:\n before %+v\n after  %+v", before, after)
	}
	if n := must(pool.SequenceLength(a.id))(t); n != 10 {
		t.Errorf("A has %d tokens after a failed append, want 10", n)
	}
	// Fill the pool: then a fork that must copy a page, and an append that needs one, are refused.
	var fillers []*seq
	for must(pool.Stats())(t).PagesFree > 0 {
		f := newSeq(t, pool)
		appendTokens(t, pool, f, poolPageSize)
		fillers = append(fillers, f)
	}
	full := must(pool.Stats())(t)
	_, err = pool.Fork(a.id, 5, 0)
	wantError(t, err, packinfer.StatusPoolExhausted, "nothing was changed")
	_, err = pool.Append(a.id, 3, 0)
	wantError(t, err, packinfer.StatusPoolExhausted, "appending n = 3 tokens")
	if after := must(pool.Stats())(t); after != full {
		t.Errorf("POOL_EXHAUSTED changed the full pool's stats:\n before %+v\n after  %+v", full, after)
	}
	// Still usable: two tokens fit in A's last page, and a step runs.
	appendTokens(t, pool, a, 2)
	writeKV(t, pool, rng, []*seq{a}, []uint32{2})
	step(t, ctx, pool, rng, []*seq{a}, []uint32{2}, false)
	for _, f := range fillers {
		if err := pool.Release(f.id); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPoolBadSequenceIdsAndArguments(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	pool := must(ctx.NewPool(poolOptions(t)))(t)
	defer pool.Close()
	a, b := must(pool.CreateSequence())(t), must(pool.CreateSequence())(t)
	must(pool.Append(a, 3, 0))(t)
	if err := pool.Release(b); err != nil {
		t.Fatal(err)
	}
	_, err := pool.SequenceLength(9999)
	wantError(t, err, packinfer.StatusInvalidArgument, "sequence id 9999 is not a live sequence")
	_, err = pool.Append(b, 1, 0)
	wantError(t, err, packinfer.StatusInvalidArgument, fmt.Sprintf("sequence id %d ", b))
	wantError(t, pool.Release(b), packinfer.StatusInvalidArgument, "is not a live sequence")
	_, err = pool.Fork(b, 0, 0)
	wantError(t, err, packinfer.StatusInvalidArgument, "is not a live sequence")
	wantError(t, pool.Truncate(a, 5), packinfer.StatusInvalidArgument, "len = 5 is longer")
	_, err = pool.NewPlan(ctx, []uint64{a, b}, []uint32{1, 1}, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "is not a live sequence")
	rows := newTensor(t, poolDType, 4*poolRow)
	src := &packinfer.KVSource{K: rows.buf.Ptr(), V: rows.buf.Ptr(), NumRows: 1, NumKVHeads: poolKVHeads, HeadDim: poolHeadDim, DType: poolDType}
	wantError(t, pool.WriteKV(0, []uint64{b}, []uint32{1}, src, 0), packinfer.StatusInvalidArgument, "is not a live sequence")
	four := *src
	four.NumRows = 4
	wantError(t, pool.WriteKV(0, []uint64{a}, []uint32{4}, &four, 0), packinfer.StatusInvalidArgument, "num_tokens[0] = 4 but sequence")
	f32 := *src
	f32.DType = packinfer.F32
	wantError(t, pool.WriteKV(0, []uint64{a}, []uint32{1}, &f32, 0), packinfer.StatusInvalidArgument, "src->dtype")
	wantError(t, pool.WriteKV(0, []uint64{a}, []uint32{1}, nil, 0), packinfer.StatusInvalidArgument, "src is nil")
	_, err = pool.KVLayout(poolLayers)
	wantError(t, err, packinfer.StatusInvalidArgument, "layer = 2")
	// Slices that pair up: the binding checks their lengths (the C API takes one count).
	wantError(t, pool.WriteKV(0, []uint64{a, a}, []uint32{1}, src, 0), packinfer.StatusInvalidArgument,
		"WriteKV: numTokens has 1 entries but seqIDs has 2")
	_, err = pool.NewPlan(ctx, []uint64{a}, nil, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "Pool.NewPlan: numNewTokens has 0 entries but seqIDs has 1")
	plan := must(pool.NewPlan(ctx, []uint64{a}, []uint32{3}, nil))(t)
	defer plan.Close()
	_, err = pool.Relayout(plan, []uint64{a, a}, true, 0)
	wantError(t, err, packinfer.StatusInvalidArgument, "2 seq_ids")
	_, err = pool.Relayout(nil, []uint64{a}, true, 0)
	wantError(t, err, packinfer.StatusInvalidArgument, "plan is nil")
	wantError(t, pool.Replan(ctx, plan, []uint64{a}, nil, nil), packinfer.StatusInvalidArgument,
		"Pool.Replan: numNewTokens has 0 entries but seqIDs has 1")
	wantError(t, pool.Replan(ctx, plan, []uint64{a, a}, []uint32{1, 1}, nil), packinfer.StatusInvalidArgument, "repeats")
	if st := must(plan.Stats())(t); st.NumRequests != 0 {
		t.Errorf("a planning error left %d requests in the plan", st.NumRequests)
	}
	if err := pool.Replan(ctx, plan, []uint64{a}, []uint32{3}, nil); err != nil {
		t.Fatal(err)
	}
	if st := must(plan.Stats())(t); st.NumRequests != 1 {
		t.Errorf("replan gave %d requests, want 1", st.NumRequests)
	}
	// Options.
	o := poolOptions(t)
	o.NumLayers = 0
	_, err = ctx.NewPool(o)
	wantError(t, err, packinfer.StatusInvalidArgument, "num_layers = 0")
	o = poolOptions(t)
	o.DType = 7
	_, err = ctx.NewPool(o)
	wantError(t, err, packinfer.StatusInvalidArgument, "options->dtype = 7")
	_, err = ctx.NewPool(nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "opts is nil")
}

func TestPoolUseAfterClose(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	pool := must(ctx.NewPool(poolOptions(t)))(t)
	a := must(pool.CreateSequence())(t)
	must(pool.Append(a, 2, 0))(t)
	if err := pool.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := pool.Stats()
	wantError(t, err, packinfer.StatusInvalidHandle, "pool handle")
	_, err = pool.CreateSequence()
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	_, err = pool.Append(a, 1, 0)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	_, err = pool.KVLayout(0)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	_, err = pool.NewPlan(ctx, []uint64{a}, []uint32{1}, nil)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	wantError(t, pool.Close(), packinfer.StatusInvalidHandle, "was destroyed")
	// A pool on a closed context.
	gone := cpuContext(t)
	if err := gone.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = gone.NewPool(poolOptions(t))
	wantError(t, err, packinfer.StatusInvalidHandle, "context handle")
}
