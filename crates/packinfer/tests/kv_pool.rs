//! The KV pool against a plain reference model: random create / append / fork / truncate /
//! release / plan / relayout sequences, with every invariant checked after every operation;
//! exhaustion that leaves the pool untouched; many threads on one pool.

use packinfer_testkit as common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::rng;
use packinfer::backend::cpu::CpuBackend;
use packinfer::backend::Backend;
use packinfer::kv::{groups_of_plan, KvPool, PoolConfig, SeqId};
use packinfer::plan::PlanOptions;
use packinfer::testing;
use packinfer::types::{DType, Shape};
use packinfer::Error;
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

const HEADS: u32 = 2;
const DIM: u32 = 8;
const LAYERS: u32 = 2;

fn config(page_size: u32, num_pages: u32, headroom: u32) -> PoolConfig {
    PoolConfig {
        num_layers: LAYERS,
        shape: Shape {
            num_qo_heads: HEADS * 2,
            num_kv_heads: HEADS,
            head_dim: DIM,
            dtype: DType::F32,
            kv_dtype: DType::F32,
            causal: true,
            sm_scale: 0.0,
        },
        page_size,
        num_pages,
        headroom_pages: headroom,
    }
}

fn new_pool(page_size: u32, num_pages: u32, headroom: u32) -> KvPool {
    KvPool::new(Arc::new(CpuBackend::new(1)), config(page_size, num_pages, headroom)).expect("pool")
}

/// The value of element `i` of a token's K (`v = false`) or V row in `layer`: a function of the
/// token's tag, so the model only stores tags.
fn value(tag: u64, layer: u32, v: bool, i: usize) -> f32 {
    ((tag.wrapping_mul(1_000_003) + layer as u64 * 7919 + v as u64 * 104_729 + i as u64) % 65_521) as f32
}

fn rows(tags: &[u64], layer: u32, v: bool) -> Vec<f32> {
    let row = (HEADS * DIM) as usize;
    tags.iter().flat_map(|&t| (0..row).map(move |i| value(t, layer, v, i))).collect()
}

/// Writes the K/V of the last `tags.len()` tokens of `seq` in every layer.
fn write(pool: &KvPool, seq: SeqId, tags: &[u64]) -> Result<(), Error> {
    for layer in 0..LAYERS {
        let (k, v) = (rows(tags, layer, false), rows(tags, layer, true));
        // SAFETY: k and v hold the tags' rows of HEADS × DIM f32 each, on the host.
        unsafe { pool.write_kv(layer, &[(seq, tags.len() as u32)], k.as_ptr() as u64, v.as_ptr() as u64, (HEADS * DIM) as i64, 0)? };
    }
    Ok(())
}

/// The reference: each live sequence's token tags.
#[derive(Default, Clone)]
struct Model {
    seqs: BTreeMap<SeqId, Vec<u64>>,
    next_tag: u64,
}

impl Model {
    fn tags(&mut self, n: u32) -> Vec<u64> {
        (0..n)
            .map(|_| {
                self.next_tag += 1;
                self.next_tag
            })
            .collect()
    }
}

/// The engine's content hash of each full page: a chained hash of the tags up to the page's end.
fn chain_hashes(tags: &[u64], page_size: u32) -> Vec<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut out = Vec::new();
    for (i, &t) in tags.iter().enumerate() {
        h = (h ^ t).wrapping_mul(0x100_0000_01b3);
        if (i + 1) % page_size as usize == 0 {
            out.push(h);
        }
    }
    out
}

/// Every invariant of the pool against the model.
fn check(pool: &KvPool, model: &Model, ctx: &str) {
    let snap = testing::pool_snapshot(pool);
    let ps = pool.config().page_size;
    let mut refs = vec![0u32; snap.refcount.len()];
    let ids: Vec<SeqId> = snap.seqs.iter().map(|s| s.0).collect();
    assert_eq!(ids, model.seqs.keys().copied().collect::<Vec<_>>(), "{ctx}: live sequences");
    for (id, pages, reserved, len) in &snap.seqs {
        assert_eq!(*len as usize, model.seqs[id].len(), "{ctx}: length of {id}");
        assert_eq!(pages.len(), len.div_ceil(ps) as usize, "{ctx}: pages of {id}");
        for &p in pages.iter().chain(reserved) {
            refs[p as usize] += 1;
        }
        for &p in reserved {
            assert_eq!(snap.refcount[p as usize], 1, "{ctx}: headroom page {p} of {id} must be private");
        }
    }
    assert_eq!(refs, snap.refcount, "{ctx}: reference counts equal the number of sequences using each page");
    let free: BTreeSet<u32> = snap.free.iter().copied().collect();
    for p in 0..snap.refcount.len() as u32 {
        assert_eq!(free.contains(&p), snap.refcount[p as usize] == 0, "{ctx}: page {p} free iff unused");
    }
    for (&id, tags) in &model.seqs {
        for (t, &tag) in tags.iter().enumerate() {
            for layer in 0..LAYERS {
                let (k, v) = testing::read_token_host(pool, id, layer, t as u32).unwrap();
                let want_k: Vec<u8> = rows(&[tag], layer, false).iter().flat_map(|x| x.to_le_bytes()).collect();
                let want_v: Vec<u8> = rows(&[tag], layer, true).iter().flat_map(|x| x.to_le_bytes()).collect();
                assert!(k == want_k && v == want_v, "{ctx}: token {t} of sequence {id} layer {layer} is not what was written");
            }
        }
    }
    let st = pool.stats();
    assert_eq!(st.pages_used + st.pages_free, st.num_pages, "{ctx}: stats pages");
    assert_eq!(st.tokens_logical, model.seqs.values().map(|t| t.len() as u64).sum::<u64>(), "{ctx}: tokens_logical");
    assert_eq!(st.pages_used as u64 * ps as u64, st.tokens_stored + st.slots_reserved_unused, "{ctx}: stats slots");
}

