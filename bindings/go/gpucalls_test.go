package packinfer_test

// The calls the CUDA backend added (Precompile, Calibrate, NewLaunchWithCapacity, Update), pinned
// down on the CPU backend: what each does there, and each bad argument.

import (
	"strings"
	"testing"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

func TestPrecompileIsANoOpAndCalibrateIsUnsupportedOnCPU(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	for i := 0; i < 2; i++ {
		if err := ctx.Precompile(); err != nil {
			t.Fatalf("Precompile #%d: %v", i+1, err)
		}
	}
	wantError(t, ctx.Calibrate(), packinfer.StatusUnsupported,
		"packinfer_context_calibrate: only the CUDA backend calibrates its cost model")
	// Planning and running still work after the failed calibration.
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	defer plan.Close()
	launch := must(ctx.NewLaunch(plan, nil))(t)
	defer launch.Close()
	runAndCompare(t, c, launch)
}

func TestCapacityLaunchRunsAndUpdatesOnCPU(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.BF16, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	defer plan.Close()
	// The next step's batch: same shape, fewer and shorter requests, so it fits every launch below.
	d := newCase(t, 8, 2, 64, packinfer.BF16, true, 16, []request{{1, 60}, {30, 30}, {1, 100}}, false, nil, 0)
	next := must(ctx.NewPlan(&d.batch, nil))(t)
	defer next.Close()
	roomy := packinfer.LaunchCapacity{MaxWorkItems: 512, MaxRowSegments: 512, MaxKVChunks: 512, MaxRequests: 512,
		MaxPages: 512, MaxMergeRows: 512, MaxMergeSlots: 512, MaxGroups: 512, MaxPartialSlots: 512}
	tight := packinfer.LaunchCapacity{MaxWorkItems: 1, MaxRequests: 1, MaxPages: 1} // below the plan: grown to it, not an error
	for _, tc := range []struct {
		name string
		cap  packinfer.LaunchCapacity
	}{{"zero value", packinfer.LaunchCapacity{}}, {"roomy", roomy}, {"below the plan", tight}} {
		t.Run(tc.name, func(t *testing.T) {
			launch := must(ctx.NewLaunchWithCapacity(plan, &tc.cap, nil))(t)
			defer launch.Close()
			if ready := must(launch.Ready())(t); !ready {
				t.Error("a CPU launch is ready at once")
			}
			runAndCompare(t, c, launch)
			if err := launch.Update(next, 0); err != nil {
				t.Fatal(err)
			}
			runAndCompare(t, d, launch)
			// Back to the first batch: a second layer.
			if err := launch.Update(plan, 0); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < c.q.n; i++ {
				c.q.set(i, -c.q.get(i))
			}
			runAndCompare(t, c, launch)
		})
	}

	// A plan bigger than the launch's capacity is refused, naming the count; the launch keeps its plan.
	big := newCase(t, 8, 2, 64, packinfer.BF16, true, 16, append(append([]request{}, mixed...), request{9, 300}, request{1, 500}), false, nil, 0)
	bigger := must(ctx.NewPlan(&big.batch, nil))(t)
	defer bigger.Close()
	launch := must(ctx.NewLaunchWithCapacity(plan, &packinfer.LaunchCapacity{}, nil))(t)
	defer launch.Close()
	if s := must(launch.Suits(plan))(t); !s {
		t.Error("a launch does not suit its own plan")
	}
	if s := must(launch.Suits(bigger))(t); s {
		t.Error("a launch suits a plan over its capacity")
	}
	_, err := launch.Suits(nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "Suits: plan is nil")
	wantError(t, launch.Update(bigger, 0), packinfer.StatusInvalidArgument, "but the launch was created with capacity for")
	runAndCompare(t, c, launch)
	// An ordinary launch takes plans within its own plan's counts.
	plain := must(ctx.NewLaunch(plan, nil))(t)
	defer plain.Close()
	if err := plain.Update(next, 0); err != nil {
		t.Fatal(err)
	}
	runAndCompare(t, d, plain)
}

func TestCapacityLaunchWithCallerScratch(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	// Deterministic 64-key splits: the plan has split partials, so it needs scratch.
	plan := must(ctx.NewPlan(&c.batch, &packinfer.PlanOptions{Flags: packinfer.Deterministic, SplitKeys: 64}))(t)
	defer plan.Close()
	st := must(plan.Stats())(t)
	if st.ScratchBytes == 0 || st.NumSplitRequests == 0 {
		t.Fatalf("the plan was meant to split requests: %+v", st)
	}
	scratch := newTensor(t, packinfer.F32, int(st.ScratchBytes/4)+1)
	launch := must(ctx.NewLaunchWithCapacity(plan, &packinfer.LaunchCapacity{},
		&packinfer.LaunchOptions{Scratch: scratch.buf.Ptr(), ScratchBytes: uintptr(scratch.n * 4)}))(t)
	defer launch.Close()
	runAndCompare(t, c, launch)
	_, err := ctx.NewLaunchWithCapacity(plan, &packinfer.LaunchCapacity{}, &packinfer.LaunchOptions{Scratch: scratch.buf.Ptr(), ScratchBytes: 4})
	wantError(t, err, packinfer.StatusInvalidArgument, "scratch_bytes = 4 is smaller than")
}

func TestGPUCallsArgumentsAndClosedHandles(t *testing.T) {
	ctx := cpuContext(t)
	c := newCase(t, 8, 2, 64, packinfer.F32, true, 16, mixed, false, nil, 0)
	plan := must(ctx.NewPlan(&c.batch, nil))(t)
	launch := must(ctx.NewLaunchWithCapacity(plan, &packinfer.LaunchCapacity{}, nil))(t)

	_, err := ctx.NewLaunchWithCapacity(nil, &packinfer.LaunchCapacity{}, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "NewLaunchWithCapacity: plan is nil")
	_, err = ctx.NewLaunchWithCapacity(plan, nil, nil)
	wantError(t, err, packinfer.StatusInvalidArgument, "NewLaunchWithCapacity: capacity is nil")
	wantError(t, launch.Update(nil, 0), packinfer.StatusInvalidArgument, "Update: plan is nil")

	other := must(ctx.NewPlan(&c.batch, nil))(t)
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	wantError(t, launch.Update(other, 0), packinfer.StatusInvalidHandle, "was destroyed")
	_, err = ctx.NewLaunchWithCapacity(other, &packinfer.LaunchCapacity{}, nil)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")

	// The launch outlives its plan and context; closed, it is an invalid handle.
	if err := plan.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ctx.Close(); err != nil {
		t.Fatal(err)
	}
	wantError(t, ctx.Precompile(), packinfer.StatusInvalidHandle, "packinfer_context_precompile: ")
	wantError(t, ctx.Calibrate(), packinfer.StatusInvalidHandle, "packinfer_context_calibrate: ")
	_, err = ctx.NewLaunchWithCapacity(plan, &packinfer.LaunchCapacity{}, nil)
	wantError(t, err, packinfer.StatusInvalidHandle, "was destroyed")
	runAndCompare(t, c, launch)
	if err := launch.Close(); err != nil {
		t.Fatal(err)
	}
	ctx2 := cpuContext(t)
	defer ctx2.Close()
	fresh := must(ctx2.NewPlan(&c.batch, nil))(t)
	defer fresh.Close()
	wantError(t, launch.Update(fresh, 0), packinfer.StatusInvalidHandle, "was destroyed")
}

// The engine loop of docs/design.md ("Threads"): a goroutine re-plans step N+1 into one of two
// plans (Context.Replan) while this one runs step N's layers; then the launch is updated to it.
// Every layer of every step is checked against the reference.
func TestReplanNextStepWhileThisOneRuns(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	batches := [][]request{mixed, {{1, 60}, {30, 30}, {1, 100}}, {{1, 9}, {1, 33}, {12, 50}, {1, 77}}, {{64, 64}}, mixed}
	steps := make([]*testCase, len(batches))
	for i, b := range batches {
		steps[i] = newCase(t, 8, 2, 64, packinfer.BF16, true, 16, b, false, nil, 0)
	}
	plans := [2]*packinfer.Plan{must(ctx.NewPlan(&steps[0].batch, nil))(t), must(ctx.NewPlan(&steps[1].batch, nil))(t)}
	defer plans[0].Close()
	defer plans[1].Close()
	roomy := packinfer.LaunchCapacity{MaxWorkItems: 512, MaxRowSegments: 512, MaxKVChunks: 512, MaxRequests: 512,
		MaxPages: 4096, MaxMergeRows: 4096, MaxMergeSlots: 4096, MaxGroups: 512, MaxPartialSlots: 4096}
	launch := must(ctx.NewLaunchWithCapacity(plans[0], &roomy, nil))(t)
	defer launch.Close()
	for n := range steps {
		if n > 0 {
			if err := launch.Update(plans[n%2], 0); err != nil {
				t.Fatal(err)
			}
		}
		done := make(chan error, 1)
		if n > 0 && n+1 < len(steps) {
			go func() { done <- ctx.Replan(plans[(n+1)%2], &steps[n+1].batch, nil) }()
		} else {
			done <- nil
		}
		for layer := 0; layer < 2; layer++ {
			runAndCompare(t, steps[n], launch)
		}
		if err := <-done; err != nil {
			t.Fatalf("planning step %d: %v", n+1, err)
		}
	}
	// A bad batch: the error names the function; the plan is planned again afterwards.
	bad := steps[1].batch
	bad.KVLastPageLen = append([]int32{99}, bad.KVLastPageLen[1:]...)
	err := ctx.Replan(plans[0], &bad, nil)
	if e, ok := err.(*packinfer.Error); !ok || e.Status != packinfer.StatusInvalidArgument || !strings.Contains(e.Message, "packinfer_plan_update") {
		t.Fatalf("bad batch: %v", err)
	}
	if err := ctx.Replan(plans[0], &steps[2].batch, nil); err != nil {
		t.Fatal(err)
	}
	if st := must(plans[0].Stats())(t); st.NumRequests != uint32(len(batches[2])) {
		t.Fatalf("stats after replan: %+v", st)
	}
}
