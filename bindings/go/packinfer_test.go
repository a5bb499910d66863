package packinfer_test

// Tests of the Go binding on the CPU backend, mirroring the C++ ones: whole steps compared
// against a naive float64 attention written here (f32, f16, bf16; NHD and HND; GQA; a shared
// prefix), every error the binding returns, use after Close, and errors from many goroutines.

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

// ---- element types: what a dtype stores for x (round to nearest even) ----

func toBF16(f float32) uint16 {
	u := math.Float32bits(f)
	return uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
}

func fromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// toF16 handles the finite values of these tests (|x| <= 2), normal or subnormal.
func toF16(f float32) uint16 {
	u := math.Float32bits(f)
	sign := uint16(u>>16) & 0x8000
	a := math.Abs(float64(f))
	if a < 6.103515625e-05 {
		return sign | uint16(math.RoundToEven(a*16777216))
	}
	h := (((u>>23)&0xFF)-112)<<10 | (u&0x7FFFFF)>>13
	rest := u & 0x1FFF
	if rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}

func fromF16(h uint16) float32 {
	sign, exp, mant := uint32(h&0x8000)<<16, uint32(h>>10)&0x1F, uint32(h&0x3FF)
	switch exp {
	case 0:
		v := float32(mant) / 16777216
		if sign != 0 {
			v = -v
		}
		return v
	case 31:
		return math.Float32frombits(sign | 0x7F800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
}

// tensor is a HostBuffer of one dtype.
type tensor struct {
	dtype packinfer.DType
	buf   *packinfer.HostBuffer
	n     int
}

// fromFP8 is an fp8 e4m3 code's value by the format's definition (bias 7, subnormals at
// exponent 0, NaN at S.1111.111, no infinities).
func fromFP8(c byte) float32 {
	e, m := int(c>>3&0xF), float64(c&7)
	if e == 15 && m == 7 {
		return float32(math.NaN())
	}
	v := math.Ldexp(1+m/8, e-7)
	if e == 0 {
		v = math.Ldexp(m/8, -6)
	}
	if c&0x80 != 0 {
		v = -v
	}
	return float32(v)
}

// toFP8 is the e4m3 code nearest to x (ties to the even code), saturated to ±448, by search.
func toFP8(x float32) byte {
	a := math.Min(math.Abs(float64(x)), 448)
	best := byte(0)
	for c := byte(1); c < 0x7F; c++ {
		d, bd := math.Abs(float64(fromFP8(c))-a), math.Abs(float64(fromFP8(best))-a)
		if d < bd || (d == bd && c&1 == 0) {
			best = c
		}
	}
	if math.Signbit(float64(x)) {
		best |= 0x80
	}
	return best
}

func newTensor(t testing.TB, dtype packinfer.DType, n int) *tensor {
	size := 2
	if dtype == packinfer.F32 {
		size = 4
	} else if dtype == packinfer.FP8E4M3 {
		size = 1
	}
	b, err := packinfer.NewHostBuffer(max(n*size, 4))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Free)
	return &tensor{dtype: dtype, buf: b, n: n}
}

// set stores x and returns the value actually stored.
func (x *tensor) set(i int, v float32) float32 {
	switch x.dtype {
	case packinfer.F32:
		x.buf.Float32s()[i] = v
	case packinfer.F16:
		x.buf.Uint16s()[i] = toF16(v)
	case packinfer.FP8E4M3:
		x.buf.Bytes()[i] = toFP8(v)
	default:
		x.buf.Uint16s()[i] = toBF16(v)
	}
	return x.get(i)
}

func (x *tensor) get(i int) float32 {
	switch x.dtype {
	case packinfer.F32:
		return x.buf.Float32s()[i]
	case packinfer.F16:
		return fromF16(x.buf.Uint16s()[i])
	case packinfer.FP8E4M3:
		return fromFP8(x.buf.Bytes()[i])
	}
	return fromBF16(x.buf.Uint16s()[i])
}

type request struct{ qLen, kvLen int }

// testCase is one step's batch in a paged cache with scattered pages and random contents.
type testCase struct {
	windowLeft int     // the sliding window the case is planned with; -1 = none (set by newCase)
	softCap    float32 // the soft-cap its runs use; 0 = none
	batch      packinfer.Batch
	requests   []request
	hnd        bool
	q, k, v    *tensor
	// An fp8 cache's scales (batch.KVDType = FP8E4M3): per tensor (0 = 1) and per KV head (nil = 1).
	kScale, vScale float32
	kHeads, vHeads *tensor
}

// scale is KV head h's scale of K (v = false) or V.
func (c *testCase) scale(v bool, h int) float64 {
	t, heads := c.kScale, c.kHeads
	if v {
		t, heads = c.vScale, c.vHeads
	}
	s := 1.0
	if t != 0 {
		s = float64(t)
	}
	if heads != nil {
		s *= float64(heads.get(h))
	}
	return s
}

// toFP8 makes the case's cache fp8: codes of 16 times the values, which scales of about 1/16
// bring back.
func (c *testCase) toFP8(t testing.TB) {
	for _, kv := range []**tensor{&c.k, &c.v} {
		f := newTensor(t, packinfer.FP8E4M3, (*kv).n)
		for i := 0; i < f.n; i++ {
			f.set(i, 16*(*kv).get(i))
		}
		*kv = f
	}
	c.batch.KVDType = packinfer.FP8E4M3
}

func newCase(t testing.TB, qoHeads, kvHeads, headDim uint32, dtype packinfer.DType, causal bool, pageSize uint32,
	reqs []request, hnd bool, shared []int32, sharedLen int) *testCase {
	rng := rand.New(rand.NewSource(7))
	numPages := 3
	for _, r := range reqs {
		numPages += (r.kvLen + int(pageSize) - 1) / int(pageSize)
	}
	order := rng.Perm(numPages)
	b := packinfer.Batch{NumQOHeads: qoHeads, NumKVHeads: kvHeads, HeadDim: headDim, DType: dtype, Causal: causal,
		PageSize: pageSize, NumPages: uint32(numPages), QOIndptr: []int32{0}, KVIndptr: []int32{0}}
	next := 0
	for i, r := range reqs {
		b.QOIndptr = append(b.QOIndptr, b.QOIndptr[i]+int32(r.qLen))
		shares := false
		for j, m := range shared {
			shares = shares || (j > 0 && int(m) == i)
		}
		np := (r.kvLen + int(pageSize) - 1) / int(pageSize)
		for p := 0; p < np; p++ {
			if shares && (p+1)*int(pageSize) <= sharedLen {
				b.KVPageIndices = append(b.KVPageIndices, b.KVPageIndices[int(b.KVIndptr[shared[0]])+p])
			} else {
				b.KVPageIndices = append(b.KVPageIndices, int32(order[next]))
				next++
			}
		}
		b.KVIndptr = append(b.KVIndptr, int32(len(b.KVPageIndices)))
		last := int32(0)
		if r.kvLen > 0 {
			last = int32((r.kvLen-1)%int(pageSize) + 1)
		}
		b.KVLastPageLen = append(b.KVLastPageLen, last)
	}
	if len(shared) > 0 {
		b.PrefixGroups = []packinfer.PrefixGroup{{PrefixLen: uint32(sharedLen), Members: shared}}
	}
	kvElems := numPages * int(pageSize) * int(kvHeads) * int(headDim)
	c := &testCase{batch: b, requests: reqs, hnd: hnd, windowLeft: -1,
		q: newTensor(t, dtype, int(b.QOIndptr[len(reqs)])*int(qoHeads*headDim)),
		k: newTensor(t, dtype, kvElems), v: newTensor(t, dtype, kvElems)}
	for i := 0; i < kvElems; i++ {
		c.k.set(i, rng.Float32()*2-1)
		c.v.set(i, rng.Float32()*2-1)
	}
	for i := 0; i < c.q.n; i++ {
		c.q.set(i, rng.Float32()*4-2)
	}
	return c
}

func (c *testCase) totalQ() int { return int(c.batch.QOIndptr[len(c.requests)]) }

func (c *testCase) layout() packinfer.KVLayout {
	b := &c.batch
	if c.hnd {
		return packinfer.KVLayoutHND(c.k.buf.Ptr(), c.v.buf.Ptr(), b.PageSize, b.NumKVHeads, b.HeadDim)
	}
	return packinfer.KVLayoutNHD(c.k.buf.Ptr(), c.v.buf.Ptr(), b.PageSize, b.NumKVHeads, b.HeadDim)
}

// shows says whether request r's query i sees key j under the custom mask (bit i*kvLen + j,
// least significant first); true without one.
func (c *testCase) shows(r, i, j int) bool {
	b := &c.batch
	if len(b.MaskIndptr) == 0 {
		return true
	}
	bit := i*c.requests[r].kvLen + j
	return b.CustomMask[int(b.MaskIndptr[r])+bit/8]>>(bit%8)&1 != 0
}

// reference is naive attention in float64 over the stored values, with this test's own index
// math for the cache layout.
func (c *testCase) reference() (out, lse []float64) {
	b := &c.batch
	hq, hk, d, ps := int(b.NumQOHeads), int(b.NumKVHeads), int(b.HeadDim), int(b.PageSize)
	scale := 1 / math.Sqrt(float64(d))
	if b.SMScale != 0 {
		scale = float64(b.SMScale)
	}
	at := func(page int32, tok, h int) int {
		if c.hnd {
			return ((int(page)*hk+h)*ps + tok) * d
		}
		return ((int(page)*ps+tok)*hk + h) * d
	}
	out = make([]float64, c.totalQ()*hq*d)
	lse = make([]float64, c.totalQ()*hq)
	for r, req := range c.requests {
		for i := 0; i < req.qLen; i++ {
			tok := int(b.QOIndptr[r]) + i
			visible := req.kvLen
			// A custom mask replaces the causal mask.
			if b.Causal && len(b.MaskIndptr) == 0 {
				visible = req.kvLen - req.qLen + i + 1
			}
			// The window counts back from the query's position kv_len - q_len + i.
			first := 0
			if c.windowLeft >= 0 {
				first = max(0, req.kvLen-req.qLen+i-c.windowLeft)
			}
			for h := 0; h < hq; h++ {
				kvh := h / (hq / hk)
				s := make([]float64, visible-first)
				m := math.Inf(-1)
				for jj := range s {
					j := first + jj
					if !c.shows(r, i, j) {
						s[jj] = math.Inf(-1)
						continue
					}
					base := at(b.KVPageIndices[int(b.KVIndptr[r])+j/ps], j%ps, kvh)
					dot := 0.0
					for e := 0; e < d; e++ {
						dot += float64(c.q.get((tok*hq+h)*d+e)) * float64(c.k.get(base+e)) * c.scale(false, kvh)
					}
					s[jj] = dot * scale
					if c.softCap > 0 {
						s[jj] = float64(c.softCap) * math.Tanh(s[jj]/float64(c.softCap))
					}
					m = math.Max(m, s[jj])
				}
				z := 0.0
				for _, x := range s {
					z += math.Exp(x - m)
				}
				for jj, x := range s {
					j := first + jj
					base := at(b.KVPageIndices[int(b.KVIndptr[r])+j/ps], j%ps, kvh)
					p := math.Exp(x-m) / z
					for e := 0; e < d; e++ {
						out[(tok*hq+h)*d+e] += p * float64(c.v.get(base+e)) * c.scale(true, kvh)
					}
				}
				lse[tok*hq+h] = m + math.Log(z)
			}
		}
	}
	return out, lse
}

func cpuContext(t testing.TB) *packinfer.Context {
	ctx, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCPU, NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	return ctx
}

// must(f())(t) is f's value, or a fatal test error.
func must[T any](v T, err error) func(testing.TB) T {
	return func(t testing.TB) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// runAndCompare runs one layer and checks O and LSE against the reference.
func runAndCompare(t *testing.T, c *testCase, launch *packinfer.Launch) {
	t.Helper()
	b := &c.batch
	o := newTensor(t, b.DType, c.totalQ()*int(b.NumQOHeads*b.HeadDim))
	for i := 0; i < o.n; i++ {
		o.set(i, float32(math.NaN())) // an unwritten element shows
	}
	lse := newTensor(t, packinfer.F32, c.totalQ()*int(b.NumQOHeads))
	for i := 0; i < lse.n; i++ {
		lse.set(i, float32(math.NaN()))
	}
	args := packinfer.RunArgs{Q: c.q.buf.Ptr(), KV: c.layout(), O: o.buf.Ptr(), LSE: lse.buf.Ptr(), LogitsSoftCap: c.softCap,
		KScale: c.kScale, VScale: c.vScale}
	if c.kHeads != nil {
		args.KHeadScales, args.VHeadScales = c.kHeads.buf.Ptr(), c.vHeads.buf.Ptr()
	}
	if err := launch.Run(&args); err != nil {
		t.Fatal(err)
	}
	refO, refLSE := c.reference()
	tol := map[packinfer.DType]float64{packinfer.F32: 1e-4, packinfer.F16: 2e-3, packinfer.BF16: 1.6e-2}[b.DType]
	bad := 0
	for i, want := range refO {
		if got := float64(o.get(i)); !(math.Abs(got-want) <= tol*(1+math.Abs(want))) && bad < 5 {
			bad++
			hd := int(b.HeadDim)
			t.Errorf("O[token %d, head %d, dim %d] = %v, reference %v", i/(int(b.NumQOHeads)*hd), (i/hd)%int(b.NumQOHeads), i%hd, got, want)
		}
	}
	for i, want := range refLSE {
		if got := float64(lse.get(i)); !(math.Abs(got-want) <= 1e-4*(1+math.Abs(want))) && bad < 5 {
			bad++
			t.Errorf("LSE[%d] = %v, reference %v", i, got, want)
		}
	}
}

func fullStep(t *testing.T, c *testCase, opts *packinfer.PlanOptions) {
	ctx := cpuContext(t)
	defer ctx.Close()
	plan := must(ctx.NewPlan(&c.batch, opts))(t)
	defer plan.Close()
	st := must(plan.Stats())(t)
	if st.NumRequests != uint32(len(c.requests)) || st.NumWorkItems < 1 || !(st.TileUtilization > 0 && st.TileUtilization <= 1) {
		t.Errorf("stats: %+v", st)
	}
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	if ready := must(launch.Ready())(t); !ready {
		t.Error("a CPU launch is ready at once")
	}
	if err := launch.Wait(); err != nil {
		t.Fatal(err)
	}
	runAndCompare(t, c, launch)
}

var mixed = []request{{1, 70}, {37, 37}, {1, 130}, {5, 40}, {1, 1}}

func TestFlows(t *testing.T) {
	t.Run("F32CausalMixedNHD", func(t *testing.T) {
		fullStep(t, newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0), nil)
	})
	t.Run("F16CausalMixedHND", func(t *testing.T) {
		fullStep(t, newCase(t, 8, 2, 64, packinfer.F16, true, 16, mixed, true, nil, 0), nil)
	})
	t.Run("BF16NonCausalHeadDim128", func(t *testing.T) {
		fullStep(t, newCase(t, 4, 4, 128, packinfer.BF16, false, 8, mixed, false, nil, 0), nil)
	})
	t.Run("F16PageSizeOneExplicitScale", func(t *testing.T) {
		c := newCase(t, 2, 1, 64, packinfer.F16, true, 1, []request{{3, 20}, {1, 9}}, false, nil, 0)
		c.batch.SMScale = 0.05
		fullStep(t, c, nil)
	})
	t.Run("BF16SharedPrefix", func(t *testing.T) {
		fullStep(t, newCase(t, 8, 1, 64, packinfer.BF16, true, 4, []request{{1, 41}, {2, 50}, {1, 33}, {4, 12}}, false, []int32{0, 1, 2}, 32), nil)
	})
	t.Run("AblationFlags", func(t *testing.T) {
		c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
		fullStep(t, c, &packinfer.PlanOptions{Flags: packinfer.NoPacking | packinfer.NoBalancing | packinfer.NoSplitKV})
		fullStep(t, c, &packinfer.PlanOptions{Flags: packinfer.Deterministic, SplitKeys: 64})
	})
	t.Run("SlidingWindowAndSoftCap", func(t *testing.T) {
		// The window is fixed by the plan; the soft-cap comes with each run of one launch.
		c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, []request{{1, 70}, {37, 60}, {1, 130}, {5, 40}}, false, nil, 0)
		c.windowLeft = 9
		ctx := cpuContext(t)
		defer ctx.Close()
		plan := must(ctx.NewPlan(&c.batch, &packinfer.PlanOptions{Flags: packinfer.SlidingWindow, WindowLeft: 9}))(t)
		defer plan.Close()
		launch := must(ctx.NewLaunch(plan, nil))(t)
		defer launch.Close()
		for _, cap := range []float32{0, 3, 30} {
			c.softCap = cap
			runAndCompare(t, c, launch)
		}
		// Non-causal, with deterministic splits.
		nc := newCase(t, 4, 4, 128, packinfer.BF16, false, 8, mixed, false, nil, 0)
		nc.windowLeft, nc.softCap = 20, 5
		fullStep(t, nc, &packinfer.PlanOptions{Flags: packinfer.SlidingWindow | packinfer.Deterministic, SplitKeys: 16, WindowLeft: 20})
	})
}

