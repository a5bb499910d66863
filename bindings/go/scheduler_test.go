package packinfer_test

// Tests of the scheduler handle (Scheduler) on the CPU backend: a serving loop with every step
// planned by the scheduler, run and recorded; each part switched off; bad arguments and use after
// Close.

import (
	"math"
	"testing"
	"time"

	packinfer "github.com/packinfer/packinfer/bindings/go"
)

// serveScheduled runs a prefill step (first[i] tokens of each sequence) then decodes steps of one
// token each, every step planned by sched, run on every layer and its time recorded.
func serveScheduled(t *testing.T, ctx *packinfer.Context, pool *packinfer.Pool, sched *packinfer.Scheduler, ids []uint64, first []uint32, decodes int) []packinfer.SchedulerStep {
	t.Helper()
	return serveScheduledInto(t, ctx, pool, sched, ids, first, decodes, nil)
}

// serveScheduledInto is serveScheduled; with kept, every step re-plans *kept (Scheduler.Replan),
// the first step's plan when *kept is nil, and leaves it open for the caller to close.
func serveScheduledInto(t *testing.T, ctx *packinfer.Context, pool *packinfer.Pool, sched *packinfer.Scheduler, ids []uint64, first []uint32, decodes int, kept **packinfer.Plan) []packinfer.SchedulerStep {
	t.Helper()
	var steps []packinfer.SchedulerStep
	for step := 0; step <= decodes; step++ {
		q := first
		if step > 0 {
			q = make([]uint32, len(ids))
			for i := range q {
				q[i] = 1
			}
		}
		total := 0
		for i, id := range ids {
			must(pool.Append(id, q[i], 0))(t)
			total += int(q[i])
		}
		var plan *packinfer.Plan
		var st packinfer.SchedulerStep
		var err error
		if kept != nil && *kept != nil {
			plan = *kept
			st, err = sched.Replan(ctx, plan, ids, q, nil, 0)
		} else {
			plan, st, err = sched.NewPlan(ctx, ids, q, nil, 0)
			if kept != nil && err == nil {
				*kept = plan
			}
		}
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		steps = append(steps, st)
		launch := must(ctx.NewLaunch(plan, nil))(t)
		n := total * poolQOHeads * poolHeadDim
		qb := must(packinfer.NewHostBuffer(2 * n))(t)
		ob := must(packinfer.NewHostBuffer(2 * n))(t)
		start := time.Now()
		for l := uint32(0); l < poolLayers; l++ {
			kv := must(pool.KVLayout(l))(t)
			if err := launch.Run(&packinfer.RunArgs{Q: qb.Ptr(), KV: kv, O: ob.Ptr()}); err != nil {
				t.Fatal(err)
			}
		}
		if err := sched.Record(time.Since(start).Seconds(), 0); err != nil {
			t.Fatal(err)
		}
		launch.Close()
		if kept == nil {
			plan.Close()
		}
		qb.Free()
		ob.Free()
	}
	return steps
}

func TestSchedulerServingLoop(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	o := poolOptions(t)
	o.NumPages = 400
	pool := must(ctx.NewPool(o))(t)
	defer pool.Close()
	d := packinfer.DefaultSchedulerOptions()
	if d.Flags != 0 || d.HorizonSteps != 32 || d.CapacityFactor != 1 || d.ContiguousGain >= 0 || d.ExploreFraction <= 0 {
		t.Errorf("DefaultSchedulerOptions() = %+v, want the C API's defaults", d)
	}
	sched := must(pool.NewScheduler(nil))(t)
	defer sched.Close()
	var ids []uint64
	for i := 0; i < 5; i++ {
		ids = append(ids, must(pool.CreateSequence())(t))
	}
	steps := serveScheduled(t, ctx, pool, sched, ids, []uint32{3, 17, 9, 30, 5}, 20)
	if !steps[0].Regrouped {
		t.Error("the first step makes the first grouping")
	}
	st := must(sched.Stats())(t)
	if st.Steps != 21 || st.Regroups < 1 || st.CapacitySearches != 1 || st.AttentionSeconds <= 0 {
		t.Errorf("stats = %+v", st)
	}
	if st.Relayouts != st.Probes {
		t.Errorf("nothing measured a gain, so every relayout is a probe: %+v", st)
	}

	// Everything off: the automatic capacity times the factor, nothing moves, no grouping kept.
	pool2 := must(ctx.NewPool(o))(t)
	defer pool2.Close()
	off := packinfer.DefaultSchedulerOptions()
	off.Flags = packinfer.SchedulerNoTuning | packinfer.SchedulerNoRegroup | packinfer.SchedulerNoRelayout
	off.CapacityFactor = 2
	sched2 := must(pool2.NewScheduler(&off))(t)
	defer sched2.Close()
	ids2 := []uint64{must(pool2.CreateSequence())(t), must(pool2.CreateSequence())(t)}
	for _, s := range serveScheduled(t, ctx, pool2, sched2, ids2, []uint32{20, 7}, 5) {
		if s.CapacityFactor != 2 || s.Relayout || s.DuePages != 0 {
			t.Errorf("step = %+v", s)
		}
	}
	st2 := must(sched2.Stats())(t)
	if st2.Regroups != 0 || st2.Relayouts != 0 || st2.CapacitySearches != 0 || !math.IsNaN(st2.ContiguousGainDecode) {
		t.Errorf("stats = %+v", st2)
	}
}

