//! The real `kube-apiserver` and `etcd` the cluster tests run against
//! (tests/src/apiserver.rs), built from the Go modules pinned in
//! `tests/k8s-servers/go.mod` and `go.sum`, and cached under
//! [`dirs::k8s_servers_dir`] so that a second `cargo xtask setup` does
//! nothing.
//!
//! The build is reproducible: `-trimpath`, no VCS stamping, `CGO_ENABLED=0`
//! (static binaries, as upstream releases them), `-mod=readonly` (go.sum
//! must already hold every checksum, so nothing is resolved anew) and
//! `GOTOOLCHAIN=local` (the machine's Go; go.mod asks for 1.26, which the
//! machine has, so no toolchain is ever downloaded). `-ldflags=-s -w` drops
//! the symbol tables the tests never need, and the version variables
//! upstream's build sets are set from the pin, so `/version` and
//! `kubectl version` report the real release. The Go module and build
//! caches (about 4 GiB) live beside the binaries only while they build and
//! are removed once both binaries are in place: a shared CI disk ran out
//! of space in a later step with them kept, and a pin bump, the only thing
//! that rebuilds, is rare enough to download again.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, dirs};

/// The servers' Go module, relative to the workspace root.
const MODULE_DIR: &str = "tests/k8s-servers";
/// The module whose version names the cache directory.
const KUBERNETES: &str = "k8s.io/kubernetes";
/// The etcd server module; its root package is etcd's `main`.
const ETCD_SERVER: &str = "go.etcd.io/etcd/server/v3";

/// The binaries: (file name in the cache, Go package).
const BINARIES: &[(&str, &str)] = &[
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    ("etcd", ETCD_SERVER),
];

/// The version `go.mod` pins `module` at (`v1.37.2`).
pub fn pinned_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        // `require k8s.io/kubernetes v1.37.2` or, inside a block,
        // `k8s.io/kubernetes v1.37.2 // indirect`.
        let first = words.next()?;
        let name = if first == "require" {
            words.next()?
        } else {
            first
        };
        if name != module {
            return None;
        }
        words
            .next()
            .filter(|v| v.starts_with('v'))
            .map(str::to_owned)
    })
}

/// `-ldflags` for a pinned Kubernetes version: no symbol tables, and the
/// version variables of k8s.io/component-base/version that upstream's
/// `hack/lib/version.sh` sets (a build date of the epoch keeps it
/// reproducible).
pub fn ldflags(kubernetes: &str) -> Result<String> {
    let core = kubernetes.strip_prefix('v').unwrap_or(kubernetes);
    let mut parts = core.split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        bail!("{KUBERNETES} version {kubernetes:?} is not vMAJOR.MINOR.PATCH");
    };
    let var = "k8s.io/component-base/version";
    Ok(format!(
        "-s -w -X {var}.gitVersion={kubernetes} -X {var}.gitMajor={major} -X {var}.gitMinor={minor} \
         -X {var}.gitTreeState=clean -X {var}.buildDate=1970-01-01T00:00:00Z"
    ))
}

/// Builds the servers unless the cache already holds them for exactly
/// these pins, this Go and these flags.
pub fn servers() -> Result<()> {
    let module = dirs::workspace_root().join(MODULE_DIR);
    let go_mod_path = module.join("go.mod");
    let go_mod = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("reading {}", go_mod_path.display()))?;
    let go_sum_path = module.join("go.sum");
    let go_sum = fs::read_to_string(&go_sum_path)
        .with_context(|| format!("reading {}", go_sum_path.display()))?;
    let Some(kubernetes) = pinned_version(&go_mod, KUBERNETES) else {
        bail!("{} does not require {KUBERNETES}", go_mod_path.display());
    };
    let Some(etcd) = pinned_version(&go_mod, ETCD_SERVER) else {
        bail!("{} does not require {ETCD_SERVER}", go_mod_path.display());
    };
    let go_version = cmd::stdout(&mut cmd::new("go", ["version"])).context(
        "Go is needed to build the test kube-apiserver and etcd (the project's machine kind has it on PATH)",
    )?;
    let go_version = go_version.trim_end();
    let ldflags = ldflags(&kubernetes)?;

    let root = dirs::k8s_servers_dir()?;
    let dir = root.join(&kubernetes);
    let bin = dir.join("bin");
    let stamp_path = dir.join("stamp");
    // Everything the binaries depend on; any change rebuilds them.
    let stamp = format!(
        "{go_version}\nldflags: {ldflags}\ngoflags: {GOFLAGS}\n--- go.mod ---\n{go_mod}--- go.sum ---\n{go_sum}"
    );
    let built = BINARIES.iter().all(|(name, _)| bin.join(name).is_file());
    if built && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        println!(
            "setup: kube-apiserver {kubernetes} and etcd {etcd} present in {}",
            bin.display()
        );
        // A cache an earlier version of this step kept.
        return remove_go_caches(&root);
    }

    println!(
        "setup: building kube-apiserver {kubernetes} and etcd {etcd} from {MODULE_DIR} (a few minutes, once)"
    );
    let start = Instant::now();
    // Into a fresh directory, renamed into place only when every binary
    // built: an interrupted build never leaves a half-set behind.
    let staging = dir.join("bin.new");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the leftover {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    for (name, package) in BINARIES {
        cmd::run(
            go(&module, &root)
                .args(["build", "-ldflags", &ldflags, "-o"])
                .arg(staging.join(name))
                .arg(package),
        )?;
    }
    if bin.exists() {
        fs::remove_dir_all(&bin).with_context(|| format!("removing the old {}", bin.display()))?;
    }
    fs::rename(&staging, &bin)
        .with_context(|| format!("renaming {} to {}", staging.display(), bin.display()))?;
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    println!(
        "setup: built kube-apiserver {kubernetes} and etcd {etcd} in {:.0} s into {}",
        start.elapsed().as_secs_f64(),
        bin.display()
    );
    remove_go_caches(&root)
}