// A custom mask replaces causal (the batch says causal); a window and soft-cap still apply,
// with and without splits. Bad offsets are named; a short MaskIndptr is caught by the binding.
// An fp8 e4m3 cache: Batch.KVDType at plan time, the scales with each run (per tensor, per KV
// head, both), with a window, a soft-cap and splits; scales with a bf16 cache are refused by name.
func TestFP8Cache(t *testing.T) {
	c := newCase(t, 8, 2, 64, packinfer.BF16, true, 16, mixed, true, nil, 0)
	c.toFP8(t)
	c.windowLeft = 30
	c.softCap = 20
	ctx := cpuContext(t)
	defer ctx.Close()
	plan := must(ctx.NewPlan(&c.batch, &packinfer.PlanOptions{Flags: packinfer.SlidingWindow | packinfer.Deterministic, SplitKeys: 16, WindowLeft: 30}))(t)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	c.kScale, c.vScale = 0.07, 0.05
	runAndCompare(t, c, launch)
	c.kHeads, c.vHeads = newTensor(t, packinfer.F32, 2), newTensor(t, packinfer.F32, 2)
	c.kHeads.set(0, 0.5)
	c.kHeads.set(1, 2)
	c.vHeads.set(0, 1.5)
	c.vHeads.set(1, 0.25)
	runAndCompare(t, c, launch)
	c.kScale, c.vScale = 0, 0 // 0 = 1
	runAndCompare(t, c, launch)
	// Scales for a bf16 cache are a mistake, not ignored.
	plain := newCase(t, 8, 2, 64, packinfer.BF16, true, 16, mixed, false, nil, 0)
	p2 := must(ctx.NewPlan(&plain.batch, nil))(t)
	defer p2.Close()
	l2 := must(ctx.NewLaunch(p2, nil))(t)
	defer l2.Close()
	o := newTensor(t, packinfer.BF16, plain.totalQ()*8*64)
	err := l2.Run(&packinfer.RunArgs{Q: plain.q.buf.Ptr(), KV: plain.layout(), O: o.buf.Ptr(), KScale: 0.5})
	wantError(t, err, packinfer.StatusInvalidArgument, "k_scale = 0.5")
	// A K/V dtype other than Q's or fp8, by name.
	plain.batch.KVDType = packinfer.F32
	_, err = ctx.NewPlan(&plain.batch, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "kv_dtype = f32 with dtype = bf16")
}

