//! The CUDA launch's device image, written on the host (`testing::HostUpload`, the path of
//! `packinfer_launch_update`): for a set of plans, the bytes a launch would copy to the device
//! must equal, byte for byte, what the encoding before issue 21's per-piece work list wrote
//! (the kernels read that format), except where that encoding repeated entries (see below).
//! `tests/data/launch_images.txt` holds the length and an FNV-1a hash of each image and of its
//! content as the kernels see it, recorded with the per-KV-head encoding (the commit in its
//! first line); `PACKINFER_WRITE_GOLDEN=1` rewrites it. No device needed.

use packinfer::backend::LaunchCapacity;
use packinfer::plan::{DeviceProfile, Plan, PlanOptions};
use packinfer::testing::HostUpload;
use packinfer::types::{DType, Shape};
use packinfer_testkit::paged_batch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn shape(qo: u32, kv: u32, causal: bool) -> Shape {
    Shape { num_qo_heads: qo, num_kv_heads: kv, head_dim: 128, dtype: DType::Bf16, kv_dtype: DType::Bf16, causal, sm_scale: 0.088 }
}

fn decodes(n: usize, rng: &mut SmallRng) -> Vec<(u32, u32)> {
    (0..n).map(|_| (1, rng.random_range(100..30_000))).collect()
}

/// Plans of every kind the planner makes: decodes with and without prefix groups, prefill,
/// mixed steps, W1–W5-like batches, split KV, sliding windows, deterministic mode, the
/// ablations, GQA ratios from 1 to 8, on the Hopper profile's 128-row and the short batches'
/// 64-row tiles.
fn cases() -> Vec<(String, Plan, u32)> {
    let mut rng = SmallRng::seed_from_u64(2121);
    let mut out = Vec::new();
    let hopper = DeviceProfile::hopper(132);
    let narrow = DeviceProfile { block_m: 64, num_workers: 264, ..DeviceProfile::hopper(132) };
    let d = PlanOptions::default;
    let mut mixed = decodes(96, &mut rng);
    mixed.extend([(2048, 4096), (300, 700), (7, 9000)]);
    let short: Vec<(u32, u32)> = (0..256).map(|_| rng.random_range(16..=256)).map(|l| (l, l)).collect();
    let prefill: Vec<(u32, u32)> = (0..8).map(|_| rng.random_range(1000..=8000)).map(|l| (l, l)).collect();
    let chunked: Vec<(u32, u32)> = (0..12).map(|_| (rng.random_range(64..=512), rng.random_range(4000..=20000))).collect();
    let long = vec![(4000, 4000), (300, 9000), (1, 20000), (16, 16)];
    let spec: Vec<(u32, u32)> = (0..64).map(|_| (rng.random_range(2..=6), rng.random_range(500..=5000))).collect();
    let windowed = |w| PlanOptions { window_left: Some(w), ..d() };
    #[allow(clippy::type_complexity)]
    let specs: Vec<(&str, Shape, Vec<(u32, u32)>, usize, bool, PlanOptions, &DeviceProfile)> = vec![
        ("256 decodes", shape(32, 8, true), decodes(256, &mut rng), 0, false, d(), &hopper),
        ("256 decodes, prefix groups", shape(32, 8, true), decodes(256, &mut rng), 8, false, d(), &hopper),
        ("1024 decodes", shape(32, 8, true), decodes(1024, &mut rng), 0, true, d(), &hopper),
        ("1024 decodes, prefix groups", shape(32, 8, true), decodes(1024, &mut rng), 8, true, d(), &hopper),
        ("W1-like prefill", shape(32, 8, true), prefill.clone(), 0, false, d(), &hopper),
        ("W2-like decode", shape(32, 8, true), decodes(64, &mut rng), 0, true, d(), &hopper),
        ("W3-like mixed", shape(32, 8, true), mixed.clone(), 0, true, d(), &hopper),
        ("W4-like shared prefix", shape(32, 8, true), decodes(64, &mut rng), 16, false, d(), &hopper),
        ("W5-like short prompts, 64-row tiles", shape(32, 8, true), short.clone(), 0, false, d(), &narrow),
        ("chunked prefill, split KV", shape(32, 8, true), chunked, 0, true, d(), &hopper),
        ("speculative tokens, prefix groups", shape(32, 4, true), spec, 4, true, d(), &hopper),
        (
            "long, deterministic",
            shape(32, 8, true),
            long.clone(),
            0,
            true,
            PlanOptions { deterministic: true, split_keys: 1024, ..d() },
            &hopper,
        ),
        (
            "decodes, prefix groups, deterministic",
            shape(32, 8, true),
            decodes(64, &mut rng),
            4,
            false,
            PlanOptions { deterministic: true, ..d() },
            &hopper,
        ),
        ("mixed, window 512", shape(32, 8, true), mixed.clone(), 0, true, windowed(512), &hopper),
        ("decodes, prefix groups, window 4096", shape(32, 8, true), decodes(128, &mut rng), 8, false, windowed(4096), &hopper),
        ("prefill, window 100, non-causal", shape(16, 16, false), prefill[..2].to_vec(), 0, false, windowed(100), &hopper),
        (
            "non-causal decodes, no balancing",
            shape(32, 8, false),
            decodes(64, &mut rng),
            4,
            false,
            PlanOptions { balancing: false, ..d() },
            &hopper,
        ),
        ("no packing", shape(32, 8, true), mixed.clone(), 0, false, PlanOptions { packing: false, ..d() }, &hopper),
        ("no split KV", shape(32, 8, true), long.clone(), 0, false, PlanOptions { split_kv: false, ..d() }, &hopper),
        ("no prefix sharing", shape(32, 8, true), decodes(64, &mut rng), 8, false, PlanOptions { prefix_sharing: false, ..d() }, &hopper),
        ("small capacity", shape(32, 8, true), decodes(64, &mut rng), 8, true, PlanOptions { capacity: Some(20_000.0), ..d() }, &hopper),
        (
            "one request per tile",
            shape(32, 8, true),
            short[..32].to_vec(),
            0,
            false,
            PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..d() },
            &hopper,
        ),
        (
            "one request per tile, window",
            shape(28, 4, true),
            mixed[90..].to_vec(),
            0,
            true,
            PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, window_left: Some(300), ..d() },
            &hopper,
        ),
        ("MHA decodes, prefix groups", shape(8, 8, true), decodes(96, &mut rng), 6, false, d(), &hopper),
        ("GQA 8, mixed, prefix groups", shape(64, 8, true), mixed, 5, true, d(), &hopper),
        ("empty batch", shape(32, 8, true), vec![], 0, false, d(), &hopper),
    ];
    for (name, shape, lens, prefix, scattered, options, profile) in specs {
        let b = paged_batch(&lens, prefix, scattered, &mut rng);
        let plan = Plan::build(shape, b, profile, options).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name.to_string(), plan, profile.block_m));
    }
    out
}