func TestSchedulerReplanDecidesAsNewPlan(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	o := poolOptions(t)
	o.NumPages = 400
	// Decisions that do not depend on measured times: a fixed factor, no relayouts.
	so := packinfer.DefaultSchedulerOptions()
	so.Flags = packinfer.SchedulerNoTuning | packinfer.SchedulerNoRelayout
	so.CapacityFactor = 0.4
	var runs [2][]packinfer.SchedulerStep
	var kept *packinfer.Plan
	for r := range runs {
		pool := must(ctx.NewPool(o))(t)
		sched := must(pool.NewScheduler(&so))(t)
		var ids []uint64
		for i := 0; i < 5; i++ {
			ids = append(ids, must(pool.CreateSequence())(t))
		}
		var into **packinfer.Plan
		if r == 1 {
			into = &kept
		}
		runs[r] = serveScheduledInto(t, ctx, pool, sched, ids, []uint32{3, 17, 9, 30, 5}, 10, into)
		sched.Close()
		pool.Close()
	}
	if kept == nil {
		t.Fatal("no plan kept")
	}
	kept.Close()
	for i := range runs[0] {
		a, b := runs[0][i], runs[1][i]
		if a.Capacity != b.Capacity || a.CapacityFactor != 0.4 || a.Regrouped != b.Regrouped || a.Imbalance != b.Imbalance {
			t.Errorf("step %d: NewPlan %+v, Replan %+v", i, a, b)
		}
	}
	if _, err := (&packinfer.Scheduler{}).Replan(ctx, nil, nil, nil, nil, 0); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("Replan of a nil plan: %v", err)
	}
}

func TestSchedulerErrors(t *testing.T) {
	ctx := cpuContext(t)
	defer ctx.Close()
	pool := must(ctx.NewPool(poolOptions(t)))(t)
	defer pool.Close()
	bad := packinfer.DefaultSchedulerOptions()
	bad.HorizonSteps = 0
	if _, err := pool.NewScheduler(&bad); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("HorizonSteps 0: %v", err)
	}
	bad = packinfer.DefaultSchedulerOptions()
	bad.Flags = 1 << 10
	if _, err := pool.NewScheduler(&bad); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("unknown flag: %v", err)
	}
	sched := must(pool.NewScheduler(nil))(t)
	if err := sched.Record(1e-3, 0); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("Record without a step: %v", err)
	}
	id := must(pool.CreateSequence())(t)
	must(pool.Append(id, 4, 0))(t)
	if _, _, err := sched.NewPlan(ctx, []uint64{id}, nil, nil, 0); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("unpaired slices: %v", err)
	}
	if _, _, err := sched.NewPlan(nil, []uint64{id}, []uint32{4}, nil, 0); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("nil context: %v", err)
	}
	plan, _, err := sched.NewPlan(ctx, []uint64{id}, []uint32{4}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	plan.Close()
	if err := sched.Record(math.NaN(), 0); packinfer.StatusOf(err) != packinfer.StatusInvalidArgument {
		t.Errorf("NaN time: %v", err)
	}
	if err := sched.Record(1e-3, 0); err != nil {
		t.Error(err)
	}
	if err := sched.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := sched.Stats(); packinfer.StatusOf(err) != packinfer.StatusInvalidHandle {
		t.Errorf("Stats after Close: %v", err)
	}
	if err := sched.Close(); packinfer.StatusOf(err) != packinfer.StatusInvalidHandle {
		t.Errorf("second Close: %v", err)
	}
}