func TestCustomMask(t *testing.T) {
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, []request{{4, 70}, {37, 60}, {1, 130}, {5, 40}}, false, nil, 0)
	rng := rand.New(rand.NewSource(11))
	b := &c.batch
	b.MaskIndptr = []int32{0}
	for _, req := range c.requests {
		bytes := make([]byte, (req.qLen*req.kvLen+7)/8)
		for i := 0; i < req.qLen; i++ {
			for j := 0; j < req.kvLen; j++ {
				// The query's own position always shows (inside any window), so every row sees
				// a key; the rest with probability 0.4.
				if j == req.kvLen-req.qLen+i || rng.Float64() < 0.4 {
					bit := i*req.kvLen + j
					bytes[bit/8] |= 1 << (bit % 8)
				}
			}
		}
		b.CustomMask = append(b.CustomMask, bytes...)
		b.MaskIndptr = append(b.MaskIndptr, int32(len(b.CustomMask)))
	}
	c.windowLeft, c.softCap = 30, 5
	fullStep(t, c, &packinfer.PlanOptions{Flags: packinfer.SlidingWindow, WindowLeft: 30})
	fullStep(t, c, &packinfer.PlanOptions{Flags: packinfer.SlidingWindow | packinfer.Deterministic, SplitKeys: 16, WindowLeft: 30})
	// The mask matters: its reference differs from the unmasked one.
	masked, _ := c.reference()
	plain := *c
	plain.batch.MaskIndptr, plain.batch.CustomMask = nil, nil
	unmasked, _ := plain.reference()
	same := true
	for i := range masked {
		same = same && masked[i] == unmasked[i]
	}
	if same {
		t.Fatal("the mask changed nothing")
	}
	ctx := cpuContext(t)
	defer ctx.Close()
	bad := *b
	bad.MaskIndptr = append([]int32{}, b.MaskIndptr...)
	bad.MaskIndptr[1]++
	bad.CustomMask = append(append([]byte{}, b.CustomMask...), 0)
	_, err := ctx.NewPlan(&bad, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "mask_indptr[1] - mask_indptr[0]")
	bad.MaskIndptr = bad.MaskIndptr[:2]
	_, err = ctx.NewPlan(&bad, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "Batch.MaskIndptr has 2 entries")
}

