use proptest::prelude::*;

use super::*;

fn best(tree: &Tree, text: &str) -> Vec<(Tenant, usize)> {
    let mut m = tree.prefix_match(text);
    m.sort();
    m
}

#[test]
fn shared_prefixes_per_tenant() {
    let mut t = Tree::new(usize::MAX);
    t.insert("system prompt: question one", 0);
    t.insert("system prompt: question two", 1);
    t.check_invariants();
    assert_eq!(best(&t, "system prompt: question one!"), vec![(0, 27), (1, 24)]);
    assert_eq!(best(&t, "system"), vec![(0, 6), (1, 6)]);
    assert_eq!(best(&t, "other"), vec![]);
    assert_eq!(t.tenant_chars(0), 27);
    assert_eq!(t.tenant_chars(1), 27);
    assert_eq!(t.stats().chars, 24 + 3 + 3);
}

#[test]
fn unicode_splits_on_char_boundaries() {
    let mut t = Tree::new(usize::MAX);
    t.insert("héllo wörld", 0);
    t.insert("héllo wèrld", 1);
    t.insert("日本語のテキスト", 2);
    t.insert("日本人", 2);
    t.check_invariants();
    assert_eq!(best(&t, "héllo wö"), vec![(0, 8), (1, 7)]);
    assert_eq!(best(&t, "日本語"), vec![(2, 3)]);
}

#[test]
fn eviction_keeps_the_budget_and_drops_the_least_recent() {
    let mut t = Tree::new(20);
    t.insert("aaaaaaaaaa", 0);
    t.insert("bbbbbbbbbb", 1);
    t.insert("aaaaaaaaaa", 0); // refresh a
    t.insert("cccccccccc", 2);
    t.check_invariants();
    assert_eq!(t.stats().chars, 20);
    assert_eq!(best(&t, "bbbbbbbbbb"), vec![], "b was least recently used");
    assert_eq!(best(&t, "aaaaaaaaaa"), vec![(0, 10)]);
    assert_eq!(t.stats().evicted_chars, 10);
}

#[test]
fn removing_a_tenant_purges_only_its_entries() {
    let mut t = Tree::new(usize::MAX);
    t.insert("shared prefix / a", 0);
    t.insert("shared prefix / b", 1);
    t.insert("only zero", 0);
    t.remove_tenant(0);
    t.check_invariants();
    assert_eq!(best(&t, "shared prefix / a"), vec![(1, 16)]);
    assert_eq!(best(&t, "only zero"), vec![]);
    assert_eq!(t.tenant_chars(0), 0);
    assert_eq!(t.stats().chars, 17);
}

fn ops() -> impl Strategy<Value = Vec<(String, Tenant)>> {
    prop::collection::vec(("[ab日]{0,12}", 0u16..4), 1..60)
}

proptest! {
    #[test]
    fn insert_then_match_covers_the_text(ops in ops()) {
        let mut t = Tree::new(usize::MAX);
        for (text, tenant) in &ops {
            t.insert(text, *tenant);
            let got = t.prefix_match(text).into_iter().find(|(x, _)| x == tenant).map(|(_, n)| n).unwrap_or(0);
            prop_assert_eq!(got, text.chars().count());
        }
        t.check_invariants();
    }

    #[test]
    fn bounded_at_every_step(ops in ops(), budget in 1usize..40) {
        let mut t = Tree::new(budget);
        for (text, tenant) in &ops {
            t.insert(text, *tenant);
            t.check_invariants();
            let n = text.chars().count();
            if n <= budget {
                let got = t.prefix_match(text).into_iter().find(|(x, _)| x == tenant).map(|(_, m)| m).unwrap_or(0);
                prop_assert_eq!(got, n, "the newest entry survives its own eviction");
            }
        }
    }

    #[test]
    fn matches_agree_with_a_naive_model(ops in ops(), probe in "[ab日]{0,12}") {
        let mut t = Tree::new(usize::MAX);
        for (text, tenant) in &ops {
            t.insert(text, *tenant);
        }
        for tenant in 0u16..4 {
            let want = ops.iter().filter(|(_, x)| *x == tenant)
                .map(|(s, _)| s.chars().zip(probe.chars()).take_while(|(a, b)| a == b).count())
                .max().unwrap_or(0);
            let got = t.prefix_match(&probe).into_iter().find(|(x, _)| *x == tenant).map(|(_, n)| n).unwrap_or(0);
            prop_assert_eq!(got, want, "tenant {}", tenant);
        }
    }

    #[test]
    fn arbitrary_unicode_and_tenant_removal(ops in prop::collection::vec(("\\PC{0,16}", 0u16..3), 1..40), gone in 0u16..3) {
        let mut t = Tree::new(usize::MAX);
        for (text, tenant) in &ops {
            t.insert(text, *tenant);
        }
        t.remove_tenant(gone);
        t.check_invariants();
        prop_assert!(t.prefix_match(&ops[0].0).iter().all(|(x, _)| *x != gone));
    }
}

#[test]
fn concurrent_use_through_a_mutex() {
    let tree = std::sync::Arc::new(std::sync::Mutex::new(Tree::new(5_000)));
    let handles: Vec<_> = (0..4u16)
        .map(|w| {
            let tree = tree.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    let text = format!("group {} question {i}", i % 7);
                    let mut g = tree.lock().unwrap();
                    let _ = g.prefix_match(&text);
                    g.insert(&text, w);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = tree.lock().unwrap();
    t.check_invariants();
    assert!(t.stats().chars <= 5_000);
}