/// FNV-1a, 64 bits: stable across Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The arrays of a launch image, read back: header words, items (8 words each), row segments
/// (4), KV chunks (6), pages, group offsets, merge rows (4), merge slots.
struct Decoded {
    header: Vec<u32>,
    items: Vec<[u32; 8]>,
    segments: Vec<[u32; 4]>,
    chunks: Vec<[u32; 6]>,
    pages: Vec<u32>,
    offsets: Vec<u32>,
    merges: Vec<[u32; 4]>,
    merge_slots: Vec<u32>,
}

/// Reads `img` back with the layout a launch sized for `plan` alone has (arrays in order, each
/// at a multiple of 256 bytes).
fn decode(plan: &Plan, img: &[u8]) -> Decoded {
    let c = LaunchCapacity::of(plan);
    let mut at = 0usize;
    let mut take = |bytes: usize| {
        let start = at;
        at = (at + bytes).div_ceil(256) * 256;
        start
    };
    let (_header, _counter) = (take(48), take(4));
    let (items, segments, chunks) = (take(c.items as usize * 32), take(c.row_segments as usize * 16), take(c.kv_chunks as usize * 24));
    let (pages, offsets) = (take(c.pages as usize * 4), take((c.groups as usize + 1) * 4));
    let (merges, merge_slots) = (take(c.merge_rows as usize * 16), take(c.merge_slots as usize * 4));
    let word = |byte: usize| u32::from_ne_bytes(img[byte..byte + 4].try_into().unwrap());
    fn rows<const N: usize>(word: &impl Fn(usize) -> u32, at: usize, n: usize) -> Vec<[u32; N]> {
        (0..n).map(|i| std::array::from_fn(|f| word(at + (i * N + f) * 4))).collect()
    }
    let header: Vec<u32> = (0..12).map(|i| word(i * 4)).collect();
    let (num_items, num_groups, num_merges) = (header[0] as usize, header[1] as usize, header[2] as usize);
    let merge_rows: Vec<[u32; 4]> = rows(&word, merges, num_merges);
    let num_slots = merge_rows.iter().map(|m| (m[2] + m[3]) as usize).max().unwrap_or(0);
    Decoded {
        items: rows(&word, items, num_items),
        segments: rows(&word, segments, plan.row_segments.len()),
        chunks: rows(&word, chunks, plan.kv_chunks.len()),
        pages: (0..plan.batch.kv_page_indices.len()).map(|p| word(pages + p * 4)).collect(),
        offsets: (0..=num_groups).map(|g| word(offsets + g * 4)).collect(),
        merges: merge_rows,
        merge_slots: (0..num_slots).map(|s| word(merge_slots + s * 4)).collect(),
        header,
    }
}

