//! `scripts/tune-host.sh` against a fake `/proc/sys`: check, apply (idempotent), revert.

use std::path::Path;
use std::process::Command;

fn write(root: &Path, knob: &str, value: &str) {
    let p = root.join(knob.replace('.', "/"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, format!("{value}\n")).unwrap();
}

fn read(root: &Path, knob: &str) -> String {
    std::fs::read_to_string(root.join(knob.replace('.', "/")))
        .unwrap()
        .trim()
        .replace('\t', " ")
}

fn run(root: &Path, arg: &str) -> (i32, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tune-host.sh"))
        .arg(arg)
        .env("SYSCTL_ROOT", root)
        .env("TUNE_STATE", root.join("state/saved"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn check_apply_revert_on_a_fake_root() {
    let root = std::env::temp_dir().join(format!("tune-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let defaults = [
        ("fs.nr_open", "1048576"),
        ("fs.file-max", "9223372036854775807"),
        ("net.core.somaxconn", "4096"),
        ("net.ipv4.tcp_max_syn_backlog", "2048"),
        ("net.core.netdev_max_backlog", "1000"),
        ("net.ipv4.ip_local_port_range", "32768\t60999"),
        ("net.ipv4.tcp_mem", "287901\t383869\t575802"),
        ("net.ipv4.tcp_rmem", "4096\t131072\t33554432"),
        ("net.ipv4.tcp_wmem", "4096\t16384\t4194304"),
    ];
    for (k, v) in defaults {
        write(&root, k, v);
    }
    // conntrack absent: reported, not a failure.
    let (code, out) = run(&root, "--check");
    assert_eq!(code, 1, "short knobs make --check fail:\n{out}");
    assert!(out.contains("net.core.somaxconn") && out.contains("SHORT"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("fs.file-max") && l.trim_end().ends_with("ok")),
        "a huge file-max is fine:\n{out}"
    );
    assert!(out.contains("nf_conntrack_max") && out.contains("absent"));

    let (code, out) = run(&root, "--apply");
    assert_eq!(code, 0, "{out}");
    assert_eq!(read(&root, "net.core.somaxconn"), "65535");
    assert_eq!(read(&root, "net.ipv4.ip_local_port_range"), "1024 65535");
    assert_eq!(
        read(&root, "fs.file-max"),
        "9223372036854775807",
        "not lowered"
    );
    assert_eq!(
        read(&root, "net.ipv4.tcp_wmem"),
        "4096 16384 4194304",
        "already ok: untouched"
    );
    assert_eq!(run(&root, "--check").0, 0);

    // A second apply keeps the first saved values (idempotent).
    assert_eq!(run(&root, "--apply").0, 0);
    let (code, out) = run(&root, "--revert");
    assert_eq!(code, 0, "{out}");
    for (k, v) in defaults {
        assert_eq!(read(&root, k), v.replace('\t', " "), "{k} restored");
    }
    assert_eq!(run(&root, "--check").0, 1);
    assert!(run(&root, "--revert").1.contains("nothing to revert"));
    std::fs::remove_dir_all(&root).unwrap();
}