/// Each group's pages (not claimed by an earlier group) form one run, in which each member's
/// private pages are followed by its headroom.
fn check_contiguous(pool: &KvPool, groups: &[Vec<SeqId>], ctx: &str) {
    let snap = testing::pool_snapshot(pool);
    let by_id: BTreeMap<SeqId, (&Vec<u32>, &Vec<u32>)> = snap.seqs.iter().map(|(id, p, r, _)| (*id, (p, r))).collect();
    let mut claimed = BTreeSet::new();
    for (g, members) in groups.iter().enumerate() {
        let mut mine = BTreeSet::new();
        for id in members {
            let (pages, reserved) = by_id[id];
            for &p in pages.iter().chain(reserved.iter()) {
                if !claimed.contains(&p) {
                    mine.insert(p);
                }
            }
        }
        if let (Some(&lo), Some(&hi)) = (mine.first(), mine.last()) {
            assert_eq!((hi - lo + 1) as usize, mine.len(), "{ctx}: group {g} {members:?} occupies pages {mine:?}, not one run");
        }
        // A member's private pages (no other sequence uses them) and its headroom follow each other.
        for id in members {
            let (pages, reserved) = by_id[id];
            let own: Vec<u32> =
                pages.iter().chain(reserved.iter()).copied().filter(|&p| mine.contains(&p) && snap.refcount[p as usize] == 1).collect();
            assert!(own.windows(2).all(|w| w[1] == w[0] + 1), "{ctx}: sequence {id} of group {g} has pages {own:?}");
        }
        claimed.extend(mine);
    }
}

