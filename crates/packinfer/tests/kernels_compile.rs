//! Compiles every kernel variant with NVRTC for Ampere (sm_80) and Hopper (sm_90a) without a GPU,
//! prints ptxas' registers/spills per variant, and checks that the C mirrors of the work-list
//! structs (`kernels/work.cuh`) have the Rust layout. Where NVRTC cannot be loaded the tests that
//! need it are reported as ignored, with the reason, unless `PACKINFER_REQUIRE_NVRTC=1` (CI sets
//! it after installing the `nvidia-cuda-nvrtc` wheel), which makes a missing NVRTC a failure.

use packinfer_testkit::harness;

use std::mem::{offset_of, size_of};

use packinfer::testing::compile::{self, Unit, Variant};
use packinfer::testing::{KernelItem, KernelMergeRow, KernelParams, KvRange, PlanHeader, SegmentInfo, TensorMap};

fn main() {
    harness::main(harness::trials![
        every_variant_compiles_for_sm80_and_sm90a,
        compile_errors_carry_nvrtc_log,
        work_structs_match_the_kernels_byte_for_byte,
        cache_names_change_with_architecture_and_variant,
        short_prefill_kernel_is_one_consumer_warpgroup_and_fits_its_ctas_per_sm,
        kv_unit_exports_the_pool_kernels,
        prepare_compiles_units_concurrently_into_the_cache,
    ]);
}

/// Whether NVRTC is usable here; where it is not, the test is reported as skipped, or fails
/// when it is required.
fn nvrtc_or_skip(test: &str) -> bool {
    if compile::nvrtc_present() {
        return true;
    }
    assert!(
        !harness::required("PACKINFER_REQUIRE_NVRTC"),
        "PACKINFER_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (LD_LIBRARY_PATH = {:?})",
        std::env::var("LD_LIBRARY_PATH").ok()
    );
    harness::skipped(format!(
        "{test}: libnvrtc is not loadable on this machine (install nvidia-cuda-nvrtc and put its lib/ on LD_LIBRARY_PATH)"
    ));
    false
}

/// The register / spill lines of ptxas' report for the kernel entries.
fn resource_summary(log: &str) -> String {
    log.lines()
        .filter(|l| {
            l.contains("Used") || l.contains("spill") || l.contains("Compiling entry") || l.contains("warning") || l.contains("Performance")
        })
        .map(|l| l.trim().trim_start_matches("ptxas info    :").trim())
        .collect::<Vec<_>>()
        .join("\n    ")
}

fn every_variant_compiles_for_sm80_and_sm90a() {
    if !nvrtc_or_skip("every_variant_compiles_for_sm80_and_sm90a") {
        return;
    }
    let (major, minor) = compile::nvrtc_version().unwrap();
    println!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    // `PACKINFER_DUMP_KERNELS=<dir>` keeps each cubin and its ptxas log there, so that a kernel
    // refactor can be checked against the cubins from before it (sections, SASS).
    let dump = std::env::var_os("PACKINFER_DUMP_KERNELS").filter(|d| !d.is_empty()).map(std::path::PathBuf::from);
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir).unwrap();
    }
    for arch in ["sm_80", "sm_90a"] {
        // Both tile sizes, every variant that exists on the architecture (one that does not
        // builds the plain kernel, which is compiled once).
        let units: Vec<Unit> = Variant::all()
            .into_iter()
            .flat_map(|v| [4, 8].into_iter().flat_map(move |w| Unit::all(w, v)))
            .filter(|u| match *u {
                Unit::Attention { variant, .. } => u.variant_on(arch) == variant,
                Unit::Kv => true,
            })
            .fold(Vec::new(), |mut v, u| {
                if !v.contains(&u) {
                    v.push(u);
                }
                v
            });
        for unit in units {
            match compile::compile(unit, arch) {
                Ok(c) => {
                    println!("{} {arch}: cubin {} bytes\n    {}", unit.name(), c.cubin.len(), resource_summary(&c.log));
                    if let Some(dir) = &dump {
                        let stem = dir.join(format!("{}-{arch}", unit.name()));
                        std::fs::write(stem.with_extension("cubin"), &*c.cubin).unwrap();
                        std::fs::write(stem.with_extension("log"), &c.log).unwrap();
                    }
                    assert!(!c.cubin.is_empty());
                    // A spill in the attention kernel is a performance bug worth seeing in CI's log.
                    if c.log.lines().any(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")) {
                        println!("    NOTE: {} spills registers on {arch}", unit.name());
                    }
                    // ptxas serialises every wgmma when it cannot prove the pipelined loop safe
                    // (C7515, C7518) or has too few registers for it (C7512): the kernel still
                    // works, 20-30% slower on prefill (H100). A failure, so that such a change is
                    // seen.
                    if c.log.contains("wgmma.mma_async instructions are serialized") {
                        failures.push(format!("{} {arch}: ptxas serialised the wgmmas:\n{}", unit.name(), c.log));
                    }
                }
                Err(e) => failures.push(format!("{} {arch}: {e}", unit.name())),
            }
        }
    }
    assert!(failures.is_empty(), "kernel compile failures:\n{}", failures.join("\n"));
}