func TestLaunchOutlivesPlanAndContextAndRunsManyLayers(t *testing.T) {
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	ctx := cpuContext(t)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	st := must(plan.Stats())(t)
	scratch := must(packinfer.NewHostBuffer(int(st.ScratchBytes) + 4))(t)
	defer scratch.Free()
	launch := must(ctx.NewLaunch(plan, &packinfer.LaunchOptions{Scratch: scratch.Ptr(), ScratchBytes: uintptr(scratch.Len())}))(t)
	defer launch.Close()
	if err := plan.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ctx.Close(); err != nil {
		t.Fatal(err)
	}
	for layer := 0; layer < 3; layer++ {
		for i := 0; i < c.q.n; i++ {
			c.q.set(i, c.q.get(i)*-0.5+0.1*float32(layer))
		}
		runAndCompare(t, c, launch)
	}
}

func TestContextInfoAndVersion(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	info := must(ctx.Info())(t)
	if info.Backend != packinfer.BackendCPU || info.DeviceName != "cpu" || info.NumWorkers != 2 {
		t.Errorf("info = %+v", info)
	}
	if packinfer.ABIVersion() != packinfer.HeaderABIVersion {
		t.Errorf("library ABI %d, header ABI %d", packinfer.ABIVersion(), packinfer.HeaderABIVersion)
	}
	if packinfer.Version() == "" {
		t.Error("empty version")
	}
	auto := must(packinfer.NewContext(packinfer.ContextOptions{}))(t)
	defer auto.Close()
	if i := must(auto.Info())(t); i.Backend == packinfer.BackendAuto {
		t.Errorf("AUTO context reports backend %v", i.Backend)
	}
}

