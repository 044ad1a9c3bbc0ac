//! Makes cargo rebuild the eBPF object when bpf-linker changes.
//!
//! cargo does not track the linker, so a new bpf-linker (for a new LLVM)
//! would otherwise leave a stale object behind.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