fn compile_errors_carry_nvrtc_log() {
    if !nvrtc_or_skip("compile_errors_carry_nvrtc_log") {
        return;
    }
    // An architecture NVRTC does not know is rejected with NVRTC's own message.
    let err = compile::compile(Unit::Kv, "sm_1").unwrap_err();
    assert!(matches!(err, packinfer::Error::Compile(_)), "{err:?}");
}

/// Checks the C mirrors in work.cuh against Rust's layout: NVRTC has no `offsetof`, so the C
/// side asserts every struct's size, and the Rust side asserts that each field sits where C's
/// natural-alignment rules put it (declaration order, no hidden padding), which together pin
/// every offset as long as the field lists agree (they are listed here in C's order).
fn work_structs_match_the_kernels_byte_for_byte() {
    let mut checks = String::new();
    macro_rules! layout {
        ($rust:ty, $c:literal, [$($field:ident: $fty:ty),*]) => {{
            checks += &format!("static_assert(sizeof({}) == {}, \"sizeof {}\");\n", $c, size_of::<$rust>(), $c);
            let mut at = 0usize;
            $(
                let align = std::mem::align_of::<$fty>();
                at = at.div_ceil(align) * align;
                assert_eq!(offset_of!($rust, $field), at, "{}.{} is not where C puts it", $c, stringify!($field));
                at += size_of::<$fty>();
            )*
            assert_eq!(at.div_ceil(std::mem::align_of::<$rust>()) * std::mem::align_of::<$rust>(), size_of::<$rust>(), "{} has trailing fields C does not know", $c);
        }};
    }
    layout!(KernelItem, "WorkItem", [kv_head: u32, seg_begin: u32, seg_count: u32, chunk_begin: u32, chunk_count: u32, num_rows: u32, partial_slot: u32, group: u32]);
    layout!(SegmentInfo, "SegmentInfo", [row_begin: u32, token0: u32, limit0: u32, step: u32]);
    layout!(KvRange, "KvRange", [page_start: u32, key_begin: u32, key_end: u32, row_begin: u32, row_end: u32, row0: u32]);
    layout!(KernelMergeRow, "MergeRow", [q_token: u32, qo_head: u32, slot_begin: u32, slot_count: u32]);
    layout!(PlanHeader, "PlanHeader", [num_items: u32, num_groups: u32, num_merges: u32, num_slots: u32, group_size: u32, page_size: u32, causal: u32, window_left: u32, sm_scale_log2: f32, reserved2: [u32; 3]]);
    layout!(KernelParams, "KernelParams", [header: u64, items: u64, segments: u64, chunks: u64, pages: u64, group_offsets: u64, merges: u64, merge_slots: u64, q: u64, q_stride_token: i64, q_stride_head: i64, k: u64, v: u64, kv_stride_page: i64, kv_stride_token: i64, kv_stride_head: i64, kv_stride_dim: i64, o: u64, o_stride_token: i64, o_stride_head: i64, lse: u64, scratch: u64, group_counter: u64, flags: u32, num_qo_heads: u32, softcap_in: f32, softcap_out: f32, k_scale: f32, v_scale: f32, k_head_scales: u64, v_head_scales: u64, mask: u64, mask_bit0: u64, reserved: [u32; 4], k_map: TensorMap, v_map: TensorMap, q_map: TensorMap, o_map: TensorMap]);
    if !nvrtc_or_skip("work_structs_match_the_kernels_byte_for_byte (C side)") {
        return;
    }
    let src = format!("{}\n{checks}\nextern \"C\" __global__ void layout_probe() {{}}\n", compile::WORK_CUH);
    compile::compile_source("layout_probe", &src, "sm_80").unwrap_or_else(|e| panic!("work.cuh disagrees with the Rust structs:\n{e}"));
}