// ---- errors ----

// wantError checks err's status, that its message contains needle, and its Error() text.
func wantError(t *testing.T, err error, status packinfer.Status, needle string) *packinfer.Error {
	t.Helper()
	var e *packinfer.Error
	if !errors.As(err, &e) {
		t.Fatalf("got %v, want a *packinfer.Error with %v", err, status)
	}
	if e.Status != status || !strings.Contains(e.Message, needle) {
		t.Errorf("got %v: %q, want %v with %q", e.Status, e.Message, status, needle)
	}
	if e.Error() != status.String()+": "+e.Message || packinfer.StatusOf(fmt.Errorf("wrapped: %w", err)) != status {
		t.Errorf("Error() = %q", e.Error())
	}
	return e
}

func TestInvalidArgumentNamesTheValue(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	b := c.batch
	b.KVLastPageLen = append([]int32(nil), c.batch.KVLastPageLen...)
	b.KVLastPageLen[1] = 99
	_, err := ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "kv_last_page_len[1] = 99")
	b = c.batch
	b.NumQOHeads = 7
	_, err = ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "num_qo_heads = 7")
	b = c.batch
	b.PrefixGroups = []packinfer.PrefixGroup{{PrefixLen: 8, Members: []int32{2}}}
	_, err = ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "prefix_groups[0] has 1 member")
	_, err = ctx.NewPlan(nil, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "batch is nil")
	_, err = packinfer.NewHostBuffer(0)
	wantError(t, err, packinfer.StatusInvalidArgument, "n = 0 bytes")
}