/// The image's content as the kernels see it, independent of where the arrays' entries sit:
/// per item copy in order its group, KV head, partial slot and rows with its row segments and
/// KV chunks resolved, the group offsets, the pages, per merge row its token, query head and
/// slots; hashed as for the bytes. Equal for two encodings that give the kernels the same work.
fn content_hash(plan: &Plan, img: &[u8]) -> u64 {
    let d = decode(plan, img);
    let mut out: Vec<u32> = d.header.clone();
    for it in &d.items {
        // kv_head, seg_begin, seg_count, chunk_begin, chunk_count, num_rows, partial_slot, group
        out.extend([it[7], it[0], it[6], it[5]]);
        for sg in it[1]..it[1] + it[2] {
            out.extend(d.segments[sg as usize]);
        }
        for ch in it[3]..it[3] + it[4] {
            out.extend(d.chunks[ch as usize]);
        }
    }
    out.extend(&d.offsets);
    out.extend(&d.pages);
    for m in &d.merges {
        out.extend([m[0], m[1], m[3]]);
        out.extend(&d.merge_slots[m[2] as usize..(m[2] + m[3]) as usize]);
    }
    fnv1a(bytemuck::cast_slice(&out))
}

#[test]
fn images_list_the_item_copies_and_a_merge_row_per_query_head() {
    // The expansion against the encoding's definition (plan/work.rs), not against the old bytes:
    // item copies as `Plan::item_copies` derives them, group offsets from their groups, and per
    // merged token and query head h·group + j the slots `slot + h·head_stride + j`.
    let mut checked = (0, 0);
    for (name, plan, block_m) in cases() {
        let mut upload = HostUpload::new(&plan, &LaunchCapacity::default(), block_m);
        upload.update(&plan).unwrap();
        let d = decode(&plan, upload.image());
        let copies: Vec<[u32; 8]> = plan
            .item_copies()
            .map(|c| {
                let it = &plan.items[c.item as usize];
                [c.kv_head, it.seg_begin, it.seg_count, it.chunk_begin, it.chunk_count, it.num_rows, c.partial_slot, c.group]
            })
            .collect();
        assert_eq!(d.items, copies, "{name}: items");
        let groups = plan.num_groups() as usize;
        let offsets: Vec<u32> = (0..=groups).map(|g| copies.iter().take_while(|c| (c[7] as usize) < g).count() as u32).collect();
        assert_eq!(d.offsets, offsets, "{name}: group offsets");
        let (group, heads) = (plan.shape.group_size(), plan.shape.num_kv_heads);
        let (mut rows, mut slots) = (Vec::new(), Vec::new());
        for m in &plan.merges {
            let pieces = &plan.merge_slots[m.slot_begin as usize..(m.slot_begin + m.slot_count) as usize];
            for q in 0..heads * group {
                rows.push([m.q_token, q, slots.len() as u32, m.slot_count]);
                slots.extend(pieces.iter().map(|p| p.slot + q / group * p.head_stride + q % group));
            }
        }
        assert_eq!(d.merges, rows, "{name}: merge rows");
        assert_eq!(d.merge_slots, slots, "{name}: merge slots");
        assert_eq!(d.header[..4], [copies.len() as u32, groups as u32, rows.len() as u32, plan.num_partial_slots()], "{name}: header");
        checked.0 += plan.units.iter().filter(|u| u.group_stride > 1).count();
        checked.1 += rows.len();
    }
    assert!(checked.0 > 0 && checked.1 > 0, "the cases had no group-per-copy unit or no merges: {checked:?}");
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/launch_images.txt");

#[test]
fn launch_images_are_the_per_kv_head_encodings_bytes() {
    let mut lines = Vec::new();
    for (name, plan, block_m) in cases() {
        // Through the checked update and the planned one (what the C API calls): same bytes.
        let mut upload = HostUpload::new(&plan, &LaunchCapacity::default(), block_m);
        let used = upload.update(&plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        let hash = fnv1a(&upload.image()[..used]);
        let content = content_hash(&plan, upload.image());
        let mut again = HostUpload::new(&plan, &LaunchCapacity::default(), block_m);
        let used_planned = again.update_planned(&plan).unwrap();
        assert_eq!((used_planned, fnv1a(&again.image()[..used_planned])), (used, hash), "{name}: update_planned");
        lines.push(format!("{name}\t{used}\t{hash:016x}\t{content:016x}"));
    }
    if std::env::var_os("PACKINFER_WRITE_GOLDEN").is_some() {
        let commit = std::env::var("PACKINFER_GOLDEN_COMMIT").unwrap_or_default();
        std::fs::write(
            GOLDEN,
            format!(
                "# per-KV-head encoding at {commit}: case, image bytes, FNV-1a 64 of the bytes, of the content\n{}\n",
                lines.join("\n")
            ),
        )
        .unwrap();
        return;
    }
    let golden = std::fs::read_to_string(GOLDEN).expect("tests/data/launch_images.txt");
    let want: Vec<&str> = golden.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(want.len(), lines.len(), "cases differ from the golden file's");
    for (got, want) in lines.iter().zip(want) {
        let (got, want): (Vec<&str>, Vec<&str>) = (got.split('\t').collect(), want.split('\t').collect());
        assert_eq!((got[0], got[3]), (want[0], want[3]), "{}: the kernels' work differs from the per-KV-head encoding's", got[0]);
        // The one-request-per-tile schedule made a row segment and a KV chunk per (block, KV
        // head); the per-piece encoding makes them once per block, which its copies share: the
        // same content (checked above) in fewer bytes. Every other plan: the same bytes.
        if got[0].starts_with("one request per tile") {
            assert!(got[1].parse::<usize>().unwrap() < want[1].parse::<usize>().unwrap(), "{}: no shorter", got[0]);
        } else {
            assert_eq!(got, want, "{}: image differs from the per-KV-head encoding's", got[0]);
        }
    }
}

#[test]
fn masked_images_carry_the_mask_and_each_querys_first_bit() {
    // Tree-speculation-like steps (a few queries over long contexts, some split) with a custom
    // mask: after the merge slots the image holds the mask's bytes, then per query token the bit
    // of (that query, key 0); the mask replaces the causal one, so the header says not causal.
    let mut rng = SmallRng::seed_from_u64(77);
    let lens: Vec<(u32, u32)> = (0..24).map(|_| (rng.random_range(1..=8), rng.random_range(100..=6000))).collect();
    let mut b = paged_batch(&lens, 0, true, &mut rng);
    b.mask_indptr.push(0);
    for &(q, kv) in &lens {
        let bytes = (q as usize * kv as usize).div_ceil(8);
        b.custom_mask.extend((0..bytes).map(|_| rng.random::<u8>()));
        b.mask_indptr.push(b.custom_mask.len() as i32);
    }
    let options = PlanOptions { split_keys: 1024, ..PlanOptions::default() };
    let plan = Plan::build(shape(32, 8, true), b.clone(), &DeviceProfile::hopper(132), options).unwrap();
    let mut upload = HostUpload::new(&plan, &LaunchCapacity::default(), 128);
    let used = upload.update(&plan).unwrap();
    let img = upload.image();
    let d = decode(&plan, img);
    assert_eq!(d.header[6], 0, "causal in the header of a masked plan");
    assert!(d.segments.iter().all(|s| s[3] == 0), "a masked plan's segments advance no causal limit");
    // The mask follows the merge slots, each array at a multiple of 256 bytes.
    let c = LaunchCapacity::of(&plan);
    let end_of_slots = used - plan.batch.total_q() as usize * 4 - b.custom_mask.len().div_ceil(256) * 256;
    assert_eq!(c.mask_bytes as usize, b.custom_mask.len());
    assert_eq!(&img[end_of_slots..end_of_slots + b.custom_mask.len()], &b.custom_mask[..], "mask bytes");
    let bit0_at = end_of_slots + b.custom_mask.len().div_ceil(256) * 256;
    let mut token = 0usize;
    for (r, &(q_len, kv_len)) in lens.iter().enumerate() {
        for q in 0..q_len {
            let got = u32::from_ne_bytes(img[bit0_at + token * 4..bit0_at + token * 4 + 4].try_into().unwrap());
            assert_eq!(got, b.mask_indptr[r] as u32 * 8 + q * kv_len, "request {r} query {q}");
            token += 1;
        }
    }
    assert_eq!(bit0_at + token * 4, used);
}