fn cache_names_change_with_architecture_and_variant() {
    let a = compile::cache_file_name(
        Unit::Attention { head_dim: 128, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::Plain },
        "sm_90a",
        (13, 0),
    );
    let b = compile::cache_file_name(
        Unit::Attention { head_dim: 128, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::Plain },
        "sm_80",
        (13, 0),
    );
    let c = compile::cache_file_name(
        Unit::Attention { head_dim: 64, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::Plain },
        "sm_90a",
        (13, 0),
    );
    let d = compile::cache_file_name(
        Unit::Attention { head_dim: 128, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::Plain },
        "sm_90a",
        (13, 1),
    );
    assert!(a != b && a != c && a != d && b != c, "{a} {b} {c} {d}");
}

/// The short-prefill kernel on Hopper is the warp-specialised one with a single consumer
/// warpgroup (plus the producer's), 32-key blocks, Q/O by TMA, and `SHORT_PREFILL_CTAS` of it
/// fit an SM's shared memory (227 KiB); elsewhere, and at head_dim 256, it is the plain kernel.
fn short_prefill_kernel_is_one_consumer_warpgroup_and_fits_its_ctas_per_sm() {
    for dtype in [packinfer::types::DType::F16, packinfer::types::DType::Bf16] {
        for head_dim in [64, 128] {
            let u = Unit::Attention { head_dim, dtype, warps: 4, variant: Variant::ShortPrefill };
            assert!(u.warp_specialized("sm_90a") && u.qo_tma("sm_90a"), "{}", u.name());
            assert_eq!((u.threads("sm_90a"), u.block_n("sm_90a")), (256, 32), "{}", u.name());
            assert!(
                compile::SHORT_PREFILL_CTAS * u.smem_bytes("sm_90a") <= 227 * 1024,
                "{}: {} bytes of shared memory",
                u.name(),
                u.smem_bytes("sm_90a")
            );
            assert_eq!(u.variant_on("sm_80"), Variant::Plain);
        }
    }
    let d256 = Unit::Attention { head_dim: 256, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::ShortPrefill };
    assert_eq!(d256.variant_on("sm_90a"), Variant::Plain);
}

/// The KV unit holds the pool's byte-move kernels (`DeviceKvMemory` looks them up by name).
fn kv_unit_exports_the_pool_kernels() {
    if !nvrtc_or_skip("kv_unit_exports_the_pool_kernels") {
        return;
    }
    let c = compile::compile(Unit::Kv, "sm_90a").unwrap();
    for name in ["append_kv", "copy_pages", "scatter_rows", "copy_ranges", "scatter_rows_fp8"] {
        assert!(c.cubin.windows(name.len()).any(|w| w == name.as_bytes()), "the kv cubin has no symbol {name}");
    }
}

/// `KernelCache::prepare` compiles units on several threads (as `precompile` does): each lands in
/// the cache's memory and on disk, byte for byte what a compile on one thread gives.
fn prepare_compiles_units_concurrently_into_the_cache() {
    if !nvrtc_or_skip("prepare_compiles_units_concurrently_into_the_cache") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("packinfer-prepare-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = compile::KernelCache::new("sm_90a", Some(dir.clone())).unwrap();
    let units = vec![
        Unit::Attention { head_dim: 64, dtype: packinfer::types::DType::F16, warps: 4, variant: Variant::Plain },
        Unit::Attention { head_dim: 128, dtype: packinfer::types::DType::Bf16, warps: 4, variant: Variant::ShortPrefill },
        Unit::Attention { head_dim: 64, dtype: packinfer::types::DType::Bf16, warps: 8, variant: Variant::WarpSpecialized },
        Unit::Kv,
    ];
    let t = std::time::Instant::now();
    cache.prepare(&units).unwrap();
    println!(
        "prepare: {} units in {:.1} s on {:?} threads",
        units.len(),
        t.elapsed().as_secs_f64(),
        std::thread::available_parallelism().ok()
    );
    for &unit in &units {
        let cached = cache.get(unit).unwrap();
        assert!(!cached.from_disk, "{}: prepared into memory", unit.name());
        let on_disk = std::fs::read(dir.join(compile::cache_file_name(unit, "sm_90a", compile::nvrtc_version().unwrap()))).unwrap();
        assert_eq!(on_disk, *cached.cubin, "{}: the file is the cubin", unit.name());
        assert_eq!(compile::compile(unit, "sm_90a").unwrap().cubin, cached.cubin, "{}: same as a compile on one thread", unit.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