func TestBindingChecksSliceLengths(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	b := c.batch
	b.QOIndptr = b.QOIndptr[:3]
	_, err := ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "Batch.QOIndptr has 3 entries; it needs 6")
	b = c.batch
	b.KVIndptr = append(append([]int32(nil), b.KVIndptr...), 99)
	_, err = ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "Batch.KVIndptr has 7 entries; it needs 6")
	b = c.batch
	b.KVPageIndices = b.KVPageIndices[:2]
	_, err = ctx.NewPlan(&b, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, fmt.Sprintf("Batch.KVPageIndices has 2 entries but KVIndptr[5] = %d", c.batch.KVIndptr[5]))
}

func TestUnsupportedHeadDim(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	c.batch.HeadDim = 100
	_, err := ctx.NewPlan(&c.batch, nil)
	wantError(t, err, packinfer.StatusUnsupported, "head_dim = 100")
}

func TestNoDeviceForCUDAWithoutGPU(t *testing.T) {
	if _, err := os.Stat("/dev/nvidia0"); err == nil {
		t.Skip("/dev/nvidia0 exists: this machine may have a GPU")
	}
	_, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCUDA})
	e := wantError(t, err, packinfer.StatusNoDevice, "packinfer_context_create: ")
	if !strings.Contains(e.Message, "CUDA") && !strings.Contains(e.Message, "NVRTC") && !strings.Contains(e.Message, "cuInit") {
		t.Errorf("NO_DEVICE gives no reason: %q", e.Message)
	}
}