/// Random operations against the model; invariants after each. Returns how many ops ran out of pages.
fn random_ops(seed: u64, page_size: u32, num_pages: u32, headroom: u32, steps: usize) -> (usize, u64, usize) {
    let mut r = rng(seed);
    let pool = new_pool(page_size, num_pages, headroom);
    let cpu = CpuBackend::new(1);
    let mut model = Model::default();
    let mut exhausted = 0;
    let mut contiguity_checks = 0;
    for step in 0..steps {
        let ids: Vec<SeqId> = model.seqs.keys().copied().collect();
        let pick = |r: &mut SmallRng| ids.choose(r).copied();
        let op = r.random_range(0..110);
        let before = testing::pool_snapshot(&pool);
        let ctx = format!("seed {seed} step {step} op {op}");
        let result: Result<(), Error> = match op {
            0..=9 => {
                let id = pool.create_sequence();
                model.seqs.insert(id, Vec::new());
                Ok(())
            }
            10..=44 => match pick(&mut r) {
                Some(id) => {
                    let n = if r.random_bool(0.3) { r.random_range(1..=3 * page_size) } else { r.random_range(0..=2) };
                    match pool.append(id, n, 0) {
                        Ok(slots) => {
                            assert_eq!(slots.len(), n as usize);
                            let tags = model.tags(n);
                            write(&pool, id, &tags).unwrap();
                            model.seqs.get_mut(&id).unwrap().extend(tags);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                None => Ok(()),
            },
            45..=59 => match pick(&mut r) {
                Some(id) => {
                    let len = model.seqs[&id].len() as u32;
                    let at = r.random_range(0..=len);
                    pool.fork(id, at, 0).map(|child| {
                        let tags = model.seqs[&id][..at as usize].to_vec();
                        model.seqs.insert(child, tags);
                    })
                }
                None => Ok(()),
            },
            60..=69 => match pick(&mut r) {
                Some(id) => {
                    let len = model.seqs[&id].len() as u32;
                    let to = r.random_range(0..=len);
                    pool.truncate(id, to).map(|()| model.seqs.get_mut(&id).unwrap().truncate(to as usize))
                }
                None => Ok(()),
            },
            70..=79 => match pick(&mut r) {
                Some(id) => pool.release(id).map(|()| {
                    model.seqs.remove(&id);
                }),
                None => Ok(()),
            },
            100..=104 => match pick(&mut r) {
                // The engine registers content hashes of a sequence's full pages.
                Some(id) => {
                    let hashes = chain_hashes(&model.seqs[&id], page_size);
                    let k = r.random_range(0..=hashes.len());
                    pool.register_page_hashes(id, &hashes[..k])
                }
                None => Ok(()),
            },
            105..=109 => match pick(&mut r) {
                // A new sequence whose prompt starts like an existing one shares its pages by hash.
                Some(like) => {
                    let hashes = chain_hashes(&model.seqs[&like], page_size);
                    let id = pool.create_sequence();
                    let m = pool.match_prefix(id, &hashes).unwrap();
                    assert_eq!(m % page_size, 0);
                    model.seqs.insert(id, model.seqs[&like][..m as usize].to_vec());
                    Ok(())
                }
                None => Ok(()),
            },
            80..=99 => {
                // Plan a random subset, check the batch, then relayout by the plan's groups or by random groups.
                let mut subset: Vec<SeqId> = ids.iter().copied().filter(|_| r.random_bool(0.6)).collect();
                subset.shuffle(&mut r);
                let reqs: Vec<(SeqId, u32)> =
                    subset.iter().map(|&id| (id, r.random_range(0..=model.seqs[&id].len().min(3) as u32))).collect();
                let plan = pool.plan(&reqs, Some(&cpu.profile()), PlanOptions::default()).unwrap();
                let snap = testing::pool_snapshot(&pool);
                for (i, &(id, q)) in reqs.iter().enumerate() {
                    assert_eq!(plan.batch.kv_len(i), model.seqs[&id].len() as u32, "{ctx}: kv_len");
                    assert_eq!(plan.batch.q_len(i), q, "{ctx}: q_len");
                    let pages = &snap.seqs.iter().find(|s| s.0 == id).unwrap().1;
                    let got: Vec<u32> = plan.batch.kv_page_indices[plan.batch.kv_indptr[i] as usize..plan.batch.kv_indptr[i + 1] as usize]
                        .iter()
                        .map(|&p| p as u32)
                        .collect();
                    assert_eq!(&got, pages, "{ctx}: page table of {id}");
                }
                for pg in &plan.batch.prefix_groups {
                    let first = &model.seqs[&reqs[pg.members[0] as usize].0];
                    for &m in &pg.members {
                        let (id, q) = reqs[m as usize];
                        let tags = &model.seqs[&id];
                        assert!(pg.prefix_len as usize <= tags.len() - q as usize, "{ctx}: prefix covers a new token");
                        assert_eq!(
                            &tags[..pg.prefix_len as usize],
                            &first[..pg.prefix_len as usize],
                            "{ctx}: prefix group members differ in content"
                        );
                    }
                }
                let groups = if r.random_bool(0.5) {
                    groups_of_plan(&plan, &subset).unwrap()
                } else {
                    let mut gs: Vec<Vec<SeqId>> = vec![Vec::new(); r.random_range(1..=3)];
                    for &id in &subset {
                        let g = r.random_range(0..gs.len());
                        gs[g].push(id);
                    }
                    gs
                };
                let regroup = r.random_bool(0.7);
                let report = pool.relayout(&groups, regroup, 0).unwrap();
                if regroup && report.groups_no_room == 0 {
                    check_contiguous(&pool, &groups, &ctx);
                    contiguity_checks += 1;
                }
                Ok(())
            }
            _ => unreachable!(),
        };
        match result {
            Ok(()) => {}
            Err(Error::PoolExhausted(_)) => {
                exhausted += 1;
                assert_eq!(testing::pool_snapshot(&pool), before, "{ctx}: an exhausted operation changed the pool");
            }
            Err(e) => panic!("{ctx}: unexpected error {e}"),
        }
        check(&pool, &model, &ctx);
    }
    for id in model.seqs.keys().copied().collect::<Vec<_>>() {
        pool.release(id).unwrap();
        model.seqs.remove(&id);
    }
    check(&pool, &model, "after releasing everything");
    let st = pool.stats();
    assert_eq!(st.pages_free, st.num_pages, "seed {seed}: pages leaked after releasing every sequence");
    (exhausted, st.relayout_pages_moved, contiguity_checks)
}

#[test]
fn model_based_random_operations() {
    let mut total_exhausted = 0;
    let mut moved = 0;
    let mut contiguity_checks = 0;
    for (i, &(ps, pages, headroom)) in [(1, 200, 0), (4, 64, 1), (16, 40, 2), (3, 24, 2), (8, 400, 3)].iter().enumerate() {
        for seed in 0..4 {
            let (e, m, c) = random_ops(1000 * i as u64 + seed, ps, pages, headroom, 300);
            total_exhausted += e;
            moved += m;
            contiguity_checks += c;
        }
    }
    eprintln!("{total_exhausted} exhausted operations, {moved} pages moved, {contiguity_checks} contiguity checks");
    assert!(contiguity_checks > 50, "only {contiguity_checks} relayouts were checked for contiguity");
    // The small pools must really have run out, and relayouts must really have moved pages.
    assert!(total_exhausted > 10, "only {total_exhausted} operations hit exhaustion; the test does not exercise it");
    assert!(moved > 0, "no relayout moved a page");
}

#[test]
fn exhaustion_is_atomic_and_recoverable() {
    let pool = new_pool(4, 6, 0);
    let mut model = Model::default();
    let a = pool.create_sequence();
    model.seqs.insert(a, Vec::new());
    pool.append(a, 18, 0).unwrap(); // 5 pages
    let tags = model.tags(18);
    write(&pool, a, &tags).unwrap();
    model.seqs.insert(a, tags);
    check(&pool, &model, "filled");
    let before = testing::pool_snapshot(&pool);
    let b = pool.create_sequence();
    model.seqs.insert(b, Vec::new());
    let before_b = testing::pool_snapshot(&pool);
    assert!(matches!(pool.append(b, 5, 0), Err(Error::PoolExhausted(_))), "append of 2 pages into 1 free page");
    assert_eq!(testing::pool_snapshot(&pool), before_b);
    // Fork at a partial page needs one page: fits once, then not.
    let c = pool.fork(a, 6, 0).unwrap();
    model.seqs.insert(c, model.seqs[&a][..6].to_vec());
    check(&pool, &model, "after fork");
    let snap = testing::pool_snapshot(&pool);
    assert!(matches!(pool.fork(a, 7, 0), Err(Error::PoolExhausted(_))));
    assert!(matches!(pool.append(a, 3, 0), Err(Error::PoolExhausted(_))), "a needs a new page for its 19th..21st tokens");
    assert_eq!(testing::pool_snapshot(&pool), snap);
    // Page-aligned forks need nothing.
    let d = pool.fork(a, 8, 0).unwrap();
    model.seqs.insert(d, model.seqs[&a][..8].to_vec());
    // Releasing gives the room back and everything works again.
    pool.release(c).unwrap();
    model.seqs.remove(&c);
    pool.append(b, 3, 0).unwrap();
    let tags = model.tags(3);
    write(&pool, b, &tags).unwrap();
    model.seqs.insert(b, tags);
    check(&pool, &model, "after recovery");
    let _ = before;
    // Truncating into a shared page, then appending, copies the page (copy-on-write) -- and
    // needs a page for it.
    pool.release(b).unwrap();
    model.seqs.remove(&b);
    pool.truncate(d, 6).unwrap();
    model.seqs.get_mut(&d).unwrap().truncate(6);
    let cow_before = pool.stats().cow_page_copies;
    pool.append(d, 1, 0).unwrap();
    let tags = model.tags(1);
    write(&pool, d, &tags).unwrap();
    model.seqs.get_mut(&d).unwrap().extend(tags);
    assert_eq!(pool.stats().cow_page_copies, cow_before + 1);
    check(&pool, &model, "after copy-on-write");
}

#[test]
fn bad_input_changes_nothing() {
    let pool = new_pool(4, 16, 1);
    let a = pool.create_sequence();
    pool.append(a, 5, 0).unwrap();
    pool.release(a).unwrap();
    let b = pool.create_sequence();
    pool.append(b, 6, 0).unwrap();
    let before = testing::pool_snapshot(&pool);
    let msg = |e: Error| e.to_string();
    for (what, e) in [
        ("append to released", pool.append(a, 1, 0).map(drop)),
        ("append to unknown", pool.append(999, 1, 0).map(drop)),
        ("fork released", pool.fork(a, 0, 0).map(drop)),
        ("fork beyond length", pool.fork(b, 7, 0).map(drop)),
        ("truncate beyond length", pool.truncate(b, 7)),
        ("release released", pool.release(a)),
        // SAFETY: refused before any read (the test's point): the bogus address is never used.
        ("write more than stored", unsafe { pool.write_kv(0, &[(b, 7)], 8, 8, 16, 0) }),
        // SAFETY: refused before any read (the test's point): the bogus address is never used.
        ("write bad layer", unsafe { pool.write_kv(LAYERS, &[(b, 1)], 8, 8, 16, 0) }),
        // SAFETY: refused before any read (the test's point): the bogus address is never used.
        ("write short stride", unsafe { pool.write_kv(0, &[(b, 1)], 8, 8, 15, 0) }),
        // SAFETY: refused before any read (the test's point): the bogus address is never used.
        ("write null", unsafe { pool.write_kv(0, &[(b, 1)], 0, 0, 16, 0) }),
        ("plan unknown", pool.plan(&[(a, 0)], None, PlanOptions::default()).map(drop)),
        ("plan repeated", pool.plan(&[(b, 1), (b, 1)], None, PlanOptions::default()).map(drop)),
        ("plan more queries than tokens", pool.plan(&[(b, 7)], None, PlanOptions::default()).map(drop)),
        ("relayout unknown", pool.relayout(&[vec![a]], true, 0).map(drop)),
        ("relayout twice", pool.relayout(&[vec![b], vec![b]], true, 0).map(drop)),
        ("layout bad layer", pool.kv_layout(LAYERS).map(drop)),
    ] {
        let e = e.expect_err(what);
        assert!(matches!(e, Error::InvalidArgument(_)), "{what}: {e:?}");
        assert!(!msg(e.clone()).is_empty(), "{what}");
        assert_eq!(testing::pool_snapshot(&pool), before, "{what} changed the pool");
    }
    let e = pool.fork(b, 7, 0).unwrap_err().to_string();
    assert!(e.contains("prefix_len = 7") && e.contains("6 tokens"), "{e}");
    let e = pool.append(a, 1, 0).unwrap_err().to_string();
    assert!(e.contains(&format!("sequence id {a}")), "{e}");
    // Zero-sized pools are refused.
    for cfg in [config(4, 0, 0), config(0, 4, 0), PoolConfig { num_layers: 0, ..config(4, 4, 0) }] {
        assert!(matches!(KvPool::new(Arc::new(CpuBackend::new(1)), cfg), Err(Error::InvalidArgument(_))), "{cfg:?}");
    }
}

#[test]
fn content_hash_prefix_sharing() {
    let pool = new_pool(4, 32, 0);
    let mut model = Model::default();
    let a = pool.create_sequence();
    pool.append(a, 10, 0).unwrap();
    let tags = model.tags(10);
    write(&pool, a, &tags).unwrap();
    model.seqs.insert(a, tags.clone());
    pool.register_page_hashes(a, &[11, 22]).unwrap();
    assert!(pool.register_page_hashes(a, &[11, 22, 33]).is_err(), "only 2 full pages");
    let b = pool.create_sequence();
    // Same first two pages, different third.
    assert_eq!(pool.match_prefix(b, &[11, 22, 44]).unwrap(), 8);
    model.seqs.insert(b, tags[..8].to_vec());
    pool.append(b, 3, 0).unwrap();
    let more = model.tags(3);
    write(&pool, b, &more).unwrap();
    model.seqs.get_mut(&b).unwrap().extend(more);
    check(&pool, &model, "after match");
    let plan = pool.plan(&[(a, 1), (b, 1)], None, PlanOptions::default()).unwrap();
    assert_eq!(plan.batch.prefix_groups.len(), 1);
    assert_eq!(plan.batch.prefix_groups[0].prefix_len, 8);
    let st = pool.stats();
    assert_eq!(st.step_read_bytes_unshared - st.step_read_bytes_shared, 8 * config(4, 32, 0).token_bytes_all_layers());
    // Releasing the original keeps the shared pages alive for b, and its hashes.
    pool.release(a).unwrap();
    model.seqs.remove(&a);
    check(&pool, &model, "after releasing the original");
    let c = pool.create_sequence();
    assert_eq!(pool.match_prefix(c, &[11, 22]).unwrap(), 8);
    pool.release(b).unwrap();
    pool.release(c).unwrap();
    let d = pool.create_sequence();
    assert_eq!(pool.match_prefix(d, &[11]).unwrap(), 0, "hashes of freed pages are forgotten");
    // A hashed page that becomes partial by truncation may be rewritten: its hash is dropped.
    let e = pool.create_sequence();
    pool.append(e, 8, 0).unwrap();
    pool.register_page_hashes(e, &[55, 66]).unwrap();
    pool.truncate(e, 6).unwrap();
    let f = pool.create_sequence();
    assert_eq!(pool.match_prefix(f, &[55, 66]).unwrap(), 4, "only the still-full first page matches");
}

#[test]
fn decode_appends_stay_in_headroom_until_it_runs_out() {
    let ps = 4;
    let pool = new_pool(ps, 200, 2);
    let cpu = CpuBackend::new(1);
    // A shared prefix of 3 pages and 4 members with scattered suffixes.
    let root = pool.create_sequence();
    pool.append(root, 12, 0).unwrap();
    let mut members = Vec::new();
    let mut filler = Vec::new();
    for _ in 0..4 {
        let m = pool.fork(root, 12, 0).unwrap();
        let f = pool.create_sequence();
        pool.append(f, 4, 0).unwrap();
        filler.push(f);
        pool.append(m, 5, 0).unwrap();
        members.push(m);
    }
    pool.release(root).unwrap();
    for f in filler {
        pool.release(f).unwrap();
    }
    let reqs: Vec<(SeqId, u32)> = members.iter().map(|&m| (m, 1)).collect();
    let plan = pool.plan(&reqs, Some(&cpu.profile()), PlanOptions::default()).unwrap();
    assert_eq!(plan.batch.prefix_groups.len(), 1);
    assert_eq!(plan.batch.prefix_groups[0].prefix_len, 12);
    let groups = vec![members.clone()];
    let r = pool.relayout(&groups, true, 0).unwrap();
    assert_eq!((r.groups_rebuilt, r.groups_no_room), (1, 0));
    check_contiguous(&pool, &groups, "after relayout");
    // Run: prefix 3 pages once, then each member: 2 pages + 2 headroom.
    let snap = testing::pool_snapshot(&pool);
    let prefix: Vec<u32> = snap.seqs.iter().find(|s| s.0 == members[0]).unwrap().1[..3].to_vec();
    assert!(prefix.windows(2).all(|w| w[1] == w[0] + 1));
    // Another relayout without regroup and without overflow moves nothing.
    let again = pool.relayout(&groups, false, 0).unwrap();
    assert_eq!(again.pages_moved, 0);
    let again = pool.relayout(&groups, true, 0).unwrap();
    assert_eq!((again.pages_moved, again.groups_in_place), (0, 1), "an in-place group is not moved even on regroup");
    // Decode: 8 tokens per member stay within the last page's 3 free slots + 2 headroom pages.
    let moved_before = pool.stats().relayout_pages_moved;
    for _ in 0..8 {
        for &m in &members {
            pool.append(m, 1, 0).unwrap();
        }
        let r = pool.relayout(&groups, false, 0).unwrap();
        assert_eq!(r.pages_moved, 0, "appends inside the headroom need no relayout");
        check_contiguous(&pool, &groups, "decode inside headroom");
    }
    // 4 more each: 3 fit, the 4th needs a page beyond the headroom; members overflow, relayout rebuilds.
    for &m in &members {
        pool.append(m, 4, 0).unwrap();
    }
    let r = pool.relayout(&groups, false, 0).unwrap();
    assert_eq!(r.groups_rebuilt, 1);
    assert!(r.pages_moved > 0);
    check_contiguous(&pool, &groups, "after overflow relayout");
    assert_eq!(pool.stats().relayout_pages_moved, moved_before + r.pages_moved);
    assert_eq!(r.bytes_moved, r.pages_moved * config(ps, 200, 2).page_bytes_all_layers());
}

#[test]
fn threads_append_write_plan_and_relayout_on_one_pool() {
    let pool = Arc::new(new_pool(4, 3000, 1));
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let pool = pool.clone();
            s.spawn(move || {
                let mut r = rng(77 + t);
                let cpu = CpuBackend::new(1);
                let mut model = Model { next_tag: t * 1_000_000_000, ..Default::default() };
                for step in 0..150 {
                    match r.random_range(0..10) {
                        0..=1 => {
                            model.seqs.insert(pool.create_sequence(), Vec::new());
                        }
                        2..=5 => {
                            if let Some(&id) = model.seqs.keys().collect::<Vec<_>>().choose(&mut r) {
                                let id = *id;
                                let n = r.random_range(1..=6);
                                pool.append(id, n, 0).unwrap();
                                let tags = model.tags(n);
                                write(&pool, id, &tags).unwrap();
                                model.seqs.get_mut(&id).unwrap().extend(tags);
                            }
                        }
                        6 => {
                            if let Some(&id) = model.seqs.keys().collect::<Vec<_>>().choose(&mut r) {
                                let id = *id;
                                let at = r.random_range(0..=model.seqs[&id].len() as u32);
                                let child = pool.fork(id, at, 0).unwrap();
                                let tags = model.seqs[&id][..at as usize].to_vec();
                                model.seqs.insert(child, tags);
                            }
                        }
                        7 => {
                            if let Some(&id) = model.seqs.keys().collect::<Vec<_>>().choose(&mut r) {
                                let id = *id;
                                pool.release(id).unwrap();
                                model.seqs.remove(&id);
                            }
                        }
                        _ => {
                            let ids: Vec<SeqId> = model.seqs.keys().copied().collect();
                            let reqs: Vec<(SeqId, u32)> = ids.iter().map(|&id| (id, model.seqs[&id].len().min(1) as u32)).collect();
                            let plan = pool.plan(&reqs, Some(&cpu.profile()), PlanOptions::default()).unwrap();
                            for (i, &(id, _)) in reqs.iter().enumerate() {
                                assert_eq!(plan.batch.kv_len(i) as usize, model.seqs[&id].len());
                            }
                            let groups = groups_of_plan(&plan, &ids).unwrap();
                            pool.relayout(&groups, step % 3 == 0, 0).unwrap();
                        }
                    }
                    // This thread's sequences read back what it wrote, whatever the others did.
                    if step % 25 == 0 {
                        for (&id, tags) in &model.seqs {
                            for (i, &tag) in tags.iter().enumerate() {
                                let (k, _) = testing::read_token_host(&pool, id, 1, i as u32).unwrap();
                                let want: Vec<u8> = rows(&[tag], 1, false).iter().flat_map(|x| x.to_le_bytes()).collect();
                                assert_eq!(k, want, "thread {t} step {step}: token {i} of {id}");
                            }
                        }
                    }
                }
                for id in model.seqs.keys() {
                    pool.release(*id).unwrap();
                }
            });
        }
    });
    let st = pool.stats();
    assert_eq!((st.pages_free, st.num_sequences), (st.num_pages, 0), "leaked pages or sequences");
    let snap = testing::pool_snapshot(&pool);
    assert!(snap.refcount.iter().all(|&c| c == 0));
}