/// Removes the Go module and build caches under `root`, if any.
fn remove_go_caches(root: &Path) -> Result<()> {
    for name in ["gocache", "gomod"] {
        let dir = cache(root, name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| {
                format!("removing the Go cache {} the build left", dir.display())
            })?;
            println!("setup: removed the Go cache {}", dir.display());
        }
    }
    Ok(())
}

/// The flags every build uses (see the module docs).
const GOFLAGS: &str = "-trimpath -buildvcs=false -mod=readonly -modcacherw";

/// A `go` command in the servers' module with the cache and flags set.
/// `-modcacherw` leaves the module cache deletable by a plain `rm -r`.
fn go(module: &Path, root: &Path) -> std::process::Command {
    let mut go = cmd::new("go", std::iter::empty::<&str>());
    go.current_dir(module)
        .env("GOFLAGS", GOFLAGS)
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOMODCACHE", cache(root, "gomod"))
        .env("GOCACHE", cache(root, "gocache"));
    go
}

fn cache(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

#[cfg(test)]
mod tests {
    use super::{ldflags, pinned_version};

    const GO_MOD: &str = "module kmod-monitor.test/k8s-servers\n\ngo 1.26.0\n\n\
        tool (\n\tgo.etcd.io/etcd/server/v3\n\tk8s.io/kubernetes/cmd/kube-apiserver\n)\n\n\
        require (\n\tgo.etcd.io/etcd/server/v3 v3.7.0 // indirect\n\
        \tk8s.io/kubernetes v1.37.2 // indirect\n)\n\n\
        replace (\n\tk8s.io/api => k8s.io/api v0.37.2\n)\n";

    #[test]
    fn reads_the_pins_from_a_require_block() {
        assert_eq!(
            pinned_version(GO_MOD, "k8s.io/kubernetes").as_deref(),
            Some("v1.37.2")
        );
        assert_eq!(
            pinned_version(GO_MOD, "go.etcd.io/etcd/server/v3").as_deref(),
            Some("v3.7.0")
        );
        // A tool line names the package, not a version.
        assert_eq!(
            pinned_version(GO_MOD, "k8s.io/kubernetes/cmd/kube-apiserver"),
            None
        );
        // A replaced module's `=>` is not a version.
        assert_eq!(pinned_version(GO_MOD, "k8s.io/api"), None);
    }

    #[test]
    fn reads_a_single_line_require() {
        assert_eq!(
            pinned_version("require k8s.io/kubernetes v1.34.0\n", "k8s.io/kubernetes").as_deref(),
            Some("v1.34.0")
        );
    }

    #[test]
    fn ldflags_carry_the_version() {
        let flags = ldflags("v1.37.2").unwrap_or_default();
        assert!(flags.starts_with("-s -w "), "{flags}");
        assert!(flags.contains("version.gitVersion=v1.37.2"), "{flags}");
        assert!(flags.contains("version.gitMajor=1 "), "{flags}");
        assert!(flags.contains("version.gitMinor=37 "), "{flags}");
        assert!(ldflags("latest").is_err());
    }
}
