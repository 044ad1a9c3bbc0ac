//! The uevent source: netlink kobject uevents for `/module/<name>`. Still
//! event-driven, needs no BPF, but knows no actor and no failed loads.
//! Since Linux 5.3 the kernel sends a module's `add` only after its init
//! succeeded, and `remove` when it is freed.
//!
//! Only the kernel is believed: a message counts only when its sender's
//! netlink port id is 0 ([`from_kernel`]). A process with CAP_NET_ADMIN in
//! the daemon's network namespace can send to the uevent group too (udev's
//! rebroadcasts, or a forged `remove@/module/dm_crypt`), but always from a
//! non-zero port: the kernel stamps the sender's port and never gives 0 to
//! a userspace socket.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use netlink_sys::{
    AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket,
    protocols::NETLINK_KOBJECT_UEVENT,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{SourceMsg, StartError, Started};
use crate::{
    event::{Raw, SourceEvent, boot_ns_now},
    names::ModuleName,
};

/// Kernel uevents go to multicast group 1.
const KERNEL_GROUP: u32 = 1;

/// Receive buffer for bursts (a module storm sends two uevents per cycle).
const RCVBUF_BYTES: usize = 4 * 1024 * 1024;

/// Most messages one start-up sync reads from the socket.
const SYNC_MAX: usize = 4096;

/// A parsed module uevent.
#[derive(Debug, PartialEq, Eq)]
pub struct ModuleUevent {
    pub raw: Raw,
    pub module: ModuleName,
}

/// Whether a message from `sender` came from the kernel: only the kernel
/// sends from port id 0.
#[must_use]
pub fn from_kernel(sender: &SocketAddr) -> bool {
    sender.port_number() == 0
}

/// The module uevent in `msg` from `sender`, if the kernel sent it and it
/// is one ([`parse`]).
#[must_use]
pub fn accept(msg: &[u8], sender: &SocketAddr) -> Option<ModuleUevent> {
    if from_kernel(sender) {
        parse(msg)
    } else {
        None
    }
}

/// Parses one netlink message; `None` for anything that is not a module
/// add/remove (devices, udev's own re-broadcasts, other actions).
#[must_use]
pub fn parse(msg: &[u8]) -> Option<ModuleUevent> {
    let mut fields = msg.split(|&b| b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    // "add@/module/dm_crypt"; udev's messages start with "libudev".
    let (action, devpath) = header.split_once('@')?;
    let mut subsystem = None;
    for f in fields {
        if let Some(v) = f.strip_prefix(b"SUBSYSTEM=") {
            subsystem = Some(v);
        }
        // Written to /sys/module/<name>/uevent (Linux 4.13+ marks such a
        // synthetic event, `SYNTH_UUID=0` when no uuid was given): the
        // kernel sends it, but nothing was loaded or freed.
        if f.starts_with(b"SYNTH_UUID=") {
            return None;
        }
    }
    if subsystem != Some(b"module".as_slice()) {
        return None;
    }
    let name = devpath.strip_prefix("/module/")?;
    let module = ModuleName::from_kernel(name)?;
    let raw = match action {
        "add" => Raw::Present,
        "remove" => Raw::Absent,
        _ => return None,
    };
    Some(ModuleUevent { raw, module })
}

pub(crate) fn start(
    tx: mpsc::Sender<SourceMsg>,
    lost: Arc<AtomicU64>,
    cancel: CancellationToken,
) -> Result<Started, StartError> {
    let mut socket = TokioSocket::new(NETLINK_KOBJECT_UEVENT)
        .map_err(|e| StartError::new(format!("netlink kobject-uevent socket: {e}")))?;
    let mut details = Vec::new();
    if let Err(e) = socket.socket_mut().set_rx_buf_sz(RCVBUF_BYTES) {
        details.push(format!("could not enlarge the uevent receive buffer: {e}"));
    }
    socket
        .socket_mut()
        .bind(&SocketAddr::new(0, KERNEL_GROUP))
        .map_err(|e| StartError::new(format!("binding to kernel uevents: {e}")))?;
    details.push("listening for kernel module uevents (from the kernel only)".into());
    let (sync_tx, sync_rx) = mpsc::channel(1);
    tokio::spawn(read_loop(socket, tx, lost, sync_rx, cancel));
    Ok(Started {
        details,
        guard: None,
        control: None,
        sync: Some(sync_tx),
        ring: None,
    })
}

/// Reads uevents until cancelled. A sync request ([`super::RunningSource::sync`])
/// reads everything the socket holds now (the kernel queues uevents ahead
/// of this reader, as the ring does for eBPF) and then acknowledges, so the
/// start-up drain sees every uevent sent before the snapshot.
async fn read_loop(
    socket: TokioSocket,
    tx: mpsc::Sender<SourceMsg>,
    lost: Arc<AtomicU64>,
    mut sync: mpsc::Receiver<oneshot::Sender<()>>,
    cancel: CancellationToken,
) {
    let mut ignored: u64 = 0;
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            Some(ack) = sync.recv() => {
                // The socket is non-blocking (TokioSocket): read until it
                // says it would block, but never more than SYNC_MAX
                // messages, never into a full channel (the daemon, waiting
                // for this answer, is not draining it), and yielding now
                // and then, so a uevent storm can neither spin the one
                // runtime thread nor deadlock the daemon. What is left is
                // read by the loop as usual.
                for read in 0..SYNC_MAX {
                    if tx.capacity() == 0 || cancel.is_cancelled() {
                        break;
                    }
                    if read % 64 == 63 {
                        tokio::task::yield_now().await;
                    }
                    let r = socket.socket_ref().recv_from_full();
                    if matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                        break;
                    }
                    match classify(r, &lost, &mut ignored) {
                        Flow::Send(msg) => {
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                        Flow::Skip => {}
                        Flow::Stop => return,
                    }
                }
                let _ = ack.send(());
                continue;
            }
            r = socket.recv_from_full() => r,
        };
        match classify(received, &lost, &mut ignored) {
            Flow::Send(msg) => {
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Flow::Skip => {}
            Flow::Stop => return,
        }
    }
}