/// A plan made from the pool takes the sliding window from its options, as a kernel-level plan
/// does: decodes over a shared 12-key prefix plus their own keys, under a window of 3 keys,
/// read no key before their window (the prefix is then not shared: no member still sees key 0).
#[test]
fn pool_plans_take_the_sliding_window() {
    let pool = new_pool(4, 100, 2);
    let cpu = CpuBackend::new(1);
    let root = pool.create_sequence();
    pool.append(root, 12, 0).unwrap();
    let members: Vec<SeqId> = (0..3).map(|_| pool.fork(root, 12, 0).unwrap()).collect();
    for &m in &members {
        pool.append(m, 5, 0).unwrap();
    }
    let reqs: Vec<(SeqId, u32)> = members.iter().map(|&m| (m, 1)).collect();
    let plan = pool.plan(&reqs, Some(&cpu.profile()), PlanOptions { window_left: Some(3), ..PlanOptions::default() }).unwrap();
    assert_eq!(plan.options.window_left, Some(3));
    assert!(!plan.kv_chunks.is_empty());
    for c in &plan.kv_chunks {
        // Each decode sits at position 16 and sees keys 13..=16.
        assert_eq!((c.key_begin, c.key_end), (13, 17), "{c:?}");
    }
}

/// A pool of fp8 K/V: it takes rows of Q's dtype and stores one byte per element, each the
/// e4m3 code of x / scale with its layer's scale for its K or V head (nearest, ties to even,
/// saturated at ±448); its stats count those bytes (half those of a bf16 pool of the same shape,
/// which also fits twice the pages in the same bytes); its runs' scales point at the layer's
/// scales; wrong scales are refused by name.
#[test]
fn fp8_pool_stores_one_byte_per_element_with_its_scales() {
    use packinfer::fp8::f32_to_e4m3;
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new(1));
    let shape = |kv_dtype| Shape { dtype: DType::Bf16, kv_dtype, ..config(4, 64, 1).shape };
    let bf16 = PoolConfig { shape: shape(DType::Bf16), ..config(4, 64, 1) };
    let fp8 = PoolConfig { shape: shape(DType::Fp8E4m3), ..config(4, 64, 1) };
    assert_eq!(fp8.row_bytes() * 2, bf16.row_bytes());
    assert_eq!(fp8.pages_for_bytes(bf16.page_bytes_all_layers() * 10 + fp8.scale_bytes()), 20);
    // [layer][K, V][head]: distinct per head, layer and K/V, small enough that values saturate.
    let scales: Vec<f32> = (0..LAYERS * 2 * HEADS).map(|i| 0.5f32.powi(i as i32 + 3)).collect();
    let pools = [KvPool::new(cpu.clone(), bf16).unwrap(), KvPool::with_scales(cpu.clone(), fp8, &scales).unwrap()];
    let row = (HEADS * DIM) as usize;
    let x: Vec<half::bf16> = (0..6 * row).map(|i| half::bf16::from_f32((i as f32 - 20.0) * 0.37)).collect();
    let mut read = Vec::new();
    for pool in &pools {
        // a: pages 0, 1; c: page 2; b forks a's first page and takes pages 3, 4, so laying out
        // a's and b's group (prefix, a, headroom, b) has pages to move.
        let a = pool.create_sequence();
        pool.append(a, 6, 0).unwrap();
        for layer in 0..LAYERS {
            let p = x.as_ptr() as u64;
            // SAFETY: x holds 6 rows of HEADS × DIM bf16 on the host.
            unsafe { pool.write_kv(layer, &[(a, 6)], p, p, row as i64, 0) }.unwrap();
        }
        let c = pool.create_sequence();
        pool.append(c, 3, 0).unwrap();
        let b = pool.fork(a, 4, 0).unwrap();
        pool.append(b, 5, 0).unwrap();
        let plan = pool.plan(&[(a, 1), (b, 1), (c, 1)], None, PlanOptions::default()).unwrap();
        let groups = groups_of_plan(&plan, &[a, b, c]).unwrap();
        pool.relayout(&groups, true, 0).unwrap();
        let s = pool.stats();
        read.push((s.step_read_bytes_shared, s.step_read_bytes_unshared, s.relayout_bytes_moved, s.relayout_pages_moved));
        for layer in 0..LAYERS {
            let sc = pool.kv_scales(layer).unwrap();
            if pool.config().shape.kv_dtype == DType::Bf16 {
                assert_eq!(sc, packinfer::types::KvScales::NONE);
                continue;
            }
            let base = pool.memory().base();
            let head_scales = |addr: u64| {
                (0..HEADS as usize).map(move |h| {
                    // SAFETY: the pool's host memory holds the layer's scales at the address it gives.
                    unsafe { *(addr as *const f32).add(h) }
                })
            };
            assert!(sc.k_head_scales > base && sc.v_head_scales == sc.k_head_scales + 4 * HEADS as u64);
            let want = |v: bool| scales[((2 * layer + v as u32) * HEADS) as usize..][..HEADS as usize].to_vec();
            assert_eq!(head_scales(sc.k_head_scales).collect::<Vec<_>>(), want(false), "layer {layer} K");
            assert_eq!(head_scales(sc.v_head_scales).collect::<Vec<_>>(), want(true), "layer {layer} V");
            for t in 0..6 {
                let (k, v) = testing::read_token_host(pool, a, layer, t).unwrap();
                assert_eq!(k.len(), row, "one byte per element");
                for i in 0..row {
                    let src = x[t as usize * row + i].to_f32();
                    let (ks, vs) = (want(false)[i / DIM as usize], want(true)[i / DIM as usize]);
                    assert_eq!(k[i], f32_to_e4m3(src / ks), "layer {layer} token {t} K[{i}]");
                    assert_eq!(v[i], f32_to_e4m3(src / vs), "layer {layer} token {t} V[{i}]");
                }
            }
        }
    }
    let (b16, f8) = (read[0], read[1]);
    assert!(b16.0 > 0 && b16.2 > 0, "the step read and the relayout moved bytes: {b16:?}");
    assert_eq!((f8.0 * 2, f8.1 * 2, f8.2 * 2, f8.3), b16, "fp8 counts half the bytes of bf16, the same pages");
    // Saturation was exercised: some codes are ±448.
    let (k, _) = testing::read_token_host(&pools[1], 1, LAYERS - 1, 2).unwrap();
    assert!(k.iter().any(|&c| c & 0x7F == 0x7E), "no value saturated: {k:?}");
    // Wrong scales, by name.
    let bad = |config: PoolConfig, scales: &[f32], want: &str| {
        let e = KvPool::with_scales(cpu.clone(), config, scales).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains(want), "{e}");
    };
    bad(
        fp8,
        &scales[1..],
        "kv_head_scales has 7 entries; a pool of num_layers = 2 and num_kv_heads = 2 needs num_layers × 2 × num_kv_heads = 8",
    );
    let mut neg = scales.clone();
    neg[5] = -1.0;
    bad(fp8, &neg, "kv_head_scales[5] = -1 must be positive and finite");
    bad(bf16, &scales, "scales apply to an fp8_e4m3 pool only");
    let q_fp8 = PoolConfig { shape: Shape { dtype: DType::Fp8E4m3, ..fp8.shape }, ..fp8 };
    bad(q_fp8, &[], "dtype = fp8_e4m3, but Q and O are");
}

