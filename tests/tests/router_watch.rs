//! The configuration file is watched: in-place writes, editors' write-then-rename, Kubernetes'
//! `..data` symlink swap, delete then re-create, and bursts of writes all end in one reload of
//! the final content; a missing file changes nothing.

use std::os::unix::fs::symlink;
use std::time::Duration;

use routerd::config::Flags;
use routerd_e2e::{eventually, fleet, get_json, shutdown_all, workers_toml, ConfigDir};

async fn generation(url: &str) -> u64 {
    get_json(&format!("{url}/admin/config")).await["generation"].as_u64().unwrap()
}

async fn listed(url: &str) -> usize {
    get_json(&format!("{url}/list_workers")).await["urls"].as_array().unwrap().len()
}

#[tokio::test]
async fn in_place_writes_renames_and_bursts() {
    let ws = fleet(3, |_| {}).await;
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let d = ConfigDir::new("watch-basic");
    d.write(&workers_toml("random", &urls[..1]));
    let r = d.start(&d.file, Flags::default()).await;
    let u = r.url();

    d.write(&workers_toml("random", &urls[..2]));
    eventually(Duration::from_secs(10), "in-place write applied", || async {
        listed(&u).await == 2
    })
    .await;
    assert_eq!(generation(&u).await, 2);

    // An editor writes a temporary file and renames it over the original.
    let tmp = d.dir.join(".routerd.toml.swp");
    std::fs::write(&tmp, workers_toml("random", &urls[..3])).unwrap();
    std::fs::rename(&tmp, &d.file).unwrap();
    eventually(Duration::from_secs(10), "rename applied", || async { listed(&u).await == 3 }).await;
    assert_eq!(generation(&u).await, 3);

    // A burst of writes settles into the final content.
    for i in 0..10 {
        d.write(&workers_toml("random", &urls[..1 + i % 3]));
    }
    d.write(&workers_toml("round_robin", &urls[..1]));
    eventually(Duration::from_secs(10), "burst applied", || async {
        get_json(&format!("{u}/admin/config")).await["config"]["policy"]["name"] == "round_robin"
    })
    .await;
    assert_eq!(listed(&u).await, 1);
    assert!(generation(&u).await <= 6, "a burst is debounced, not applied write by write");
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn delete_and_recreate_and_invalid_files() {
    let ws = fleet(2, |_| {}).await;
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let d = ConfigDir::new("watch-delete");
    d.write(&workers_toml("random", &urls[..1]));
    let r = d.start(&d.file, Flags::default()).await;
    let u = r.url();
    std::fs::remove_file(&d.file).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(listed(&u).await, 1, "a missing file changes nothing");
    assert_eq!(generation(&u).await, 1);

    d.write("[policy]\nname = \"nope\"\n");
    eventually(Duration::from_secs(10), "invalid file seen and rejected", || async {
        get_json(&format!("{u}/admin/config")).await["reloads"]["rejected"] == 1
    })
    .await;
    assert_eq!(listed(&u).await, 1, "the last good configuration keeps serving");

    d.write(&workers_toml("random", &urls));
    eventually(Duration::from_secs(10), "re-created file applied", || async {
        listed(&u).await == 2
    })
    .await;
    r.shutdown().await;
    shutdown_all(ws).await;
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap() {
    let ws = fleet(2, |_| {}).await;
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let d = ConfigDir::new("watch-k8s");
    // The layout kubelet makes: routerd.toml -> ..data/routerd.toml, ..data -> ..v1
    let v1 = d.dir.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("routerd.toml"), workers_toml("random", &urls[..1])).unwrap();
    symlink("..v1", d.dir.join("..data")).unwrap();
    let file = d.dir.join("mounted.toml");
    symlink("..data/routerd.toml", &file).unwrap();
    let r = d.start(&file, Flags::default()).await;
    let u = r.url();
    assert_eq!(listed(&u).await, 1);

    // An update: a new version directory, a new ..data link, renamed over the old one.
    let v2 = d.dir.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("routerd.toml"), workers_toml("random", &urls)).unwrap();
    symlink("..v2", d.dir.join("..data_tmp")).unwrap();
    std::fs::rename(d.dir.join("..data_tmp"), d.dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    eventually(Duration::from_secs(10), "symlink swap applied", || async { listed(&u).await == 2 })
        .await;
    assert_eq!(generation(&u).await, 2);
    r.shutdown().await;
    shutdown_all(ws).await;
}
