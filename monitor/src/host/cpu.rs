//! The CPU feature SPDK needs, from /proc/cpuinfo: SSE4.2 on x86-64,
//! ASIMD (NEON) on arm64.
use serde::Serialize;

use super::{HostError, HostRoot, read_optional_text};

/// What /proc/cpuinfo says about the instruction set SPDK needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuFeature {
    /// `sse4_2` or `asimd`; `None` when the file names neither kind of
    /// flag line (another architecture, or an unreadable format).
    pub feature: Option<&'static str>,
    /// Whether every CPU listed has it.
    pub present: bool,
    /// `vendor_id` (x86: `GenuineIntel`, `AuthenticAMD`), for the IOMMU
    /// kernel parameter to suggest; `None` elsewhere.
    pub vendor: Option<String>,
}

/// Reads /proc/cpuinfo under the host root.
///
/// # Errors
/// [`HostError`] when the file exists but cannot be read.
pub fn read_cpu_feature(root: &HostRoot) -> Result<Option<CpuFeature>, HostError> {
    let path = root.root().join("proc/cpuinfo");
    Ok(read_optional_text(&path)?.map(|t| parse_cpuinfo(&t)))
}

/// x86 lists `flags : ... sse4_2 ...` per CPU, arm64 `Features : ... asimd
/// ...`. The feature counts as present only if every CPU has it.
#[must_use]
pub fn parse_cpuinfo(text: &str) -> CpuFeature {
    let mut feature = None;
    let mut all = true;
    let mut vendor = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() == "vendor_id" && vendor.is_none() {
            vendor = Some(value.trim().to_owned());
        }
        let wanted = match key.trim() {
            "flags" => "sse4_2",
            "Features" => "asimd",
            _ => continue,
        };
        feature = Some(wanted);
        all &= value.split_whitespace().any(|f| f == wanted);
    }
    CpuFeature {
        feature,
        present: feature.is_some() && all,
        vendor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_from_a_real_guest() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/host/fixtures/hugepages/none/proc/cpuinfo"
        ))
        .unwrap();
        let f = parse_cpuinfo(&text);
        assert_eq!(f.feature, Some("sse4_2"));
        assert!(f.present);
        assert_eq!(f.vendor.as_deref(), Some("AuthenticAMD"));
        let without = text.replace(" sse4_2", "");
        assert!(!parse_cpuinfo(&without).present);
    }

    #[test]
    fn arm64_and_other() {
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\nCPU implementer\t: 0x41\n";
        assert_eq!(
            parse_cpuinfo(arm),
            CpuFeature {
                feature: Some("asimd"),
                present: true,
                vendor: None,
            }
        );
        let one_cpu_lacks = format!("{arm}\nprocessor\t: 1\nFeatures\t: fp evtstrm\n");
        assert!(!parse_cpuinfo(&one_cpu_lacks).present);
        assert_eq!(parse_cpuinfo("processor : 0\ncpu : POWER9\n").feature, None);
    }
}