/// What to do with one receive.
enum Flow {
    Send(SourceMsg),
    Skip,
    Stop,
}

fn classify(
    received: std::io::Result<(Vec<u8>, SocketAddr)>,
    lost: &AtomicU64,
    ignored: &mut u64,
) -> Flow {
    match received {
        Ok((_, sender)) if !from_kernel(&sender) => {
            *ignored += 1;
            // Said once: a sender that repeats itself must not flood the
            // daemon's log either.
            if *ignored == 1 {
                tracing::warn!(
                    port = sender.port_number(),
                    groups = sender.multicast_groups(),
                    "uevent source: ignored a message from a userspace sender (only the kernel's uevents count; further ones are ignored silently)"
                );
            }
            Flow::Skip
        }
        Ok((buf, sender)) => match accept(&buf, &sender) {
            Some(ModuleUevent { raw, module }) => Flow::Send(SourceMsg::Event(
                SourceEvent::observed(raw, module, boot_ns_now()),
            )),
            None => Flow::Skip,
        },
        // ENOBUFS: the socket overflowed and uevents were dropped.
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
            let total = lost.fetch_add(1, Ordering::Relaxed) + 1;
            Flow::Send(SourceMsg::Lost { total })
        }
        Err(e) => {
            tracing::error!(error = %e, "uevent socket failed; uevent source stopped");
            Flow::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_module_add_and_remove() {
        let add = b"add@/module/nvme_tcp\0ACTION=add\0DEVPATH=/module/nvme_tcp\0SUBSYSTEM=module\0SEQNUM=2113\0";
        assert_eq!(
            parse(add),
            Some(ModuleUevent {
                raw: Raw::Present,
                module: ModuleName::from_kernel("nvme_tcp").unwrap()
            })
        );
        let rm = b"remove@/module/dm_crypt\0ACTION=remove\0DEVPATH=/module/dm_crypt\0SUBSYSTEM=module\0SEQNUM=2114\0";
        assert_eq!(parse(rm).map(|u| u.raw), Some(Raw::Absent));
        // `echo remove > /sys/module/dm_crypt/uevent`: the module stays.
        let synthetic = b"remove@/module/dm_crypt\0ACTION=remove\0DEVPATH=/module/dm_crypt\0SUBSYSTEM=module\0SYNTH_UUID=0\0SEQNUM=2115\0";
        assert_eq!(parse(synthetic), None);
    }

    #[test]
    fn only_the_kernel_is_believed() {
        let rm = b"remove@/module/dm_crypt\0ACTION=remove\0DEVPATH=/module/dm_crypt\0SUBSYSTEM=module\0SEQNUM=2114\0";
        let kernel = SocketAddr::new(0, KERNEL_GROUP);
        assert!(from_kernel(&kernel));
        assert_eq!(accept(rm, &kernel).map(|u| u.raw), Some(Raw::Absent));
        // The same bytes from a userspace socket: its port is its pid (or
        // another non-zero id the kernel picked), never 0.
        for port in [1, 4242, u32::MAX] {
            let forged = SocketAddr::new(port, KERNEL_GROUP);
            assert!(!from_kernel(&forged), "{port}");
            assert_eq!(accept(rm, &forged), None, "{port}");
        }
    }

    #[test]
    fn ignores_devices_and_other_actions() {
        let dev = b"add@/devices/virtual/misc/vfio\0ACTION=add\0DEVPATH=/devices/virtual/misc/vfio\0SUBSYSTEM=misc\0";
        assert_eq!(parse(dev), None);
        let bind = b"bind@/module/x\0ACTION=bind\0SUBSYSTEM=module\0";
        assert_eq!(parse(bind), None);
        assert_eq!(parse(b"libudev\0\xfe\xed"), None);
        assert_eq!(parse(b""), None);
    }
}