/// A relayout on one thread must not move pages that a run on another thread is reading. The
/// threads phase of the C++ stress test found this: thread B relays out its own sequence, whose
/// leading pages thread A's sequences matched (`match_prefix`) and A's plan reads; the relayout
/// copies them to a new run and frees their old places, and B's next append takes those pages
/// and writes other tokens into them. A plan made before the relayout is stale and refused, but
/// the run checked that only when it started, so a run already past its check read the other
/// tokens' K/V and returned OK.
///
/// Here A's run is long (a large prefix read by many queries on one thread, so a relayout and
/// an append fit in it many times over) and B starts its relayout a fifth of the way into it; an
/// attempt counts when B's relayout call started while A's run was running. The run must then
/// either be refused as stale or give the output of a fresh plan after the relayout (the same
/// keys, at their new places); a relayout that did not wait made it read some of the other
/// prompt's K/V instead (off by about 4e-3 here).
#[test]
fn a_relayout_waits_for_a_run_that_reads_the_pages_it_moves() {
    use packinfer::types::{RowsTensor, RunArgs};
    use std::sync::{Barrier, Mutex};
    use std::time::{Duration, Instant};

    const PS: u32 = 4;
    const PREFIX_PAGES: u32 = 192;
    const READERS: usize = 48;
    const QUERIES: u32 = 48;
    let qo = (HEADS * 2 * DIM) as usize;
    // Small values, so every key weighs in the softmax (the kv_pool model's `value` is large).
    let small = |tag: u64, layer: u32, v: bool, i: usize| value(tag, layer, v, i) / 65_521.0 - 0.5;
    let write_small = |pool: &KvPool, seq: SeqId, tags: &[u64]| {
        for layer in 0..LAYERS {
            let row = (HEADS * DIM) as usize;
            let k: Vec<f32> = tags.iter().flat_map(|&t| (0..row).map(move |i| small(t, layer, false, i))).collect();
            let v: Vec<f32> = tags.iter().flat_map(|&t| (0..row).map(move |i| small(t, layer, true, i))).collect();
            // SAFETY: k and v hold the tags' rows of HEADS × DIM f32 each, on the host.
            unsafe { pool.write_kv(layer, &[(seq, tags.len() as u32)], k.as_ptr() as u64, v.as_ptr() as u64, row as i64, 0) }.unwrap();
        }
    };
    let run = |bound: &dyn packinfer::backend::BoundPlan, pool: &KvPool, q: &[f32], o: &mut [f32]| -> Result<(), Error> {
        let rows = RowsTensor { ptr: 0, stride_token: qo as i64, stride_head: DIM as i64 };
        let args = RunArgs {
            q: RowsTensor { ptr: q.as_ptr() as u64, ..rows },
            kv: pool.kv_layout(0).unwrap(),
            o: RowsTensor { ptr: o.as_mut_ptr() as u64, ..rows },
            lse: 0,
            stream: 0,
            logits_soft_cap: 0.0,
            kv_scales: pool.kv_scales(0).unwrap(),
        };
        // SAFETY: q and o hold the plan's total_q rows of every query head, on the host; the
        // K/V are the pool's, which the plan was made from.
        unsafe { bound.run(&args) }
    };

    let mut overlapped = 0;
    for attempt in 0..20 {
        let backend: Arc<CpuBackend> = Arc::new(CpuBackend::new(1));
        let pool = KvPool::new(backend.clone(), config(PS, 4 * PREFIX_PAGES + READERS as u32 * 16 + 64, 0)).unwrap();
        let mut model = Model { next_tag: 1, ..Default::default() };
        // B's prompt P, its pages interleaved with a filler's, so a relayout moves every one of them.
        let (p, filler) = (pool.create_sequence(), pool.create_sequence());
        let mut p_tags = Vec::new();
        for _ in 0..PREFIX_PAGES {
            for id in [p, filler] {
                pool.append(id, PS, 0).unwrap();
                let tags = model.tags(PS);
                write_small(&pool, id, &tags);
                if id == p {
                    p_tags.extend(tags);
                }
            }
        }
        let hashes = chain_hashes(&p_tags, PS);
        pool.register_page_hashes(p, &hashes).unwrap();
        // A's requests: the same prompt, matched, then QUERIES tokens of their own.
        let mut reqs = Vec::new();
        for _ in 0..READERS {
            let id = pool.create_sequence();
            assert_eq!(pool.match_prefix(id, &hashes).unwrap(), PS * PREFIX_PAGES);
            pool.append(id, QUERIES, 0).unwrap();
            write_small(&pool, id, &model.tags(QUERIES));
            reqs.push((id, QUERIES));
        }
        let plan = pool.plan(&reqs, None, PlanOptions::default()).unwrap();
        let total_q = plan.batch.total_q() as usize;
        let mut r = rng(0x5eed + attempt);
        let q: Vec<f32> = (0..total_q * qo).map(|_| r.random_range(-1.0..1.0f32)).collect();
        let bound = backend.bind(Arc::new(plan), 0, None).unwrap();
        // How long a run takes here, so B can start in the middle of the next one.
        let mut o = vec![f32::NAN; total_q * qo];
        let t0 = Instant::now();
        run(&*bound, &pool, &q, &mut o).unwrap();
        let run_time = t0.elapsed();

        let go = Barrier::new(2);
        let times = Mutex::new((Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO));
        let epoch = Instant::now();
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                go.wait();
                std::thread::sleep(run_time / 5);
                let start = epoch.elapsed();
                let report = pool.relayout(&[vec![p]], true, 0).unwrap();
                let end = epoch.elapsed();
                assert_eq!(report.pages_moved, PREFIX_PAGES as u64, "attempt {attempt}: the relayout moves every page of P");
                // The pages P left are the lowest free ones: another prompt takes them and writes.
                let g = pool.create_sequence();
                pool.append(g, PS * PREFIX_PAGES, 0).unwrap();
                write_small(&pool, g, &(0..(PS * PREFIX_PAGES) as u64).map(|t| 1_000_000_007 + t).collect::<Vec<_>>());
                let mut t = times.lock().unwrap();
                (t.2, t.3) = (start, end);
            });
            go.wait();
            let start = epoch.elapsed();
            let result = run(&*bound, &pool, &q, &mut o);
            let end = epoch.elapsed();
            let mut t = times.lock().unwrap();
            (t.0, t.1) = (start, end);
            result
        });
        let (run_start, run_end, relayout_start, relayout_end) = *times.lock().unwrap();
        if relayout_start <= run_start || relayout_start >= run_end {
            continue; // B did not start while A's run was running: this attempt shows nothing
        }
        if let Err(e) = result {
            // Refused as stale: the relayout got in before the run's check.
            assert!(format!("{e}").contains("stale"), "attempt {attempt}: {e}");
            continue;
        }
        overlapped += 1;
        // The same step planned again after the relayout reads the keys at their new places.
        let fresh = pool.plan(&reqs, None, PlanOptions::default()).unwrap();
        let fresh = backend.bind(Arc::new(fresh), 0, None).unwrap();
        let mut want = vec![f32::NAN; total_q * qo];
        run(&*fresh, &pool, &q, &mut want).unwrap();
        let worst = o.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "attempt {attempt}: the run (from {run_start:?} to {run_end:?}) is off by up to {worst}: the relayout (from \
             {relayout_start:?} to {relayout_end:?}) moved the pages it read"
        );
        let err = run(&*bound, &pool, &q, &mut o).unwrap_err();
        assert!(format!("{err}").contains("stale"), "attempt {attempt}: after the relayout the plan is stale: {err}");
        if overlapped >= 3 {
            break;
        }
    }
    assert!(overlapped > 0, "no attempt started the relayout during the run; the test checked nothing");
}
