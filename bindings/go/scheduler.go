package packinfer

/*
#include <stdint.h>
#include "packinfer.h"

static enum PackinferStatus pi_scheduler_plan(PackinferScheduler s, PackinferContext ctx, const uint64_t* seq_ids,
                                              const uint32_t* num_new_tokens, uint32_t n, const PackinferPlanOptions* o,
                                              uintptr_t stream, PackinferPlan* out, PackinferSchedulerStep* step) {
	return packinfer_scheduler_plan(s, ctx, seq_ids, num_new_tokens, n, o, (void*)stream, out, step);
}
static enum PackinferStatus pi_scheduler_plan_update(PackinferScheduler s, PackinferContext ctx, PackinferPlan plan,
                                                     const uint64_t* seq_ids, const uint32_t* num_new_tokens, uint32_t n,
                                                     const PackinferPlanOptions* o, uintptr_t stream, PackinferSchedulerStep* step) {
	return packinfer_scheduler_plan_update(s, ctx, plan, seq_ids, num_new_tokens, n, o, (void*)stream, step);
}
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// SchedulerFlags switch parts of a scheduler off (0 adapts everything).
type SchedulerFlags uint32

const (
	SchedulerNoTuning       SchedulerFlags = C.PACKINFER_SCHEDULER_FLAGS_NO_TUNING       // plan with CapacityFactor x automatic
	SchedulerNoRegroup      SchedulerFlags = C.PACKINFER_SCHEDULER_FLAGS_NO_REGROUP      // keep no grouping across steps
	SchedulerNoRelayout     SchedulerFlags = C.PACKINFER_SCHEDULER_FLAGS_NO_RELAYOUT     // never move pages
	SchedulerRelayoutAlways SchedulerFlags = C.PACKINFER_SCHEDULER_FLAGS_RELAYOUT_ALWAYS // move whenever due (comparisons)
)

// SchedulerOptions say how a scheduler adapts. Start from DefaultSchedulerOptions: the zero
// value is not the library's default (HorizonSteps 0 is refused).
type SchedulerOptions struct {
	Flags              SchedulerFlags
	HorizonSteps       uint32  // steps a layout is expected to serve
	CapacityFactor     float64 // with SchedulerNoTuning
	CopyBytesPerSecond float64 // 0 = measured from the relayouts
	ContiguousGain     float64 // attention share contiguous KV saves; negative = measured by probes
	ExploreFraction    float64 // share of attention time probes may cost
}

// DefaultSchedulerOptions are the library's defaults.
func DefaultSchedulerOptions() SchedulerOptions {
	var o C.PackinferSchedulerOptions
	C.packinfer_scheduler_options_default(&o)
	return SchedulerOptions{Flags: SchedulerFlags(o.flags), HorizonSteps: uint32(o.horizon_steps), CapacityFactor: float64(o.capacity_factor),
		CopyBytesPerSecond: float64(o.copy_bytes_per_second), ContiguousGain: float64(o.contiguous_gain), ExploreFraction: float64(o.explore_fraction)}
}

// SchedulerStep is what Scheduler.NewPlan decided and did.
type SchedulerStep struct {
	Capacity, CapacityFactor         float64
	Regrouped, Relayout, Probe       bool
	Imbalance, AccumulatedImbalance  float64 // in automatic capacities
	DuePages, PagesMoved, BytesMoved uint64
	PredictedGainSeconds             float64 // attention saved over the horizon by the relayout due
	PredictedCostSeconds             float64 // its copy (NaN before a copy rate is known)
	PlanSeconds, RelayoutSeconds     float64
}

// SchedulerStats are a scheduler's totals.
type SchedulerStats struct {
	Steps, Regroups, Relayouts, Probes, RelayoutsDeclined, BytesMoved uint64
	PlanSeconds, RelayoutSeconds, AttentionSeconds                    float64
	PredictedCostSeconds, PredictedGainSeconds, MeasuredGainSeconds   float64
	GainsMeasured                                                     uint64
	ContiguousGainDecode, ContiguousGainPrefill                       float64 // NaN: unmeasured
	CopyBytesPerSecond                                                float64
	CapacitySearches, ExploringSteps                                  uint64
	CapacityFactor                                                    float64
	CopySeconds                                                       float64 // measured copy time of the relayouts run
}

// Scheduler is the adaptive schedule of one pool (capacity tuning, regroup trigger, relayouts by
// a cost model with measured inputs). Keep one per pool; each step: NewPlan, launch and run,
// then Record the measured attention time.
type Scheduler struct {
	h C.PackinferScheduler
}

// NewScheduler creates a scheduler for the pool; opts nil = the defaults.
func (p *Pool) NewScheduler(opts *SchedulerOptions) (*Scheduler, error) {
	o := DefaultSchedulerOptions()
	if opts != nil {
		o = *opts
	}
	var c C.PackinferSchedulerOptions
	c.struct_size = C.size_t(unsafe.Sizeof(c))
	c.flags = C.uint32_t(o.Flags)
	c.horizon_steps = C.uint32_t(o.HorizonSteps)
	c.capacity_factor = C.double(o.CapacityFactor)
	c.copy_bytes_per_second = C.double(o.CopyBytesPerSecond)
	c.contiguous_gain = C.double(o.ContiguousGain)
	c.explore_fraction = C.double(o.ExploreFraction)
	s := &Scheduler{}
	err := call(func() C.enum_PackinferStatus { return C.packinfer_scheduler_create(p.h, &c, &s.h) })
	runtime.KeepAlive(p)
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(s, (*Scheduler).destroyUnclosed)
	return s, nil
}

// NewPlan plans a step from the scheduler's pool (request i is seqIDs[i] with its last
// numNewTokens[i] tokens, already appended) with the capacity the scheduler chooses, after the
// regroup trigger and any relayout it decided (copies on stream). opts may be nil.
func (s *Scheduler) NewPlan(ctx *Context, seqIDs []uint64, numNewTokens []uint32, opts *PlanOptions, stream uintptr) (*Plan, SchedulerStep, error) {
	if ctx == nil {
		return nil, SchedulerStep{}, invalidArgument("Scheduler.NewPlan: ctx is nil")
	}
	n, err := pairedLength("Scheduler.NewPlan", seqIDs, "numNewTokens", len(numNewTokens))
	if err != nil {
		return nil, SchedulerStep{}, err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return nil, SchedulerStep{}, err
	}
	var st C.PackinferSchedulerStep
	st.struct_size = C.size_t(unsafe.Sizeof(st))
	plan := &Plan{}
	err = call(func() C.enum_PackinferStatus {
		return C.pi_scheduler_plan(s.h, ctx.h, u64Ptr(seqIDs), u32Ptr(numNewTokens), n, &o, C.uintptr_t(stream), &plan.h, &st)
	})
	runtime.KeepAlive(s)
	runtime.KeepAlive(ctx)
	if err != nil {
		return nil, SchedulerStep{}, err
	}
	runtime.SetFinalizer(plan, (*Plan).destroyUnclosed)
	return plan, stepFromC(&st), nil
}

// Replan is NewPlan into plan (an earlier step's), reusing its memory in the library
// (packinfer_scheduler_plan_update): once plan has held a step as large, planning allocates
// nothing there. Context.Replan's rules on launches, goroutines and errors apply.
func (s *Scheduler) Replan(ctx *Context, plan *Plan, seqIDs []uint64, numNewTokens []uint32, opts *PlanOptions, stream uintptr) (SchedulerStep, error) {
	if ctx == nil || plan == nil {
		return SchedulerStep{}, invalidArgument("Scheduler.Replan: ctx or plan is nil")
	}
	n, err := pairedLength("Scheduler.Replan", seqIDs, "numNewTokens", len(numNewTokens))
	if err != nil {
		return SchedulerStep{}, err
	}
	o, err := planOptionsToC(opts)
	if err != nil {
		return SchedulerStep{}, err
	}
	var st C.PackinferSchedulerStep
	st.struct_size = C.size_t(unsafe.Sizeof(st))
	err = call(func() C.enum_PackinferStatus {
		return C.pi_scheduler_plan_update(s.h, ctx.h, plan.h, u64Ptr(seqIDs), u32Ptr(numNewTokens), n, &o, C.uintptr_t(stream), &st)
	})
	runtime.KeepAlive(s)
	runtime.KeepAlive(ctx)
	runtime.KeepAlive(plan)
	if err != nil {
		return SchedulerStep{}, err
	}
	return stepFromC(&st), nil
}

func stepFromC(st *C.PackinferSchedulerStep) SchedulerStep {
	return SchedulerStep{
		Capacity: float64(st.capacity), CapacityFactor: float64(st.capacity_factor),
		Regrouped: bool(st.regrouped), Relayout: bool(st.relayout), Probe: bool(st.probe),
		Imbalance: float64(st.imbalance), AccumulatedImbalance: float64(st.accumulated_imbalance),
		DuePages: uint64(st.due_pages), PagesMoved: uint64(st.pages_moved), BytesMoved: uint64(st.bytes_moved),
		PredictedGainSeconds: float64(st.predicted_gain_seconds), PredictedCostSeconds: float64(st.predicted_cost_seconds),
		PlanSeconds: float64(st.plan_seconds), RelayoutSeconds: float64(st.relayout_seconds),
	}
}

// Record reports the measured times of the step NewPlan (or Replan) planned: attention (every
// layer) and, when timed on the device, the relayout's copies (0 = the scheduler's host timing).
func (s *Scheduler) Record(attentionSeconds, relayoutSeconds float64) error {
	t := C.PackinferStepTimes{attention_seconds: C.double(attentionSeconds), relayout_seconds: C.double(relayoutSeconds)}
	t.struct_size = C.size_t(unsafe.Sizeof(t))
	err := call(func() C.enum_PackinferStatus { return C.packinfer_scheduler_record(s.h, &t) })
	runtime.KeepAlive(s)
	return err
}

// Stats reads the scheduler's totals.
func (s *Scheduler) Stats() (SchedulerStats, error) {
	var c C.PackinferSchedulerStats
	c.struct_size = C.size_t(unsafe.Sizeof(c))
	err := call(func() C.enum_PackinferStatus { return C.packinfer_scheduler_stats(s.h, &c) })
	runtime.KeepAlive(s)
	if err != nil {
		return SchedulerStats{}, err
	}
	return SchedulerStats{
		Steps: uint64(c.steps), Regroups: uint64(c.regroups), Relayouts: uint64(c.relayouts), Probes: uint64(c.probes),
		RelayoutsDeclined: uint64(c.relayouts_declined), BytesMoved: uint64(c.bytes_moved),
		PlanSeconds: float64(c.plan_seconds), RelayoutSeconds: float64(c.relayout_seconds), AttentionSeconds: float64(c.attention_seconds),
		PredictedCostSeconds: float64(c.predicted_cost_seconds), PredictedGainSeconds: float64(c.predicted_gain_seconds),
		MeasuredGainSeconds: float64(c.measured_gain_seconds), GainsMeasured: uint64(c.gains_measured),
		ContiguousGainDecode: float64(c.contiguous_gain_decode), ContiguousGainPrefill: float64(c.contiguous_gain_prefill),
		CopyBytesPerSecond: float64(c.copy_bytes_per_second), CapacitySearches: uint64(c.capacity_searches),
		ExploringSteps: uint64(c.exploring_steps), CapacityFactor: float64(c.capacity_factor), CopySeconds: float64(c.copy_seconds),
	}, nil
}

// Close destroys the scheduler. A second Close, or any use after Close, returns an error with
// StatusInvalidHandle.
func (s *Scheduler) Close() error {
	runtime.SetFinalizer(s, nil)
	return call(func() C.enum_PackinferStatus { return C.packinfer_scheduler_destroy(s.h) })
}

func (s *Scheduler) destroyUnclosed() { C.packinfer_scheduler_destroy(s.h) }