// TestCUDAContextPlansAndLaunches is GPU only: a CUDA context where one is usable, its info, and
// a plan and a launch for a bf16 batch (the launch compiles and loads the kernels). Without a
// usable device it is skipped (t.Skip, shown as SKIP); PACKINFER_REQUIRE_GPU=1 makes that a
// failure.
func TestCUDAContextPlansAndLaunches(t *testing.T) {
	ctx, err := packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCUDA})
	if st := packinfer.StatusOf(err); st == packinfer.StatusNoDevice || st == packinfer.StatusUnsupported {
		if os.Getenv("PACKINFER_REQUIRE_GPU") == "1" {
			t.Fatalf("PACKINFER_REQUIRE_GPU=1 but CUDA is unusable here: %v", err)
		}
		t.Skipf("no usable CUDA device here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	info := must(ctx.Info())(t)
	if info.Backend != packinfer.BackendCUDA || info.DeviceName == "" {
		t.Errorf("info = %+v", info)
	}
	c := newCase(t, 8, 2, 128, packinfer.BF16, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	if st := must(plan.Stats())(t); st.NumWorkItems < 1 {
		t.Errorf("plan stats %+v", st)
	}
}

func TestRunArguments(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	o := newTensor(t, packinfer.F32, c.totalQ()*8*64)
	err := launch.Run(&packinfer.RunArgs{Q: 0, KV: c.layout(), O: o.buf.Ptr()})
	wantError(t, err, packinfer.StatusInvalidArgument, "q is a null pointer")
	err = launch.Run(&packinfer.RunArgs{Q: c.q.buf.Ptr(), QStrideToken: -5, KV: c.layout(), O: o.buf.Ptr()})
	wantError(t, err, packinfer.StatusInvalidArgument, "q strides (-5, 0)")
	wantError(t, launch.Run(nil), packinfer.StatusInvalidArgument, "args is nil")
	_, err = ctx.NewLaunch(nil, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "plan is nil")
}

func TestUseAfterClose(t *testing.T) {
	ctx := cpuContext(t)
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	launch := must(ctx.NewLaunch(plan, nil))(t)
	o := newTensor(t, packinfer.F32, c.totalQ()*8*64)
	args := &packinfer.RunArgs{Q: c.q.buf.Ptr(), KV: c.layout(), O: o.buf.Ptr()}

	if err := launch.Close(); err != nil {
		t.Fatal(err)
	}
	wantError(t, launch.Run(args), packinfer.StatusInvalidHandle, "launch handle")
	_, err := launch.Ready()
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	wantError(t, launch.Wait(), packinfer.StatusInvalidHandle, "was destroyed")
	wantError(t, launch.Close(), packinfer.StatusInvalidHandle, "was destroyed")

	if err := plan.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = plan.Stats()
	wantError(t, err, packinfer.StatusInvalidHandle, "plan handle")
	_, err = ctx.NewLaunch(plan, nil)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	wantError(t, plan.Close(), packinfer.StatusInvalidHandle, "was destroyed")

	if err := ctx.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = ctx.Info()
	wantError(t, err, packinfer.StatusInvalidHandle, "context handle")
	_, err = ctx.NewPlan(&c.batch, nil)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	wantError(t, ctx.Close(), packinfer.StatusInvalidHandle, "was destroyed")
}

// Each goroutine's error carries its own message although the library keeps the message per OS
// thread and goroutines move between threads.
func TestErrorsFromManyGoroutines(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				b := c.batch
				b.KVLastPageLen = append([]int32(nil), c.batch.KVLastPageLen...)
				b.KVLastPageLen[1] = int32(100 + g)
				_, err := ctx.NewPlan(&b, nil)
				want := fmt.Sprintf("kv_last_page_len[1] = %d ", 100+g)
				if e, ok := err.(*packinfer.Error); !ok || !strings.Contains(e.Message, want) {
					errs <- fmt.Sprintf("goroutine %d got %v, want %q", g, err, want)
					return
				}
				if i%10 == 0 { // successful calls in between, on whatever thread
					p, err := ctx.NewPlan(&c.batch, nil)
					if err != nil {
						errs <- err.Error()
						return
					}
					p.Close()
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestStatusNames(t *testing.T) {
	for s, want := range map[packinfer.Status]string{
		packinfer.StatusOK:            "PACKINFER_STATUS_OK",
		packinfer.StatusNoDevice:      "PACKINFER_STATUS_NO_DEVICE",
		packinfer.StatusPoolExhausted: "PACKINFER_STATUS_POOL_EXHAUSTED",
		packinfer.StatusInternal:      "PACKINFER_STATUS_INTERNAL",
		packinfer.Status(42):          "PACKINFER_STATUS(42)",
	} {
		if s.String() != want {
			t.Errorf("%d: %q, want %q", int(s), s.String(), want)
		}
	}
	if packinfer.StatusOf(nil) != packinfer.StatusOK || packinfer.StatusOf(errors.New("x")) != packinfer.StatusInternal {
		t.Error("StatusOf")
	}
}

// The managed KV pool flow (packinfer_kv_pool_*) is not in the C API yet; its tests come with it.

// ---- call overhead: one plan + one run of a small decode batch ----
//
// The contexts have one CPU thread so that thread start-up does not hide the call overhead;
// BenchmarkRunEmptyBatch is the binding's and the C ABI's own cost, with no attention to compute.

func benchCase(b *testing.B) *testCase {
	return newCase(b, 8, 2, 64, packinfer.F16, true, 16, []request{{1, 16}, {1, 9}, {1, 30}, {1, 2}}, false, nil, 0)
}

func benchContext(b *testing.B) *packinfer.Context {
	return must(packinfer.NewContext(packinfer.ContextOptions{Backend: packinfer.BackendCPU, NumThreads: 1}))(b)
}

// BenchmarkPlanLaunchRun is a whole step: plan, launch, one layer, close both.
func BenchmarkPlanLaunchRun(b *testing.B) {
	c := benchCase(b)
	ctx := benchContext(b)
	defer ctx.Close()
	o := newTensor(b, packinfer.F16, c.totalQ()*8*64)
	args := &packinfer.RunArgs{Q: c.q.buf.Ptr(), KV: c.layout(), O: o.buf.Ptr()}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		plan, err := ctx.NewPlan(&c.batch, nil)
		if err != nil {
			b.Fatal(err)
		}
		launch, err := ctx.NewLaunch(plan, nil)
		if err != nil {
			b.Fatal(err)
		}
		if err := launch.Run(args); err != nil {
			b.Fatal(err)
		}
		launch.Close()
		plan.Close()
	}
}

// BenchmarkRun is the per-layer call alone.
func BenchmarkRun(b *testing.B) {
	c := benchCase(b)
	ctx := benchContext(b)
	defer ctx.Close()
	plan := must(ctx.NewPlan(&c.batch, nil))(b)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(b)
	defer launch.Close()
	o := newTensor(b, packinfer.F16, c.totalQ()*8*64)
	args := &packinfer.RunArgs{Q: c.q.buf.Ptr(), KV: c.layout(), O: o.buf.Ptr()}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := launch.Run(args); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRunEmptyBatch is one Run of a step without requests: cgo, handle lookup, argument
// checks and the error path setup, nothing else.
func BenchmarkRunEmptyBatch(b *testing.B) {
	ctx := benchContext(b)
	defer ctx.Close()
	batch := packinfer.Batch{NumQOHeads: 8, NumKVHeads: 2, HeadDim: 64, DType: packinfer.F16, Causal: true,
		QOIndptr: []int32{0}, KVIndptr: []int32{0}, KVLastPageLen: []int32{}, PageSize: 16, NumPages: 1}
	plan := must(ctx.NewPlan(&batch, nil))(b)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(b)
	defer launch.Close()
	args := &packinfer.RunArgs{}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := launch.Run(args); err != nil {
			b.Fatal(err)
		}
	}
}
